"""Typed configuration: YAML files mapped onto dataclasses, validated with messages that name the key.

Every component (model, data, optimisation, parallelism, ...) declares a dataclass. ``load_config`` reads a
YAML file, applies ``key.sub=value`` overrides and builds the dataclass tree, rejecting unknown keys, wrong
types and invalid choices with an error that names the file, the dotted key and the valid options.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; the message names the source file and the dotted key."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one, so a second ``lr:`` further
    down a file would quietly win over the first."""

    def compose_mapping_node(self, anchor):
        # checked as composed: construction flattens `<<: *base` merges into the node, whose keys may then repeat
        node = super().compose_mapping_node(anchor)
        first_line = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)  # so that `yes` and `true`, `1` and `01` are the same key
            if key in first_line:
                raise yaml.composer.ComposerError(
                    "while composing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return node


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where a dotted key's value came from, for error messages: the file, or the override that set it."""

    file: str
    overrides: tuple[tuple[str, str], ...] = ()  # (dotted key, override text), in the order applied

    def error(self, key: str, what: str) -> ConfigError:
        """``what`` went wrong at ``key``: the message starts with the file and names the override at fault."""
        setters = [text for path, text in self.overrides if _within(key, path)]
        # the last override that set this key (or a section above it) wins; an error about a whole section
        # (__post_init__) may come from an override of any of its keys
        involved = setters[-1:] or [text for path, text in self.overrides if _within(path, key)]
        if not involved:
            return ConfigError(f"{self.file}: {what}")
        named = ("override " if len(involved) == 1 else "overrides ") + ", ".join(f"'{text}'" for text in involved)
        return ConfigError(f"{self.file}: {what} (from {named})")


def _within(key: str, section: str) -> bool:
    """Dotted ``key`` is ``section`` or lies under it (``section`` == "" is the root)."""
    return not section or key == section or key.startswith((section + ".", section + "["))


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        args = get_args(tp)
        return f"list[{_describe(args[0]) if args else 'any'}]"
    if origin is tuple:
        return f"tuple[{', '.join('...' if a is Ellipsis else _describe(a) for a in get_args(tp)) or 'any'}]"
    if origin is dict:
        k, v = get_args(tp) or (Any, Any)
        return f"dict[{_describe(k)}, {_describe(v)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# A number as YAML 1.2 writes it; YAML 1.1 (PyYAML) reads the ones without a dot, like 1e-6, as strings.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, tp: Any, key: str, origin: _Origin) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (ints widen to floats)."""

    def fail(what: str) -> ConfigError:
        return origin.error(key, f"key '{key}': {what}")

    kind = get_origin(tp)
    if tp is Any:
        return value
    if kind is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise fail(f"invalid value {value!r}; valid choices: {', '.join(repr(c) for c in choices)}")
        return value
    if kind in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail(f"must not be null (expected {_describe(tp)})")
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise message
            return _convert(value, options[0], key, origin)
        for arg in options:
            try:
                return _convert(value, arg, key, origin)
            except ConfigError:
                pass
        raise fail(f"expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail(f"expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return _build(tp, value, origin, key + ".")
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp) or (Any,)
        if kind is list or args[-1] is Ellipsis:
            items = [_convert(v, args[0], f"{key}[{i}]", origin) for i, v in enumerate(value)]
            return items if kind is list else tuple(items)
        if len(value) != len(args):  # tuple[int, str]: one item per position
            raise fail(f"expected {len(args)} items ({_describe(tp)}), got {len(value)}: {value!r}")
        return tuple(_convert(v, t, f"{key}[{i}]", origin) for i, (v, t) in enumerate(zip(value, args)))
    if kind is dict:
        if not isinstance(value, dict):
            raise fail(f"expected a mapping, got {type(value).__name__} {value!r}")
        ktp, vtp = get_args(tp) or (Any, Any)
        return {_convert(k, ktp, f"{key}.{k}", origin): _convert(v, vtp, f"{key}.{k}", origin)
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads 1e-6 (no dot) as a string; other strings Python's float() takes ('nan', '1_0') stay refused
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail(f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail(f"expected {_describe(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict, *, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating every key (recursively for nested dataclasses)."""
    return _build(cls, data, _Origin(source), prefix)


def _build(cls: type[T], data: dict, origin: _Origin, prefix: str) -> T:
    if not isinstance(data, dict):
        raise origin.error(prefix.rstrip("."), f"'{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        valid = ", ".join(sorted(fields))
        raise origin.error(f"{prefix}{key}", f"unknown key '{prefix}{key}'{hint}; valid keys for {cls.__name__}: {valid}")
    kwargs = {name: _convert(value, hints[name], prefix + name, origin) for name, value in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = prefix + missing[0]
        raise origin.error(key, f"missing required key '{key}' ({_describe(hints[missing[0]])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        if isinstance(e, ConfigError):
            raise
        raise origin.error(prefix.rstrip("."), f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass tree → plain YAML/JSON-able structure that ``from_dict`` reads back."""
    if dataclasses.is_dataclass(obj):  # init=False fields are derived, and from_dict refuses them
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dotted_keys(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: the leaves of a nested config under their dotted keys (to name what differs
    between two configs)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' → (['optim', 'lr'], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [part.strip() for part in key.split(".")]
    if not all(path):
        raise ConfigError(f"override '{text}' has an empty key or key part")
    if raw == "":
        return path, ""
    try:
        return path, yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': invalid YAML value: {e}") from e


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each override set in order (a later one wins); ``data`` is left unchanged."""
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a mapping")
            # a copy: a YAML alias (`based: *heads`) shares this mapping with another key, which must not change
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (optional), apply ``overrides`` and build a validated ``cls``."""
    overrides = list(overrides or [])
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    # an error in a key an override set also names that override: the file alone would point at the wrong line
    origin = _Origin(str(path) if path is not None else "<overrides>",
                     tuple((".".join(parse_override(text)[0]), text) for text in overrides))
    return _build(cls, data, origin, "")
