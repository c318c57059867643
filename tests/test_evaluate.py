"""evaluate.py on a tiny dataset, with this project's and the official trainer's checkpoints."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from inference_utils import (
    CLASSES,
    command_error,
    make_official_checkpoint,
    make_project_checkpoint,
)

import evaluate
from evaluate import mcnemar_exact
from utils import CLIError


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return synthetic_root  # 7 classes x 4 images in val and test


def three_class_copy(root, out):
    for name in ("Angry", "Happy", "Sad"):
        shutil.copytree(root / "test" / name, out / "test" / name)
    return out


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
    three = three_class_copy(dataset, tmp_path / "three")
    with pytest.raises(CLIError, match="predicts 7 classes"):
        run(["--checkpoint", checkpoint, "--dataset-path", three, "--output", tmp_path])
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
