"""timm users' calls: `forward_intermediates` with timm's contract, `features_only=True, out_indices=...` and
`checkpoint_path=`, checked against timm's own model carrying the same weights."""

import pytest
import torch

from convnext.registry import create_model
from convnext.weights import from_ours

timm = pytest.importorskip("timm")


def _pair(name: str = "convnext_atto", **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours with random weights and timm's model holding the same weights."""
    torch.manual_seed(0)
    ours = create_model(name, **overrides).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the identity-like init
    peer = timm.create_model(name, **overrides).eval()
    peer.load_state_dict(from_ours(ours.state_dict(), "timm"))
    return ours, peer


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"indices": 2}, {"indices": [0, -1]}, {"indices": [1], "stop_early": True}, {"norm": True}],
)
def test_forward_intermediates_matches_timm(kwargs):
    ours, peer = _pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = ours.forward_intermediates(x, **kwargs)
        ref_final, ref_feats = peer.forward_intermediates(x, **kwargs)
        only = ours.forward_intermediates(x, intermediates_only=True, **kwargs)
    assert len(feats) == len(ref_feats) == len(only)
    for a, b, c in zip(feats, ref_feats, only):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4 and torch.equal(a, c)
    assert final.shape == ref_final.shape and (final - ref_final).abs().max() < 1e-4


def test_forward_intermediates_bad_arguments():
    ours = create_model("convnext_atto")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="4 stages"):
        ours.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="NCHW"):
        ours.forward_intermediates(x, output_fmt="NHWC")


def test_features_only_matches_timm_and_its_feature_info(tmp_path):
    ours, peer = _pair()
    torch.save(ours.state_dict(), tmp_path / "w.pt")
    feats = create_model("convnext_atto", features_only=True, out_indices=(1, 2, 3), checkpoint_path=tmp_path / "w.pt")
    ref = timm.create_model("convnext_atto", features_only=True, out_indices=(1, 2, 3))
    assert feats.feature_info.channels() == ref.feature_info.channels() == [80, 160, 320]
    assert feats.feature_info.reduction() == ref.feature_info.reduction() == [8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = feats.eval()(x)
        want = peer.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    assert isinstance(got, list) and len(got) == 3
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-4
    with pytest.raises(ValueError, match="not both"):
        create_model("convnext_atto", checkpoint=tmp_path / "w.pt", checkpoint_path=tmp_path / "w.pt")
    with pytest.raises(ValueError, match="out of range"):
        create_model("convnext_atto", features_only=True, out_indices=(5,))


ONE = {"depths": (1, 1, 1, 1)}
OPTIONS = {  # timm's own variants, one block per stage: an overlapping stem, head norm first, the MLP head
    "convnext_zepto_rms_ols": ONE,
    "convnext_tiny_hnf": ONE,
    "convnext_large_mlp": {**ONE, "dims": (96, 192, 384, 768), "head_hidden_size": 128},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_timm_options_keep_timms_api(name):
    """Intermediates (normed as timm norms them), the pre-logits features and the logits through `forward_head` of
    the final features equal timm's; with head norm first timm's final features are normed and ours are not (our
    `forward_head` norms them), so both heads are fed their own."""
    ours, peer = _pair(name, **OPTIONS[name])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = ours.forward_intermediates(x, norm=True)
        ref_final, ref_feats = peer.forward_intermediates(x, norm=True)
        pre, ref_pre = ours.forward_head(final, pre_logits=True), peer.forward_head(ref_final, pre_logits=True)
        got, want = ours.forward_head(final), peer.forward_head(ref_final)
    assert [f.shape for f in feats] == [f.shape for f in ref_feats]
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert pre.shape == ref_pre.shape == (2, peer.head_hidden_size) and ours.head_hidden_size == peer.head_hidden_size
    torch.testing.assert_close(pre, ref_pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [i["reduction"] for i in ours.feature_info] == [i["reduction"] for i in peer.feature_info]
