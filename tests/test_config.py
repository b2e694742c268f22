"""The config layer on any dataclass tree: nested sections and dotted keys alike, flags parsed to each field's type,
and every unknown field or wrong type one ValueError line naming the source, the field, the value and what is
allowed, never a traceback from deeper down."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import pytest

from convnext import extras
from convnext.config import apply_overrides, from_dict, parse_overrides, read_config_file, to_dict
from convnext.dense.config import DetectConfig, SegmentConfig
from convnext.pretrain.config import PretrainConfig
from convnext.train.config import TrainConfig


@dataclass
class Inner:
    rate: float = 0.5
    name: str = "a"


@dataclass
class Tree:
    inner: Inner = field(default_factory=Inner)
    other: Inner = field(default_factory=lambda: Inner(name="b"))  # a section whose default differs from Inner()
    count: int = 1
    flag: bool = False
    limit: float | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    sizes: tuple[int, ...] = (1,)
    names: list[str] = field(default_factory=list)
    grid: list[list[int]] = field(default_factory=list)
    mean: tuple[float, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- building and overriding
def test_nested_sections_and_dotted_keys_build_the_same_tree():
    nested = {"inner": {"rate": 2, "name": "x"}, "count": 3, "pair": [1, 2], "mean": [0.1, 0.2], "grid": [[1, 2]]}
    dotted = {"inner.rate": 2, "inner.name": "x", "count": 3, "pair": [1, 2], "mean": [0.1, 0.2], "grid": [[1, 2]]}
    a, b = from_dict(nested, Tree), from_dict(dotted, Tree)
    assert a == b and a.inner.rate == 2.0 and isinstance(a.inner.rate, float)  # an int is taken for a float
    assert a.pair == (1.0, 2.0) and a.mean == (0.1, 0.2) and a.grid == [[1, 2]]  # lists become tuples where typed
    assert a.other == Inner(name="b")  # a section not given keeps its field's default, not the class's
    assert from_dict(json.loads(json.dumps(to_dict(a))), Tree) == a


def test_flags_are_parsed_to_each_fields_type():
    flags = ["--count", "4", "--flag", "yes", "--limit=none", "--pair", "0.5,1", "--sizes", "[2, 3]", "--names",
             "a,b", "--grid", "[[1, 2], [3]]", "--mean", "0.1,0.2,0.3", "--inner.rate", "1e-3", "--extra.depths",
             "[1,1]", "--extra.act", "gelu", "--other.name=--x"]  # fmt: skip
    t = apply_overrides(Tree(), flags)
    assert (t.count, t.flag, t.limit, t.pair, t.sizes, t.names) == (4, True, None, (0.5, 1.0), (2, 3), ["a", "b"])
    assert t.grid == [[1, 2], [3]] and t.mean == (0.1, 0.2, 0.3) and t.inner.rate == 1e-3
    assert t.extra == {"depths": [1, 1], "act": "gelu"} and t.other.name == "--x"
    assert apply_overrides(Tree(), ["--limit", "-2"]).limit == -2.0  # a negative number is a value, not a flag
    assert parse_overrides({"inner": {"rate": 1}}, Tree) == {"inner.rate": 1.0}


def test_all_values_are_checked_before_any_is_set():
    t = Tree()
    with pytest.raises(ValueError, match="flag: count: expected an integer, got 'x'"):
        apply_overrides(t, ["--inner.rate", "3", "--count", "x"])
    assert t == Tree()


# ---------------------------------------------------------------- one line for every wrong value
WRONG = [
    # (field, value from a mapping, what the line says is allowed)
    ("count", "1", "an integer"),
    ("count", [1, 2], "an integer"),
    ("count", 1.5, "an integer"),
    ("count", True, "an integer"),
    ("count", None, "an integer"),
    ("inner.rate", "0.1", "a number"),
    ("inner.rate", False, "a number"),
    ("flag", 1, "true or false"),
    ("flag", "true", "true or false"),
    ("inner.name", 3, "a string"),
    ("inner.name", ["a"], "a string"),
    ("limit", "x", "a number or null"),
    ("pair", [1], "a list of 2 (each a number)"),
    ("pair", "0,1", "a list of 2 (each a number)"),
    ("pair", [1, "a"], "a list of 2 (each a number)"),
    ("sizes", 3, "a list (each an integer)"),
    ("names", [1], "a list (each a string)"),
    ("grid", [1, 2], "a list (each a list (each an integer))"),
    ("mean", {"a": 1}, "a list (each a number) or null"),
    ("extra", [1], "a mapping"),
    ("inner", "convnext_atto", "a section (a mapping of Inner's fields)"),
]


@pytest.mark.parametrize(("path", "value", "allowed"), WRONG)
def test_a_wrong_value_is_one_line_naming_source_field_value_and_type(path, value, allowed):
    with pytest.raises(ValueError) as e:
        from_dict({path: value}, Tree, source="c.json")
    assert str(e.value).startswith(f"c.json: {path}: expected {allowed}, got {value!r}")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError) as nested:  # the same value inside its section
        *parents, leaf = path.split(".")
        d: dict[str, Any] = {leaf: value}
        for p in reversed(parents):
            d = {p: d}
        from_dict(d, Tree, source="c.json")
    assert str(nested.value) == str(e.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--count", "1.5"], "flag: count: expected an integer, got '1.5'"),
        (["--flag", "maybe"], "flag: flag: expected true or false, got 'maybe'"),
        (["--inner.rate", "fast"], "flag: inner.rate: expected a number, got 'fast'"),
        (["--pair", "1"], "flag: pair: expected a list of 2 (each a number), got '1'"),
        (["--sizes", "[1, 2"], "flag: sizes: expected a list (each an integer), got '[1, 2'"),
        (["--extra", "[1]"], "flag: extra: expected a mapping, got '[1]'"),
        (["--inner", "x"], "flag: inner: expected a section (a mapping of Inner's fields), got 'x'; set its fields"),
        (["--count"], "flag: --count needs a value"),
        (["count", "1"], "flag: unexpected argument 'count'"),
        (["--inner.nme", "x"], "flag: unknown config field 'inner.nme' (did you mean 'inner.name'?); Inner has: rate"),
        (["--rate", "1"], "flag: unknown config field 'rate' (did you mean 'inner.rate' or 'other.rate'?)"),
        (["--count.x", "1"], "flag: unknown config field 'count.x': count is an integer, not a section"),
    ],
)
def test_a_wrong_flag_is_one_line(flags, message):
    with pytest.raises(ValueError) as e:
        apply_overrides(Tree(), flags)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _holds(value: Any, t: Any) -> bool:
    """Whether `value` is of the annotated type `t` (the property below checks what from_dict built)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(_holds(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, origin):
            return False
        items = args[:1] * len(value) if origin is list or args[-1] is Ellipsis else args
        return len(items) == len(value) and all(map(_holds, value, items))
    if t is float:
        return isinstance(value, float)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return t is Any or isinstance(value, typing.get_origin(t) or t)


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out += _leaves(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else [(prefix + f.name, t)]
    return out


ODD = ["1", "text", "none", "true", "0.5,1", "[1, 2]", '{"a": 1}', 7, -1, 2.5, True, None, [], [1, 2], [0.5, "a"],
       [[1]], {}, {"a": 1}]  # fmt: skip


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig, DetectConfig, SegmentConfig])
def test_every_field_of_every_job_takes_its_type_or_says_one_line(cls):
    """Each value above in each field of each job's config, from a file and as a flag: either the field then holds
    a value of its type, or one ValueError line naming the source and the field; never another error."""
    refused = 0
    for path, t in _leaves(cls):
        for value in ODD:
            for source, given in (("c.json", {path: value}), ("flag", [f"--{path}", json.dumps(value)])):
                try:
                    cfg = apply_overrides(cls(), given, source=source) if source == "flag" else from_dict(
                        given, cls, source=source)  # fmt: skip
                except ValueError as e:
                    assert str(e).startswith(f"{source}: {path}: expected ") and "\n" not in str(e), str(e)
                    refused += 1
                    continue
                got = cfg
                for name in path.split("."):
                    got = getattr(got, name)
                assert _holds(got, t), (path, value, got)
    assert refused > len(_leaves(cls)) * len(ODD)  # most of them are wrong somewhere


# ---------------------------------------------------------------- files
def test_config_files_json_and_yaml_nested_or_dotted(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "p", "inner": {"rate": 2}, "other.name": "z"}))
    got = read_config_file(tmp_path / "c.json", Tree, keep=("preset",))
    assert got == {"preset": "p", "inner.rate": 2.0, "other.name": "z"}
    pytest.importorskip("yaml")
    (tmp_path / "c.yml").write_text("inner:\n  rate: 2\nother.name: z\npair: [1, 2]\n")
    assert read_config_file(tmp_path / "c.yml", Tree) == {"inner.rate": 2.0, "other.name": "z", "pair": (1.0, 2.0)}
    (tmp_path / "bad.yaml").write_text("count: [1\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        read_config_file(tmp_path / "bad.yaml", Tree)
    (tmp_path / "typed.yaml").write_text("count: 1.0\n")
    with pytest.raises(ValueError, match=r"typed.yaml: count: expected an integer, got 1\.0$"):
        read_config_file(tmp_path / "typed.yaml", Tree)


def test_yaml_without_pyyaml_names_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "yaml" else real(n, *a))
    (tmp_path / "c.yaml").write_text("count: 1\n")
    with pytest.raises(extras.MissingExtraError) as e:
        read_config_file(tmp_path / "c.yaml", Tree)
    assert str(e.value).startswith(f"reading {tmp_path / 'c.yaml'} needs yaml, which is not installed: pip install")
    assert "'convnext[" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.json", b"[1, 2]", "c.json: expected a mapping of config fields, got list"),
        ("c.json", b"{not json", "c.json: not valid JSON"),
        ("c.json", b"\xff\xfe\x00", "c.json: not a text file"),
        ("c.toml", b"count = 1", "c.toml: give a .json, .yaml or .yml file"),
        ("c.json", b'{"inner": {"rat": 1}}', "c.json: unknown config field 'inner.rat' (did you mean 'inner.rate'?)"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_config_file(tmp_path / name, Tree)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        read_config_file(tmp_path / "missing.json", Tree)
