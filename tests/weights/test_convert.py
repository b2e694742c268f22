"""Conversion parity: weights of timm, torchvision and HF transformers models, converted into ours, give the same
logits (fp32, max abs diff <= 1e-4); the official layout is checked through timm's own official->timm converter.
Every layout round-trips ours -> layout -> ours exactly."""

import pytest
import torch

from convnext.registry import VARIANTS, create_model
from convnext.weights import LAYOUTS, detect_layout, from_ours, load_checkpoint, to_ours
from convnext.weights.layouts import shape_config

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, so layer scale, GRN and norms are far from their identity-like init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            matrix = p.squeeze().ndim > 1  # conv / linear; layer scale (C,1,1) and GRN (1,1,1,C) count as vectors
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if matrix else 0.5))
    return model.eval()


def hf_v1(depths, dims):
    cfg = transformers.ConvNextConfig(depths=list(depths), hidden_sizes=list(dims), num_labels=1000)
    return transformers.ConvNextForImageClassification(cfg)  # default layer_norm_eps=1e-12 on the head norm


def hf_v2(depths, dims):
    cfg = transformers.ConvNextV2Config(depths=list(depths), hidden_sizes=list(dims), num_labels=1000)
    return transformers.ConvNextV2ForImageClassification(cfg)


T, ATTO = ((3, 3, 9, 3), (96, 192, 384, 768)), ((2, 2, 6, 2), (40, 80, 160, 320))
PEERS = {  # id: (build the peer, our model name, layout)
    "timm-convnext_tiny": (lambda: timm.create_model("convnext_tiny"), "convnext_tiny", "timm"),
    "timm-convnext_atto": (lambda: timm.create_model("convnext_atto"), "convnext_atto", "timm"),  # 1x1-conv MLP
    "timm-convnextv2_atto": (lambda: timm.create_model("convnextv2_atto"), "convnextv2_atto", "timm"),
    "timm-convnextv2_tiny": (lambda: timm.create_model("convnextv2_tiny"), "convnextv2_tiny", "timm"),
    "torchvision-convnext_tiny": (
        lambda: torchvision.models.convnext_tiny(weights=None),
        "convnext_tiny",
        "torchvision",
    ),
    "hf-convnext_tiny": (lambda: hf_v1(*T), "convnext_tiny", "hf"),
    "hf-convnextv2_atto": (lambda: hf_v2(*ATTO), "convnextv2_atto", "hf"),
    "hf-convnextv2_tiny": (lambda: hf_v2(*T), "convnextv2_tiny", "hf"),
}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x) if isinstance(model, transformers.PreTrainedModel) else model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("peer_id", list(PEERS))
def test_converted_weights_give_the_peers_logits(peer_id):
    build, name, layout = PEERS[peer_id]
    torch.manual_seed(0)
    peer = randomize(build())
    sd = peer.state_dict()
    assert detect_layout(sd) == layout
    ours = create_model(name).eval()
    load_checkpoint(ours, sd)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref, got = logits(peer, x), logits(ours, x)
    diff = (ref - got).abs().max().item()
    assert ref.abs().max() > 0.1  # the comparison means something
    assert diff <= TOL, f"{peer_id}: max abs diff {diff:.2e}"

    # ... and back: our weights in the peer's layout load strictly into the peer and reproduce its state dict.
    back = from_ours(ours.state_dict(), layout)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k
    peer.load_state_dict(back, strict=True)


@pytest.mark.parametrize(
    ("timm_name", "ours_name"), [("convnext_tiny", "convnext_tiny"), ("convnextv2_atto", "convnextv2_atto")]
)
def test_official_layout_through_timms_own_converter(timm_name, ours_name):
    """Our official-layout output, fed to timm's official->timm filter, loads into timm with the same logits."""
    from timm.models.convnext import checkpoint_filter_fn

    ours = randomize(create_model(ours_name))
    official = from_ours(ours.state_dict(), "official")
    assert "downsample_layers.0.0.weight" in official and "stages.0.0.dwconv.weight" in official
    if ours.cfg.grn:
        assert official["stages.0.0.grn.gamma"].shape == (1, 1, 1, 4 * ours.cfg.dims[0])
    else:
        assert official["stages.0.0.gamma"].shape == (ours.cfg.dims[0],)
    peer = timm.create_model(timm_name).eval()
    peer.load_state_dict(checkpoint_filter_fn({"model": official}, peer), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert (logits(peer, x) - logits(ours, x)).abs().max() <= TOL

    fresh = create_model(ours_name).eval()
    load_checkpoint(fresh, {"model": official})  # and back into ours, wrapped as the official files are
    assert torch.equal(logits(fresh, x), logits(ours, x))


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_isotropic_small"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_ours_layout_ours(name, layout):
    model = create_model(name, num_classes=7, depths=(1,) * len(VARIANTS[name].depths))  # one block per stage
    sd = randomize(model).state_dict()
    isotropic, v2 = model.cfg.isotropic, model.cfg.grn
    if (isotropic and layout not in ("ours", "official")) or (v2 and layout == "torchvision"):
        with pytest.raises(ValueError, match="isotropic|torchvision has no"):
            from_ours(sd, layout)
        return
    theirs = from_ours(sd, layout)
    assert detect_layout(theirs) == layout
    back = to_ours(theirs, layout)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_hf_keys_carry_the_model_prefix():
    v1 = from_ours(create_model("convnext_atto", depths=(1, 1, 1, 1)).state_dict(), "hf")
    v2 = from_ours(create_model("convnextv2_atto", depths=(1, 1, 1, 1)).state_dict(), "hf")
    assert "convnext.embeddings.patch_embeddings.weight" in v1 and "classifier.weight" in v1
    assert "convnextv2.encoder.stages.0.layers.0.grn.weight" in v2
    assert v2["convnextv2.encoder.stages.0.layers.0.grn.weight"].shape == (1, 1, 1, 160)
    assert v1["convnext.encoder.stages.1.downsampling_layer.1.weight"].shape == (80, 40, 2, 2)


def test_torchvision_layer_scale_shape_and_interleaved_indices():
    tv = from_ours(create_model("convnext_atto", depths=(1, 1, 1, 1)).state_dict(), "torchvision")
    assert tv["features.1.0.layer_scale"].shape == (40, 1, 1)
    assert tv["features.2.1.weight"].shape == (80, 40, 2, 2)  # downsampling before stage 1
    assert "features.7.0.block.5.weight" in tv and "classifier.2.weight" in tv


# timm's own options, each on a small representative built by timm with random weights: (timm name, overrides for
# both models, the config fields the option sets); one block per stage (timm's entry points take the same overrides),
# the MLP head at 256 wide.
ONE = {"depths": (1, 1, 1, 1)}
TIMM_OPTIONS = {
    "convnext_atto_ols": (ONE, {"stem_type": "overlap_tiered"}),
    "convnext_nano_ols": (ONE, {"stem_type": "overlap"}),
    "convnext_zepto_rms": (ONE, {"norm_layer": "simplenorm"}),
    "convnext_zepto_rms_ols": (ONE, {"norm_layer": "simplenorm", "stem_type": "overlap_act"}),
    "convnext_tiny_hnf": (ONE, {"head_norm_first": True}),
    "convnext_large_mlp": ({**ONE, "dims": (96, 192, 384, 768), "head_hidden_size": 256}, {"head_hidden_size": 256}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TIMM_OPTIONS))
def test_timm_options_give_timms_logits(name):
    """timm's model with random weights, converted, gives its logits (to 1e-5 of their scale) in ours; ours goes back
    into timm's layout exactly, and its shapes alone rebuild its config (as `convnext.resolve` does for a bare file)."""
    overrides, options = TIMM_OPTIONS[name]
    torch.manual_seed(0)
    peer = randomize(timm.create_model(name, pretrained=False, **overrides))
    sd = peer.state_dict()
    ours = create_model(name, **overrides).eval()
    assert {k: getattr(ours.cfg, k) for k in options} == options
    load_checkpoint(ours, sd)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want, got = logits(peer, x), logits(ours, x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())

    back = from_ours(ours.state_dict(), "timm")
    assert set(back) == set(sd) and all(back[k].shape == v.shape and torch.equal(back[k], v) for k, v in sd.items())
    shape = shape_config(ours.state_dict())
    assert {k: shape[k] for k in options} == options and shape["patch_size"] == 4
    with pytest.raises(ValueError, match="cannot hold timm's options"):
        from_ours(ours.state_dict(), "official")
