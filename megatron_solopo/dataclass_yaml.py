"""Typed config dataclasses <-> YAML files, dicts and dotted command-line overrides, for any dataclass.

The generic half of the configuration system: `from_dict` builds a dataclass (nested sections, lists,
Optional, Literal) and refuses unknown keys naming the valid ones; `to_dict`/`save_config` write one back;
`parse_override`/`apply_overrides` read `section.key=value`; `load_yaml` refuses a key given twice.
A foundation module: it imports nothing of the project but `console` (messages), so every room can
build and save its own section without importing the composed `config.ExperimentConfig` above it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import types
import typing
from typing import Any, Mapping

import yaml

from megatron_solopo.console import relative_path_hint

__all__ = ["ConfigError", "from_dict", "to_dict", "OVERRIDE_PATTERN", "parse_override", "apply_overrides",
           "load_yaml", "load_section", "save_config"]


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and says how to fix it."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)  # string annotations resolve in the dataclass's own module
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Converts a YAML/CLI value to the annotated type (dataclass, list, tuple, int, float...)."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Builds dataclass `cls` from a mapping; unknown keys raise ConfigError naming the valid ones."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(data) - set(types_by_name))
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys for {where or cls.__name__}: {', '.join(sorted(types_by_name))}")
    kwargs = {name: _coerce(value, types_by_name[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict (YAML-ready) form of a config dataclass."""
    return dataclasses.asdict(config)


# what a dotted override looks like on a command line: section.key[.key...]=value
OVERRIDE_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-6` -> (["train", "lr"], 1e-6); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-6)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 1e-6 as a string (no dot before the exponent); numbers are what people mean
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies dotted overrides to a nested dict (in place) and returns it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


class _DuplicateKey(yaml.YAMLError):
    """A mapping of a YAML file gives one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (line {seen[key]} and line {line}); only one "
                                    "can apply: remove the other")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a YAML config file into a dict, with a clear error for a missing, malformed or ambiguous file
    (a key given twice in one section)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file (e.g. {path}/<name>.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + relative_path_hint(path))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte offset {err.start}); re-save it as UTF-8") from None
    except _DuplicateKey as err:
        raise ConfigError(f"config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at top level")
    return data


def load_section(cls: type, source: str | pathlib.Path | Mapping[str, Any] | None,
                 overrides: list[str] | None = None, where: str = "") -> Any:
    """Builds any config dataclass from a YAML path or dict plus dotted overrides."""
    data = dict(load_yaml(source)) if isinstance(source, (str, pathlib.Path)) else dict(source or {})
    return from_dict(cls, apply_overrides(data, list(overrides or [])), where)


def save_config(config: Any, path: str | pathlib.Path) -> None:
    """Writes a config dataclass as YAML (the run directory keeps the exact config it ran with), under a
    temporary name renamed over `path`: a full disk never leaves half a config.yaml in place of the old one."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
