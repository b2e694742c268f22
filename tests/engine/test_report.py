"""The run folder's reports: curves.png with the per-class scores, and the trackers (`--log mlflow|wandb`), run
offline into the run folder and read back: MLflow through its own client, W&B from its offline run file."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from convnext.engine.report import Trackers, plot_curves

ROWS = [
    {"epoch": 1, "step": 5, "lr": 0.1, "train_loss": 2.0, "val_loss": 1.5, "val_top1": 40.0, "val_top5": 90.0,
     "val_macro_f1": 30.0, "val_balanced_accuracy": 35.0},
    {"epoch": 2, "step": 10, "lr": 0.05, "train_loss": 1.2, "val_loss": 1.1, "val_top1": 60.0, "val_top5": 95.0,
     "val_macro_f1": 55.0, "val_balanced_accuracy": 57.5},
]  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Nothing reaches the network: W&B offline and silent, MLflow to the run folder's file store."""
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                 "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                 "MLFLOW_ALLOW_FILE_STORE": "true"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_curves_show_macro_f1_and_balanced_accuracy(tmp_path):
    assert plot_curves(ROWS, tmp_path / "curves.png").stat().st_size > 0


def _mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("convnext")
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_mlflow_gets_config_metrics_curves_and_results_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow", reason="the track extra is not installed")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    curves = plot_curves(ROWS, run_dir / "curves.png")
    t = Trackers(["mlflow"], run_dir, {"optim": {"lr": 0.1}, "epochs": 3, "recipe": ["a"]})
    for row in ROWS:
        t.log_row(row, curves)
    t.finish(None, failed=True)  # killed after epoch 2
    t = Trackers(["mlflow"], run_dir, {"optim": {"lr": 0.1}, "epochs": 4}, resume=True)
    t.log_row({**ROWS[1], "epoch": 3, "val_top1": 70.0}, curves)
    (run_dir / "results.json").write_text("{}")
    t.finish({"top1": 70.0, "macro_f1": 66.0, "run_dir": "x"}, [run_dir / "results.json"])

    client, run = _mlflow_run(run_dir)  # one run, continued
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["epochs"] == "3"  # the first start's config
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(1, 40.0), (2, 60.0), (3, 70.0)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [30.0, 55.0, 55.0]
    assert run.data.metrics["final/top1"] == 70.0 and run.data.metrics["final/macro_f1"] == 66.0
    assert {"curves.png", "results.json"} <= {f.path for f in client.list_artifacts(run.info.run_id)}


def _wandb_records(run_dir: Path) -> list:
    """The records of W&B's offline run file (LevelDB's log format: 32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, out, part, pos = path.read_bytes(), [], b"", 7  # a 7-byte header: ":W&B", a magic, a version
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def test_wandb_offline_run_holds_config_metrics_and_results(tmp_path):
    pytest.importorskip("wandb", reason="the track extra is not installed")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    curves = plot_curves(ROWS, run_dir / "curves.png")
    t = Trackers(["wandb"], run_dir, {"optim": {"lr": 0.1}, "epochs": 3})
    for row in ROWS:
        t.log_row(row, curves)
    t.finish({"top1": 60.0, "macro_f1": 55.0}, [])
    for _ in range(100):  # W&B's service may still be writing the file when finish() returns: wait for its end
        records = _wandb_records(run_dir)
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.1)
    history = [(r.history.step.num, {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
               for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip
    assert [(n, float(h["val_top1"]), float(h["val_macro_f1"])) for n, h in history] == [(1, 40, 30), (2, 60, 55)]
    assert all(json.loads(h["curves/_type"]) == "image-file" for _, h in history)  # curves.png, each epoch
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}  # fmt: skip
    assert config["optim"] == {"lr": 0.1} and config["epochs"] == 3
    summary = {i.key: i.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}  # fmt: skip
    assert float(summary["final/top1"]) == 60.0 and float(summary["final/macro_f1"]) == 55.0
