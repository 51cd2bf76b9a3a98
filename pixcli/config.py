"""Configuration: nested dataclasses, filled from a TOML file and command-line overrides.

Each stage has one dataclass (in ``stages/``) whose fields are plain values or nested
dataclasses. ``load_config`` builds it from defaults, then the TOML file, then overrides
given as dotted keys (``{"train.lr": 0.01}``). Unknown keys and ill-typed values are user
errors naming the key. ``to_dict`` gives the resolved configuration for ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pixcli.errors import UserError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """The configuration as plain data (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_config(
    cls: type[T],
    file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: T | None = None,
) -> T:
    """``cls`` (or ``base``) updated by the TOML ``file`` and then by dotted ``overrides``.

    ``None`` values in ``overrides`` mean "not given on the command line" and are skipped.
    """
    data = to_dict(base if base is not None else cls())
    if file is not None:
        if not file.is_file():
            raise UserError(f"{file}: config file not found")
        try:
            loaded = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{file}: not valid TOML ({exc})") from None
        _merge(data, loaded, str(file))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _merge(data, _nest(key.split("."), _plain(value)), "command line")
    return _build(cls, data, "")


def _nest(keys: list[str], value: Any) -> dict:
    return {keys[0]: _nest(keys[1:], value) if len(keys) > 1 else value}


def _merge(into: dict, new: dict, source: str, prefix: str = "") -> None:
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key not in into:
            known = ", ".join(sorted(into))
            raise UserError(f"{source}: unknown setting '{name}' (known here: {known})")
        if isinstance(into[key], dict) and isinstance(value, dict):
            _merge(into[key], value, source, f"{name}.")
        elif isinstance(into[key], dict) and into[key] and not isinstance(value, dict):
            raise UserError(f"{source}: '{name}' is a section, not a value")
        else:
            into[key] = value


def _build(cls: type[T], data: dict, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in data:
            kwargs[field.name] = _coerce(hints[field.name], data[field.name], prefix + field.name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"setting '{name}' must be a section")
        return _build(hint, value, name + ".")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"setting '{name}': bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"setting '{name}' must be a list, got {value!r}")
        items = args if args and args[-1] is not Ellipsis else [args[0]] * len(value)
        if len(items) != len(value):
            raise UserError(f"setting '{name}' needs {len(items)} values, got {len(value)}")
        return tuple(_coerce(a, v, name) for a, v in zip(items, value, strict=True))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"setting '{name}' must be a list, got {value!r}")
        return [_coerce(args[0], v, name) for v in value] if args else list(value)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"setting '{name}' must be one of {list(args)}, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise UserError(f"setting '{name}' must be true or false, got {value!r}")
    if hint in (int, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise UserError(f"setting '{name}' must be {hint.__name__}, got {value!r}")
    return value


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as TOML values, else taken as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.01")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()
    return out
