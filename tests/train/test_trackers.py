"""`--log mlflow|wandb` in a training run: the run's config, rows and results reach MLflow's store in the run folder;
a tracker that is not installed is one line naming the extra, before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from convnext.extras import MissingExtraError
from convnext.train import TrainConfig, fit


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing reaches the network: MLflow to the run folder's file store, W&B offline."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("convnext").experiment_id])
    return client, run


def test_a_training_run_logs_to_mlflow_on_its_own(image_folder, tiny_config, tmp_path):
    pytest.importorskip("mlflow", reason="the track extra is not installed")
    out = tmp_path / "run"
    r = fit(tiny_config(image_folder, out, trackers=["mlflow"]))
    client, run = _mlflow_run(out)
    assert run.data.params["data.name"] == str(image_folder)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [1, 2]
    assert run.data.metrics["final/top1"] == pytest.approx(r["top1"])
    assert {"curves.png", "results.json", "config.json", "metrics.csv"} <= {
        f.path for f in client.list_artifacts(run.info.run_id)
    }


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_not_installed_is_one_line_naming_the_extra(image_folder, tmp_path, capsys, monkeypatch, tracker):
    from convnext.cli import main

    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: find_spec gives None
    out = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), "--output", str(out), "--log", tracker]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--log {tracker} needs {tracker}" in err[0] and "convnext[track]" in err[0]
    assert not out.exists()
    with pytest.raises(MissingExtraError, match=r"convnext\[track\]"):  # the API too, before the folder is made
        fit(TrainConfig(trackers=[tracker], output=str(out)))
    assert not out.exists()
