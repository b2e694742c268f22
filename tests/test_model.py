"""The network itself: parts, options and the backbone API, on tiny models and small images."""

import pytest
import torch

from convnext.model import (
    GRN,
    VARIANTS,
    Block,
    ConvNeXt,
    ConvNeXtConfig,
    ConvNeXtFeatures,
    DropPath,
    LayerNorm2d,
    SimpleNorm,
    SimpleNorm2d,
)

TINY = ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), num_classes=5)


def test_layernorm2d_matches_layernorm_over_channels():
    x = torch.randn(2, 8, 5, 7)
    ln = LayerNorm2d(8)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)
    mean = ln(x).sub(ln.bias[:, None, None]).div(ln.weight[:, None, None]).mean(1)
    assert mean.abs().max() < 1e-4


def test_grn_starts_as_identity_and_follows_the_formula():
    x = torch.randn(2, 4, 4, 6)
    grn = GRN(6)
    torch.testing.assert_close(grn(x), x)
    grn.weight.data.fill_(0.5)
    grn.bias.data.fill_(0.1)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), 0.5 * (x * nx) + 0.1 + x)


def test_grn_does_not_overflow_in_fp16():
    x = torch.full((1, 64, 64, 4), 200.0, dtype=torch.float16)  # sum of squares 1.6e8 > fp16 max
    grn = GRN(4).half()
    grn.weight.data.fill_(1.0)
    assert torch.isfinite(grn(x)).all()


def test_drop_path_is_identity_in_eval_and_keeps_expectation_in_train():
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert abs(y.mean().item() - 1.0) < 0.1


def test_block_layer_scale_and_residual():
    blk = Block(8, TINY)
    assert torch.allclose(blk.gamma, torch.full((8,), 1e-6))
    x = torch.randn(2, 8, 6, 6)
    assert (blk(x) - x).abs().max() < 1e-4  # gamma 1e-6: the block starts near the identity
    assert Block(8, TINY.with_(layer_scale_init=0.0)).gamma is None


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_shapes_and_strides(patch):
    model = ConvNeXt(TINY.with_(patch_size=patch))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    assert [32 // f.shape[-1] for f in feats] == [patch, 2 * patch, 4 * patch, 8 * patch]
    assert [i["reduction"] for i in model.feature_info] == [patch, 2 * patch, 4 * patch, 8 * patch]
    torch.testing.assert_close(model.forward_features(x), feats[-1])


def test_forward_head_pre_logits_and_reset_classifier():
    model = ConvNeXt(TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.cfg.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_head_init_scale_and_init():
    torch.manual_seed(0)
    small = ConvNeXt(TINY.with_(head_init_scale=1e-3))
    torch.manual_seed(0)
    plain = ConvNeXt(TINY)
    torch.testing.assert_close(small.head.weight, plain.head.weight * 1e-3)
    assert 0.01 < plain.head.weight.std() < 0.03  # trunc_normal(std=0.02)
    assert all(m.bias.abs().sum() == 0 for m in small.modules() if isinstance(m, torch.nn.Conv2d))


def test_in_chans_and_drop_rate():
    model = ConvNeXt(TINY.with_(in_chans=1, drop_rate=0.5))
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_drop_path_rates_rise_linearly():
    model = ConvNeXt(TINY.with_(drop_path_rate=0.4))
    rates = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)
    assert rates == sorted(rates) and len(rates) == 5


def test_channels_last_gives_same_output():
    model = ConvNeXt(TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = ConvNeXt(TINY.with_(layer_scale_init=0.5))
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, r in zip((p.grad for p in model.parameters()), ref):
        torch.testing.assert_close(g, r)


def test_no_weight_decay_is_every_1d_param():
    model = ConvNeXt(TINY)
    nwd = model.no_weight_decay()
    assert "stages.0.blocks.0.gamma" in nwd and "head.bias" in nwd and "stem.1.weight" in nwd
    assert "head.weight" not in nwd and "stages.0.blocks.0.pwconv1.weight" not in nwd


def test_features_backbone_with_norms_and_indices():
    model = ConvNeXt(TINY)
    bb = ConvNeXtFeatures(model, out_indices=(1, 2, 3))
    outs = bb(torch.randn(1, 3, 64, 64))
    assert list(outs) == ["1", "2", "3"] and bb.out_channels == [16, 32, 64] and bb.strides == [8, 16, 32]
    assert [o.shape[-1] for o in outs.values()] == [8, 4, 2]
    assert ConvNeXtFeatures(model, norms=False).norms["0"].__class__.__name__ == "Identity"


def test_isotropic_has_one_stage_at_patch_stride():
    model = ConvNeXt(ConvNeXtConfig(depths=(2,), dims=(16,), patch_size=16, stem_norm=False, num_classes=3))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)[0].shape == (1, 16, 4, 4)


def test_torch_export_matches_eager():
    model = ConvNeXt(TINY.with_(grn=True, layer_scale_init=0.0)).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x))


def test_stages_after_the_first_downsample_even_at_equal_width():
    model = ConvNeXt(ConvNeXtConfig(depths=(1, 1), dims=(8, 8), num_classes=2))
    assert model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)[1].shape == (1, 8, 4, 4)


def test_default_state_dict_keys_are_unchanged():
    """Our layout for the default options (converted weights and checkpoints rely on it): a two-stage model's every
    key, the new options' modules (norm_pre, pre_logits) leaving no trace."""
    model = ConvNeXt(ConvNeXtConfig(depths=(1, 1), dims=(8, 16), num_classes=3))
    block = ["gamma", "dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight", "pwconv1.bias",
             "pwconv2.weight", "pwconv2.bias"]  # fmt: skip
    want = ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]
    want += [f"stages.0.blocks.0.{k}" for k in block]
    want += [f"stages.1.downsample.{k}" for k in ("0.weight", "0.bias", "1.weight", "1.bias")]
    want += [f"stages.1.blocks.0.{k}" for k in block] + ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert list(model.state_dict()) == want


def test_simple_norm_divides_by_the_std_without_centring():
    x = torch.randn(2, 5, 3, 8) + 3.0  # far from zero mean: centring would show
    norm = SimpleNorm(8)
    torch.nn.init.normal_(norm.weight)
    want = x / torch.sqrt(x.var(dim=-1, unbiased=True, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)
    norm2d = SimpleNorm2d(8)
    norm2d.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm2d(x.permute(0, 3, 1, 2)), want.permute(0, 3, 1, 2))
    assert list(norm.state_dict()) == ["weight"]  # no bias


@pytest.mark.parametrize(
    ("stem_type", "widths"), [("overlap", [8, 8]), ("overlap_tiered", [8, 8]), ("overlap_act", [8, 8])]
)
def test_overlapping_stems_have_stride_4(stem_type, widths):
    model = ConvNeXt(TINY.with_(stem_type=stem_type)).eval()
    convs = [m for m in model.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths and all(c.kernel_size == (3, 3) for c in convs)
    assert isinstance(model.stem[1], torch.nn.GELU) == (stem_type == "overlap_act")
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [32 // f.shape[-1] for f in feats] == [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert model(x).shape == (2, 5)


@pytest.mark.parametrize(("width", "mid"), [(32, 16), (40, 24), (48, 24), (64, 32), (80, 40), (22, 16)])
def test_tiered_stem_first_conv_is_half_as_wide_rounded_to_8(width, mid):
    model = ConvNeXt(ConvNeXtConfig(depths=(1,), dims=(width,), stem_type="overlap_tiered"))
    assert model.stem[0].out_channels == mid  # timm's make_divisible(width // 2): 20 -> 24, 11 -> 16 (not 8)


def test_head_norm_first_norms_the_map_before_pooling():
    model = ConvNeXt(TINY.with_(head_norm_first=True)).eval()
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.norm_pre, LayerNorm2d)
    torch.nn.init.normal_(model.norm_pre.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.forward_features(x)
        want = model.head(model.norm_pre(f).mean(dim=(2, 3)))
        torch.testing.assert_close(model(x), want)
        _, [last] = model.forward_intermediates(x, indices=1, norm=True)
        torch.testing.assert_close(last, model.norm_pre(f))


def test_mlp_head_width_pre_logits_and_reset_classifier():
    model = ConvNeXt(TINY.with_(head_hidden_size=24)).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == (2, 24) and (feats >= -0.17).all()  # after the GELU
    assert model.head.in_features == model.head_hidden_size == 24 and model.num_features == 64
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.head.in_features == 24
    assert model.pre_logits.fc.weight.shape == (24, 64)


def test_simplenorm_model_uses_no_layernorm():
    model = ConvNeXt(TINY.with_(norm_layer="simplenorm", norm_eps=1e-5))
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, SimpleNorm))]
    assert norms and all(isinstance(m, SimpleNorm) and m.eps == 1e-5 for m in norms)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="stem_type must be one of"):
        ConvNeXtConfig(stem_type="conv")
    with pytest.raises(ValueError, match="norm_layer"):
        ConvNeXtConfig(norm_layer="rmsnorm")
    with pytest.raises(ValueError, match="patch_size must be 4"):
        TINY.with_(stem_type="overlap", patch_size=2)
    with pytest.raises(ValueError, match="exclude each other"):
        TINY.with_(head_norm_first=True, head_hidden_size=8)


def test_timm_variants_are_in_the_table():
    assert VARIANTS["convnext_atto_ols"] == VARIANTS["convnext_atto"].with_(stem_type="overlap_tiered")
    assert VARIANTS["convnext_tiny_hnf"] == VARIANTS["convnext_tiny"].with_(head_norm_first=True)
    assert VARIANTS["convnext_large_mlp"] == VARIANTS["convnext_large"].with_(head_hidden_size=1536)
    assert VARIANTS["convnext_zepto_rms_ols"].stem_type == "overlap_act"
