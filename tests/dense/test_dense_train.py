"""End to end on tiny synthetic data: train, evaluate, predict overlays, the run-folder guard, and a run stopped
mid-epoch by a corrupt image that resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from convnext.cli import main
from convnext.dense.backbone import BackboneConfig
from convnext.dense.config import DenseOptim, DetectConfig, DetectData, RunConfig, SegmentConfig, SegmentData
from convnext.dense.predict import draw_classes, draw_detections
from convnext.dense.train import load_dense_run, train_detection, train_segmentation
from convnext.engine.run import run_lock

from .conftest import write_instance_folder, write_label_folder

SMALL_RCNN = {"rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32, "box_detections_per_img": 5}


def det_config(root: Path, out: Path) -> DetectConfig:
    return DetectConfig(
        backbone=BackboneConfig("convnext_atto", drop_path_rate=0.1),
        data=DetectData(root=str(root), test_split=2, train_sizes=(64, 80), test_size=64, max_size=96),
        optim=DenseOptim(lr=1e-4, warmup_steps=1),
        run=RunConfig(output=str(out), epochs=1, max_steps=2, batch_size=2, num_workers=0, eval_every=0),
        fpn_channels=32,
        detector_kwargs={**SMALL_RCNN, "box_score_thresh": 0.0},
    )


def seg_config(root: Path, out: Path, **run) -> SegmentConfig:
    return SegmentConfig(
        backbone=BackboneConfig("convnext_atto", drop_path_rate=0.1),
        data=SegmentData(
            format="folder",
            train_images=str(root / "images"),
            train_labels=str(root / "labels"),
            val_images=str(root / "images"),
            val_labels=str(root / "labels"),
            num_classes=3,
            ignore_ids=(3,),
            crop=(32, 48),
            scale=(64, 80),
            test_scale=(64, 80),
        ),
        optim=DenseOptim(lr=1e-3, warmup_steps=1),
        run=RunConfig(output=str(out), **{"epochs": 1, "batch_size": 2, "num_workers": 0, **run}),
        channels=16,
        aux_channels=8,
    )


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    cfg = det_config(write_instance_folder(tmp / "peds"), tmp / "run")
    return train_detection(cfg), cfg


def test_detection_trains_and_scores(det_run):
    result, cfg = det_run
    run = Path(cfg.run.output)
    assert result["steps"] == 2 and 0.0 <= result["box_AP"] <= 1.0 and "mask_AP" in result
    assert {p.name for p in run.iterdir()} >= {"config.json", "last.pt", "metrics.jsonl", "results.json"}
    model, loaded = load_dense_run(run)
    assert loaded.data.classes == ["background", "pedestrian"] and loaded.masks
    with pytest.raises(ValueError, match="already holds a run"):  # never overwrite saved work by accident
        train_detection(det_config(Path(cfg.data.root), run))


def test_overwrite_failing_in_set_up_keeps_the_old_run_and_a_held_folder_is_refused(det_run, tmp_path):
    _, cfg = det_run
    run = Path(cfg.run.output)
    before = {f: (run / f).read_bytes() for f in ("config.json", "last.pt", "results.json")}
    bad = det_config(Path(cfg.data.root), run)
    bad.run.overwrite = True
    bad.backbone = BackboneConfig("convnext_atto", checkpoint=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):  # the model fails after the data is read
        train_detection(bad)
    assert {f: (run / f).read_bytes() for f in before} == before, "--overwrite removed the old run before set-up"
    second = det_config(Path(cfg.data.root), tmp_path / "held")
    (tmp_path / "held").mkdir()
    with run_lock(tmp_path / "held"), pytest.raises(RuntimeError, match="another run is writing"):
        train_detection(second)


def test_detect_cli_eval_and_predict_write_overlays(det_run, tmp_path, capsys):
    _, cfg = det_run
    assert main(["detect", "eval", cfg.run.output, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and "box_AP" in out and "mask_AP50" in out
    image = Path(cfg.data.root) / "PNGImages" / "img2.png"
    assert (
        main(["detect", "predict", cfg.run.output, str(image), "--output", str(tmp_path), "--score-thresh", "0"]) == 0
    )
    overlay = np.array(Image.open(tmp_path / "img2.png"))
    assert overlay.shape == (80, 96, 3) and (overlay != np.array(Image.open(image))).any()
    assert main(["segment", "eval", cfg.run.output]) == 2  # the wrong family: one clear error, no traceback
    assert "is a detection run" in capsys.readouterr().err
    # a bad image among good ones is named and left out; the others are still predicted
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_bad.png").write_bytes(b"not a png")
    Image.open(image).save(tmp_path / "in" / "b_good.png")
    assert main(["detect", "predict", cfg.run.output, str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "a_bad.png" in captured.err and "1 skipped" in captured.out
    assert (tmp_path / "out" / "b_good.png").is_file() and not (tmp_path / "out" / "a_bad.png").exists()
    only_bad = ["detect", "predict", cfg.run.output, str(tmp_path / "in" / "a_bad.png"), "--output", str(tmp_path)]
    assert main(only_bad) == 1


def test_draw_detections_paints_boxes_and_masks_in_class_colours():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    masks = torch.zeros(2, 1, 40, 40)
    masks[0, 0, 10:20, 10:20] = 0.9
    pred = {"boxes": torch.tensor([[10.0, 10, 20, 20], [0, 0, 5, 5]]), "labels": torch.tensor([1, 1]),
            "scores": torch.tensor([0.9, 0.1]), "masks": masks}  # fmt: skip
    out = draw_detections(image, pred, ["bg", "ped"], score_thresh=0.5, colours=[(0, 0, 0), (255, 0, 0)])
    assert out[:, 10, 15].tolist() == [255, 0, 0]  # box edge in the class colour
    assert out[0, 15, 15] > 0 and out[1, 15, 15] == 0  # mask blended in red
    assert out[:, 0:5, 0:5].sum() == 0  # the low-score detection is not drawn
    classmap = torch.zeros(40, 40, dtype=torch.int64)
    classmap[20:] = 2
    seg = draw_classes(image, classmap, [(10, 0, 0), (0, 0, 0), (0, 200, 0)], alpha=1.0)
    assert seg[:, 30, 30].tolist() == [0, 200, 0] and seg[:, 5, 5].tolist() == [10, 0, 0]


def test_segmentation_cli_train_eval_predict(tmp_path, capsys):
    data = write_label_folder(tmp_path / "seg")
    run = tmp_path / "run"
    cfg = seg_config(data, run)
    d = cfg.data
    args = ["segment", "train", "--output", str(run), "--max-steps", "2", "--batch-size", "2", "--json",
            "--data.format", "folder", "--data.num_classes", "3", "--data.ignore_ids", "3",
            "--data.train_images", d.train_images, "--data.train_labels", d.train_labels,
            "--data.val_images", d.val_images, "--data.val_labels", d.val_labels,
            "--data.crop", "32,48", "--data.scale", "64,80", "--data.test_scale", "64,80",
            "--channels", "16", "--aux_channels", "8", "--run.num_workers", "0"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and 0.0 <= result["mIoU"] <= 1.0 and set(result["IoU"]) == {"0", "1", "2"}
    assert main(["segment", "eval", str(run), "--mode", "slide", "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["mIoU"] <= 1.0
    assert main(["segment", "predict", str(run), str(data / "images"), "--output", str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("s*_classes.png"))) == 4
    classes = np.array(Image.open(tmp_path / "pred" / "s0_classes.png"))
    assert classes.shape == (64, 80) and classes.max() < 3


def test_a_run_stopped_by_a_corrupt_image_resumes_to_the_same_weights(tmp_path):
    data = write_label_folder(tmp_path / "seg")
    reference = train_segmentation(seg_config(data, tmp_path / "a", epochs=2, eval_every=0))
    assert reference["steps"] == 4

    sampler = DistributedSampler(range(4), num_replicas=1, rank=0, shuffle=True, seed=0)
    victim = data / "images" / f"s{list(sampler)[2]}.jpg"  # in the second batch of the first epoch
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # the header still reads: the check at start passes
    cfg = seg_config(data, tmp_path / "b", epochs=2, eval_every=0)
    with pytest.raises(ValueError, match=f"cannot read image .*{victim.name}"):
        train_segmentation(cfg)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["epoch_step"]) == (1, 0, 1)  # the finished step was kept

    victim.write_bytes(good)
    resumed = train_segmentation(seg_config(data, tmp_path / "b", epochs=2, eval_every=0, resume=str(tmp_path / "b")))
    assert resumed["steps"] == 4
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    shutil.rmtree(tmp_path / "a")


def test_backbone_from_a_training_run_folder(tmp_path):
    from convnext.dense.backbone import build_backbone
    from convnext.resolve import resolve
    from convnext.train import apply_overrides, fit, get_preset

    pre = tmp_path / "pre"  # a real `convnext train` run: the digits demo (atto, 2x2 stem, mean/std 0.5), cut short
    fit(apply_overrides(get_preset("demo"), {"epochs": 1, "budget_min": 0.02, "output": str(pre)}))
    trained = resolve(pre).model

    cfg = BackboneConfig("convnext_femto", pretrained_run=str(pre))
    b = build_backbone(cfg)
    assert cfg.model == "convnext_atto" and cfg.mean == (0.5, 0.5, 0.5)  # the run's model and normalisation
    assert b.features.stem[0].stride == (4, 4) and b.mean == (0.5, 0.5, 0.5)
    assert torch.equal(b.features.stages[3].blocks[1].pwconv2.weight, trained.stages[3].blocks[1].pwconv2.weight)

    data = write_label_folder(tmp_path / "seg")
    seg = seg_config(data, tmp_path / "run", max_steps=1)
    seg.backbone.pretrained_run = str(pre)
    train_segmentation(seg)
    shutil.rmtree(pre)  # the dense run no longer needs the pre-training run
    model, loaded = load_dense_run(tmp_path / "run")
    assert loaded.backbone.pretrained_run == str(pre) and loaded.backbone.mean == (0.5, 0.5, 0.5)
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
