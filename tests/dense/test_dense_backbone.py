"""ConvNeXt as a torchvision backbone: strides and widths, Faster/Mask R-CNN forward and backward, frozen stages,
pretrained stems of another patch size, and the optimizer's layer-wise lr decay groups."""

from __future__ import annotations

import pytest
import torch

from convnext.dense.backbone import build_backbone, detector, resize_stem
from convnext.dense.config import BackboneConfig
from convnext.dense.train import optimizer_groups
from convnext.registry import create_model


@pytest.mark.parametrize(
    "name, widths",
    [
        ("convnext_atto", [40, 80, 160, 320]),
        ("convnextv2_atto", [40, 80, 160, 320]),
        ("convnext_isotropic_small", [96, 192, 384, 384]),  # a simple pyramid around its one stride-16 map
        ("roadmap_03_patchify_stem", [256, 512, 1024, 2048]),
    ],
)
def test_backbone_gives_strides_4_to_32(name, widths):
    torch.manual_seed(0)
    b = build_backbone(BackboneConfig(name))
    feats = b(torch.rand(1, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3"] and b.out_channels == widths
    assert [tuple(f.shape[1:]) for f in feats.values()] == [
        (c, 64 // s, 96 // s) for c, s in zip(widths, (4, 8, 16, 32))
    ]


def _targets(masks: bool):
    m = torch.zeros(2, 128, 160, dtype=torch.uint8)
    m[0, 10:60, 20:50] = 1
    m[1, 70:120, 90:150] = 1
    full = {"boxes": torch.tensor([[20.0, 10, 50, 60], [90, 70, 150, 120]]), "labels": torch.tensor([1, 2])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # an image with no object
    if masks:
        full["masks"], empty["masks"] = m, torch.zeros(0, 128, 128, dtype=torch.uint8)
    return [full, empty]


@pytest.mark.parametrize("masks", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_detector_forward_backward(masks):
    torch.manual_seed(0)
    small = {"box_detections_per_img": 5, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64}
    model = detector(BackboneConfig("convnext_atto"), 3, masks, train_sizes=(128,), test_size=128, **small)
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 128)]
    losses = model(images, _targets(masks))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} | (
        {"loss_mask"} if masks else set()
    )
    sum(losses.values()).backward()
    stem = model.backbone.body.features.stem[0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) <= 5
    # the torchvision arguments reach the detector (they were once dropped for ConvNeXt backbones)
    assert model.roi_heads.detections_per_img == 5 and model.rpn.post_nms_top_n() == 100
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    if masks:
        assert out[0]["masks"].shape[1:] == (1, 128, 160)


def test_frozen_stages_really_frozen():
    torch.manual_seed(0)
    model = detector(
        BackboneConfig("convnext_atto", frozen_stages=2, drop_path_rate=0.5),
        num_classes=3,
        train_sizes=(128,),
        test_size=128,
    )
    feats = model.backbone.body.features
    frozen = list(feats.stem.parameters()) + list(feats.stages[0].parameters()) + list(feats.stages[1].parameters())
    before = [p.clone() for p in frozen]
    trainable_before = feats.stages[2].blocks[0].dwconv.weight.clone()
    assert not any(p.requires_grad for p in frozen) and feats.stages[2].blocks[0].dwconv.weight.requires_grad
    model.train()
    assert not feats.stages[1].training and not feats.stem.training and feats.stages[2].training  # no drop path
    opt = torch.optim.AdamW(optimizer_groups(model, 0.05, 0.9), lr=1e-2)
    assert not {id(p) for p in frozen} & {id(p) for g in opt.param_groups for p in g["params"]}
    sum(model([torch.rand(3, 128, 128)], _targets(True)[:1]).values()).backward()
    opt.step()
    assert all(p.grad is None for p in frozen)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))
    assert not torch.equal(trainable_before, feats.stages[2].blocks[0].dwconv.weight)
    with pytest.raises(ValueError, match="frozen_stages=5: model 'convnext_atto' has 4 stages"):
        build_backbone(BackboneConfig("convnext_atto", frozen_stages=5))


def test_layer_decay_groups_cover_every_parameter_once():
    model = detector(BackboneConfig("convnext_atto"), num_classes=2, train_sizes=(128,), test_size=128)
    groups = optimizer_groups(model, 0.05, 0.8)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    feats = model.backbone.body.features
    stem, last = scale[id(feats.stem[0].weight)], scale[id(feats.stages[3].blocks[0].dwconv.weight)]
    head = scale[id(model.roi_heads.box_predictor.cls_score.weight)]
    assert stem < last < head == 1.0 and scale[id(feats.norms["0"].weight)] == 1.0
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(feats.stem[0].weight)] == 0.05 and decay[id(feats.stem[0].bias)] == 0.0


def test_resized_stem_sees_an_enlarged_image_as_the_old_one():
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=0, patch_size=2).eval()
    x = torch.rand(1, 3, 32, 32)
    old = model.stem(x)
    resize_stem(model, 4)
    big = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 64x64, each pixel 2x2
    assert torch.allclose(model.stem(big), old, atol=1e-5)
    assert model.feature_info[0]["reduction"] == 4


def test_checkpoint_with_a_patch2_stem_loads_as_a_stride4_backbone(tmp_path):
    torch.manual_seed(0)
    cifar = create_model("convnext_atto", num_classes=10, patch_size=2)
    torch.save({"model": cifar.state_dict()}, tmp_path / "cifar.pt")
    b = build_backbone(BackboneConfig("convnext_atto", checkpoint=str(tmp_path / "cifar.pt")))
    assert b.features.stem[0].stride == (4, 4)
    assert torch.equal(b.features.stages[2].blocks[3].pwconv1.weight, cifar.stages[2].blocks[3].pwconv1.weight)
    assert b(torch.rand(1, 3, 64, 64))["0"].shape[-1] == 16


def test_a_weight_tag_loads_its_weights_and_normalisation(monkeypatch, tmp_path):
    """`--model convnext_atto.TAG` starts the backbone from those published weights (here already in the download
    cache: no network) with their mean/std; the bare name stays random; a resumed run rebuilds the bare arch."""
    from convnext.dense.backbone import load_model
    from convnext.dense.train import _architecture_only
    from convnext.weights import WEIGHTS, WeightSpec

    spec = WeightSpec("convnext_atto", "local_test", "https://example.invalid/w.pth", None, "ours", num_classes=10,
                      mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))  # fmt: skip
    monkeypatch.setitem(WEIGHTS, spec.name, spec)
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    src = create_model("convnext_atto", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "weights" / spec.filename)
    cfg = BackboneConfig("convnext_atto.local_test")
    tagged = load_model(cfg)
    w = "stages.1.blocks.0.pwconv1.weight"
    assert torch.equal(tagged.state_dict()[w], src.state_dict()[w])
    assert cfg.mean == (0.1, 0.2, 0.3) and cfg.std == (0.4, 0.5, 0.6)
    assert not torch.equal(load_model(BackboneConfig("convnext_atto")).state_dict()[w], src.state_dict()[w])
    assert torch.equal(load_model(BackboneConfig("convnext_atto.local_test", pretrained=True)).state_dict()[w],
                       src.state_dict()[w])  # fmt: skip
    from convnext.dense.config import get_preset

    run_cfg = get_preset("detect", "pennfudan", "convnext_atto.local_test")
    assert _architecture_only(run_cfg).backbone.model == "convnext_atto"


def test_detect_train_reads_a_config_file_and_flags_win(tmp_path, capsys):
    import json

    from convnext.cli import main

    f = tmp_path / "det.json"
    f.write_text(json.dumps({"preset": "pennfudan", "optim": {"lr": 5e-4}, "run.epochs": 3}))
    assert main(["detect", "train", "--config", str(f), "--run.epochs", "7", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 5e-4 and printed["run"]["epochs"] == 7
    f.write_text(json.dumps({"optim": {"lrr": 1}}))
    assert main(["segment", "train", "--config", str(f), "--print-config"]) == 2
    assert "lrr" in capsys.readouterr().err
