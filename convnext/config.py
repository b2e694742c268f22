"""One config layer for every command that trains: typed dataclass trees from files, flags and plain dicts.

Knows no job: it works on any tree of dataclasses whose fields all have defaults (`TrainConfig`, `PretrainConfig`,
`DetectConfig`, ...). A source is a mapping (nested sections as in a run's config.json, `{"optim": {"lr": 1e-3}}`,
or dotted keys, `{"optim.lr": 1e-3}`, alike) or command-line flags (`["--optim.lr", "1e-3"]`). Every value is
checked against its field before any work: an unknown field, or a value that is not of the field's type, is one
ValueError line naming the source (a file, or "flag"), the dotted field, what was given and what is allowed.
Mapping values must already have the field's type (an int is taken for a float, a list for a tuple); flag values
are text, parsed to the field's type (`none`, `true`, `0.5,1` or `[0.5, 1]`, JSON for mappings). A number field takes
finite numbers only (nan and inf are refused), an integer field integers of 64 bits, and a field of any type plain
data (what JSON holds).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
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
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # also: an integer too long, nesting too deep
            raise ValueError(f"{path}: not valid YAML ({_first_line(e)})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not valid JSON ({_first_line(e)})") from None
    else:
        raise ValueError(f"{path}: give a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    kept = {k: data.pop(k) for k in keep if k in data}
    return {**kept, **parse_overrides(data, cls, str(path))}


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


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
            hints = _hints(t)
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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved once (annotations are text under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a dataclass tree."""
    out = []
    for name, t in _hints(cls).items():
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
    given = _shown(value)
    bad = ValueError(f"{path}: expected {_describe(t)}, got {given}")
    text = value.strip() if parse and isinstance(value, str) else None
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        value = _parse_any(value) if text is not None else value
        if not _plain(value):  # it is saved in config.json (and nesting too deep to check is not plain)
            raise ValueError(f"{path}: expected plain data (null, true/false, numbers, text, lists, mappings with "
                             f"text keys), got {given}")  # fmt: skip
        return value
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
        try:
            if isinstance(value, int) or (t is float and isinstance(value, float)):
                number = t(value)
            elif text is not None:
                number = t(text)
            else:
                raise bad
        except (ValueError, OverflowError):  # not a number; an integer too large for a float
            raise bad from None
        if t is float and not math.isfinite(number):
            raise ValueError(f"{path}: expected a finite number, got {given}")
        if t is int and not _int64(number):  # config.json could not even print some of them
            raise ValueError(f"{path}: expected an integer of 64 bits (at most 19 digits), got {given}")
        return number
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
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad
        return {k: _coerce(v, Any, f"{path}.{k}", False) for k, v in value.items()}
    if dataclasses.is_dataclass(t):
        if isinstance(value, t):
            return value
        raise ValueError(f"{path}: expected {_describe(t)}, got {given}; set its fields as {path}.FIELD")
    raise TypeError(f"{path}: the config layer does not read fields of type {t}")


def _shown(value: Any) -> str:
    """`value` as the error lines show it: its repr, cut at 80 characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer of more digits than Python prints; nesting too deep
        return "a value too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _plain(value: Any) -> bool:
    """Whether `value` is plain data that config.json can hold (what JSON reads: YAML also gives dates, bytes...)."""
    try:
        return _plain_data(value)
    except RecursionError:
        return False


def _plain_data(value: Any) -> bool:
    if value is None or isinstance(value, bool | float | str):
        return True
    if isinstance(value, int):
        return _int64(value)
    if isinstance(value, list | tuple):
        return all(_plain_data(v) for v in value)
    return isinstance(value, Mapping) and all(isinstance(k, str) and _plain_data(v) for k, v in value.items())


def _int64(n: int) -> bool:
    return -(2**63) <= n < 2**63


def _json(text: str, bad: ValueError) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON; an integer too long or nesting too deep for the parser
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
    except (ValueError, RecursionError):
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
