"""Typed dataclass configs, and the command line derived from them.

Every command declares one dataclass. Each field becomes a flag (`batch_size` -> `--batch-size`) whose help
text comes from the field's metadata, so flags are never written by hand. `--config run.toml` loads a file
(flat keys with the field names); flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def arg(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with help text; lists get a fresh default each time."""
    if isinstance(default, list):
        value = list(default)
        return dataclasses.field(default_factory=lambda: list(value), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1, f"unsupported union {tp}"
        return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; defaults are left as None so that a TOML file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, _ = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if not required:
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp)
            parser.add_argument(_flag(f.name), nargs="+", type=inner, metavar=f.name.upper(), **kw)
        else:
            parser.add_argument(_flag(f.name), type=tp, metavar=f.name.upper(), **kw)


def _coerce(name: str, tp: Any, value: Any, source: str) -> Any:
    """Check a TOML value against the field's type (ints pass for floats, a lone string for a list)."""
    tp, optional = _unwrap(tp)
    if value is None and optional:
        return None
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"{source}: {name} must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(name, inner, v, source) for v in items]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ValueError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Make `cls` from a dict, with a clear error for unknown or missing keys and wrongly typed values."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; valid: {sorted(names)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        and f.name not in values
    ]
    if missing:
        raise ValueError(f"{source}: missing required option(s): {', '.join(_flag(m) for m in missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, hints[k], v, source) for k, v in values.items()})


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"--config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: invalid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse(cls: type[T], argv: list[str] | None, prog: str, description: str = "") -> T:
    """Parse argv into `cls`: defaults < --config file < flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file; flags override it")
    add_arguments(parser, cls)
    ns = parser.parse_args(argv)
    values = load_toml(ns.config) if ns.config else {}
    for f in dataclasses.fields(cls):
        if f.init and getattr(ns, f.name, None) is not None:
            values[f.name] = getattr(ns, f.name)
    try:
        return build(cls, values, source=ns.config or prog)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
