"""Class imbalance: the class-balanced sampler (resumable, sharded), inverse-frequency weights, the recipe's rule,
and `data.balance` in a run: forced, chosen, refused, and nothing changed on a balanced folder."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from convnext.engine.balance import BalancedSampler, class_counts, class_weights, imbalance_ratio
from convnext.engine.checkpoint import load
from convnext.engine.distributed import DistInfo
from convnext.train import fit
from convnext.train.auto import BALANCE, IMBALANCE_FROM, choose_balance

TARGETS = [0] * 90 + [1] * 9 + [2] * 1  # 90:1


def test_balanced_sampler_draws_classes_evenly_and_resumes_mid_epoch():
    s = BalancedSampler(TARGETS * 50, 3, DistInfo(), seed=3)
    s.set_epoch(2)
    order = list(s)
    assert len(order) == len(s) == 5000
    drawn = Counter(TARGETS[i % 100] for i in order)
    assert all(abs(drawn[c] / 5000 - 1 / 3) < 0.03 for c in range(3)), drawn  # the 1-image class a third of draws
    s.set_epoch(2, skip=1234)
    assert list(s) == order[1234:] and len(s) == 5000 - 1234  # resume: the same draws, from where it stopped
    s.set_epoch(3)
    assert list(s) != order  # another epoch, another draw


def test_balanced_sampler_shards_one_draw_over_processes():
    whole = BalancedSampler(TARGETS, 3, DistInfo(), seed=0)
    ranks = [BalancedSampler(TARGETS, 3, DistInfo(rank=r, world_size=2), seed=0) for r in range(2)]
    assert [len(r) for r in ranks] == [50, 50]
    interleaved = [i for pair in zip(*(list(r) for r in ranks)) for i in pair]
    assert interleaved == list(whole)  # process r takes draws r, r + 2, ... of the one-process order


def test_inverse_frequency_weights_keep_the_average_image_at_one():
    counts = class_counts(torch.tensor(TARGETS), 4)
    assert counts == [90, 9, 1, 0] and imbalance_ratio(counts) == 90
    w = class_weights(counts)
    assert w[3] == 0 and w[0] * 90 == pytest.approx(w[1] * 9) == pytest.approx(w[2] * 1)
    assert float((w * torch.tensor(counts, dtype=torch.float32)).sum()) == pytest.approx(100)  # sum over images = N


def test_the_rule_does_nothing_below_the_ratio_and_says_why():
    mode, line = choose_balance([100, 100, 99])
    assert mode == "none" and "under" in line
    mode, line = choose_balance([500, 50, 5])
    assert mode == BALANCE and f"at least {IMBALANCE_FROM:g}:1" in line and "ratio 100.0:1" in line
    assert choose_balance([500, 5], given="sampler") == ("sampler", "class balance: sampler (given); classes of 5 "
                                                          "to 500 images (ratio 100.0:1)")  # fmt: skip


def _imbalanced(folder):
    """Drop all but 1 of the 'stripe' training images: 12 / 12 / 1."""
    for f in sorted((folder / "train" / "stripe").iterdir())[1:]:
        f.unlink()
    return folder


@pytest.mark.parametrize("mode", ["sampler", "weights"])
def test_a_run_trains_with_the_forced_balance(image_folder, tiny_config, tmp_path, mode):
    out = tmp_path / mode
    r = fit(tiny_config(_imbalanced(image_folder), out, **{"data.balance": mode}, batch_size=2))
    assert json.loads((out / "config.json").read_text())["data"]["balance"] == mode
    assert r["epochs"] == 2 and 0 <= r["macro_f1"] <= 100


def test_auto_says_its_choice_in_the_recipe(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    fit(tiny_config(_imbalanced(image_folder), out, **{"data.balance": "auto"}, epochs=1, batch_size=2))
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["balance"] == BALANCE  # resolved: the run resumes with what it trained with
    assert any(line.startswith("class balance:") and "ratio 12.0:1" in line for line in saved["recipe"])


def test_a_balanced_folder_trains_exactly_as_before(image_folder, tiny_config, tmp_path):
    fit(tiny_config(image_folder, tmp_path / "plain", epochs=1))
    fit(tiny_config(image_folder, tmp_path / "auto", epochs=1, **{"data.balance": "auto"}))
    a, b = load(tmp_path / "plain" / "last.pt"), load(tmp_path / "auto" / "last.pt")
    torch.testing.assert_close(a["model"], b["model"], rtol=0, atol=0)
    assert b["config"]["data"]["balance"] == "none"


def test_an_unknown_balance_is_one_line_before_any_work(image_folder, tiny_config, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"data.balance must be one of none, sampler, weights, auto, got 'even'"):
        fit(tiny_config(image_folder, tmp_path / "run", **{"data.balance": "even"}))
    assert not (tmp_path / "run").exists()
    from convnext.cli import main

    argv = ["train", "--data", str(image_folder), "--output", str(tmp_path / "cli"), "--data.balance", "even"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.balance must be one of" in err[0] and not (tmp_path / "cli").exists()
