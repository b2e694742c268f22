"""The C kernels (depthwise weight gradient, GELU with its derivative, LayerNorm, the tiled MLP) against aten's
and float64 references, on the shapes and dtypes the fast path gives them. Each test counts the calls into the C
library (`c_kernels`, tests/fast/conftest.py), so it checks the C kernel, or the fallback it names, never aten
against itself; without a built library those tests skip and say why."""

import logging

import pytest
import torch

from convnext.fast import kernels


def _aten_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    c = x.shape[1]
    weight = torch.empty(c, 1, k, k)
    args = (grad.float(), x.float(), weight, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], c)
    return torch.ops.aten.convolution_backward(*args, [False, True, False])[1]


@pytest.mark.parametrize(
    ("b", "c", "h", "w", "k"),
    [(2, 40, 9, 7, 7), (3, 16, 5, 6, 3), (1, 24, 8, 8, 5), (2, 37, 6, 4, 7), (2, 8, 4, 4, 11), (1, 3, 10, 10, 9)],
)
def test_matches_aten(b, c, h, w, k, c_kernels):
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(b, c, h, w)  # any layout
    out = kernels.depthwise_weight_grad(x, grad, k)
    assert c_kernels["depthwise_weight_grad"] == 1
    assert out.shape == (c, 1, k, k) and out.dtype == torch.float32
    torch.testing.assert_close(out, _aten_weight_grad(x, grad, k), atol=1e-4, rtol=1e-4)


def test_bf16_inputs_are_summed_in_float32(c_kernels):
    torch.manual_seed(0)
    x, grad = torch.randn(4, 16, 8, 8).bfloat16(), torch.randn(4, 16, 8, 8).bfloat16()
    torch.testing.assert_close(kernels.depthwise_weight_grad(x, grad, 7), _aten_weight_grad(x, grad, 7))
    assert c_kernels["depthwise_weight_grad"] == 1


def test_even_kernel_falls_back_to_aten(c_kernels):
    x, grad = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 7, 7)  # k = 4, padding 2: output one larger
    out = kernels.depthwise_weight_grad(x, grad, 4)
    torch.testing.assert_close(out, _aten_weight_grad(x, grad, 4))
    assert c_kernels["depthwise_weight_grad"] == 0  # the library is there, and aten ran: the fallback is tested


def test_builds_into_the_cache_folder(tmp_path, monkeypatch):
    if not kernels.available():
        pytest.skip(f"no C kernels on this machine, aten's kernels run instead ({kernels.status()})")
    monkeypatch.setenv("CONVNEXT_CACHE", str(tmp_path))
    lib, status = kernels._build.__wrapped__()  # a fresh build, not the process's cached one
    assert lib is not None and status.startswith("built: ") and str(tmp_path) in status
    built = list((tmp_path / "kernels").glob("convnext-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "kernels").iterdir() if p.is_dir()]  # no leftovers


def test_traces_under_torch_compile(c_kernels):
    x, grad = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    compiled = torch.compile(lambda a, g: kernels.depthwise_weight_grad(a, g, 7) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x, grad), 2 * _aten_weight_grad(x, grad, 7))
    assert c_kernels["depthwise_weight_grad"] == 1  # the compiled graph calls the C kernel (traced with the fake)


def test_unwritable_cache_falls_back_to_aten(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CONVNEXT_CACHE", str(blocker))  # cache_dir() lies under a file: cannot be created
    monkeypatch.delenv(kernels.REQUIRE, raising=False)
    with caplog.at_level(logging.WARNING, logger="convnext.fast.kernels"):
        lib, status = kernels._build.__wrapped__()
    assert lib is None and status.startswith("unavailable: cannot build or load")
    assert "aten's kernels run instead" in caplog.text  # said, not silent


def test_a_failing_compiler_is_named_with_its_first_error_lines(tmp_path, monkeypatch, caplog):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'depthwise.c:1: error: no such thing' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("CONVNEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.REQUIRE, raising=False)
    with caplog.at_level(logging.WARNING, logger="convnext.fast.kernels"):
        lib, status = kernels._build.__wrapped__()
    assert lib is None and "depthwise.c:1: error: no such thing" in status and "no such thing" in caplog.text
    monkeypatch.setenv(kernels.REQUIRE, "1")  # CI: a fallback is a failure
    with pytest.raises(RuntimeError, match="CONVNEXT_REQUIRE_KERNELS=1"):
        kernels._build.__wrapped__()


def test_weight_grad_is_the_same_bits_every_time_at_several_threads(c_kernels):
    """Per-thread partial sums added in thread order: no dependence on which thread finishes first."""
    torch.manual_seed(0)
    x, grad = torch.randn(6, 32, 9, 9), torch.randn(6, 32, 9, 9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        first = kernels.depthwise_weight_grad(x, grad, 7)
        assert all(torch.equal(first, kernels.depthwise_weight_grad(x, grad, 7)) for _ in range(20))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(first, _aten_weight_grad(x, grad, 7))
    assert c_kernels["depthwise_weight_grad"] == 21


def _gelu_and_grad_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h64 = h.double().requires_grad_()
    a = torch.nn.functional.gelu(h64)
    (d,) = torch.autograd.grad(a.sum(), h64)
    return a.detach(), d


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4099])  # the vector width, its tail, and several threads' share
def test_gelu_with_grad_matches_float64(n, c_kernels):
    torch.manual_seed(0)
    h = torch.randn(n) * 4
    h[:3] = torch.tensor([0.0, -1e-30, 40.0])[: min(3, n)]
    a, d = kernels.gelu_with_grad(h)
    ra, rd = _gelu_and_grad_reference(h)
    assert a.dtype == d.dtype == torch.float32
    assert (a.double() - ra).abs().max() < 2e-6 and (d.double() - rd).abs().max() < 2e-6
    assert torch.isfinite(kernels.gelu_with_grad(torch.tensor([-200.0, 200.0]))[1]).all()  # exp underflow clamped
    a, d = kernels.gelu_with_grad(torch.linspace(-200.0, -10.01, 64))  # written as 0: grad * d gives no denormals
    assert not a.any() and not d.any()
    assert c_kernels["gelu_with_grad"] == 3


def test_gelu_with_grad_keeps_layout_and_bf16(c_kernels):  # float32 by the C kernel, bf16 through aten's fallback
    torch.manual_seed(0)
    h = torch.randn(2, 24, 5, 3).contiguous(memory_format=torch.channels_last)
    a, d = kernels.gelu_with_grad(h)
    assert c_kernels["gelu_with_grad"] == 1
    assert a.is_contiguous(memory_format=torch.channels_last) and d.stride() == h.stride()
    torch.testing.assert_close(a, torch.nn.functional.gelu(h), atol=2e-6, rtol=0)
    hb = h.bfloat16()
    ab, db = kernels.gelu_with_grad(hb)
    ra, rd = _gelu_and_grad_reference(hb)
    assert ab.dtype == torch.bfloat16
    torch.testing.assert_close(ab.double(), ra, atol=0.02, rtol=0.01)  # one bf16 rounding
    torch.testing.assert_close(db.double(), rd, atol=0.02, rtol=0.01)
    assert c_kernels["gelu_with_grad"] == 1  # bf16: not the C kernel


def test_gelu_with_grad_without_the_library_is_the_same(monkeypatch, c_kernels):
    torch.manual_seed(0)
    h = torch.randn(3, 8, 4, 4) * 3
    native = kernels.gelu_with_grad(h)
    assert c_kernels["gelu_with_grad"] == 1
    monkeypatch.setattr(kernels, "_library", lambda *kernel: None)
    for got, want in zip(kernels.gelu_with_grad(h), native):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def _layer_norm_reference(x, weight, bias, grad):
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    out = torch.nn.functional.layer_norm(x64, (x.shape[-1],), w64, b64, 1e-6)
    return out.detach(), *torch.autograd.grad(out, (x64, w64, b64), grad.double())


@pytest.mark.parametrize("c", [1, 15, 16, 17, 40, 200])  # no vector, a tail, one vector, wider rows
def test_layer_norm_forward_and_backward_match_float64(c, c_kernels):
    torch.manual_seed(0)
    x, grad = torch.randn(3, 7, 5, c) * 3 + 1, torch.randn(3, 7, 5, c)
    weight, bias = torch.randn(c), torch.randn(c)
    out, mean, rstd = kernels.layer_norm(x, weight, bias, 1e-6)
    assert mean.shape == rstd.shape == (3, 7, 5, 1)
    grads = kernels.layer_norm_backward(grad, x, mean, rstd, weight)
    assert c_kernels["layer_norm_rows"] == c_kernels["layer_norm_rows_backward"] == 1
    for got, want in zip((out, *grads), _layer_norm_reference(x, weight, bias, grad)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_layer_norm_falls_back_to_aten_alike(monkeypatch, c_kernels):
    """Without the library, and for input the kernel does not take (strided, bf16), aten gives the same numbers."""
    torch.manual_seed(0)
    x, grad, weight, bias = torch.randn(4, 6, 6, 24), torch.randn(4, 6, 6, 24), torch.randn(24), torch.randn(24)
    native = kernels.layer_norm(x, weight, bias, 1e-6)
    native_grads = kernels.layer_norm_backward(grad, x, *native[1:], weight)
    strided = kernels.layer_norm(x.transpose(1, 2).contiguous().transpose(1, 2), weight, bias, 1e-6)
    torch.testing.assert_close(strided[0], native[0], atol=1e-5, rtol=0)
    bf16 = kernels.layer_norm(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), 1e-6)[0]
    torch.testing.assert_close(bf16.float(), native[0], atol=0.05, rtol=0.02)
    assert c_kernels["layer_norm_rows"] == c_kernels["layer_norm_rows_backward"] == 1  # strided and bf16: aten's
    monkeypatch.setattr(kernels, "_library", lambda *kernel: None)
    for got, want in zip(kernels.layer_norm(x, weight, bias, 1e-6), native):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(kernels.layer_norm_backward(grad, x, *native[1:], weight), native_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def _mlp_reference(y, w1, b1, w2, b2, shortcut, grad):
    y64, w164, b164, w264, b264 = (t.double().requires_grad_() for t in (y, w1, b1, w2, b2))
    out = torch.nn.functional.gelu(y64 @ w164.t() + b164) @ w264.t() + b264
    out = out if shortcut is None else out + shortcut.double()
    return out.detach(), *torch.autograd.grad(out, (y64, w164, b164, w264, b264), grad.double())


@pytest.mark.parametrize(
    ("rows", "c", "shortcut"),
    [(1, 8, True), (98, 40, True), (193, 20, False), (96, 24, True), (250, 64, False), (37, 3, True)],
)  # one row, tiles and a partial one, columns 16 wide + tails (C = 20: 4C = 80), no shortcut (drop path)
def test_tiled_mlp_forward_and_backward_match_float64(rows, c, shortcut, tiled_mlp_kernel):
    torch.manual_seed(0)
    y, grad = torch.randn(rows, c), torch.randn(rows, c)
    w1, b1, w2, b2 = torch.randn(4 * c, c) / c**0.5, torch.randn(4 * c), torch.randn(c, 4 * c) / 2, torch.randn(c)
    sc = torch.randn(rows, c) if shortcut else None
    out, a, d = kernels.mlp_forward(y, w1, b1, w2, b2, sc)
    a_ref, d_ref = _gelu_and_grad_reference(y.double() @ w1.double().t() + b1.double())
    torch.testing.assert_close(a.double(), a_ref, atol=1e-5, rtol=1e-5)  # what the backward reads
    torch.testing.assert_close(d.double(), d_ref, atol=1e-5, rtol=1e-5)
    grads = kernels.mlp_backward(grad, y, w1, a, d, w2)
    assert tiled_mlp_kernel["mlp_forward"] == tiled_mlp_kernel["mlp_backward"] == 1
    for got, want in zip((out, *grads), _mlp_reference(y, w1, b1, w2, b2, sc, grad)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_tiled_mlp_takes_unaligned_rows_and_falls_back_alike(monkeypatch, tiled_mlp_kernel):
    """Inputs that start off a 64-byte boundary give the same numbers, and so does aten's composition without the
    library."""
    torch.manual_seed(0)
    rows, c = 130, 16
    y, grad, sc = torch.randn(rows, c), torch.randn(rows, c), torch.randn(rows, c)
    w1, b1, w2, b2 = torch.randn(4 * c, c), torch.randn(4 * c), torch.randn(c, 4 * c), torch.randn(c)
    native = kernels.mlp_forward(y, w1, b1, w2, b2, sc)
    native_grads = kernels.mlp_backward(grad, y, w1, native[1], native[2], w2)
    unaligned = torch.empty(rows * 4 * c + 1)[1:].view(rows, 4 * c)  # 4 bytes past the allocation's alignment
    y_off = torch.empty(rows * c + 3)[3:].view(rows, c).copy_(y)
    out, a, d = kernels.mlp_forward(y_off, w1, b1, w2, b2, sc)
    torch.testing.assert_close(out, native[0], atol=1e-5, rtol=1e-5)
    a_off, d_off = unaligned.copy_(a), torch.empty(rows * 4 * c + 1)[1:].view(rows, 4 * c).copy_(d)
    for got, want in zip(kernels.mlp_backward(grad, y_off, w1, a_off, d_off, w2), native_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert tiled_mlp_kernel["mlp_forward"] == tiled_mlp_kernel["mlp_backward"] == 2
    monkeypatch.setattr(kernels, "_library", lambda *kernel: None)
    assert not kernels.tiled_mlp_available()
    for got, want in zip(kernels.mlp_forward(y, w1, b1, w2, b2, sc), native):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for got, want in zip(kernels.mlp_backward(grad, y, w1, native[1], native[2], w2), native_grads):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)


def test_tiled_mlp_traces_under_torch_compile(tiled_mlp_kernel):
    torch.manual_seed(0)
    y, w1, b1, w2, b2 = torch.randn(50, 8), torch.randn(32, 8), torch.randn(32), torch.randn(8, 32), torch.randn(8)
    compiled = torch.compile(lambda *t: kernels.mlp_forward(*t, None)[0] * 2, fullgraph=True)
    torch.testing.assert_close(compiled(y, w1, b1, w2, b2), 2 * kernels.mlp_forward(y, w1, b1, w2, b2, None)[0])
    assert tiled_mlp_kernel["mlp_forward"] == 2  # compiled and eager: both the C kernel


def test_kernels_off_sends_each_named_op_to_aten_and_an_unknown_name_is_an_error(monkeypatch, c_kernels):
    """CONVNEXT_KERNELS_OFF (what benchmarks/kernel_gains.py times each kernel's gain with)."""
    torch.manual_seed(0)
    x = torch.randn(64, 40)
    w, b = torch.randn(40), torch.randn(40)
    kernels.switched_off.cache_clear()
    monkeypatch.setenv(kernels.OFF, "layer_norm, gelu")
    try:
        assert kernels.switched_off() == {"layer_norm", "gelu"}
        assert kernels._library("layer_norm") is None and kernels._library("gelu") is None
        assert kernels._library("depthwise") is not None  # the others still run the C kernels
        out = kernels.layer_norm(x, w, b, 1e-6)[0]  # aten's
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (40,), w, b, 1e-6), atol=0, rtol=0)
        assert c_kernels["layer_norm_rows"] == 0
        assert "switched off" in kernels.status()
        kernels.switched_off.cache_clear()
        monkeypatch.setenv(kernels.OFF, "layernorm")
        with pytest.raises(ValueError, match="unknown kernel.*layernorm.*choose from depthwise"):
            kernels.switched_off()
    finally:
        kernels.switched_off.cache_clear()
