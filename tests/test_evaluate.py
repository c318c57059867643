"""evaluate.py on a tiny dataset, with this project's and the official trainer's checkpoints."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_utils import (
    CLASSES,
    EIGHT_MODEL,
    command_error,
    make_official_checkpoint,
    make_project_checkpoint,
)

import evaluate
from evaluate import Scores, match_classes, mcnemar_exact, restrict, unmasked_metrics
from utils import CLIError


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return synthetic_root  # 7 classes x 4 images in val and test


def run(argv: list) -> dict:
    return evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in argv]))


def read_predictions(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_outputs(record: dict, out, predictions, n_images: int) -> None:
    saved = json.loads((out / "eval.json").read_text())
    assert saved["accuracy"] == pytest.approx(record["accuracy"])
    assert saved["num_images"] == n_images and saved["classes"] == CLASSES
    assert (out / f"confusion_matrix_{saved['split']}.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_predictions(predictions)
    assert len(rows) == n_images
    for row in rows:
        probs = [float(row[c]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert row["predicted"] == CLASSES[probs.index(max(probs))]
    correct = sum(row["true"] == row["predicted"] for row in rows)
    assert record["accuracy"] == pytest.approx(100 * correct / n_images)
    assert sum(map(sum, saved["confusion_matrix"])) == n_images


def test_project_checkpoint_tencrop(dataset, tmp_path, capsys):
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    predictions = tmp_path / "preds" / "test.csv"
    record = run(
        ["--checkpoint", checkpoint, "--dataset-path", dataset, "--predictions", predictions]
    )
    assert record["tta"] == "tencrop" and record["weights"] == "ema"
    assert record["model_name"] == "emonext_micro"
    check_outputs(record, tmp_path, predictions, 28)  # default output: beside the checkpoint
    rows = read_predictions(predictions)
    assert "/test/Angry/" in rows[0]["path"] and rows[0]["true"] == "Angry"
    assert all(Path(r["path"]).parent.name == r["true"] for r in rows)  # rows match images
    assert "macro-F1" in capsys.readouterr().out


def test_score_names_what_it_returns(dataset, tmp_path):
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    args = evaluate.parse_args(
        ["--checkpoint", str(checkpoint), "--dataset-path", str(dataset), "--tta", "none"]
    )
    scores = evaluate.score(str(checkpoint), args, torch.device("cpu"))
    assert scores.classes == CLASSES and scores.ckpt["weights_used"] == "ema"
    assert scores.model.model_name == "emonext_micro" and scores.data_config["image_size"] == 64
    assert scores.logits.shape == (28, 7) and scores.logits.dtype == torch.float32
    assert scores.targets.tolist() == [c for c in range(7) for _ in range(4)]
    assert [Path(p).parent.name for p in scores.loader.split.paths] == [
        CLASSES[t] for t in scores.targets
    ]


def test_compare_two_checkpoints_on_the_same_images(dataset, tmp_path, capsys):
    a = make_project_checkpoint(tmp_path / "a.pt")
    b = make_project_checkpoint(tmp_path / "b.pt", seed=1)
    common = ["--dataset-path", dataset, "--tta", "none", "--output", tmp_path]
    alone = {
        name: run(["--checkpoint", path, *common, "--predictions", tmp_path / f"{name}.csv"])
        for name, path in (("a", a), ("b", b))
    }
    record = run(["--checkpoint", a, "--compare", b, *common, "--bootstrap", "500"])
    compared = record["compare"]
    assert json.loads((tmp_path / "eval.json").read_text())["compare"] == compared
    assert compared["accuracy_a"] == pytest.approx(alone["a"]["accuracy"])
    assert compared["accuracy_b"] == pytest.approx(alone["b"]["accuracy"])
    assert compared["checkpoint_b"] == str(b) and compared["bootstrap"]["resamples"] == 500
    # McNemar's table from the two prediction files, image by image
    rows_a, rows_b = read_predictions(tmp_path / "a.csv"), read_predictions(tmp_path / "b.csv")
    right_a = [r["true"] == r["predicted"] for r in rows_a]
    right_b = [r["true"] == r["predicted"] for r in rows_b]
    a_only = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    b_only = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    assert (compared["mcnemar"]["a_only_correct"], compared["mcnemar"]["b_only_correct"]) == (
        a_only,
        b_only,
    )
    assert compared["mcnemar"]["p_value"] == pytest.approx(mcnemar_exact(a_only, b_only))
    low, high = compared["accuracy_difference_ci95"]
    assert low <= compared["accuracy_difference"] == pytest.approx(100 * (a_only - b_only) / 28)
    assert compared["accuracy_difference"] <= high
    out = capsys.readouterr().out
    assert f"A - B = {compared['accuracy_difference']:+.2f} points, 95 % CI [{low:+.2f}" in out
    assert "McNemar exact p = " in out
    low, high = record["accuracy_ci95"]  # A's own interval, in the report too
    assert low <= record["accuracy"] <= high and "95 % CI" in out


def test_official_checkpoint(dataset, golden_dir, tmp_path):
    checkpoint = make_official_checkpoint(golden_dir, tmp_path / "official.pt")
    out, predictions = tmp_path / "out", tmp_path / "val.csv"
    record = run(
        ["--checkpoint", checkpoint, "--dataset-path", dataset, "--split", "val"]
        + ["--tta", "none", "--weights", "model", "--model-size", "micro"]
        + ["--output", out, "--predictions", predictions, "--batch-size", "5"]
    )
    assert record["weights"] == "model" and record["split"] == "val"
    assert record["data_config"]["image_size"] == 224
    check_outputs(record, out, predictions, 28)


def test_bad_images_fail_in_one_line_or_are_skipped(dataset, bomb_png, tmp_path, repo_root, capsys):
    root = tmp_path / "data"
    shutil.copytree(dataset / "val", root / "val")
    bomb = root / "val" / "Happy" / "huge.png"  # 400 megapixels, a decompression bomb
    shutil.copy(bomb_png, bomb)
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    argv = ["--checkpoint", checkpoint, "--dataset-path", root, "--split", "val", "--tta", "none"]
    status, message = command_error(capsys, repo_root / "evaluate.py", argv)  # as a user runs it
    assert status == 1 and message.count("\n") == 1
    assert message.startswith("evaluate.py: error: cannot read image")
    assert str(bomb) in message and "too large" in message and "--skip-bad-images" in message
    record = run([*argv, "--skip-bad-images", "--predictions", tmp_path / "p.csv"])
    assert record["num_images"] == 28 and record["skipped_bad_images"] == 1
    assert record["skipped_images"] == [str(bomb)]
    assert json.loads((tmp_path / "eval.json").read_text())["skipped_images"] == [str(bomb)]
    assert len(read_predictions(tmp_path / "p.csv")) == 28


def test_clear_errors(dataset, tmp_path, repo_root, capsys):
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(CLIError, match="does not exist"):
        run(["--checkpoint", tmp_path / "nope.pt", "--dataset-path", dataset])
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CLIError, match="not a readable PyTorch checkpoint"):
        run(["--checkpoint", text, "--dataset-path", dataset])
    with pytest.raises(CLIError, match="scripts/download_dataset.py"):
        run(["--checkpoint", checkpoint, "--dataset-path", tmp_path / "missing"])
    # Two classes, since one is refused (datasets.check_dataset), that a two-class model lacks.
    two_class = make_project_checkpoint(tmp_path / "two.pt", classes=["Happy", "Sad"])
    other = tmp_path / "contempt"
    shutil.copytree(dataset / "test" / "Angry", other / "test" / "Angry")
    shutil.copytree(dataset / "test" / "Angry", other / "test" / "Contempt")
    with pytest.raises(
        CLIError, match="predicts Happy, Sad; .*Angry, Contempt: no class in common"
    ):
        run(["--checkpoint", two_class, "--dataset-path", other, "--output", tmp_path])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # flags that contradict: a usage error
        run(["--checkpoint", checkpoint, "--model", "emonext_tiny", "--model-size", "micro"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "evaluate.py: error: --model emonext_tiny and --model-size micro name different models; "
        "give one\n"
    )
    argv = ["--checkpoint", text, "--dataset-path", dataset]
    status, message = command_error(capsys, repo_root / "evaluate.py", argv)
    assert status == 1 and message.count("\n") == 1
    assert message.startswith("evaluate.py: error:") and "not a readable PyTorch" in message
    argv = ["--checkpoint", checkpoint, "--bootstrap", "-1"]  # a bad flag value: exit status 2
    status, message = command_error(capsys, repo_root / "evaluate.py", argv)
    assert (status, message) == (2, "evaluate.py: error: --bootstrap -1: must be at least 0\n")


def test_compare_with_bootstrap_0_gives_no_interval(dataset, tmp_path, capsys):
    """--bootstrap 0 means no interval: the difference is printed and recorded without one,
    never with an interval from a single resample (which need not even hold the estimate)."""
    a = make_project_checkpoint(tmp_path / "a.pt")
    b = make_project_checkpoint(tmp_path / "b.pt", seed=1)
    argv = ["--checkpoint", a, "--compare", b, "--dataset-path", dataset, "--tta", "none"]
    record = run([*argv, "--output", tmp_path, "--bootstrap", "0"])
    compared = record["compare"]
    assert compared["accuracy_difference_ci95"] is None
    assert compared["macro_f1_difference_ci95"] is None
    assert compared["bootstrap"]["resamples"] == 0
    assert compared["bootstrap"]["method"] == "none: --bootstrap 0"
    assert "accuracy_ci95" not in record  # nor for A alone
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("A - B"))
    assert line.startswith(
        f"A - B = {compared['accuracy_difference']:+.2f} points, no interval: --bootstrap 0; "
        "McNemar exact p = "
    )
    assert "CI" not in line and "resample" not in line


def test_outputs_are_checked_before_the_evaluation(dataset, tmp_path, repo_root, capsys):
    """--output and --predictions that cannot be written: one line, exit status 2, before the
    checkpoint is even read (the evaluation used to run, then end in a traceback)."""
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file, not a folder")
    common = ["--checkpoint", checkpoint, "--dataset-path", dataset, "--tta", "none"]
    cases = [
        (["--output", a_file / "out"], f"--output {a_file / 'out'}: {a_file} is a file, not a "
         "folder"),
        (["--output", a_file], f"--output {a_file}: {a_file} is a file, not a folder"),
        (["--predictions", a_file / "p.csv"], f"--predictions {a_file / 'p.csv'}: {a_file} is "
         "a file, not a folder"),
        (["--predictions", tmp_path], f"--predictions {tmp_path}: is a folder; give the path of "
         "a CSV file"),
    ]  # fmt: skip
    for extra, message in cases:
        status, err = command_error(capsys, repo_root / "evaluate.py", [*common, *extra])
        assert status == 2 and err.count("\n") == 1, (extra, err)
        assert err.startswith(f"evaluate.py: error: {message}"), (extra, err)
    assert capsys.readouterr().out == ""  # nothing was evaluated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "notes.txt"]


# ------------------------------------------------------------------ cross-dataset evaluation

TO_DATASET = {"happiness": "Happy", "anger": "Angry", "disgust": "Disgust", "fear": "Fear",
              "neutral": "Neutral", "sadness": "Sad", "surprise": "Surprise"}  # fmt: skip


def test_matching_masking_and_the_unmasked_figures_by_hand():
    from sklearn.metrics import f1_score

    match = match_classes(EIGHT_MODEL, CLASSES, "m.pt")
    assert match.shared == CLASSES and match.extra == ["contempt"] and not match.missing
    output_of = {TO_DATASET[k]: i for i, k in enumerate(EIGHT_MODEL) if k in TO_DATASET}
    assert match.model_index == [output_of[c] for c in CLASSES]
    assert not match.identical and match_classes(CLASSES, CLASSES, "m.pt").identical
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 8, generator=generator)
    logits[::3, EIGHT_MODEL.index("contempt")] += 3  # contempt wins on many images
    targets = torch.randint(0, 7, (200,), generator=generator)
    view = restrict(Scores(None, EIGHT_MODEL, {}, {}, None, logits, targets), match)
    assert view.keep.all() and torch.equal(view.targets, targets)
    masked = [CLASSES[i] for i in view.logits.argmax(1)]  # among the shared outputs only
    assert masked == [max(CLASSES, key=lambda c: float(row[output_of[c]])) for row in logits]
    winners = [EIGHT_MODEL[i] for i in logits.argmax(1)]
    assert 50 < winners.count("contempt") < 150
    predicted = [TO_DATASET.get(w, "contempt") for w in winners]  # contempt: always wrong
    truth = [CLASSES[t] for t in targets]
    unmasked = unmasked_metrics(view, match, 300, 0)
    right = [p == t for p, t in zip(predicted, truth, strict=True)]
    assert unmasked["accuracy"] == pytest.approx(100 * np.mean(right))
    assert unmasked["macro_f1"] == pytest.approx(  # averaged over the 7 shared classes
        100 * f1_score(truth, predicted, labels=CLASSES, average="macro", zero_division=0)
    )
    assert unmasked["predicted_as"] == {"contempt": winners.count("contempt")}
    low, high = unmasked["macro_f1_ci95"]
    assert low <= unmasked["macro_f1"] <= high


def eight_class_copy(root, out):
    """The synthetic test split with an eighth class, Contempt (copies of Neutral's faces)."""
    shutil.copytree(root / "test", out / "test", ignore=shutil.ignore_patterns(".cache"))
    shutil.copytree(root / "test" / "Neutral", out / "test" / "Contempt")
    return out


def test_a_model_of_other_classes_is_scored_on_the_shared_ones(dataset, tmp_path, capsys):
    seven = make_project_checkpoint(tmp_path / "seven.pt")
    common = ["--tta", "none", "--bootstrap", "200"]
    alone = run(["--checkpoint", seven, "--dataset-path", dataset, *common, "--output", tmp_path])
    assert "cross_dataset" not in alone  # the same classes: nothing changes
    eight_data = eight_class_copy(dataset, tmp_path / "eight_data")
    out = tmp_path / "excluded"
    record = run(["--checkpoint", seven, "--dataset-path", eight_data, *common, "--output", out,
                  "--predictions", tmp_path / "excluded.csv"])  # fmt: skip
    cross = record["cross_dataset"]
    assert cross["excluded_classes"] == {"Contempt": 4} and cross["scored_images"] == 28
    assert cross["masked_classes"] == [] and "unmasked" not in cross
    for key in ("accuracy", "macro_f1", "confusion_matrix", "accuracy_ci95", "num_images"):
        assert record[key] == alone[key], key  # exactly the 28 images of the shared classes
    assert json.loads((out / "eval.json").read_text())["cross_dataset"] == cross
    rows = read_predictions(tmp_path / "excluded.csv")
    assert len(rows) == 32 and sum(r["scored"] == "0" for r in rows) == 4
    assert {r["true"] for r in rows if r["scored"] == "0"} == {"Contempt"}
    assert "excluded: 4 test images of classes the model lacks (4 of Contempt)" in (
        capsys.readouterr().out
    )

    eight = make_project_checkpoint(tmp_path / "eight.pt", classes=EIGHT_MODEL, seed=3)
    record = run(["--checkpoint", eight, "--dataset-path", dataset, *common, "--output", tmp_path,
                  "--predictions", tmp_path / "masked.csv"])  # fmt: skip
    cross = record["cross_dataset"]
    assert cross["masked_classes"] == ["contempt"] and cross["excluded_images"] == 0
    assert record["classes"] == CLASSES and cross["shared_classes"] == CLASSES
    rows = read_predictions(tmp_path / "masked.csv")
    for row in rows:
        probs = {c: float(row[c]) for c in EIGHT_MODEL}
        assert row["predicted"] == TO_DATASET[max(TO_DATASET, key=probs.__getitem__)]
        assert row["predicted_unmasked"] == max(EIGHT_MODEL, key=probs.__getitem__)
    masked_right = [r["predicted"] == r["true"] for r in rows]
    unmasked_right = [TO_DATASET.get(r["predicted_unmasked"]) == r["true"] for r in rows]
    assert record["accuracy"] == pytest.approx(100 * np.mean(masked_right))
    assert cross["unmasked"]["accuracy"] == pytest.approx(100 * np.mean(unmasked_right))
    printed = capsys.readouterr().out
    assert "classes: the model's 8 and the dataset's 7, matched by name: 7 shared" in printed
    assert "masked: contempt (the model's, not the dataset's) out of the argmax" in printed
    assert f"unmasked: accuracy {cross['unmasked']['accuracy']:.2f} %" in printed


def test_a_one_class_dataset_is_refused(synthetic_root, tmp_path, capsys, repo_root):
    """train.py refused a dataset of one class folder (every prediction right: a meaningless
    100 %); evaluate.py scored it. The check is datasets.check_dataset's now, so every command
    that reads a dataset gives the same line."""
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        shutil.copytree(synthetic_root / split / "Happy", data / split / "Happy")
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    argv = ["--checkpoint", checkpoint, "--dataset-path", data, "--output", tmp_path / "out"]
    status, message = command_error(capsys, repo_root / "evaluate.py", argv + ["--tta", "none"])
    assert status == 1 and message == (
        f"evaluate.py: error: {data} has 1 class folder (Happy) per split; a classifier needs at "
        "least 2\n"
    )
    assert not (tmp_path / "out").exists()
