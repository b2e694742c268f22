"""One config layer for every command that trains: typed dataclass trees from files, flags and plain dicts.

Knows no job: it works on any tree of dataclasses whose fields all have defaults (`TrainConfig`, `PretrainConfig`,
`DetectConfig`, ...). A source is a mapping (nested sections as in a run's config.json, `{"optim": {"lr": 1e-3}}`,
or dotted keys, `{"optim.lr": 1e-3}`, alike) or command-line flags (`["--optim.lr", "1e-3"]`). Every value is
checked against its field before any work: an unknown field, or a value that is not of the field's type, is one
ValueError line naming the source (a file, or "flag"), the dotted field, what was given and what is allowed.
Mapping values must already have the field's type (an int is taken for a float, a list for a tuple); flag values
are text, parsed to the field's type (`none`, `true`, `0.5,1` or `[0.5, 1]`, JSON for mappings).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
NoneType = type(None)


def from_dict(d: Mapping[str, Any], cls: type[T], source: str = "config") -> T:
    """A `cls` built from `d` (nested sections or dotted keys); fields not in `d` keep `cls`'s defaults."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a mapping of config fields, got {type(d).__name__}")
    return apply_overrides(cls(), d, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (what config.json and `--print-config` hold; `from_dict` reads it back)."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: T, overrides: Sequence[str] | Mapping[str, Any], source: str = "flag") -> T:
    """Set fields of `cfg` by dotted path: flags `["--optim.lr", "1e-3", "--data.mixup=0"]` or a mapping
    `{"optim.lr": 1e-3}` / `{"optim": {"lr": 1e-3}}`. All are checked before any is set; `model.kwargs.NAME`
    sets one key of a mapping field. Modifies and returns `cfg`."""
    for path, value in parse_overrides(overrides, type(cfg), source).items():
        *parents, leaf = path.split(".")
        obj: Any = cfg
        for name in parents:
            obj = obj.setdefault(name, {}) if isinstance(obj, dict) else getattr(obj, name)
        if isinstance(obj, dict):
            obj[leaf] = value
        else:
            setattr(obj, leaf, value)
    return cfg


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any], cls: type, source: str = "flag") -> dict[str, Any]:
    """`overrides` (flags or a mapping, as `apply_overrides` takes them) as `{dotted field: value}`, each value of
    its field's type in `cls`; a ValueError line for the first field that is unknown or of the wrong type."""
    parse = not isinstance(overrides, Mapping)
    try:
        pairs = _pairs(overrides) if parse else _flatten(overrides, cls)
        return {path: _coerce(value, _field_type(cls, path), path, parse) for path, value in pairs}
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_config_file(path: str | Path, cls: type, keep: Sequence[str] = ()) -> dict[str, Any]:
    """A .json, .yaml or .yml file (YAML needs PyYAML: the `yaml` extra) as `parse_overrides` gives it, checked
    against `cls`; top-level keys named in `keep` (a CLI's "preset") are returned as given, not checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        suffix, text = path.suffix.lower(), path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if suffix in (".yaml", ".yml"):
        from convnext.extras import require

        require("yaml", what=f"reading {path}")
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    else:
        raise ValueError(f"{path}: give a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    kept = {k: data.pop(k) for k in keep if k in data}
    return {**kept, **parse_overrides(data, cls, str(path))}


def field_paths(cls: type) -> list[str]:
    """The dotted path of every field of a dataclass tree that holds a value (sections left out)."""
    return [p for p in _paths(cls) if not dataclasses.is_dataclass(_field_type(cls, p))]


# ---------------------------------------------------------------- paths and types
def _flatten(d: Mapping[str, Any], cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) pairs of a mapping, descending into the values that fill a section of `cls`."""
    out = []
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and dataclasses.is_dataclass(_field_type(cls, path, strict=False)):
            out += _flatten(value, cls, f"{path}.")
        else:
            out.append((path, value))
    return out


def _field_type(cls: type, path: str, strict: bool = True) -> Any:
    """The annotated type at a dotted path of `cls` (a key inside a mapping field: the mapping's value type).
    An unknown path is a ValueError naming the closest fields (None with strict=False)."""
    t: Any = cls
    parts = str(path).split(".")
    for i, name in enumerate(parts):
        if dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            names = [f.name for f in dataclasses.fields(t)]
            if name not in names:
                if not strict:
                    return None
                section = ".".join(parts[:i] + [""])
                near = [section + n for n in difflib.get_close_matches(name, names, n=2, cutoff=0.6)]
                near += [p for p in _paths(cls) if p.rsplit(".", 1)[-1] == name]  # in another section
                hint = f" (did you mean {' or '.join(repr(p) for p in near[:3])}?)" if near else ""
                raise ValueError(f"unknown config field {path!r}{hint}; {t.__name__} has: {', '.join(names)}")
            t = hints[name]
        elif t is dict or typing.get_origin(t) is dict:
            t = typing.get_args(t)[1] if typing.get_args(t) else Any
        elif t is not Any:
            if not strict:
                return None
            raise ValueError(f"unknown config field {path!r}: {'.'.join(parts[:i])} is {_describe(t)}, not a section")
    return t


def _paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a dataclass tree."""
    out = []
    for name, t in typing.get_type_hints(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(t):
            out += _paths(t, f"{prefix}{name}.")
    return out


def _describe(t: Any) -> str:
    """What a value of type `t` looks like, in words (for the error lines)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in args if a is not NoneType]
        return " or ".join(words + (["null"] if NoneType in args else []))
    if origin in (list, tuple):
        items = _item_types(t, None)
        n = f" of {len(items)}" if items is not None else ""
        kinds = sorted({_describe(a) for a in (items or args[:1] or [Any])})
        return f"a list{n} (each {' or '.join(kinds)})"
    if t is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(t):
        return f"a section (a mapping of {t.__name__}'s fields)"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    return words.get(t, getattr(t, "__name__", str(t)))


def _item_types(t: Any, n: int | None) -> list[Any] | None:
    """The item types of a list/tuple type for `n` items; None for any length when `n` is None."""
    args = typing.get_args(t)
    if typing.get_origin(t) is tuple and args and args[-1] is not Ellipsis:
        return list(args)
    return None if n is None else [args[0] if args else Any] * n


# ---------------------------------------------------------------- values
def _coerce(value: Any, t: Any, path: str, parse: bool) -> Any:
    """`value` as type `t`: data of that type (an int taken for a float, a list for a tuple), or, with `parse`,
    a flag's text parsed to it. A ValueError names the field, what was given and what is allowed."""
    given = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    bad = ValueError(f"{path}: expected {_describe(t)}, got {given}")
    text = value.strip() if parse and isinstance(value, str) else None
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        return _parse_any(value) if text is not None else value
    if origin in (typing.Union, types.UnionType):
        if value is None or (text is not None and text.lower() in ("none", "null")):
            if NoneType in args:
                return None
            raise bad
        for a in (a for a in args if a is not NoneType):
            try:
                return _coerce(value, a, path, parse)
            except ValueError:
                pass
        raise bad
    if t is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        raise bad
    if t in (int, float):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int) or (t is float and isinstance(value, float)):
            return t(value)
        if text is not None:
            try:
                return t(text)
            except ValueError:
                raise bad from None
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (list, tuple):
        if text is not None:
            value = _json(text, bad) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise bad
        items = _item_types(t, len(value))
        if items is None or len(items) != len(value):
            raise bad
        try:
            out = [_coerce(v, a, path, parse) for v, a in zip(value, items)]
        except ValueError:
            raise bad from None
        return tuple(out) if origin is tuple else out
    if t is dict or origin is dict:
        value = _json(text, bad) if text is not None else value
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(t):
        if isinstance(value, t):
            return value
        raise ValueError(f"{path}: expected {_describe(t)}, got {given}; set its fields as {path}.FIELD")
    raise TypeError(f"{path}: the config layer does not read fields of type {t}")


def _json(text: str, bad: ValueError) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise bad from None


def _parse_any(text: str) -> Any:
    """A flag's text for a field of any type: none/null, true/false, JSON, else the text itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(args: Sequence[str]) -> list[tuple[str, str]]:
    """(dotted path, text) pairs of `--a.b value` and `--a.b=value` flags (dashes in names read as underscores)."""
    out, i = [], 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}; overrides look like --optim.lr 1e-3")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
            value = args[i + 1]
            i += 2
        else:
            raise ValueError(f"--{key} needs a value")
        out.append((key.replace("-", "_"), value))
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
