"""Imbalanced benchmarks: `--sampler balanced`, `--loss-weighting`, `--logit-adjustment`, and
balanced accuracy with its interval in every report."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_resume_is_exact
from sklearn.metrics import balanced_accuracy_score

import datasets
import engine
import losses
import train
from losses import EmoNeXtLoss

# Training images per class of the imbalanced copy of the synthetic faces (7 classes).
KEPT = {"Angry": 16, "Disgust": 2, "Fear": 16, "Happy": 16, "Neutral": 4, "Sad": 16, "Surprise": 8}
FAST = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
        "--batch-size", "16", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
        "--no-progress", "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip


@pytest.fixture(scope="module")
def skewed(synthetic_root, tmp_path_factory):
    """The synthetic faces with KEPT training images per class (val and test unchanged)."""
    root = tmp_path_factory.mktemp("skewed") / "faces"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns(".cache"))
    for name, keep in KEPT.items():
        for path in sorted((root / "train" / name).iterdir())[keep:]:
            path.unlink()
    return root


def test_balanced_order_draws_every_class_equally_and_shares_it_across_ranks():
    targets = torch.tensor([0] * 50 + [1] * 5 + [2] * 10 + [4] * 3)  # class 3: no image
    for world in (1, 2, 3):
        shares = [datasets.balanced_order(targets, 7, 4, r, world) for r in range(world)]
        length = datasets.balanced_epoch_length(len(targets), 4, world)
        assert length % (4 * world) == 0 and len(targets) <= length < len(targets) + 4 * world
        assert all(len(s) == length // world for s in shares)  # each rank its share
        whole = torch.cat(shares)  # the epoch, over all ranks
        counts = torch.bincount(targets[whole], minlength=5).tolist()
        assert counts == [length // 4] * 3 + [0] + [length // 4]  # every class equally often
    order = datasets.balanced_order(targets, 7, 4, 0, 1)
    assert torch.equal(order, datasets.balanced_order(targets, 7, 4, 0, 1))  # seeded
    assert not torch.equal(order, datasets.balanced_order(targets, 7, 5, 0, 1))  # per epoch
    assert not torch.equal(order, datasets.balanced_order(targets, 8, 4, 0, 1))  # per seed
    # with replacement: class 4's three images fill its 17 draws, each of them drawn
    assert sorted(set(order[targets[order] == 4].tolist())) == [65, 66, 67]
    assert len(set(order[targets[order] == 0].tolist())) < 50  # not every image of a large class


def test_balanced_loader_yields_classes_equally_on_both_pipelines(skewed):
    def loader(pipeline, sampler="balanced", rank=0, world=1):
        return datasets.build_loader(skewed, "train", mode="train", pipeline=pipeline,
                                     batch_size=16, seed=3, sampler=sampler, rank=rank,
                                     world_size=world, data_config=datasets.DataConfig(
                                         image_size=32, resize_size=34))  # fmt: skip

    fast = loader("fast")
    fast.set_epoch(2)
    assert fast.dataset_size == 78 and fast.num_samples == 84 and len(fast) == 6  # 78 -> 84
    seen = torch.cat([y for _, y in fast])
    assert torch.bincount(seen).tolist() == [12] * 7
    pil = loader("pil")
    pil.set_epoch(2)
    assert torch.equal(pil.indices(), fast.indices())  # one rule for both pipelines
    halves = [loader("fast", rank=r, world=2) for r in (0, 1)]
    assert [h.num_samples for h in halves] == [42, 42]
    assert loader("fast", "shuffle").num_samples == 78  # the default is what it was
    with pytest.raises(ValueError, match="sampler"):
        datasets.build_loader(skewed, "val", mode="val", sampler="balanced")


def test_class_weights_are_cuis_and_inverse_frequency():
    counts = torch.tensor([100, 10, 1, 0])
    inverse = losses.class_weights(counts, "inverse-frequency")
    raw = torch.tensor([1 / 100, 1 / 10, 1.0, 0.0])
    assert torch.allclose(inverse, raw * 3 / raw.sum())  # normalised to sum to the classes
    beta = 0.99
    effective = losses.class_weights(counts, "effective-number", beta)
    raw = torch.tensor([(1 - beta) / (1 - beta**n) if n else 0.0 for n in (100, 10, 1, 0)])
    assert torch.allclose(effective, raw * 3 / raw.sum())
    assert torch.allclose(losses.class_weights(counts, "effective-number", 0.0)[:3], torch.ones(3))
    near_one = losses.class_weights(counts, "effective-number", 1 - 1e-9)
    assert torch.allclose(near_one, inverse, rtol=1e-4)  # beta -> 1: inverse frequency
    assert losses.class_weights(counts, "none") is None
    assert losses.logit_adjustment(counts[:3], 0.0) is None
    assert torch.allclose(losses.logit_adjustment(counts[:3], 2.0),
                          2.0 * torch.log(torch.tensor([100, 10, 1]) / 111.0))  # fmt: skip


def test_loss_combines_weights_adjustment_smoothing_and_attention_term():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    attention = torch.softmax(torch.randn(6, 6, generator=g), 1)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    w, shift = torch.tensor([0.5, 1.0, 1.5, 1.0]), torch.tensor([-0.1, -1.0, -2.0, -0.3])
    loss = EmoNeXtLoss(0.2, 2.0, w, shift)(logits, attention, y)
    z = logits + shift
    target = 0.8 * F.one_hot(y, 4) + 0.2 / 4  # label smoothing of the adjusted softmax
    per_image = -(target * torch.log_softmax(z, 1)).sum(1)
    expected = (w[y] * per_image).mean() + 2.0 * losses.attention_variance(attention)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the defaults build exactly the loss a run always had
    args = train.parse_args(FAST)
    criterion = train.build_criterion(args, torch.tensor([16, 2, 16, 16, 4, 16, 8]))
    assert criterion.class_weights is None and criterion.adjustment is None
    plain = F.cross_entropy(logits.float(), y, label_smoothing=0.2)
    assert torch.equal(criterion(logits, None, y), plain)


def test_balanced_accuracy_and_its_interval_are_scikit_learns():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(90, 5, generator=g)
    y = torch.randint(0, 4, (90,), generator=g)  # class 4 never true, sometimes predicted
    preds = logits.argmax(1).numpy()
    assert (preds == 4).any()
    metrics = engine.metrics_with_intervals(logits, y, list("ABCDE"), resamples=60, seed=3)
    with warnings.catch_warnings():  # scikit-learn's: a predicted class without images
        warnings.simplefilter("ignore", UserWarning)
        expected = balanced_accuracy_score(y.numpy(), preds)
        scores = [
            100 * balanced_accuracy_score(y.numpy()[row], preds[row])
            for idx in engine.bootstrap_indices(90, 60, 3)  # every interval's resamples
            for row in idx
        ]
    assert metrics["balanced_accuracy"] == pytest.approx(100 * expected)
    assert metrics["balanced_accuracy_ci95"] == pytest.approx(engine.percentile_interval(scores))
    report = engine.format_report(metrics)
    low, high = metrics["balanced_accuracy_ci95"]
    assert f"balanced accuracy {metrics['balanced_accuracy']:.2f} % 95 % CI [{low:.2f}" in report


def test_balanced_run_resumes_exactly_and_reports_balanced_accuracy(skewed, tmp_path):
    common = FAST + ["--dataset-path", str(skewed), "--output-dir", str(tmp_path),
                     "--sampler", "balanced", "--loss-weighting", "effective-number",
                     "--effective-number-beta", "0.9", "--logit-adjustment", "1"]  # fmt: skip
    assert_resume_is_exact(lambda argv: train.main(train.parse_args(argv)), common, tmp_path)
    ckpt = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert ckpt["args"]["sampler"] == "balanced" and ckpt["args"]["logit_adjustment"] == 1
    assert ckpt["args"]["loss_weighting"] == "effective-number"
    assert ckpt["args"]["effective_number_beta"] == 0.9
    assert ckpt["step"] == 2 * 6  # 84 images an epoch (78 rounded up to 7 x 12): 6 batches
    results = json.loads((tmp_path / "split" / "results.json").read_text())
    for key in ("balanced_accuracy", "ece", "nll", "brier"):
        low, high = results[f"{key}_ci95"]
        assert low - 1e-9 <= results[key] <= high + 1e-9, key  # up to float rounding
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    assert all("val_balanced_accuracy" in m for m in metrics)
    # the run's flags are its own: a resume that changes one is refused in one line
    with pytest.raises(SystemExit) as err:
        train.parse_args(common + ["--epochs", "3", "--sampler", "shuffle",
                                   "--resume", str(tmp_path / "split" / "last.pt")])  # fmt: skip
    assert err.value.code == 2


@pytest.mark.parametrize(
    "flag, value, rule",
    [("--effective-number-beta", "1", "in [0, 1)"), ("--logit-adjustment", "-1", "at least 0"),
     ("--sampler", "weighted", "invalid choice"), ("--loss-weighting", "focal", "invalid choice")],
)  # fmt: skip
def test_imbalance_flags_are_checked(flag, value, rule, capsys):
    with pytest.raises(SystemExit) as err:
        train.parse_args(FAST + [flag, value])
    message = capsys.readouterr().err
    assert err.value.code == 2 and flag in message and rule in message


def test_help_names_the_imbalance_flags():
    text = train.get_args_parser().format_help()
    for flag in ("--sampler", "--loss-weighting", "--effective-number-beta", "--logit-adjustment"):
        assert flag in text
    assert np.isclose(train.get_args_parser().get_default("effective_number_beta"), 0.9999)
