"""The package's layers point one way, read from the source with `ast` (no import runs): every `import` and
`from ... import` in every module of `convnext/` counts, function-local ones included; relative imports are
resolved; a package's `__init__` is a module of its own (importing `convnext.weights` is an arrow to it).

Layers, bottom to top (the ARCHITECTURE.md table); an arrow may point down or stay within its layer, never up:
  L0  model, roadmap, constants, extras, viz     the networks, variants, shared constants; no convnext imports
  L1  weights/                                   specs, layouts, io, download cache, Hub reading
  L2  registry, data/, flops, scores, onnx_model   names -> models, datasets, transforms, metrics, ORT runner
  L3  resolve, engine/, config                   any source -> model + preprocessing; the run engine; config
  L4  train/, pretrain/, dense/, infer, export, bench, publish, fast/, erf, cam, quantize    jobs and uses
  L5  cli/, __main__, the package's own __init__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import convnext

ROOT = Path(convnext.__file__).parent
LAYERS = {
    "convnext.model": 0, "convnext.roadmap": 0, "convnext.constants": 0, "convnext.extras": 0, "convnext.viz": 0,
    "convnext.weights": 1,
    "convnext.registry": 2, "convnext.data": 2, "convnext.flops": 2, "convnext.scores": 2, "convnext.onnx_model": 2,
    "convnext.resolve": 3, "convnext.engine": 3, "convnext.config": 3,
    "convnext.train": 4, "convnext.pretrain": 4, "convnext.dense": 4, "convnext.infer": 4, "convnext.export": 4,
    "convnext.bench": 4, "convnext.publish": 4, "convnext.fast": 4, "convnext.erf": 4, "convnext.cam": 4,
    "convnext.quantize": 4, "convnext.report_eval": 4, "convnext.features": 4,
    "convnext.cli": 5, "convnext.__main__": 5, "convnext": 5,
}  # fmt: skip
LOW = ("convnext.weights", "convnext.model", "convnext.data")  # the rule: these never reach up into HIGH
HIGH = ("convnext.train", "convnext.infer", "convnext.cli")


def modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package's __init__)} of every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


MODULES = modules()


def owner(name: str) -> str | None:
    """The module `name` lives in: itself, or the nearest enclosing module (an attribute of a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, source: str | None = None) -> list[tuple[str, str | None, int]]:
    """(imported module, the name taken from it or None, line) for every convnext import in `module` (its file, or
    `source` read as if it were that module)."""
    path, package = MODULES[module]
    here = module if package else module.rpartition(".")[0]
    tree = ast.parse(path.read_text() if source is None else source)
    out, bound = [], {}  # bound: local name -> the convnext module it holds (`import a.b as m`, `from a import b`)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(owner(a.name), None, node.lineno) for a in node.names if a.name.split(".")[0] == "convnext"]
            bound |= {a.asname: a.name for a in node.names if a.asname and a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..a import b
                parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "convnext":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (owner(base), a.name, node.lineno))
                bound |= {a.asname or a.name: sub} if sub in MODULES else {}
    for node in ast.walk(tree):  # `m._name` on a module imported whole takes that name too
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            out.append((bound[node.value.id], node.attr, node.lineno))
    return [(m, name, line) for m, name, line in out if m is not None and m != module]


EDGES = {m: imports(m) for m in MODULES}


def layer(module: str) -> int:
    return LAYERS[max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)]


def cycles() -> list[list[str]]:
    """The import circles: the strongly connected components of more than one module (Tarjan)."""
    graph = {m: sorted({t for t, _, _ in EDGES[m]}) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for m in graph:
        if m not in index:
            visit(m)
    return found


def test_the_reader_sees_every_kind_of_import():
    """What the other tests rely on: relative imports resolved from the module's package, `import a.b`, names taken
    from a module or a package's __init__ (or as attributes of a module imported whole), imports inside functions;
    and in the package itself."""
    source = """
from . import io
from .layouts import to_ours
from ..model import ConvNeXt
import convnext.data.decode as decode
import torch

def late():
    from convnext.registry import create_model
    from convnext.weights import load_checkpoint
    return decode._private
"""
    assert set(imports("convnext.weights.specs", source)) == {
        ("convnext.data.decode", None, 5),
        ("convnext.data.decode", "_private", 11),
        ("convnext.model", "ConvNeXt", 4),
        ("convnext.registry", "create_model", 9),
        ("convnext.weights", "load_checkpoint", 10),
        ("convnext.weights.io", None, 2),
        ("convnext.weights.layouts", "to_ours", 3),
    }
    assert ("convnext.weights.specs", None, 1) in imports("convnext.weights", "from . import specs")  # an __init__
    targets = {m: {t for t, _, _ in EDGES[m]} for m in MODULES}
    assert "convnext.weights.hf" in targets["convnext.registry"]  # inside create_model
    assert {"convnext.weights.io", "convnext.weights.specs"} <= targets["convnext.weights"]
    assert all(isinstance(layer(m), int) for m in MODULES)  # every module has a layer


def test_no_import_circle():
    found = cycles()
    lines = []
    for component in found:
        inside = set(component)
        lines += [f"{m}:{line} -> {t}" for m in component for t, _, line in EDGES[m] if t in inside]
    assert not found, "import circles:\n" + "\n".join(lines)


def test_arrows_point_down():
    up = [(m, t, line) for m in MODULES for t, _, line in EDGES[m] if layer(t) > layer(m)]
    assert not up, "\n".join(f"{m}:{line} (L{layer(m)}) imports {t} (L{layer(t)})" for m, t, line in up)


@pytest.mark.parametrize("low", LOW)
def test_weights_model_and_data_never_reach_training_inference_or_cli(low):
    inside = [m for m in MODULES if m == low or m.startswith(low + ".")]
    assert inside
    bad = [f"{m}:{line} imports {t}" for m in inside for t, _, line in EDGES[m]
           if t.startswith(HIGH)]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_modules():
    """`from convnext.a import _b` (or `a._b`) elsewhere than in `convnext.a` couples a module to another's insides;
    dunders (`__version__`) are public."""
    taken = {(m, t, n) for m in MODULES for t, n, _ in EDGES[m] if n and n.startswith("_") and not n.startswith("__")}
    assert not taken, "\n".join(f"{m} imports {t}.{n}" for m, t, n in sorted(taken))
