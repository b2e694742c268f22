"""timm users' calls: `forward_intermediates` with timm's contract, `features_only=True, out_indices=...` and
`checkpoint_path=`, checked against timm's own model carrying the same weights."""

import pytest
import torch

from convnext.registry import create_model
from convnext.weights import from_ours

timm = pytest.importorskip("timm")


def _pair(name: str = "convnext_atto") -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours with random weights and timm's model holding the same weights."""
    torch.manual_seed(0)
    ours = create_model(name).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the identity-like init
    peer = timm.create_model(name).eval()
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
