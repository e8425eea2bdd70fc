"""serve's settings from flags, DIFFUSERVE_* variables and a TOML file, in that order of precedence; bad settings
fail at start-up naming the setting; --help documents each."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffuserve.server.cli import build_parser, main, subcommand
from diffuserve.server.settings import SettingsError, check_ranges, settable, with_settings


@pytest.fixture
def serve_parser():
    return subcommand(build_parser(), "serve")


def test_the_environment_sets_what_flags_leave_unset(serve_parser):
    environ = {"DIFFUSERVE_QUEUE_CAPACITY": "3", "DIFFUSERVE_NO_BATCHING": "true", "DIFFUSERVE_MODELS": "a b"}
    args = with_settings(serve_parser, [], environ)
    assert (args.queue_capacity, args.no_batching, args.models) == (3, True, ["a", "b"])
    args = with_settings(subcommand(build_parser(), "serve"), ["m", "--queue-capacity", "9"], environ)
    assert (args.queue_capacity, args.models) == (9, ["m"])


def test_a_toml_file_holds_many_models_and_settings_below_the_environment(serve_parser, tmp_path: Path):
    config = tmp_path / "diffuserve.toml"
    config.write_text('[serve]\nmodels = ["/m/sd15", "/m/sdxl"]\nport = 6000\nmax-batch-wait-ms = 5.5\n')
    args = with_settings(serve_parser, ["--config", str(config)], {"DIFFUSERVE_PORT": "7000"})
    assert args.models == ["/m/sd15", "/m/sdxl"] and args.port == 7000 and args.max_batch_wait_ms == 5.5
    args = with_settings(subcommand(build_parser(), "serve"), [], {"DIFFUSERVE_CONFIG": str(config)})
    assert args.port == 6000


@pytest.mark.parametrize(
    ("environ", "toml", "message"),
    [
        ({"DIFFUSERVE_PORT": "http"}, "", "DIFFUSERVE_PORT: 'http' is not a valid int"),
        ({"DIFFUSERVE_NO_BATCHING": "maybe"}, "", "DIFFUSERVE_NO_BATCHING: expected true or false"),
        ({"DIFFUSERVE_BACKEND": "tpu"}, "", "DIFFUSERVE_BACKEND: 'tpu' is not one of"),
        ({}, "queue_capacity = 'many'\n", "queue_capacity: 'many' is not a valid int"),
        ({}, "queue_size = 4\n", "unknown setting 'queue_size'; settings are: "),
        ({}, "port = [1, 2]\n", "port: expected a single value"),
        ({}, "port = \n", "is not valid TOML"),
    ],
)
def test_bad_settings_fail_naming_the_setting(serve_parser, tmp_path: Path, environ, toml, message):
    argv = []
    if toml:
        (tmp_path / "c.toml").write_text(toml)
        argv = ["--config", str(tmp_path / "c.toml")]
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        with_settings(serve_parser, argv, environ)


def test_out_of_range_numbers_are_refused_by_flag_name(serve_parser):
    with pytest.raises(SettingsError, match="--port: must be 0..65535, got 70000"):
        check_ranges(with_settings(serve_parser, ["--port", "70000"], {}))
    with pytest.raises(SettingsError, match="--queue-capacity: must be >= 1, got 0"):
        check_ranges(with_settings(subcommand(build_parser(), "serve"), [], {"DIFFUSERVE_QUEUE_CAPACITY": "0"}))


def test_serve_fails_at_start_up_on_a_bad_setting(monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSERVE_GRACE", "soon")
    assert main(["serve"]) == 2
    assert "serve: DIFFUSERVE_GRACE: 'soon' is not a valid float" in capsys.readouterr().err


def test_help_documents_every_setting_and_the_other_spellings(serve_parser, capsys):
    undocumented = [a.option_strings or a.dest for a in settable(serve_parser).values() if not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DIFFUSERVE_QUEUE_CAPACITY=8" in text and "TOML" in text and "--metrics-port" in text
