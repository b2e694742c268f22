"""Every command that trains (train, pretrain, detect train, segment train) reads its config one way: --config FILE
(JSON or YAML; a run's own config.json too), dotted flags, --print-config, whose output read back as --config gives
the same config; a wrong field or type in any of them is one line and exit code 2, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convnext.cli import main
from convnext.dense.config import DetectConfig, SegmentConfig
from convnext.pretrain.config import PretrainConfig
from convnext.train.config import TrainConfig

from ..dense.conftest import write_instance_folder, write_label_folder
from ..test_config import a_wrong_value, config_leaves, dumped
from ..train.conftest import write_image_folder

KWARGS = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'  # a tiny 4-stage ConvNeXt
TRAIN = ["train", "--model.kwargs", KWARGS, "--threads", "1", "--img-size", "16", "--batch-size", "6",
         "--data.num_workers", "0", "--device", "cpu"]  # fmt: skip
PRETRAIN = ["pretrain", "--model.kwargs", KWARGS, "--img-size", "32", "--model.patch_size", "1", "--batch-size", "8",
            "--data.num_workers", "0", "--data.eval_images", "8", "--fcmae.decoder_dim", "32", "--threads", "1",
            "--device", "cpu"]  # fmt: skip
DENSE = ["--model", "convnext_atto", "--batch-size", "2", "--max-steps", "1", "--threads", "1", "--device", "cpu",
         "--run.num_workers", "0", "--run.eval_every", "0"]  # fmt: skip
DETECT = ["detect", "train", *DENSE, "--data.test_split", "2", "--data.train_sizes", "64,80", "--data.test_size", "64",
          "--data.max_size", "96", "--fpn_channels", "32", "--detector_kwargs",
          '{"rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32, "box_detections_per_img": 5}']  # fmt: skip
SEGMENT = ["segment", "train", *DENSE, "--data.format", "folder", "--data.num_classes", "3", "--data.ignore_ids", "3",
           "--data.crop", "32,48", "--data.scale", "64,80", "--data.test_scale", "64,80", "--channels", "16",
           "--aux_channels", "8"]  # fmt: skip


def printed(capsys, *argv: str) -> dict:
    """The config `convnext ARGV --print-config` prints."""
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def read_back(capsys, tmp_path: Path, command: list[str], cfg: dict, name: str = "printed.json") -> dict:
    """What `command --config FILE --print-config` prints for `cfg` written to FILE."""
    (tmp_path / name).write_text(json.dumps(cfg))
    return printed(capsys, *command, "--config", str(tmp_path / name))


def segment_data(root: Path) -> list[str]:
    data = write_label_folder(root)
    return [f"--data.{split}_{kind}={data / folder}" for split in ("train", "val")
            for kind, folder in (("images", "images"), ("labels", "labels"))]  # fmt: skip


# ---------------------------------------------------------------- --print-config read back as --config
@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["train", "--preset", "cifar10", "--model", "convnext_femto", "--optim.lr", "1e-3", "--data.mean", "0.5,0.5,1"],
        ["train", "--preset", "finetune", "--model", "convnext_atto.d2_in1k", "--epochs", "3"],
        ["pretrain", "--data", "cifar10", "--fcmae.mask_ratio", "0.75"],
        ["pretrain", "--preset", "in1k", "--model", "convnextv2_pico"],
        ["detect", "train"],
        ["detect", "train", "--preset", "coco", "--data.train_ann", "a.json", "--optim.betas", "0.9,0.99"],
        ["segment", "train"],
        ["segment", "train", "--preset", "ade20k", "--data.mode", "whole", "--backbone.frozen_stages", "1"],
    ],
)
def test_print_config_read_back_as_config_is_the_same_config(argv, tmp_path, capsys):
    command = argv[:2] if argv[0] in ("detect", "segment") else argv[:1]
    cfg = printed(capsys, *argv)
    assert read_back(capsys, tmp_path, command, cfg) == cfg
    if argv[0] != "train":  # the file's own "preset" key picks the same preset
        preset = {"pretrain": "small", "detect": "pennfudan", "segment": "camvid"}[argv[0]]
        assert read_back(capsys, tmp_path, command, {"preset": preset}) == printed(capsys, *command)


def test_train_auto_recipe_print_config_reads_back(tmp_path, capsys):
    data = write_image_folder(tmp_path / "shapes", n=4)
    cfg = printed(capsys, *TRAIN, "--data", str(data), "--budget-min", "0.2", "--model.patch_size", "2")
    assert cfg["recipe"] and cfg["data"]["name"] == str(data)  # the auto recipe, chosen from the data
    assert read_back(capsys, tmp_path, ["train"], cfg) == cfg


def test_pretrain_reads_a_yaml_config_and_flags_win(tmp_path, capsys):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("preset: in1k\nfcmae:\n  mask_ratio: 0.75\noptim.weight_decay: 0.1\nepochs: 5\n")
    cfg = printed(capsys, "pretrain", "--config", str(tmp_path / "c.yaml"), "--epochs", "7")
    assert (cfg["data"]["img_size"], cfg["fcmae"]["decoder_dim"]) == (224, 512)  # the in1k preset's
    assert (cfg["fcmae"]["mask_ratio"], cfg["optim"]["weight_decay"], cfg["epochs"]) == (0.75, 0.1, 7)


# ---------------------------------------------------------------- a run's own config.json read back
def test_train_run_config_json_reads_back(tmp_path, capsys):
    data = write_image_folder(tmp_path / "shapes", n=4)
    run = tmp_path / "run"
    assert main([*TRAIN, "--preset", "demo", "--data", str(data), "--epochs", "1", "--output", str(run)]) == 0
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["classes"] == ["circle", "square", "stripe"]  # filled in by the run
    assert read_back(capsys, tmp_path, ["train"], saved) == saved
    assert printed(capsys, "train", "--config", str(run / "config.json")) == saved


def test_pretrain_run_config_json_reads_back(tmp_path, capsys):
    data = write_image_folder(tmp_path / "shapes", n=4)
    run = tmp_path / "run"
    assert main([*PRETRAIN, "--data", str(data), "--epochs", "1", "--output", str(run)]) == 0
    capsys.readouterr()
    assert printed(capsys, "pretrain", "--config", str(run / "config.json")) == json.loads(
        (run / "config.json").read_text()
    )


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_run_config_json_reads_back_and_trains(task, tmp_path, capsys):
    """A detection or segmentation run's own config.json as --config: the same config, with typed sections, so a
    second run trains from it (it stopped with "'dict' object has no attribute 'resume'")."""
    if task == "detect":
        argv = [*DETECT, "--data", str(write_instance_folder(tmp_path / "peds"))]
    else:
        argv = [*SEGMENT, *segment_data(tmp_path / "seg")]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*argv, "--output", str(first)]) == 0
    capsys.readouterr()
    saved = json.loads((first / "config.json").read_text())
    assert printed(capsys, task, "train", "--config", str(first / "config.json")) == saved
    assert main([task, "train", "--config", str(first / "config.json"), "--output", str(second), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    again = json.loads((second / "config.json").read_text())
    assert again == {**saved, "run": {**saved["run"], "output": str(second)}}


# ---------------------------------------------------------------- one line for a wrong config, before any work
@pytest.mark.parametrize(
    ("command", "given", "message"),
    [
        (["train"], {"epochs": "1"}, "c.json: epochs: expected an integer, got '1'"),
        (["train"], {"epochs": [1, 2]}, "c.json: epochs: expected an integer, got [1, 2]"),
        (["train"], {"model": "convnext_atto"}, "c.json: model: expected a section (a mapping of ModelConfig's"),
        (["train"], {"optim": {"lr": "fast"}}, "c.json: optim.lr: expected a number or null, got 'fast'"),
        (["pretrain"], {"fcmae": {"mask_ratio": [0.6]}}, "c.json: fcmae.mask_ratio: expected a number, got [0.6]"),
        (["pretrain"], {"fcmae.ratio": 0.6}, "c.json: unknown config field 'fcmae.ratio' (did you mean 'fcmae.mask_"),
        (["detect", "train"], {"run": {"epochs": "2"}}, "c.json: run.epochs: expected an integer, got '2'"),
        (["detect", "train"], {"channels": 8}, "c.json: unknown config field 'channels'"),  # a segmentation field
        (["segment", "train"], {"data": {"crop": [32]}}, "c.json: data.crop: expected a list of 2 (each an integer)"),
        (["segment", "train"], {"backbone": "convnext_atto"}, "c.json: backbone: expected a section"),
    ],
)
def test_a_wrong_config_file_is_one_line_and_nothing_written(command, given, message, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(given))
    out = tmp_path / "run"
    assert main([*command, "--config", str(tmp_path / "c.json"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "cls"),
    [(["train"], TrainConfig), (["pretrain"], PretrainConfig), (["detect", "train"], DetectConfig),
     (["segment", "train"], SegmentConfig)],
)  # fmt: skip
def test_a_wrong_kind_of_value_in_any_field_of_a_config_file_is_one_line_and_nothing_written(command, cls, tmp_path,
                                                                                             capsys):  # fmt: skip
    """Property (hypothesis): a value of a kind its field never takes, in any field of the job's config, in its section
    of a --config FILE.json: exit code 2, one line naming the file and the field, nothing written."""
    config, out = tmp_path / "c.json", tmp_path / "run"

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
    @given(path_type=st.sampled_from(config_leaves(cls)), data=st.data())
    def check(path_type: tuple[str, object], data: st.DataObject) -> None:
        path, t = path_type
        tree = data.draw(a_wrong_value(t), label="value")
        for name in reversed(path.split(".")):
            tree = {name: tree}
        assume(text := dumped(json.dumps, tree))  # not an integer too long for JSON to print
        config.write_bytes(text)
        assert main([*command, "--config", str(config), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"convnext {command[0]}: error: {config}: {path}"), err
        assert not out.exists()

    check()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs.x", "1"], "flag: unknown config field 'epochs.x': epochs is an integer, not a section"),
        (["train", "--data.scale", "0.5"], "flag: data.scale: expected a list of 2 (each a number), got '0.5'"),
        (["pretrain", "--lr", "1e-3"], "flag: unknown config field 'lr' (did you mean 'optim.lr'?)"),
        (["pretrain", "--ema", "true"], "flag: unknown config field 'ema'"),  # classification only
        (["detect", "train", "--masks", "sometimes"], "flag: masks: expected true or false, got 'sometimes'"),
        (["segment", "train", "--run.max_steps", "1.5"], "flag: run.max_steps: expected an integer or null"),
    ],
)
def test_a_wrong_dotted_flag_is_one_line(argv, message, capsys):
    assert main([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("command", [["train"], ["pretrain"], ["detect", "train"], ["segment", "train"]])
def test_resume_takes_no_config_file_and_needs_a_run(command, tmp_path, capsys):
    (tmp_path / "c.json").write_text("{}")
    assert main([*command, "--resume", str(tmp_path), "--config", str(tmp_path / "c.json")]) == 2
    assert "--resume continues a run with its own config.json; drop --config" in capsys.readouterr().err
    assert main([*command, "--resume", str(tmp_path)]) == 2
    assert f"nothing to resume: {tmp_path / 'config.json'} does not exist" in capsys.readouterr().err
