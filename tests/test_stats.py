"""The statistics: engine.py's bootstrap intervals, evaluate.py's paired comparison and
McNemar's exact test."""

import time

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score

import engine
import evaluate


def predictions(n: int, accuracy: float, classes: int = 7, seed: int = 0):
    """Targets and predictions right on a fraction `accuracy` of images; class 6 is rare."""
    rng = np.random.default_rng(seed)
    targets = rng.choice(classes, n, p=[0.2, 0.02, 0.14, 0.25, 0.17, 0.15, 0.07])
    wrong = (targets + rng.integers(1, classes, n)) % classes
    return targets, np.where(rng.random(n) < accuracy, targets, wrong)


def independent_interval(score, resamples: int, seed: int) -> np.ndarray:
    """The textbook bootstrap: a loop over resamples, scikit-learn's metrics, 2.5/97.5 %."""
    rows = np.random.default_rng(seed).integers(
        0, len(score.targets), (resamples, len(score.targets))
    )
    values = np.array([score(row) for row in rows])
    return np.percentile(values, [2.5, 97.5], axis=0).T


def test_bootstrap_interval_matches_an_independent_computation():
    targets, preds = predictions(300, 0.7)
    labels = list(range(7))

    def score(row):
        y, p = targets[row], preds[row]
        macro = f1_score(y, p, labels=labels, average="macro", zero_division=0)
        return 100 * accuracy_score(y, p), 100 * macro

    score.targets = targets
    expected = independent_interval(score, 200, seed=5)
    got = engine.confidence_intervals(preds, targets, 7, resamples=200, seed=5)
    assert got["accuracy_ci95"] == pytest.approx(expected[0], abs=1e-9)
    assert got["macro_f1_ci95"] == pytest.approx(expected[1], abs=1e-9)
    assert got["bootstrap"] == {"resamples": 200, "seed": 5, "method": "percentile"}
    # seeded: the same interval every time, another one for another seed
    assert engine.confidence_intervals(preds, targets, 7, 200, 5) == got
    assert engine.confidence_intervals(preds, targets, 7, 200, 6) != got


def test_bootstrap_on_fer2013_test_size_is_fast_and_about_1_5_points_wide():
    targets, preds = predictions(3589, 0.73, seed=1)
    started = time.process_time()
    ci = engine.confidence_intervals(preds, targets, 7, resamples=2000)
    assert time.process_time() - started < 1.0  # measured about 0.15 s
    accuracy = 100 * (preds == targets).mean()
    low, high = ci["accuracy_ci95"]
    assert low < accuracy < high
    half_width = 1.96 * 100 * np.sqrt(0.73 * 0.27 / 3589)  # normal approximation: 1.45 points
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)


@pytest.mark.parametrize(
    "a_only, b_only", [(10, 3), (3, 10), (0, 7), (25, 25), (1, 0), (0, 0), (60, 38), (400, 350)]
)
def test_mcnemar_matches_scipy_binomtest(a_only, b_only):
    expected = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    assert evaluate.mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_comparison_on_a_hand_made_table():
    # 100 images: both right on 60, only A on 15, only B on 5, both wrong on 20.
    targets = np.zeros(100, dtype=int)
    right_a = np.r_[np.ones(60), np.ones(15), np.zeros(5), np.zeros(20)].astype(bool)
    right_b = np.r_[np.ones(60), np.zeros(15), np.ones(5), np.zeros(20)].astype(bool)
    preds_a, preds_b = np.where(right_a, 0, 1), np.where(right_b, 0, 2)
    result = evaluate.paired_comparison(preds_a, preds_b, targets, 3, resamples=500, seed=3)
    assert (result["accuracy_a"], result["accuracy_b"]) == (75.0, 65.0)
    assert result["accuracy_difference"] == pytest.approx(10.0)
    assert result["mcnemar"]["a_only_correct"] == 15 and result["mcnemar"]["b_only_correct"] == 5
    assert result["mcnemar"]["p_value"] == pytest.approx(binomtest(15, 20, 0.5).pvalue)
    # the paired interval is the percentile interval of A - B on shared resamples
    rows = np.random.default_rng(3).integers(0, 100, (500, 100))
    diffs = 100 * (right_a[rows].mean(1) - right_b[rows].mean(1))
    assert result["accuracy_difference_ci95"] == pytest.approx(np.percentile(diffs, [2.5, 97.5]))
    # pairing matters: only the 20 discordant images vary the difference, so the interval is
    # narrower than one from independent resamples of each model
    unpaired = engine.confidence_intervals(preds_a, targets, 3, 500)["accuracy_ci95"]
    low, high = result["accuracy_difference_ci95"]
    assert high - low < 0.9 * (unpaired[1] - unpaired[0]) * np.sqrt(2)


def test_paired_comparison_without_resamples_has_no_interval():
    """resamples=0 (evaluate.py --bootstrap 0): the figures and McNemar, no interval; it was
    one from a single resample, [d, d] for a resampled difference d that need not be A - B."""
    targets, preds_a = predictions(200, 0.7, seed=2)
    _, preds_b = predictions(200, 0.6, seed=3)
    with_intervals = evaluate.paired_comparison(preds_a, preds_b, targets, 7, resamples=100)
    result = evaluate.paired_comparison(preds_a, preds_b, targets, 7, resamples=0)
    assert result["accuracy_difference_ci95"] is None and result["macro_f1_difference_ci95"] is None
    assert result["bootstrap"] == {"resamples": 0, "seed": 0, "method": "none: --bootstrap 0"}
    for key in ("accuracy_difference", "macro_f1_difference", "mcnemar", "num_images"):
        assert result[key] == with_intervals[key]


def test_report_shows_the_intervals():
    targets, preds = predictions(200, 0.6)
    logits = np.eye(7)[preds]
    metrics = engine.compute_metrics(torch.tensor(logits), torch.tensor(targets), list("ABCDEFG"))
    metrics.update(engine.confidence_intervals(preds, targets, 7))
    low, high = metrics["accuracy_ci95"]
    assert f"95 % CI [{low:.2f}, {high:.2f}]" in engine.format_report(metrics)


def test_per_class_intervals_are_the_resampled_scikit_learn_scores():
    """Each class's precision, recall and F1 interval: percentiles of scikit-learn's scores on the
    very resamples that the accuracy interval uses (the same seed draws the same images)."""
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(3)
    targets = rng.integers(0, 4, 300)
    preds = np.where(rng.random(300) < 0.6, targets, rng.integers(0, 4, 300))
    preds[preds == 3] = 2  # class 3 is never predicted: its precision is 0 (zero_division=0)
    got = engine.per_class_intervals(preds, targets, 4, resamples=60, seed=5)
    (indices,) = list(engine.bootstrap_indices(300, 60, seed=5))
    scores = np.array(
        [
            precision_recall_fscore_support(targets[i], preds[i], labels=range(4), zero_division=0)[
                :3
            ]
            for i in indices
        ]
    )
    for c in range(4):
        for k, name in enumerate(("precision", "recall", "f1")):
            low, high = np.percentile(100 * scores[:, k, c], [2.5, 97.5])
            assert got[c][f"{name}_ci95"] == pytest.approx([low, high], abs=1e-9)
    assert got[3]["precision_ci95"] == [0.0, 0.0]


def test_every_reported_class_metric_has_its_interval():
    logits = torch.eye(3)[torch.tensor([0, 1, 2, 2, 1, 0, 0, 1])] + 0.1
    targets = torch.tensor([0, 1, 2, 1, 1, 0, 2, 1])
    metrics = engine.metrics_with_intervals(logits, targets, ["a", "b", "c"], resamples=200)
    for entry in metrics["per_class"].values():
        for name in ("precision", "recall", "f1"):
            low, high = entry[f"{name}_ci95"]
            assert low <= entry[name] <= high
    assert "per_class_ci95" not in metrics  # folded into the classes' entries
    assert (
        "precision_ci95"
        not in engine.metrics_with_intervals(logits, targets, ["a", "b", "c"], resamples=0)[
            "per_class"
        ]["a"]
    )


def test_seed_level_interval_and_welch_test_by_the_textbook():
    """scripts/reproduce.py's statistics over seeds against the formulas written out: the mean's
    interval mean +- t(0.975, n - 1) s / sqrt(n); Welch's t = (ma - mb) / se with
    se^2 = va / na + vb / nb, the Welch-Satterthwaite degrees of freedom, a two-sided p-value
    and the difference's interval (ma - mb) +- t(0.975, df) se."""
    from scipy.stats import t as student

    from scripts.reproduce import mean_interval, welch_test

    a, b = [73.1, 72.4, 74.0, 73.6], [71.9, 72.8, 71.2]
    ma, mb, va, vb = np.mean(a), np.mean(b), np.var(a, ddof=1), np.var(b, ddof=1)
    half = student.ppf(0.975, 3) * np.sqrt(va / 4)
    assert mean_interval(a) == pytest.approx([ma - half, ma + half], rel=1e-12)
    se = np.sqrt(va / 4 + vb / 3)
    df = se**4 / ((va / 4) ** 2 / 3 + (vb / 3) ** 2 / 2)
    t = (ma - mb) / se
    result = welch_test(a, b)
    assert result["t"] == pytest.approx(t, rel=1e-12) and result["df"] == pytest.approx(df)
    assert result["p_value"] == pytest.approx(2 * student.sf(abs(t), df), rel=1e-9)
    half = student.ppf(0.975, df) * se
    assert result["ci95"] == pytest.approx([ma - mb - half, ma - mb + half], rel=1e-9)
    assert result["difference"] == pytest.approx(ma - mb)
    # too few seeds: no interval, no test; no spread at all: no test
    assert mean_interval([73.0]) is None and welch_test(a, [72.0]) is None
    assert mean_interval([73.0, 73.0]) == [73.0, 73.0]
    assert welch_test([73.0, 73.0], [72.0, 72.0])["p_value"] is None
