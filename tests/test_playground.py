"""The playground in a real browser: Debian's chromium, headless, driven by playwright, on the real gateway in front of
a real gRPC server with the tiny model. Skipped without chromium or playwright, unless DIFFUSERVE_REQUIRE_BROWSER=1
(CI) makes that a failure. A failing test leaves a screenshot of the page in test-artifacts/ and names it."""

from __future__ import annotations

import functools
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from diffuserve.server.client import connection
from diffuserve.server.gateway.app import GatewayConfig, GatewayServer
from diffuserve.server.models import ServedModel

from .serving_helpers import LONG, serving, wait_idle

CHROMIUM = Path(os.environ.get("DIFFUSERVE_CHROMIUM", "/usr/bin/chromium"))
REQUIRED = os.environ.get("DIFFUSERVE_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Playwright's waits, in milliseconds: the tiny model answers a few steps in well under a second.
WAIT_MS = 30_000


def browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (the dev extra: pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = browser_missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"DIFFUSERVE_REQUIRE_BROWSER=1, but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        # Never a browser of playwright's own download: the system's chromium; no sandbox as root in containers.
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(tiny_model: ServedModel, browser):
    """A server of this module's own, so its worker's step count is this module's."""
    with serving(tiny_model) as (server, _, _):
        with GatewayServer(GatewayConfig(connection(server.address), "127.0.0.1", 0)) as gateway:
            yield server, gateway


@pytest.fixture
def page(browser, served):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(served[1].url)
    expect(page.locator("#status")).to_have_text("Ready.")
    yield page
    context.close()


@contextmanager
def screenshot_on_error(page, name: str):
    """A failure inside leaves the page as a PNG in test-artifacts/, its path in the failure."""
    try:
        yield
    except Exception as error:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        raise AssertionError(f"{error}\nscreenshot of the page: {path}") from error


def screenshot_on_failure(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        with screenshot_on_error(kwargs["page"], test.__name__):
            return test(*args, **kwargs)

    return run


def status(page):
    return page.locator("#status")


def generate(page, expect_done: str) -> None:
    from playwright.sync_api import expect

    page.get_by_role("button", name="Generate").click()
    expect(status(page)).to_have_text(re.compile(expect_done))


def record_statuses(page) -> None:
    """Keeps every text the status line shows: a short run passes its steps faster than a poll could see."""
    page.evaluate(
        """() => {
            window.statuses = [];
            const line = document.getElementById("status");
            new MutationObserver(() => window.statuses.push(line.textContent))
                .observe(line, {childList: true, characterData: true, subtree: true});
        }"""
    )


@screenshot_on_failure
def test_generate_shows_progress_latent_previews_and_the_image(page) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps", exact=True).fill("6")
    page.get_by_label("Sampler").select_option("euler")  # one U-Net call a step: one progress event each
    record_statuses(page)
    generate(page, r"^done: run 1 in [\d.]+ s, seed \d+$")
    statuses = page.evaluate("window.statuses")
    assert [s for s in statuses if s.startswith("step")] == [f"step {n}/6" for n in range(1, 7)], statuses
    assert page.get_by_role("progressbar", name="Progress").evaluate("bar => [bar.value, bar.max]") == [6, 6]
    expect(page.get_by_role("img", name="Latent preview")).to_have_attribute("src", re.compile("^data:image/png;"))
    expect(page.get_by_role("img", name="Result")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    expect(page.get_by_role("img", name="Run 1", exact=True)).to_be_visible()
    expect(page.locator("#history li")).to_have_count(1)


@screenshot_on_failure
def test_a_rerun_with_other_steps_compares_side_by_side_with_the_difference_highlighted(page) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Prompt", exact=True).fill("a blue square")
    page.get_by_label("Seed", exact=True).fill("42")
    expect(page.get_by_label("Lock seed")).to_be_checked()  # a seed typed by hand stays
    page.get_by_label("Steps", exact=True).fill("3")
    generate(page, "^done: run 1 ")
    page.get_by_label("Steps", exact=True).fill("5")
    generate(page, "^done: run 2 ")
    page.get_by_label("Compare run 1").check()
    page.get_by_label("Compare run 2").check()

    compare = page.get_by_role("region", name="Side by side")
    expect(compare).to_be_visible()
    expect(compare.get_by_role("img", name=re.compile("side by side"))).to_have_count(2)
    expect(compare.locator("tbody tr.differs")).to_have_count(1)
    steps = compare.locator("tr[data-setting=steps]")
    expect(steps).to_have_class("differs")
    expect(steps.get_by_role("rowheader")).to_have_text("steps (differs)")
    expect(steps.get_by_role("cell")).to_have_text(["3", "5"])
    for plain in ("seed", "prompt", "guidance_scale", "scheduler", "size", "model"):
        expect(compare.locator(f"tr[data-setting={plain}]")).not_to_have_class("differs")
    expect(compare.locator("tr[data-setting=seed] td")).to_have_text(["42", "42"])

    # Keep the steps, change the seed: unlocked, every run draws a new one.
    page.get_by_label("Lock seed").uncheck()
    generate(page, "^done: run 3 ")
    assert page.get_by_label("Seed", exact=True).input_value() != "42"
    page.get_by_label("Compare run 3").check()  # the third tick drops the oldest, run 1
    expect(page.get_by_label("Compare run 1")).not_to_be_checked()
    expect(compare.locator("thead th")).to_have_text(["Setting", "Run 2", "Run 3"])
    expect(compare.locator("tbody tr.differs")).to_have_attribute("data-setting", "seed")


@screenshot_on_failure
def test_cancel_mid_run_says_cancelled_and_the_servers_job_stops(page, served) -> None:
    from playwright.sync_api import expect

    server = served[0]
    wait_idle(server)
    before = server.running.worker.steps_run
    page.get_by_label("Prompt", exact=True).fill("a long one")
    page.get_by_label("Steps", exact=True).fill(str(LONG))
    page.get_by_role("button", name="Generate").click()
    expect(status(page)).to_have_text(re.compile(rf"^step \d+/{LONG}$"))
    page.get_by_role("button", name="Cancel").click()
    expect(status(page)).to_have_text("cancelled")
    wait_idle(server)
    ran = server.running.worker.steps_run - before
    assert ran < LONG // 2, f"the server ran {ran} of {LONG} steps for a cancelled run"
    expect(page.locator("#history li")).to_have_count(0)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()


@screenshot_on_failure
def test_a_grid_of_steps_and_seeds_fills_a_titled_table(page) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Prompt", exact=True).fill("a green triangle")
    page.get_by_label("Steps list").fill("2, 3")
    page.get_by_label("Seeds list").fill("1,2")
    page.get_by_role("button", name="Run grid").click()
    expect(page.locator("#grid-status")).to_have_text("grid: 4/4 done")
    grid = page.locator("#grid table")
    expect(grid.get_by_role("columnheader")).to_have_text(["seed \\ steps", "steps 2", "steps 3"])
    expect(grid.get_by_role("rowheader")).to_have_text(["seed 1", "seed 2"])
    for steps in (2, 3):
        for seed in (1, 2):
            expect(grid.get_by_role("img", name=f"steps {steps}, seed {seed}")).to_be_visible()
    expect(grid.locator("caption")).to_contain_text("fixed: model tiny-sd, prompt “a green triangle”")


@screenshot_on_failure
def test_a_setting_the_server_refuses_is_shown_naming_the_field(page) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Guidance").fill("99")
    generate(page, "^failed$")
    expect(page.get_by_role("alert")).to_contain_text("INVALID_ARGUMENT: guidance_scale: must be")
    expect(page.get_by_label("Guidance")).to_have_attribute("aria-invalid", "true")
    page.get_by_label("Guidance").fill("2")
    generate(page, "^done: run 1 ")
    expect(page.get_by_role("alert")).to_be_hidden()


def test_a_server_with_tokens_is_used_once_the_token_is_typed_in(tiny_model: ServedModel, browser) -> None:
    """The page has no access of its own: the server's UNAUTHENTICATED shows until the token is entered, which the
    gateway forwards as the caller's bearer token."""
    from playwright.sync_api import expect

    from diffuserve.server.app import BackgroundServer, ServerConfig

    token = "playground-token-0123456789"
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0, auth_tokens=(token,))
    with BackgroundServer(config, {tiny_model.name: tiny_model}) as server:
        with GatewayServer(GatewayConfig(connection(server.address), "127.0.0.1", 0)) as gateway:
            context = browser.new_context()
            context.set_default_timeout(WAIT_MS)
            page = context.new_page()
            try:
                with screenshot_on_error(page, "test_a_server_with_tokens"):
                    page.goto(gateway.url)
                    expect(status(page)).to_have_text("could not load the models")
                    expect(page.locator("#error")).to_contain_text("authorization")
                    page.get_by_label("Access token").fill(token)
                    page.get_by_label("Access token").dispatch_event("change")
                    expect(status(page)).to_have_text("Ready.")
                    expect(page.locator("#error")).to_be_hidden()
                    page.get_by_label("Prompt", exact=True).fill("a red circle")
                    page.get_by_label("Steps", exact=True).fill("2")
                    generate(page, "done: run 1")
            finally:
                context.close()
