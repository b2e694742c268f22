"""The roadmap ladder: recipes per step, step parsing, an end-to-end run that resumes, settings checks, data."""

import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from convnext.cli import main
from convnext.cli.roadmap import parse_steps
from convnext.train.roadmap import LadderConfig, load_results, resolve_data, run_ladder, step_config


def test_parse_steps():
    assert parse_steps("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_steps("12,0-1,1") == [0, 1, 12]
    assert parse_steps("0-12") == list(range(13))
    for bad in ("13", "a", "3-x", ""):
        with pytest.raises(ValueError, match="--steps"):
            parse_steps(bad)


def test_step_00_takes_the_original_recipe_and_the_others_the_modern_one():
    lc = LadderConfig(data="cifar10", budget_min=1.0).resolved()
    assert (lc.img_size, lc.patch_size) == (32, 2)
    old = step_config(lc, 0, "cifar10")
    assert old.model.name == "roadmap_00_resnet50"
    assert (old.optim.name, old.optim.momentum, old.optim.weight_decay, old.sched.name) == ("sgd", 0.9, 1e-4, "step")
    d = old.data
    assert (d.randaugment, d.mixup, d.cutmix, d.re_prob, d.label_smoothing, d.crop, d.hflip) == (
        False, 0.0, 0.0, 0.0, 0.0, "pad", 0.5,
    )  # fmt: skip
    assert old.model.drop_path_rate == 0.0 and old.model.layer_scale_init is None and not old.ema
    for step in (1, 7, 12):
        new = step_config(lc, step, "cifar10")
        assert (new.optim.name, new.sched.name, new.optim.weight_decay) == ("adamw", "cosine", 0.05)
        assert new.data.randaugment and new.data.mixup > 0 and new.data.cutmix > 0 and new.data.label_smoothing > 0
        assert new.model.drop_path_rate > 0 and new.model.layer_scale_init == 1e-6
        assert new.budget_min == old.budget_min == 1.0 and new.batch_size == old.batch_size
    assert step_config(lc, 1, "cifar10").model == step_config(lc, 0, "cifar10").model.__class__(
        name="roadmap_01_modern_recipe", patch_size=2, drop_path_rate=0.05, layer_scale_init=1e-6
    )


def _folder(root, size=16, per_class=(8, 4)):
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), tuple(min(255, v + 7 * i) for v in colour)).save(
                    root / split / f"c{c}" / f"{i}.png"
                )
    return root


def test_ladder_end_to_end_resumes_and_guards_its_results(tmp_path):
    data = _folder(tmp_path / "data")
    out = tmp_path / "ladder"
    lc = LadderConfig(
        data=str(data), budget_min=0.002, steps=(0, 12), output=str(out), img_size=16, batch_size=8, workers=0,
        device="cpu",
    )  # fmt: skip
    rows = run_ladder(lc)
    assert [r["step"] for r in rows] == [0, 12]
    head, stem = 768 * 1000 + 1000 - (768 * 2 + 2), 96 * 3 * (4 * 4 - 2 * 2)
    assert rows[1]["params"] == 28_589_128 - head - stem  # ConvNeXt-T with a 2-class head and a 2x2 stem
    assert all(0 <= r["top1"] <= 100 and r["gmacs"] > 0 and r["gmacs_224"] > 4 for r in rows)
    for f in ("results.json", "roadmap.md", "roadmap.csv", "roadmap.json", "roadmap.png"):
        assert (out / f).stat().st_size > 0
    assert "roadmap_12_convnext_tiny" in (out / "roadmap.md").read_text()

    # A second run skips the finished steps: their checkpoints stay untouched.
    best = out / "runs" / "roadmap_00_resnet50" / "best.pt"
    stamp = best.stat().st_mtime_ns
    rows = run_ladder(lc)
    assert [r["step"] for r in rows] == [0, 12] and best.stat().st_mtime_ns == stamp

    # Other settings never mix with these results.
    with pytest.raises(ValueError, match="other settings.*budget_min"):
        run_ladder(LadderConfig(**{**lc.__dict__, "budget_min": 0.5}))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a roadmap results file"):
        load_results(tmp_path / "junk" / "results.json", lc.resolved())


def test_cli_runs_one_step(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    args = ["roadmap", "--data", str(data), "--budget-min", "0.001", "--steps", "6", "--output", str(tmp_path / "o")]
    assert main([*args, "--img-size", "16", "--batch-size", "8", "--workers", "0", "--device", "cpu"]) == 0
    assert "roadmap_06_dwconv_up" in capsys.readouterr().out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(results["steps"]) == ["roadmap_06_dwconv_up"]
    assert main(["roadmap", "--data", str(tmp_path / "nowhere"), "--budget-min", "1", "--output", "x"]) == 2


def _cifar_tar(tmp_path: Path) -> Path:
    """`tmp_path/shared/cifar10-jpg.tar` holding a tiny cifar10-images/ folder; returns the shared folder."""
    src = tmp_path / "shared"
    images = _folder(tmp_path / "cifar10-images", size=8, per_class=(1, 1))
    src.mkdir()
    with tarfile.open(src / "cifar10-jpg.tar", "w") as t:
        t.add(images, arcname="cifar10-images")
    return src


def test_cifar10_is_unpacked_from_the_jpg_tar_once(tmp_path):
    src = _cifar_tar(tmp_path)
    lc = LadderConfig(data="cifar10", budget_min=1, data_dir=str(src), output=str(tmp_path / "out"))
    path = resolve_data(lc)
    assert path == str(tmp_path / "out" / "data" / "cifar10-images")
    assert sorted(p.name for p in (tmp_path / "out" / "data" / "cifar10-images" / "train").iterdir()) == ["c0", "c1"]
    assert resolve_data(lc) == path  # the second time reads what is there
    assert resolve_data(LadderConfig(data="cifar10", budget_min=1, data_dir=str(tmp_path / "out" / "data"))) == path
    assert resolve_data(LadderConfig(data="cifar10", budget_min=1)) == "cifar10"  # torchvision's copy


def test_image_folder_size_is_read_from_its_images(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (100, 70 + i)).save(data / split / c / f"{i}.png")
    resolved = LadderConfig(data=str(data), budget_min=1.0).resolved()
    assert resolved.img_size == 64 and resolved.patch_size == 2  # median shorter side 71 -> 64
    assert LadderConfig(data=str(data), budget_min=1.0, img_size=96).resolved().img_size == 96
    assert LadderConfig(data=str(tmp_path / "empty"), budget_min=1.0).resolved().img_size == 224


def test_a_broken_cifar10_tar_is_one_line_naming_it(tmp_path):
    src = _cifar_tar(tmp_path)
    whole = (src / "cifar10-jpg.tar").read_bytes()
    lc = LadderConfig(data="cifar10", budget_min=1, data_dir=str(src), output=str(tmp_path / "out"))
    for broken in (b"not a tar at all" * 64, whole[:700]):  # garbage; cut inside the second member's header
        (src / "cifar10-jpg.tar").write_bytes(broken)
        with pytest.raises(ValueError, match=r"cifar10-jpg\.tar: cannot be unpacked"):
            resolve_data(lc)
        assert not (tmp_path / "out" / "data" / ".unpacked").exists()
        with pytest.raises(ValueError) as e:
            resolve_data(lc)
        assert "\n" not in str(e.value)
    (src / "cifar10-jpg.tar").write_bytes(whole)  # fixed: the next run unpacks it
    assert resolve_data(lc) == str(tmp_path / "out" / "data" / "cifar10-images")
