"""The config layer on any dataclass tree: nested sections and dotted keys alike, flags parsed to each field's type,
and every unknown field or wrong type one ValueError line naming the source, the field, the value and what is
allowed, never a traceback from deeper down."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

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
    ("inner.rate", float("nan"), "a finite number"),
    ("inner.rate", float("-inf"), "a finite number"),
    ("count", 2**63, "an integer of 64 bits (at most 19 digits)"),
    ("extra", {1: "a"}, "a mapping"),
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
    """Whether `value` is of the annotated type `t` (the properties below check what from_dict built)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(_holds(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, origin):
            return False
        items = args[:1] * len(value) if origin is list or args[-1] is Ellipsis else args
        return len(items) == len(value) and all(map(_holds, value, items))
    if t is float:
        return isinstance(value, float) and math.isfinite(value)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return t is Any or isinstance(value, typing.get_origin(t) or t)


def config_leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out += config_leaves(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else [(prefix + f.name, t)]
    return out


# ---------------------------------------------------------------- properties: random values in every field of every job
JOBS = [TrainConfig, PretrainConfig, DetectConfig, SegmentConfig]
FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# values that broke the layer before it was fuzzed: an integer too large for a float (OverflowError) or too long to
# print (a bare ValueError), JSON nested deeper than the parser goes (RecursionError), nan and inf taken as numbers
ODD_TEXT = ["none", "null", "true", "yes", "0.5,1", "[1, 2]", '{"a": 1}', "1e400", "nan", "-inf", "1" * 5000,
            "[" * 3000, '{"a": ' * 3000, "--x", ""]  # fmt: skip
HUGE = st.sampled_from([400, 5000]).map(lambda digits: 10**digits)  # made when drawn: 10**5000 has no repr
SCALARS = (st.none() | st.booleans() | st.integers() | HUGE | st.floats() | st.text(max_size=8)
           | st.sampled_from(ODD_TEXT))  # fmt: skip
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                      max_size=3), max_leaves=6)  # fmt: skip
KINDS = {  # each kind of plain data a config file holds
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers() | HUGE,
    "float": st.floats().filter(lambda x: not x.is_integer()) | st.just(1.0),
    "text": st.text(max_size=8) | st.sampled_from(ODD_TEXT),
    "list": st.lists(VALUES, max_size=3),
    "mapping": st.dictionaries(st.text(max_size=4), VALUES, max_size=3),
}


def kinds_taken(t: Any) -> set[str]:
    """The kinds of value a field of type `t` takes from a file (an int for a float, a list for a tuple)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(kinds_taken(a) for a in args))
    if origin in (list, tuple):
        return {"list"}
    taken = {type(None): {"null"}, bool: {"bool"}, int: {"int"}, float: {"int", "float"}, str: {"text"},
             dict: {"mapping"}}  # fmt: skip
    return set(KINDS) if t is Any else taken[origin or t]


def a_wrong_value(t: Any) -> st.SearchStrategy:
    """Values of a kind a field of type `t` never takes."""
    return st.one_of([KINDS[k] for k in KINDS if k not in kinds_taken(t)])


def as_flag_text(value: Any) -> str | None:
    """`value` as a flag's text (None: no text holds it, an integer too long for Python to print)."""
    try:
        return value if isinstance(value, str) else json.dumps(value)
    except ValueError:
        return None


def dumped(dump: Any, tree: dict[str, Any]) -> bytes:
    """`tree` as a file's bytes by `dump` (json.dumps, yaml.safe_dump); b"" when it cannot print an integer so long."""
    try:
        return dump(tree).encode()
    except ValueError:
        return b""


def one_line(e: ValueError, start: str, then: tuple[str, ...] = ("",)) -> None:
    """`e` is one line that starts with `start` and one of `then` next."""
    assert any(str(e).startswith(start + t) for t in then) and "\n" not in str(e), str(e)


@pytest.mark.parametrize("cls", JOBS)
def test_every_field_of_every_job_takes_its_type_or_says_one_line(cls):
    """Any plain value in any field of any job's config, from a file and as a flag: either the field then holds a
    finite value of its type and the config saves as JSON and reads back, or one ValueError line naming the source
    and the field; never another error (OverflowError, RecursionError, TypeError...)."""
    leaves = dict(config_leaves(cls))

    @FAST
    @given(path=st.sampled_from(sorted(leaves)), value=VALUES, flag=st.booleans())
    def check(path: str, value: Any, flag: bool) -> None:
        text = as_flag_text(value)
        assume(text is not None or not flag)
        source = "flag" if flag else "c.json"
        try:
            cfg = apply_overrides(cls(), [f"--{path}={text}"]) if flag else from_dict({path: value}, cls, source)
        except ValueError as e:  # the field, or a key inside a mapping field: "model.kwargs.depths"
            return one_line(e, f"{source}: {path}", then=(": expected ", "."))
        assert _holds(functools.reduce(getattr, path.split("."), cfg), leaves[path]), (path, value)
        assert from_dict(json.loads(json.dumps(to_dict(cfg))), cls) is not None  # what config.json holds reads back

    check()


@pytest.mark.parametrize("cls", JOBS)
def test_a_value_of_a_kind_a_field_never_takes_is_one_line_naming_the_field(cls):
    """A wrong kind of value (text for a number, a list for a flag, a mapping for a name...) in any field, given in its
    section or by its dotted name: always refused, in one line naming the file and the field."""

    @FAST
    @given(path_type=st.sampled_from(config_leaves(cls)), data=st.data(), nested=st.booleans())
    def check(path_type: tuple[str, Any], data: st.DataObject, nested: bool) -> None:
        path, t = path_type
        value = data.draw(a_wrong_value(t), label="value")
        given_: Any = value
        for name in reversed(path.split(".") if nested else [path]):  # {"optim": {"lr": value}} or {"optim.lr": value}
            given_ = {name: given_}
        with pytest.raises(ValueError) as e:
            from_dict(given_, cls, source="c.json")
        one_line(e.value, f"c.json: {path}", then=(": expected ", "."))

    check()


@pytest.mark.parametrize("cls", JOBS)
def test_any_flags_are_read_or_refused_in_one_line(cls):
    paths = [f"--{p}" for p in sorted(dict(config_leaves(cls)))]
    tokens = st.sampled_from(paths) | st.sampled_from(ODD_TEXT) | st.text(max_size=6) | st.sampled_from(["--", "-1"])

    @FAST
    @given(flags=st.lists(tokens, max_size=6))
    def check(flags: list[str]) -> None:
        try:
            cfg = apply_overrides(cls(), flags)
        except ValueError as e:
            return one_line(e, "flag: ")
        assert from_dict(json.loads(json.dumps(to_dict(cfg))), cls) == from_dict(to_dict(cfg), cls)

    check()


@pytest.mark.parametrize("cls", JOBS)
def test_any_config_file_is_read_or_refused_in_one_line_naming_it(cls, tmp_path):
    """Random bytes, text, or a random tree of plain values written as JSON or YAML: read into a config that the job
    takes, or one ValueError line naming the file."""
    pytest.importorskip("yaml")
    import yaml

    sections = [p.split(".")[0] for p, _ in config_leaves(cls)] + ["x", "model.kwargs", "data.mean"]
    trees = st.dictionaries(st.sampled_from(sections) | st.text(max_size=4), VALUES, max_size=4)
    written = (trees.map(lambda d: dumped(json.dumps, d)) | trees.map(lambda d: dumped(yaml.safe_dump, d))).filter(bool)
    contents = st.binary(max_size=40) | st.text(max_size=40).map(str.encode) | written

    @settings(FAST, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(content=contents, suffix=st.sampled_from([".json", ".yaml", ".yml"]))
    def check(content: bytes, suffix: str) -> None:
        path = tmp_path / f"c{suffix}"
        path.write_bytes(content)
        try:
            got = read_config_file(path, cls, keep=("preset",))
        except ValueError as e:
            return one_line(e, f"{path}: ")
        got.pop("preset", None)
        apply_overrides(cls(), got, source=str(path))

    check()


def test_what_the_fuzzing_found_is_one_line(tmp_path):
    """Before the properties below ran: OverflowError for an integer too large for a float, a bare ValueError for one
    too long to print (and one config.json could not hold), RecursionError for JSON nested too deep."""
    cases = [({"inner.rate": 10**400}, "c.json: inner.rate: expected a number, got 1000000000"),
             ({"count": 10**5000}, "c.json: count: expected an integer of 64 bits (at most 19 digits), got a value too "
              "long to print"),
             ({"extra": {"a": 10**5000}}, "c.json: extra.a: expected plain data"),
             ({"extra": {"when": datetime.date(2026, 12, 7)}}, "c.json: extra.when: expected plain data")]  # fmt: skip
    for given_, message in cases:
        with pytest.raises(ValueError) as e:
            from_dict(given_, Tree, source="c.json")
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"^flag: sizes: expected a list \(each an integer\), got '\[\[\[\["):
        apply_overrides(Tree(), ["--sizes", "[" * 3000])
    assert apply_overrides(Tree(), ["--extra.x", "[" * 3000]).extra == {"x": "[" * 3000}  # not JSON: the text
    (tmp_path / "deep.json").write_text("[" * 3000 + "]" * 3000)
    with pytest.raises(ValueError, match=r"deep.json: not valid JSON \(maximum recursion depth"):
        read_config_file(tmp_path / "deep.json", Tree)
    (tmp_path / "long.json").write_text('{"count": 1' + "0" * 5000 + "}")
    with pytest.raises(ValueError, match=r"long.json: not valid JSON \(Exceeds the limit"):
        read_config_file(tmp_path / "long.json", Tree)


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
