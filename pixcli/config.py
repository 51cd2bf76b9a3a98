"""Configuration: nested dataclasses, filled from a TOML file and command-line overrides.

Each stage has one dataclass (in ``stages/``) whose fields are plain values or nested
dataclasses. ``load_config`` builds it from defaults, then the TOML file, then overrides
given as dotted keys (``{"train.lr": 0.01}``). Unknown keys and ill-typed values are user
errors naming the key. ``to_dict`` gives the resolved configuration for ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import math
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
    cfg = _build(cls, data, "")
    check_ranges(to_dict(cfg))
    return cfg


# The allowed range of every numeric or named setting, by dotted name or, failing that, by
# its last part (``batch_size`` anywhere). Each entry: (test, what the value must be).
Check = tuple[typing.Callable[[Any], bool], str]
_POSITIVE_INT: Check = (lambda v: v >= 1, "at least 1")
_NON_NEGATIVE: Check = (lambda v: v >= 0, "0 or more")
_POSITIVE: Check = (lambda v: v > 0, "a finite number above 0")
_UNIT: Check = (lambda v: 0 <= v <= 1, "between 0 and 1")
RANGES: dict[str, Check] = {
    "batch_size": _POSITIVE_INT,
    "num_workers": _NON_NEGATIVE,
    "seed": _NON_NEGATIVE,
    "loop.iterations": _NON_NEGATIVE,  # 0: model.pt is the initial model (said on screen)
    "loop.log_every": _POSITIVE_INT,
    "log_every": _NON_NEGATIVE,  # predict's progress lines (0: every tenth of the images)
    "loop.eval_every": _NON_NEGATIVE,
    "loop.checkpoint_every": _NON_NEGATIVE,
    "optim.name": (lambda v: v in ("sgd", "adamw"), "one of sgd, adamw"),
    "optim.lr": _POSITIVE,
    "optim.head_lr_mult": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.poly_power": _NON_NEGATIVE,
    "optim.warmup_iters": _NON_NEGATIVE,
    "optim.warmup_ratio": _UNIT,
    "augment.crop_size": _POSITIVE_INT,
    "augment.base_size": _POSITIVE_INT,
    "augment.scale_range": _POSITIVE,
    "augment.color_jitter": _NON_NEGATIVE,
    "augment.blur_prob": _UNIT,
    "labeled_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "output_stride": _POSITIVE_INT,
    "ignore_below": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "rounds": _POSITIVE_INT,
    "model.num_classes": _POSITIVE_INT,
    "model.feature_dim": _POSITIVE_INT,
    "window_batch": _POSITIVE_INT,
    "adversarial.weight": _NON_NEGATIVE,
    "adversarial.lr": _POSITIVE,
    "self_training.target_colour_stats": _UNIT,  # a share of the labelled images
}


def check_ranges(data: dict, prefix: str = "") -> None:
    """Refuse a setting outside its range in :data:`RANGES`, or a float that is NaN or
    infinite, with one line naming the setting (``data``: :func:`to_dict` of a config)."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_ranges(value, f"{name}.")
            continue
        check = RANGES.get(name) or RANGES.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"setting '{name}' must be a finite number, got {item}")
            if check is None or item is None or isinstance(item, bool):
                continue
            if not check[0](item):
                raise UserError(f"setting '{name}' must be {check[1]}, got {value!r}")


def _nest(keys: list[str], value: Any) -> dict:
    return {keys[0]: _nest(keys[1:], value) if len(keys) > 1 else value}


def _merge(into: dict, new: dict, source: str, prefix: str = "") -> None:
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key not in into:
            known = ", ".join(sorted(into))
            raise UserError(f"{source}: unknown setting '{name}' (known here: {known})")
        if isinstance(into[key], dict) and into[key] and isinstance(value, dict):
            # a section; an empty dict is a free-form table (model.backbone_kwargs)
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
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"setting '{name}' must be a table, e.g. {{depth = 4}}, got {value!r}")
        return dict(value)
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
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise UserError(f"setting '{name}' must be a number, got {value!r}")
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


# Settings that change how a run runs, not what it computes: they may differ between a run and
# its rerun in the same --out (resume, or "already finished").
RUNTIME_KEYS = frozenset({"device", "num_workers", "compile", "save_predictions", "progress"})


def config_differences(
    old: dict, new: dict, ignore: frozenset[str] = RUNTIME_KEYS, prefix: str = ""
) -> list[str]:
    """``key: old -> new`` for every dotted setting that differs between two ``to_dict``
    configurations, skipping keys whose dotted name or last part is in ``ignore``."""
    diffs = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        if key in ignore or name in ignore:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, ignore, f"{name}."))
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs
