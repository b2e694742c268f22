"""Export to ONNX / TorchScript / ExportedProgram: parity with eager (reloaded from the written file), dynamic
batch, norms kept in fp32 inside fp16/bf16 graphs, no overwriting, a failed check keeps no file, and the CLI."""

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from convnext.cli import main
from convnext.export import ParityError, export_model, prepare
from convnext.registry import create_model
from convnext.resolve import Preprocess, resolve
from convnext.weights import WEIGHTS, WeightSpec, from_ours

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
CASES = [(f, d) for f in SUFFIX for d in ("fp32", "fp16", "bf16") if (f, d) != ("onnx", "bf16")]


@pytest.fixture(scope="module")
def v2_model() -> torch.nn.Module:
    """A small ConvNeXt V2 (LayerNorm and GRN) with non-trivial GRN weights."""
    torch.manual_seed(0)
    model = create_model("convnextv2_atto", num_classes=10, **SMALL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.uniform_(-0.5, 0.5)
    return model


def _load(fmt: str, path: Path):
    if fmt == "onnx":
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            m = torch.jit.load(str(path))
        return m
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize("fmt,dtype", CASES)
def test_export_parity_and_dynamic_batch(v2_model, tmp_path, fmt, dtype):
    out = tmp_path / f"m{SUFFIX[fmt]}"
    r = export_model(v2_model, fmt, out, img_size=32, dynamic_batch=True, dtype=dtype)
    assert r.ok and out.is_file() and r.batch_sizes == [2, 5]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp folder or external data left behind
    if dtype == "fp32":
        assert r.max_diff <= 1e-4 and r.max_diff_vs_fp32 <= 1e-4
    else:
        assert r.max_diff <= r.tolerance and r.max_diff_vs_fp32 < 0.1
    # our own check, independent of the report: another batch size, against the fp32 eager model
    run = _load(fmt, out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got, want = run(x).float(), v2_model(x)
    assert got.shape == (3, 10) and got.dtype == torch.float32
    tol = 1e-4 if dtype == "fp32" else 0.1
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_fixed_batch_onnx_has_static_shape(v2_model, tmp_path):
    r = export_model(v2_model, "onnx", tmp_path / "m.onnx", img_size=32, batch_size=4)
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, 32, 32] and r.batch_sizes == [4]
    dyn = export_model(v2_model, "onnx", tmp_path / "d.onnx", img_size=32, dynamic_batch=True)
    dims = onnx.load(str(tmp_path / "d.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dyn.ok


def test_onnx_fp16_keeps_norms_in_fp32(v2_model, tmp_path):
    meta = {"model": "v2", "classes": [str(i) for i in range(10)], "img_size": 32, "crop_pct": 1.0,
            "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear", "dynamic_size": True}  # fmt: skip
    r = export_model(v2_model, "onnx", tmp_path / "h.onnx", img_size=32, dtype="fp16", dynamic_size=True, metadata=meta)
    assert r.ok and r.sizes == [32, 64]  # checked at a second size, traced there
    loaded = resolve(tmp_path / "h.onnx")  # the metadata survives the fp16 export and drives the preprocessing
    assert loaded.preprocess == Preprocess(32, 1.0, (0.5,) * 3, (0.25,) * 3, interpolation="bilinear")
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), v2_model(x), atol=0.1, rtol=0)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "h.onnx")))
    assert model.opset_import[0].version >= 17
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    by_op: dict[str, set] = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, set()).add(types.get(node.input[0]))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert by_op["LayerNormalization"] == {f32}  # every LayerNorm, channels-first ones included
    grn_ops = by_op.get("ReduceL2", set()) | by_op.get("ReduceSumSquare", set())
    assert grn_ops == {f32}  # GRN's spatial L2 norm
    assert f16 in by_op["Conv"] and (f16 in by_op.get("MatMul", set()) or f16 in by_op.get("Gemm", set()))


@pytest.fixture(scope="module")
def v1_model() -> torch.nn.Module:
    """A small ConvNeXt V1 with Linear MLPs (as timm's convnext_tiny and up) and no zero parameter, as trained weights
    have none (the exporter folds zero biases away)."""
    torch.manual_seed(0)
    model = create_model("convnext_tiny", num_classes=10, **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _ort_ops(path: Path) -> Counter:
    """Op types (and how many of each) of the graph onnxruntime runs for the file at `path`: ORT_ENABLE_ALL on
    the CPU provider, as deployed, read back from `SessionOptions.optimized_model_filepath`."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(path.with_suffix(".ort.onnx"))
    opts.log_severity_level = 3  # ORT warns that the saved graph holds this CPU's NCHWc layout
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(opts.optimized_model_filepath).graph.node)


def test_onnxruntime_runs_our_fp32_export_as_lean_as_timms(v1_model, tmp_path):
    """Issue 41: onnxruntime ran timm's export of the same weights faster, as each block's GELU in ours stayed five
    elementwise ops (Div, Erf, Add, Mul, Mul) that it did not fuse. Both files with a dynamic batch (timm's
    always has one): the same fused ops, the same MatMuls and LayerNorms, no Cast, and no op type more often in
    ours but the head's pooling (ours one ReduceMean, timm's GlobalAveragePool and Flatten)."""
    timm = pytest.importorskip("timm", reason="timm (the test extra) exports the peer model")
    from timm.utils.onnx import onnx_export

    export_model(v1_model, "onnx", tmp_path / "ours.onnx", img_size=32, dynamic_batch=True)
    peer = timm.create_model("convnext_tiny", num_classes=10, **SMALL).eval()
    target = peer.state_dict()
    peer.load_state_dict({k: v.reshape(target[k].shape) for k, v in from_ours(v1_model.state_dict(), "timm").items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter timm calls is deprecated
        onnx_export(peer, str(tmp_path / "timm.onnx"), example_input=torch.randn(2, 3, 32, 32), check=False)
    ours, theirs = _ort_ops(tmp_path / "ours.onnx"), _ort_ops(tmp_path / "timm.onnx")
    blocks = sum(SMALL["depths"])
    assert ours["BiasGelu"] == theirs["BiasGelu"] == blocks  # the fc1 bias and the GELU: one kernel
    assert ours["MatMul"] == theirs["MatMul"] == 2 * blocks  # the 1x1 products, neither as Conv nor Gemm
    assert ours["LayerNormalization"] == theirs["LayerNormalization"] == blocks + 5  # stem, 3 downsampling, head
    assert not {"Erf", "Div", "Gelu", "Cast", "Reshape"} & set(ours)
    assert {op for op in ours if ours[op] > theirs[op]} <= {"ReduceMean"} and theirs["GlobalAveragePool"] == 1
    assert sum(ours.values()) < sum(theirs.values())


def test_onnxruntime_runs_a_fixed_batch_fp32_export_with_one_gelu_op(v1_model, tmp_path):
    """At a fixed shape (the default batch 1) onnxruntime folds each MatMul and its bias add into a Gemm (between
    two Reshapes) before it could fuse the add into the GELU, as it does with timm's model exported at a fixed
    batch; the GELU is still one op, not the exporter's erf form."""
    export_model(v1_model, "onnx", tmp_path / "m.onnx", img_size=32)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.opset_import[0].version == 20
    blocks = sum(SMALL["depths"])
    assert Counter(n.op_type for n in model.graph.node)["Gelu"] == blocks
    ops = _ort_ops(tmp_path / "m.onnx")
    assert ops["Gelu"] == blocks and ops["Gemm"] == 2 * blocks + 1 and ops["LayerNormalization"] == blocks + 5
    assert not {"Erf", "Div", "Cast", "MatMul"} & set(ops)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_exported_program_keeps_norms_in_fp32(v2_model, tmp_path, dtype):
    export_model(v2_model, "exported-program", tmp_path / "m.pt2", img_size=32, dtype=dtype)
    graph = torch.export.load(str(tmp_path / "m.pt2")).graph
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    seen: dict[str, set] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            name = str(node.target).split(".")[1] if str(node.target).startswith("aten.") else str(node.target)
            seen.setdefault(name, set()).add(node.args[0].meta["val"].dtype if node.args else None)
    norms = seen.get("layer_norm", set()) | seen.get("native_layer_norm", set())
    assert norms == {torch.float32}
    assert seen["linalg_vector_norm"] == {torch.float32}
    assert low in seen["conv2d"] and low in (seen.get("linear", set()) | seen.get("addmm", set()))


def test_torchscript_fp16_keeps_norms_in_fp32(v2_model, tmp_path):
    """TorchScript graphs lose dtypes on save, so watch the reloaded module run: input dtype of every op."""
    from torch.profiler import ProfilerActivity, profile

    export_model(v2_model, "torchscript", tmp_path / "m.pt", img_size=32, dtype="fp16")
    module = _load("torchscript", tmp_path / "m.pt")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        module(torch.randn(1, 3, 32, 32))
    seen: dict[str, set] = {}
    for e in prof.profiler.kineto_results.events():
        if e.dtypes():
            seen.setdefault(e.name(), set()).add(e.dtypes()[0])
    assert seen["aten::layer_norm"] == {"float"} and seen["aten::linalg_vector_norm"] == {"float"}
    assert seen["aten::linear"] == {"c10::Half"}


def test_prepare_leaves_the_model_alone(v2_model):
    before = {k: v.clone() for k, v in v2_model.state_dict().items()}
    prepare(v2_model, "bf16")
    assert all(v.dtype == torch.float32 for v in v2_model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in v2_model.state_dict().items())


def test_refuses_to_overwrite_unless_forced(v2_model, tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--force"):
        export_model(v2_model, "torchscript", out, img_size=32)
    assert out.read_bytes() == b"precious"
    export_model(v2_model, "torchscript", out, img_size=32, force=True)
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize("fmt", SUFFIX)
def test_exported_files_get_the_mode_of_the_umask(v2_model, tmp_path, fmt):
    """What a new file gets (0666 less the umask), not the 0600 of a temporary one."""
    out = tmp_path / f"m{SUFFIX[fmt]}"
    old = os.umask(0o027)
    try:
        export_model(v2_model, fmt, out, img_size=32)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640


def test_failed_parity_writes_nothing(v2_model, tmp_path):
    out = tmp_path / "h.onnx"
    with pytest.raises(ParityError, match="differs from eager"):
        export_model(v2_model, "onnx", out, img_size=32, dtype="fp16", atol=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_bad_requests(v2_model, tmp_path):
    with pytest.raises(ValueError, match="bf16 ONNX"):
        export_model(v2_model, "onnx", tmp_path / "m.onnx", dtype="bf16")
    with pytest.raises(ValueError, match=".pt2"):
        export_model(v2_model, "exported-program", tmp_path / "m.pt")
    with pytest.raises(ValueError, match="opset"):
        export_model(v2_model, "onnx", tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="format"):
        export_model(v2_model, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ValueError, match="--dynamic-size needs --format onnx"):
        export_model(v2_model, "torchscript", tmp_path / "m.pt", dynamic_size=True)
    with pytest.raises(ValueError, match="ONNX files only"):
        export_model(v2_model, "exported-program", tmp_path / "m.pt2", metadata={"model": "m"})
    assert list(tmp_path.iterdir()) == []


def test_cli_export_exit_codes(tmp_path, capsys):
    out = tmp_path / "atto.pt2"
    args = ["export", "convnext_atto", "--format", "exported-program", "--output", str(out), "--img-size", "32"]
    assert main(args + ["--dynamic-batch"]) == 0
    printed = capsys.readouterr().out
    assert "max |diff|" in printed and str(out) in printed
    assert main(args) == 2  # exists
    assert "--force" in capsys.readouterr().err
    onnx_args = ["export", "convnext_atto", "--format", "onnx", "--output", str(tmp_path / "a.onnx")]
    assert main(onnx_args + ["--img-size", "32", "--dtype", "fp16", "--atol", "1e-12"]) == 1  # parity fails
    assert "FAILED" in capsys.readouterr().err and not (tmp_path / "a.onnx").exists()
    x = torch.randn(2, 3, 32, 32)
    got = torch.export.load(str(out)).module()(x)
    assert got.shape == (2, 1000) and np.isfinite(got.detach().numpy()).all()


def test_cli_export_traces_at_the_size_the_weights_are_evaluated_at(tmp_path, monkeypatch, capsys):
    """A tagged name exports at its spec's test size, what eval and predict feed it (--img-size: that size)."""
    spec = WeightSpec(
        "convnext_atto",
        "local_test",
        "https://example.invalid/w.pth",
        None,
        "ours",
        num_classes=10,
        input_size=32,
        test_input_size=64,
        test_crop_pct=1.0,
        model_kwargs=tuple(SMALL.items()),
    )
    monkeypatch.setitem(WEIGHTS, spec.name, spec)
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path / "home"))  # the weights are in the download cache already
    (tmp_path / "home" / "weights").mkdir(parents=True)
    weights = create_model("convnext_atto", num_classes=10, **SMALL).state_dict()
    torch.save(weights, tmp_path / "home" / "weights" / spec.filename)
    out = tmp_path / "m.pt"
    assert main(["export", spec.name, "--format", "torchscript", "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["img_size"] == 64
