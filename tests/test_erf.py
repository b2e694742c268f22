"""Effective receptive field: exact support on a model with a known receptive field, area shares, the plot."""

import pytest
import torch
from torch import nn

from convnext.cli import main
from convnext.erf import area_shares, erf_map, load_images, plot_erfs, random_images
from convnext.registry import create_model


@pytest.mark.parametrize("n", [1, 2, 4])
def test_stack_of_3x3_convs_has_exactly_its_receptive_field(n):
    torch.manual_seed(n)
    model = nn.Sequential(*(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(n)))
    erf = erf_map(model, [random_images(2, 17)])
    assert erf.shape == (17, 17)
    c = 17 // 2
    inside = torch.zeros(17, 17, dtype=torch.bool)
    inside[c - n : c + n + 1, c - n : c + n + 1] = True
    assert (erf[inside] > 0).all()  # every pixel of the (2n+1)x(2n+1) square contributes
    assert (erf[~inside] == 0).all()  # and nothing outside it
    assert area_shares(erf, [0.999999])[0.999999] == pytest.approx((2 * n + 1) ** 2 / 17**2)


def test_area_shares_on_a_hand_made_map():
    erf = torch.zeros(11, 11)
    erf[5, 5] = 50.0  # the centre holds half
    erf[4:7, 4:7] += torch.tensor([[5.0, 5, 5], [5, 0, 5], [5, 5, 5]])  # the ring around it 40%
    erf[0, 0] = 10.0  # a far corner the last 10%
    shares = area_shares(erf, [0.2, 0.5, 0.6, 0.9, 0.99])
    assert shares == {0.2: 1 / 121, 0.5: 1 / 121, 0.6: 9 / 121, 0.9: 9 / 121, 0.99: 1.0}


def test_area_shares_clip_at_an_even_sized_border():
    erf = torch.ones(4, 4)  # centre (2, 2): the radius-1 square covers rows/cols 1..3, radius 2 the whole map
    assert area_shares(erf, [0.5, 0.99]) == {0.5: 9 / 16, 0.99: 1.0}
    with pytest.raises(ValueError, match="all zero"):
        area_shares(torch.zeros(3, 3))


def test_a_larger_kernel_widens_the_erf_of_a_roadmap_step():
    shares = {}
    for k in (3, 7):
        torch.manual_seed(0)
        model = create_model("roadmap_07_kernel7", kernel_size=k, patch_size=1, depths=(1, 1, 1, 1), num_classes=0)
        shares[k] = area_shares(erf_map(model, [random_images(2, 32)]))
    assert shares[7][0.99] > shares[3][0.99]
    assert erf_map(model, [random_images(1, 32)]).shape == (32, 32)
    assert model.training  # the mode is given back


def test_load_images_and_plot(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40 + i, 30), (10 * i, 100, 200)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_images(tmp_path, 24, limit=2)
    assert images.shape == (2, 3, 24, 24)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_images(tmp_path / "missing", 24)
    erf = torch.rand(8, 8)
    out = plot_erfs({"a": erf, "b": erf}, tmp_path / "sub" / "cmp.png")
    assert out.stat().st_size > 0


def test_cli_compares_two_models(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    args = ["erf", "roadmap_06_dwconv_up", "convnext_atto", "--img-size", "32", "--num-images", "2", "--json"]
    assert main([*args, "--patch-size", "1", "--output", str(out)]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in report] == ["roadmap_06_dwconv_up", "convnext_atto"]
    assert set(report[0]["area_shares"]) == {"20%", "30%", "50%", "99%"}
    assert out.stat().st_size > 0
