"""FCMAE's masked encoder, decoder and loss: the dense emulation against an independent sparse implementation on
coordinate lists (the MinkowskiEngine semantics: removed patches do not exist), no leak from removed pixels, a loss
that only removed patches touch, and the input sizes the masking cannot tile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convnext.model import GRN
from convnext.pretrain.fcmae import (
    FCMAE,
    FCMAEConfig,
    mask_grid,
    masked_features,
    patchify,
    random_mask,
    unpatchify,
    upsample_mask,
    visible_count,
)
from convnext.registry import create_model

SHAPE = {"depths": (2, 1, 1, 1), "dims": (8, 16, 32, 64)}


def randomized(name: str = "convnextv2_atto", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small encoder with every parameter random (GRN's gamma and beta and the norms included)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=0, **{**SHAPE, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 0.3))
    return model.eval()


# ---------------------------------------------------------------- an independent sparse reference
def _sparse_conv(weight: torch.Tensor, bias: torch.Tensor, coords: torch.Tensor, f: torch.Tensor, size) -> torch.Tensor:
    """Depthwise k x k "same" convolution on the sites `coords` (n, 2) with features f (n, C): each output sums over
    the neighbours that exist; absent sites (removed patches, or outside the map) contribute nothing."""
    k, r = weight.shape[-1], weight.shape[-1] // 2
    index = torch.full(size, -1, dtype=torch.long)
    index[coords[:, 0], coords[:, 1]] = torch.arange(len(coords))
    out = bias.expand(len(coords), -1).clone()
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            ni, nj = coords[:, 0] + di, coords[:, 1] + dj
            inside = (ni >= 0) & (ni < size[0]) & (nj >= 0) & (nj < size[1])
            nb = torch.full((len(coords),), -1, dtype=torch.long)
            nb[inside] = index[ni[inside], nj[inside]]
            there = nb >= 0
            out[there] += weight[:, 0, di + r, dj + r] * f[nb[there]]
    assert k == 2 * r + 1
    return out


def _sparse_block(block, coords, f, size):
    y = _sparse_conv(block.dwconv.weight, block.dwconv.bias, coords, f, size)
    y = F.layer_norm(y, (y.shape[-1],), block.norm.weight, block.norm.bias, block.norm.eps)
    y = F.gelu(y @ block.pwconv1.weight.T + block.pwconv1.bias)
    if isinstance(block.grn, GRN):  # the norm over the sites that exist
        gx = y.norm(dim=0, keepdim=True)
        y = y + block.grn.bias + block.grn.weight * (y * (gx / (gx.mean() + block.grn.eps)))
    y = y @ block.pwconv2.weight.T + block.pwconv2.bias
    if block.gamma is not None:
        y = y * block.gamma
    return f + y


def _sparse_downsample(ds, coords, f):
    """LayerNorm per site, then the 2x2 stride-2 conv over the children that exist."""
    ln, conv = ds[0], ds[1]
    f = F.layer_norm(f, (f.shape[-1],), ln.weight, ln.bias, ln.eps)
    parents, inverse = torch.unique(coords // 2, dim=0, return_inverse=True)
    out = conv.bias.expand(len(parents), -1).clone()
    for n, (i, j) in enumerate(coords.tolist()):
        out[inverse[n]] += conv.weight[:, :, i % 2, j % 2] @ f[n]
    return parents, out


def sparse_reference(encoder, x: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: (visible cells of the last stage (n, 2), their features (n, C)), computed on coordinate lists."""
    stem = encoder.stem
    out = []
    for b in range(len(x)):
        s = stem(x[b : b + 1])[0]  # a patchify stem: each site sees its own pixels only
        keep = ~upsample_mask(mask[b : b + 1], s.shape[-2:])[0, 0]
        coords = keep.nonzero()
        f = s[:, coords[:, 0], coords[:, 1]].T  # (n, C)
        size = tuple(s.shape[-2:])
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                coords, f = _sparse_downsample(stage.downsample, coords, f)
                size = (size[0] // 2, size[1] // 2)
            for block in stage.blocks:
                f = _sparse_block(block, coords, f, size)
        out.append((coords, f))
    return out


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto"])  # V2 (GRN) and V1 (layer scale)
def test_dense_masked_encoder_equals_the_sparse_network(name):
    encoder = randomized(name, patch_size=2, **({"layer_scale_init": 0.5} if name == "convnext_atto" else {}))
    x = torch.randn(3, 3, 64, 64)  # 16px patches: a 4x4 grid
    mask = random_mask(3, (4, 4), 0.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = masked_features(encoder, x, mask)
        ref = sparse_reference(encoder, x, mask)
    assert dense.shape == (3, 64, 4, 4)
    for b, (coords, f) in enumerate(ref):
        assert len(coords) == visible_count((4, 4), 0.6) == 6
        torch.testing.assert_close(dense[b, :, coords[:, 0], coords[:, 1]].T, f, rtol=1e-4, atol=1e-4)
        assert (dense[b][:, mask[b]] == 0).all()  # removed cells stay empty


def test_removed_pixels_do_not_leak_into_the_encoder():
    encoder = randomized(patch_size=2)
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, (4, 4), 0.6, generator=torch.Generator().manual_seed(2))
    junk = torch.where(upsample_mask(mask, (64, 64)), torch.randn_like(x) * 100, x)
    with torch.no_grad():
        assert torch.equal(masked_features(encoder, x, mask), masked_features(encoder, junk, mask))
        full = masked_features(encoder, x, torch.zeros_like(mask))
        assert not torch.allclose(full, masked_features(encoder, x, mask))  # the mask does change what is seen


def test_fast_depthwise_path_matches_the_plain_one():
    encoder = randomized(patch_size=2)
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, (4, 4), 0.6, generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for fast in (False, True):
        encoder.zero_grad()
        y = masked_features(encoder, x, mask, fast=fast)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(encoder.stages[0].blocks[0].dwconv.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_random_mask_keeps_the_same_count_per_image_and_is_seeded():
    a = random_mask(5, (7, 7), 0.6, generator=torch.Generator().manual_seed(0))
    b = random_mask(5, (7, 7), 0.6, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 7, 7) and a.dtype == torch.bool and torch.equal(a, b)
    assert ((~a).flatten(1).sum(1) == int(49 * 0.4)).all()  # 19 of 49 patches seen, as the official code counts
    assert not torch.equal(a[0], a[1])
    assert upsample_mask(a, (28, 28)).shape == (5, 1, 28, 28)


def test_patchify_round_trip_and_order():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 16 * 16 * 3)
    torch.testing.assert_close(p[0, 1].view(16, 16, 3), x[0, :, :16, 16:32].permute(1, 2, 0))  # row-major cells
    assert torch.equal(unpatchify(p, 16, (2, 3)), x)


def _fcmae(**cfg) -> FCMAE:
    return FCMAE(randomized(patch_size=2), FCMAEConfig(decoder_dim=32, **cfg))


def test_loss_touches_removed_patches_only():
    model = _fcmae()
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, (4, 4), 0.6, generator=torch.Generator().manual_seed(4))
    pred = torch.randn(2, 16 * 16 * 3, 4, 4, requires_grad=True)
    loss = model.forward_loss(x, pred, mask)
    loss.sum().backward()
    seen = (~mask)[:, None].expand_as(pred)
    assert (pred.grad[seen] == 0).all() and (pred.grad[~seen] != 0).any()
    other = torch.where(seen, torch.randn_like(pred), pred)  # other predictions for the visible cells
    torch.testing.assert_close(model.forward_loss(x, other, mask), loss)
    x2 = torch.where(upsample_mask(mask, (64, 64)), x, torch.randn_like(x))  # other pixels in the visible patches
    torch.testing.assert_close(model.forward_loss(x2, pred, mask), loss)
    # the target is each patch normalised by its own mean and variance: predicting that costs nothing
    t = patchify(x, 16)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    perfect = t.transpose(1, 2).reshape(2, -1, 4, 4)
    assert model.forward_loss(x, perfect, mask).abs().max() < 1e-6


def test_forward_trains_and_reconstructs():
    model = _fcmae()
    model.train()
    x = torch.randn(4, 3, 64, 64)
    loss, pred, mask = model(x)
    assert loss.ndim == 0 and torch.isfinite(loss) and pred.shape == (4, 768, 4, 4) and mask.shape == (4, 4, 4)
    loss.backward()
    assert model.mask_token.grad is not None and model.encoder.stem[0].weight.grad.abs().sum() > 0
    assert "encoder.norm.weight" not in model.state_dict() and "encoder.head.weight" not in model.state_dict()
    recon = model.reconstruct(x, mask)
    seen = ~upsample_mask(mask, (64, 64)).expand_as(x)
    torch.testing.assert_close(recon[seen], x[seen])  # visible patches as given


@pytest.mark.parametrize(
    "size, message", [(70, "not tiled by the 16px masking patches.*64 or 80"), (16, "1x1 grid.*keeps 0 of 1")]
)
def test_sizes_the_masking_cannot_tile_are_named(size, message):
    with pytest.raises(ValueError, match=message):
        _fcmae()(torch.zeros(1, 3, size, size))
    with pytest.raises(ValueError, match="keeps 0 of 16: nothing would be seen"):
        mask_grid(64, 64, 16, 0.95)


def test_v2_sizes_get_the_paper_grid_at_224():
    for name, stride in (("convnextv2_atto", 32), ("convnextv2_tiny", 32), ("convnext_isotropic_small", 16)):
        model = create_model(name, num_classes=0, depths=(1,) * (1 if "isotropic" in name else 4))
        assert FCMAE(model, FCMAEConfig(decoder_dim=8)).grid(224, 224) == (224 // stride,) * 2
