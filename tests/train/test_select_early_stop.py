"""Macro-F1 and balanced accuracy per epoch (equal to scikit-learn's on the same predictions), --select picking
best.pt, and --early-stop: the stop in results.json and the log, a clean resume after it, budgeted runs untouched."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch import nn

from convnext.engine.checkpoint import load
from convnext.engine.distributed import DistInfo
from convnext.train import fit
from convnext.train.task import evaluate


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_epoch_scores_equal_scikit_learns_on_the_same_predictions():
    torch.manual_seed(0)
    x, y = torch.randn(90, 6), torch.randint(0, 4, (90,))
    y[y == 3] = 2  # class 3 never occurs: scikit-learn's macro-F1 counts it only where it is predicted
    model = nn.Linear(6, 4)
    batches = [(x[i : i + 32], y[i : i + 32], 0) for i in range(0, 90, 32)]
    m = evaluate(model, batches, info=DistInfo(), num_classes=4)
    preds = model(x).argmax(1)
    assert m["top1"] == pytest.approx(100 * float((preds == y).float().mean()))
    assert m["macro_f1"] == pytest.approx(100 * f1_score(y, preds, average="macro"))  # classes seen or predicted
    assert m["balanced_accuracy"] == pytest.approx(100 * balanced_accuracy_score(y, preds))


def test_metrics_rows_carry_macro_f1_and_best_pt_follows_select(image_folder, tiny_config, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="convnext.train"):
        r = fit(tiny_config(image_folder, out, epochs=3, select="loss"))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert all(0 <= float(row["val_macro_f1"]) <= 100 and float(row["val_balanced_accuracy"]) >= 0 for row in rows)
    assert any("macro-F1" in m and "balanced acc" in m for m in caplog.messages)  # the epoch line
    losses = [float(row["val_loss"]) for row in rows]
    best = min(range(3), key=losses.__getitem__)
    assert load(out / "best.pt")["epoch"] == best + 1  # the lowest val loss, not the highest top-1
    assert r["select"] == "loss" and r["best_loss"] == pytest.approx(losses[best], rel=1e-5)
    assert "best_top1" not in r and r["early_stop"] is None


def _frozen(image_folder, tiny_config, out, **kw):
    """A run whose lr is too small to change a prediction: the score never improves after epoch 1."""
    return tiny_config(image_folder, out, **{"epochs": 5, "optim.lr": 1e-12, "sched.warmup_epochs": 0, **kw})


def test_early_stop_after_n_epochs_without_improvement_then_resume_is_clean(image_folder, tiny_config, tmp_path,
                                                                            caplog):  # fmt: skip
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="convnext.train"):
        r = fit(_frozen(image_folder, tiny_config, out, early_stop=2))
    assert r["epochs"] == 3 and r["early_stop"] == {"after_epoch": 3, "patience": 2, "metric": "top1"}
    assert json.loads((out / "results.json").read_text())["early_stop"]["after_epoch"] == 3
    assert sum("early stop after epoch 3" in m for m in caplog.messages) == 1
    rows, step = (out / "metrics.csv").read_text(), load(out / "last.pt")["step"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="convnext.train"):
        again = fit(_frozen(image_folder, tiny_config, out, early_stop=2, resume=str(out)))
    assert any("stopped early at epoch 3" in m for m in caplog.messages)
    assert again["early_stop"] == r["early_stop"] and again["top1"] == r["top1"]
    assert (out / "metrics.csv").read_text() == rows and load(out / "last.pt")["step"] == step  # nothing trained


def test_budgeted_runs_keep_their_schedule(image_folder, tiny_config, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="convnext.train"):
        r = fit(_frozen(image_folder, tiny_config, tmp_path / "run", early_stop=1, budget_min=30, epochs=3))
    assert r["epochs"] == 3 and r["early_stop"] is None
    assert any("early stopping does not apply to budgeted runs" in m for m in caplog.messages)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--select", "f1"], "--select must be one of top1, macro_f1, balanced_accuracy, loss, got 'f1'"),
     (["--early-stop", "-1"], "--early-stop must be >= 0"),
     (["--log", "neptune"], "--log must name mlflow or wandb, got 'neptune'")],
)  # fmt: skip
def test_bad_selection_flags_are_one_line_before_any_work(image_folder, tmp_path, capsys, flags, message):
    from convnext.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_cli_flags_set_the_config_fields(capsys):
    from convnext.cli import main

    argv = ["train", "--preset", "demo", "--select", "macro_f1", "--early-stop", "3", "--log", "mlflow,wandb",
            "--data.balance", "sampler", "--print-config"]  # fmt: skip
    assert main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["select"], cfg["early_stop"], cfg["trackers"]) == ("macro_f1", 3, ["mlflow", "wandb"])
    assert cfg["data"]["balance"] == "sampler"
