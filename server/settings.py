"""`diffuserve serve`'s settings from three places: flags, then DIFFUSERVE_* environment variables, then a TOML file
(`--config`), then the defaults. Every setting has all three spellings: `--queue-capacity 8`,
`DIFFUSERVE_QUEUE_CAPACITY=8`, `queue_capacity = 8` (or `queue-capacity`). A value that does not parse fails at
start-up naming where it came from."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6's Python 3.10: the same parser, from PyPI
    import tomli as tomllib

ENV_PREFIX = "DIFFUSERVE_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")
# The TOML key listing the model folders (the positional MODEL arguments).
MODELS_KEY = "models"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the setting and where it came from."""


def settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's settings by dest: its options (not help) and its positional model folders."""
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from the environment (a string) or TOML (typed) as the flag would have parsed it."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in TRUE + FALSE:
            raise SettingsError(f"{where}: expected true or false, got {value!r}")
        return text in TRUE
    if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [v for v in str(value).replace(",", " ").split() if v]
        return [convert_one(action, item, where) for item in items]
    return convert_one(action, value, where)


def convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, dict | list):
        raise SettingsError(f"{where}: expected a single value, got {value!r}")
    parse = action.type or str
    try:
        result = parse(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        kind = getattr(parse, "__name__", "value")
        raise SettingsError(f"{where}: {value!r} is not a valid {kind} ({error})") from None
    if action.choices is not None and result not in action.choices:
        raise SettingsError(f"{where}: {result!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def environment_settings(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> dict[str, Any]:
    actions = settable(parser)
    return {
        dest: convert(action, environ[env_name(dest)], env_name(dest))
        for dest, action in actions.items()
        if env_name(dest) in environ
    }


def file_settings(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        table = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise SettingsError(f"--config: cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"--config: {path} is not valid TOML: {error}") from None
    table = table.get("serve", table)
    actions = settable(parser)
    values = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest == "config":
            known = ", ".join(sorted(d for d in actions if d not in ("config", "func")))
            raise SettingsError(f"{path}: unknown setting {key!r}; settings are: {known}")
        values[dest] = convert(actions[dest], value, f"{path}: {key}")
    return values


def with_settings(
    parser: argparse.ArgumentParser, argv: list[str], environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Parses argv with the TOML file's and the environment's values as defaults (flags win over both)."""
    environ = os.environ if environ is None else environ
    first, _ = parser.parse_known_args(argv)
    config = getattr(first, "config", None) or environ.get(env_name("config"))
    defaults = file_settings(parser, config) if config else {}
    defaults.update(environment_settings(parser, environ))
    models = defaults.pop(MODELS_KEY, None)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if models and not args.models:  # a positional's default is not used by argparse for nargs="*"
        args.models = models
    return args


def check_ranges(args: argparse.Namespace) -> None:
    """Numeric settings outside what they can mean, named by their flag."""
    bounds = {
        "port": (0, 65535),
        "metrics_port": (0, 65535),
        "http_port": (0, 65535),
        "queue_capacity": (1, None),
        "max_steps": (1, None),
        "max_images": (1, None),
        "grace": (0, None),
        "max_batch_wait_ms": (0, None),
        "threads": (1, None),
        "longest_request_s": (1, None),
    }
    for dest, (low, high) in bounds.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            allowed = f"{low}..{high}" if high is not None else f">= {low}"
            raise SettingsError(f"--{dest.replace('_', '-')}: must be {allowed}, got {value}")
