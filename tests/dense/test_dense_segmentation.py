"""UperNet: shapes, losses with ignore and the auxiliary head, and sliding-window against whole-image inference."""

from __future__ import annotations

import torch
from torch import nn

from convnext.dense.backbone import BackboneConfig, build_backbone
from convnext.dense.segmentation import Segmentor, predict_slide, predict_whole, segmentation_loss


def _model(aux: bool = True) -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(build_backbone(BackboneConfig("convnext_atto")), 5, channels=32, aux_channels=16, aux=aux)


def test_upernet_forward_backward_with_aux():
    model = _model()
    x, y = torch.rand(2, 3, 128, 96), torch.randint(0, 5, (2, 128, 96))
    y[:, :10] = 255
    out = model(x)
    assert out["out"].shape == (2, 5, 128, 96) and out["aux"].shape == (2, 5, 128, 96)
    losses = segmentation_loss(out, y, ignore_index=255, aux_weight=0.4)
    assert set(losses) == {"loss_seg", "loss_aux"}
    sum(losses.values()).backward()
    assert model.backbone.features.stem[0].weight.grad.abs().sum() > 0
    assert model.aux_head.classifier.weight.grad.abs().sum() > 0
    model.eval()
    assert set(model(x)) == {"out"}  # the auxiliary head only trains


def test_ignored_pixels_do_not_count():
    logits = {"out": torch.zeros(1, 3, 2, 2)}
    logits["out"][0, 0] = 10.0  # confident class 0 everywhere
    y = torch.tensor([[[0, 0], [255, 255]]])
    assert segmentation_loss(logits, y)["loss_seg"] < 1e-3  # the two wrong-looking pixels are ignored
    y2 = torch.tensor([[[0, 0], [1, 1]]])
    assert segmentation_loss(logits, y2)["loss_seg"] > 4


class Pointwise(nn.Module):
    """A per-pixel model (1x1 conv): any window gives the same logits at a pixel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class Constant(nn.Module):
    def forward(self, x):
        return {"out": torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[2:])}


def test_sliding_window_equals_whole_image_on_pointwise_and_constant_models():
    x = torch.rand(2, 3, 50, 70)
    for model in (Pointwise(), Constant()):
        whole = predict_whole(model, x)
        for crop, stride in (((32, 32), (16, 20)), ((20, 70), (15, 70)), ((64, 96), (32, 32))):  # last: crop > image
            assert torch.allclose(predict_slide(model, x, crop, stride), whole, atol=1e-6)


def test_sliding_window_on_upernet_has_the_right_shape_and_resizes():
    model = _model(aux=False).eval()
    x = torch.rand(1, 3, 96, 160)
    out = predict_slide(model, x, (64, 64), (48, 48), out_size=(192, 320))
    assert out.shape == (1, 5, 192, 320) and torch.isfinite(out).all()
    assert predict_whole(model, x, out_size=(48, 80)).shape == (1, 5, 48, 80)
