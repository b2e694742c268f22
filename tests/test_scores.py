"""The scores equal scikit-learn's on the same predictions (random, imbalanced, with absent classes)."""

import numpy as np
import pytest
from sklearn import metrics

from convnext.scores import calibration, class_report, confusion, most_confused


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_report_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = 7
    t = rng.choice(n - 1, size=300, p=np.r_[0.5, np.full(n - 2, 0.5 / (n - 2))])  # class n-1 never true
    p = np.where(rng.random(300) < 0.6, t, rng.integers(0, n, 300))
    r = class_report(confusion(t, p, n))
    labels = np.unique(np.r_[t, p])
    assert r["macro_f1"] == pytest.approx(metrics.f1_score(t, p, average="macro", labels=labels))
    assert r["weighted_f1"] == pytest.approx(metrics.f1_score(t, p, average="weighted"))
    assert r["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(t, p))
    assert r["accuracy"] == pytest.approx(metrics.accuracy_score(t, p))
    pr, rc, f1, sup = metrics.precision_recall_fscore_support(t, p, labels=range(n), zero_division=0)
    np.testing.assert_allclose(r["precision"], pr)
    np.testing.assert_allclose(r["recall"], rc)
    np.testing.assert_allclose(r["f1"], f1)
    assert r["support"] == sup.tolist()
    np.testing.assert_array_equal(confusion(t, p, n), metrics.confusion_matrix(t, p, labels=range(n)))


def test_calibration_of_a_perfectly_calibrated_and_an_overconfident_model():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.05, 1.0, 200_000)
    assert calibration(conf, rng.random(conf.size) < conf)["ece"] < 0.01
    over = calibration(np.full(1000, 0.95), np.arange(1000) < 600)  # says 95%, right 60%
    assert over["ece"] == pytest.approx(0.35)
    assert sum(b["count"] for b in over["bins"]) == 1000


def test_most_confused_pairs_largest_first():
    cm = np.array([[5, 3, 0], [1, 4, 7], [0, 0, 9]])
    assert most_confused(cm, ["a", "b", "c"], top=2) == [
        {"true": "b", "predicted": "c", "count": 7},
        {"true": "a", "predicted": "b", "count": 3},
    ]
