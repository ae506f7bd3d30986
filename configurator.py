"""Typed config from a dataclass, plain-Python recipe files and --key=value overrides.

    python train.py config/tiny.py --max_iters=200 --device=cpu

A recipe is a Python file of assignments (`n_layer = 4`). It runs in its own namespace
(never in the caller's globals); every public name it leaves must be a field of the
dataclass. Overrides are checked the same way: an unknown key or a value of the wrong type
is a ConfigError naming it.
"""
from __future__ import annotations

import ast
import dataclasses
import runpy
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} is not a valid {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name}: expected a bool (True/False), got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an int, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a float, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{name}: expected a {origin.__name__}, got {value!r}")
        args = typing.get_args(typ)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{name}: expected {len(args)} items, got {value!r}")
            return tuple(_coerce(name, v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [v if item is Any else _coerce(name, v, item) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --device=cuda


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The public assignments of a recipe file, evaluated in a namespace of their own."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    namespace = runpy.run_path(str(path))
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType)
            and not callable(v)}


def parse_config(cls: type[T], argv: list[str]) -> T:
    """Build `cls` from recipe files and --key=value overrides, in the order given."""
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not sep:
                raise ConfigError(f"override {arg!r} must look like --{key}=VALUE")
            if key not in types_:
                raise ConfigError(f"unknown config key: {key}")
            values[key] = _coerce(key, _parse_literal(raw), types_[key])
        else:
            for key, value in load_recipe(arg).items():
                if key not in types_:
                    raise ConfigError(f"unknown config key {key!r} in {arg}")
                values[key] = _coerce(key, value, types_[key])
    return cls(**values)
