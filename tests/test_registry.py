"""The variant table against the reference numbers; registry behaviour; the whole registry builds and runs."""

import pytest
import torch

from convnext.flops import count_gmacs, count_params
from convnext.registry import MODELS, VARIANTS, Registry, create_model, list_models

# shared/REFERENCE.md: exact parameter counts and the paper's GMACs at 224.
PARAMS = {
    "convnext_atto": 3_695_520, "convnext_femto": 5_217_784, "convnext_pico": 9_045_672,
    "convnext_nano": 15_593_560, "convnext_tiny": 28_589_128, "convnext_small": 50_223_688,
    "convnext_base": 88_591_464, "convnext_large": 197_767_336, "convnext_xlarge": 350_196_968,
    "convnext_xxlarge": 846_471_016,
    "convnextv2_atto": 3_708_400, "convnextv2_femto": 5_233_240, "convnextv2_pico": 9_066_280,
    "convnextv2_nano": 15_623_800, "convnextv2_tiny": 28_635_496, "convnextv2_base": 88_717_800,
    "convnextv2_large": 197_956_840, "convnextv2_huge": 660_289_640,
    "convnext_isotropic_small": 22_308_712, "convnext_isotropic_base": 87_083_752,
    "convnext_isotropic_large": 305_905_640,
    # timm's own variants, as timm counts them
    "convnext_zepto_rms": 2_155_656, "convnext_zepto_rms_ols": 2_164_232, "convnext_atto_ols": 3_702_912,
    "convnext_femto_ols": 5_226_520, "convnext_pico_ols": 9_061_928, "convnext_nano_ols": 15_649_560,
    "convnext_tiny_hnf": 28_589_128, "convnext_large_mlp": 200_128_168,
}  # fmt: skip
GMACS = {
    "convnext_atto": 0.55, "convnext_femto": 0.79, "convnext_pico": 1.37, "convnext_nano": 2.46,
    "convnext_tiny": 4.47, "convnext_small": 8.71, "convnext_base": 15.38,
    "convnext_isotropic_small": 4.3, "convnext_isotropic_base": 16.9,
}  # fmt: skip


def test_every_variant_is_in_the_table():
    assert set(VARIANTS) == set(PARAMS)


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_counts_match_reference_exactly(name):
    with torch.device("meta"):
        assert count_params(create_model(name)) == PARAMS[name]


def test_isotropic_large_with_layer_scale_as_trained():
    with torch.device("meta"):
        assert count_params(create_model("convnext_isotropic_large", layer_scale_init=1e-6)) == 305_942_504


@pytest.mark.parametrize("name", list(GMACS))
def test_gmacs_match_paper_within_1_percent(name):
    assert count_gmacs(create_model(name)) == pytest.approx(GMACS[name], rel=0.01)


def test_big_gmacs_on_meta_device():
    # Large models: count on the meta device so the test stays fast and small in memory.
    big = [("convnext_large", 34.4, 224), ("convnext_xlarge", 60.9, 224), ("convnext_xxlarge", 198, 256)]
    for name, ref, size in big:
        with torch.device("meta"):
            assert count_gmacs(create_model(name), size) == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("name", [n for n in MODELS.names() if not n.startswith("roadmap_")])
def test_every_model_runs_forward_and_gives_features(name):
    with torch.device("meta"):  # shapes only: the big ones would not fit a test's budget on CPU
        model = create_model(name, num_classes=10)
        x = torch.empty(2, 3, 64, 64)
        assert model(x).shape == (2, 10)
        feats = model.forward_intermediates(x, intermediates_only=True)
    cfg = VARIANTS[name]
    assert [f.shape[1] for f in feats] == list(cfg.dims)
    assert [64 // f.shape[-1] for f in feats] == [cfg.patch_size * 2**i for i in range(len(cfg.dims))]


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_small_models_run_for_real(name):
    model = create_model(name, num_classes=3, patch_size=2, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_registering_twice_raises():
    reg = Registry()
    reg.register("a", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", lambda: None)


def test_list_models_patterns_and_unknown_names():
    assert list_models("convnextv2_*")[0] == "convnextv2_atto"
    assert "convnext_tiny" in list_models()
    with pytest.raises(KeyError, match="unknown model"):
        create_model("convnext_tinyy")
    with pytest.raises(TypeError, match="unknown option"):
        create_model("convnext_atto", depth=3)
