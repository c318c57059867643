"""scripts/reproduce.py: the commands of the paper's table, resuming, and the results table."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from inference_utils import CLASSES, EIGHT_MODEL, make_project_checkpoint

import evaluate
import models
import train
from scripts import reproduce
from utils import CLIError


def args_for(tmp_path, *argv: str):
    return reproduce.get_args_parser().parse_args(
        ["--dataset-path", "data/FER2013", "--output-dir", str(tmp_path), *argv]
    )


def test_dry_run_prints_every_rows_command(repo_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--dry-run", "--seeds", "2"]
        + ["--output-dir", str(tmp_path)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [line for line in result.stdout.splitlines() if line.startswith("python train.py")]
    assert len(commands) == 2 * len(reproduce.ROWS) == 38
    for k, row in enumerate(reproduce.ROWS):
        for seed, command in zip((2001, 2002), commands[2 * k : 2 * k + 2], strict=True):
            assert (
                f"--output-dir {tmp_path / row['row']} --run-name seed_{seed} --seed {seed} "
                f"--model {row['model']} --amp" in command
            )
    assert "--model emonext_tiny --amp --in_22k --no-stn --no-se --sa-weight 0" in result.stdout
    assert "--model timm:convnextv2_tiny --amp --pretrained timm" in result.stdout


def test_rows_are_the_papers_table():
    rows = {r["row"]: r for r in reproduce.ROWS}
    assert [
        rows[f"emonext_{s}"]["paper"] for s in ("tiny", "small", "base", "large", "xlarge")
    ] == [
        73.34,
        74.33,
        74.91,
        75.57,
        76.12,
    ]
    assert rows["resemotenet"]["paper"] == 79.79
    assert "claimed by ResEmoteNet paper" in rows["resemotenet"]["paper_note"]
    assert all(rows[f"convnext_{s}"]["paper"] is None for s in ("tiny", "xlarge"))
    # every row's model exists
    for row in reproduce.ROWS:
        if not row["model"].startswith("timm:"):
            assert row["model"] in models.list_models()


def test_command_flags_extra_args_and_resume(tmp_path):
    row = next(r for r in reproduce.ROWS if r["row"] == "emonext_tiny_no_se")
    args = args_for(tmp_path, "--epochs", "3", "--", "--batch-size", "32")
    cmd = reproduce.build_command(row, 2002, args)
    assert cmd == [
        "python", "train.py", "--dataset-path", "data/FER2013", "--output-dir",
        str(tmp_path / "emonext_tiny_no_se"), "--run-name", "seed_2002", "--seed", "2002",
        "--model", "emonext_tiny", "--amp", "--in_22k", "--no-se", "--epochs", "3",
        "--batch-size", "32",
    ]  # fmt: skip
    assert reproduce.run_status(row, 2002, tmp_path) == "new"
    run_dir = tmp_path / "emonext_tiny_no_se" / "seed_2002"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")  # interrupted: resume from it
    assert reproduce.run_status(row, 2002, tmp_path) == "resume"
    assert reproduce.run_status(row, 2001, tmp_path) == "new"  # each seed on its own
    cmd = reproduce.build_command(row, 2002, args)
    assert cmd[-4:] == ["--resume", str(run_dir / "last.pt"), "--batch-size", "32"]
    (run_dir / "results.json").write_text("{}")  # finished: skipped
    assert reproduce.run_status(row, 2002, tmp_path) == "done"
    assert "--resume" not in reproduce.build_command(row, 2002, args)


def test_without_epochs_train_py_keeps_its_default(tmp_path):
    cmd = reproduce.build_command(reproduce.ROWS[0], 2001, args_for(tmp_path))
    assert "--epochs" not in cmd


def test_unknown_rows_are_refused():
    with pytest.raises(CLIError, match="unknown rows: emonext_huge"):
        reproduce.select_rows("emonext_tiny,emonext_huge")
    assert [r["row"] for r in reproduce.select_rows("resemotenet,emonext_tiny")] == [
        "emonext_tiny",
        "resemotenet",
    ]


def test_bad_arguments_are_one_line(repo_root):
    for argv, status, line in [
        (["--seeds", "0"], 2, "reproduce.py: error: --seeds 0: must be at least 1"),
        (["--rows", "emonext_huge", "--dry-run"], 1, "reproduce.py: error: unknown rows: "),
    ]:
        result = subprocess.run(
            [sys.executable, "scripts/reproduce.py", *argv],
            cwd=repo_root,
            capture_output=True,
            text=True,
        )
        assert result.returncode == status and result.stderr.startswith(line), result.stderr
        assert result.stderr.count("\n") == 1 and result.stdout == ""


# ------------------------------------------------------------------ rows from config files


def test_config_rows_run_train_py_with_their_file(repo_root, tmp_path, capsys):
    rafdb, ferplus = (str(repo_root / "configs" / f"{n}.yaml") for n in ("rafdb", "ferplus"))
    argv = ["--config", rafdb, "--config", ferplus, "--output-dir", str(tmp_path)]
    assert reproduce.main(reproduce.parse_args([*argv, "--dry-run", "--seeds", "2"])) == 0
    out = capsys.readouterr().out
    commands = [shlex.split(c) for c in out.splitlines() if c.startswith("python train.py")]
    assert len(commands) == 4  # the config rows only, without --rows
    assert commands[0] == [
        "python", "train.py", "-c", rafdb, "--dataset-path", "RAF-DB", "--output-dir",
        str(tmp_path / "rafdb"), "--run-name", "seed_2001", "--seed", "2001",
    ]  # fmt: skip
    assert commands[3][2:6] == ["-c", ferplus, "--dataset-path", "FERPlus"]
    assert f"# rafdb: paper no number, train.py -c {rafdb}" in out
    args = train.parse_args(commands[0][2:])  # each command is one train.py reads
    wanted = (os.path.abspath("RAF-DB"), True, True, 2001)  # train.py makes paths absolute
    assert (args.dataset_path, args.in_22k, args.amp, args.seed) == wanted

    # --dataset-path overrides the file's, --rows adds the paper's rows, --epochs and the extra
    # flags come last, and an interrupted seed resumes
    args = reproduce.parse_args([*argv, "--rows", "emonext_tiny", "--dataset-path", "elsewhere",
                                 "--epochs", "3", "--", "--batch-size", "32"])  # fmt: skip
    rows = reproduce.select_rows(args.rows) + reproduce.config_rows(args.config)
    assert [r["row"] for r in rows] == ["emonext_tiny", "rafdb", "ferplus"]
    (tmp_path / "rafdb" / "seed_2001").mkdir(parents=True)
    (tmp_path / "rafdb" / "seed_2001" / "last.pt").write_bytes(b"")
    command = reproduce.build_command(rows[1], 2001, args)
    assert command[2:6] == ["-c", rafdb, "--dataset-path", "elsewhere"]
    assert command[-6:] == ["--epochs", "3", "--resume",
                            str(tmp_path / "rafdb" / "seed_2001" / "last.pt"), "--batch-size",
                            "32"]  # fmt: skip

    # the table has the config rows
    fake_results(tmp_path, "ferplus")
    assert reproduce.main(reproduce.parse_args([*argv, "--table-only"])) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| ferplus | not published | 72.50 % | 1 |" in table and "| rafdb | " in table
    assert "| emonext_tiny | 73.34 % | not run |" in table  # and the paper's rows


def test_a_bad_config_row_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a run started"))
    good = tmp_path / "good.yaml"
    good.write_text("lr: 0.002\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\n")
    out = tmp_path / "out"
    args = reproduce.parse_args(["--config", str(good), "--config", str(bad), "--output-dir",
                                 str(out)])  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        reproduce.main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{bad}: lr: 'fast': must be a number (positive)" in err and not out.exists()
    (tmp_path / "emonext_tiny.yaml").write_text("lr: 0.002\n")
    with pytest.raises(CLIError, match="another row is named emonext_tiny; rename the file"):
        reproduce.config_rows([str(tmp_path / "emonext_tiny.yaml")])


def fake_results(output_dir, row: str, seed: int = 2001, **values) -> None:
    results = {
        "test_accuracy": 72.5,
        "test_accuracy_ci95": [71.0, 74.0],
        "test_accuracy_best": 72.9,
        "macro_f1": 70.0,
        "macro_f1_ci95": [68.5, 71.5],
        "epochs_run": 120,
        "best_val_accuracy": 71.0,
        "train_seconds": 7200.0,
        "device": "NVIDIA H100 80GB HBM3",
        "num_gpus": 2,
        "git_commit": "0123456789abcdef",
        "date": "2025-01-31T12:00:00",
        **values,
    }
    (output_dir / row / f"seed_{seed}").mkdir(parents=True)
    (output_dir / row / f"seed_{seed}" / "results.json").write_text(json.dumps(results))


def test_table_from_results(tmp_path):
    fake_results(tmp_path, "emonext_tiny")
    fake_results(tmp_path, "resemotenet", test_accuracy=70.0, num_gpus=1, train_seconds=1800)
    fake_results(tmp_path, "simple_cnn", test_accuracy=65.25, device="cpu", num_gpus=0)
    table = reproduce.make_table(reproduce.ROWS, tmp_path)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert len(lines) == len(reproduce.ROWS)
    assert lines["emonext_tiny"] == (
        "| emonext_tiny | 73.34 % | 72.50 % | 1 |  | [71.00, 74.00] | 70.00 | [68.50, 71.50] "
        "| -0.84 | 120 | 4.00 | NVIDIA H100 80GB HBM3 | 2025-01-31 | 0123456 |"
    )
    assert "| 79.79 % (claimed by ResEmoteNet paper) | 70.00 % | 1 |  |" in lines["resemotenet"]
    assert "| -9.79 | 120 | 0.50 |" in lines["resemotenet"]
    assert "| simple_cnn | not published | 65.25 % | 1 |" in lines["simple_cnn"]
    assert "| 120 | 0.00 | cpu |" in lines["simple_cnn"]
    assert lines["emonext_small"] == "| emonext_small | 74.33 % | not run |" + " |" * 11
    assert sum("not run" in line for line in lines.values()) == len(reproduce.ROWS) - 3
    assert table.splitlines()[0] == "| " + " | ".join(reproduce.TABLE_COLUMNS) + " |"


def test_table_over_seeds_is_mean_and_standard_deviation(tmp_path):
    for seed, accuracy, low in ((2001, 72.0, 70.5), (2002, 73.0, 71.5), (2003, 74.5, 73.0)):
        fake_results(tmp_path, "emonext_tiny", seed, test_accuracy=accuracy,
                     test_accuracy_ci95=[low, low + 3], date=f"2025-02-0{seed - 2000}")  # fmt: skip
    line = reproduce.make_table(reproduce.ROWS[:1], tmp_path).splitlines()[2]
    mean, std = np.mean([72.0, 73.0, 74.5]), np.std([72.0, 73.0, 74.5], ddof=1)
    # the mean's 95 % interval over seeds, by hand: mean +- t(0.975, n - 1) * sd / sqrt(n)
    half = 4.302652729911275 * std / np.sqrt(3)  # t(0.975, 2), from a table
    assert line.startswith(
        f"| emonext_tiny | 73.34 % | {mean:.2f} ± {std:.2f} % | 3 | [{mean - half:.2f}, "
        f"{mean + half:.2f}] | [71.67, 74.67] | 70.00 ± 0.00 | [68.50, 71.50] | "
        f"{mean - 73.34:+.2f} | 120 | 12.00 |"
    )
    assert "| 2025-02-03 | 0123456 |" in line


def test_table_only_writes_results_md(tmp_path, capsys):
    fake_results(tmp_path, "convnext_tiny")
    assert reproduce.main(args_for(tmp_path, "--table-only")) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| convnext_tiny | not published | 72.50 % | 1 |" in text
    assert "not run" in capsys.readouterr().out


@pytest.mark.parametrize("doc", ["README.md", "docs/BASELINES.md"])
def test_docs_table_lists_every_row(repo_root, doc):
    text = (repo_root / doc).read_text()
    assert reproduce.make_table(reproduce.ROWS, repo_root / "no-results") in text  # CI columns
    for row in reproduce.ROWS:
        assert f"\n| {row['row']} | " in text, row["row"]


# ------------------------------------------------------------------ train-on-X, test-on-Y


def finished_run(folder, dataset, classes, seed: int) -> None:
    """A run as train.py leaves it: last.pt (recording its --dataset-path) and results.json."""
    folder.mkdir(parents=True)
    checkpoint = make_project_checkpoint(folder / "last.pt", classes=classes, seed=seed)
    data = torch.load(checkpoint, weights_only=True)
    data["args"] = {"dataset_path": str(dataset)}
    torch.save(data, checkpoint)
    (folder / "results.json").write_text("{}")


def test_cross_dataset_matrix(synthetic_root, tmp_path, monkeypatch, capsys):
    eight = tmp_path / "eight"  # the synthetic test split with Contempt (Neutral's faces)
    shutil.copytree(synthetic_root / "test", eight / "test", ignore=shutil.ignore_patterns(".*"))
    shutil.copytree(synthetic_root / "test" / "Neutral", eight / "test" / "Contempt")
    out = tmp_path / "runs"
    finished_run(out / "seven" / "seed_2001", synthetic_root, CLASSES, 0)
    finished_run(out / "eightfold" / "seed_2001", eight, EIGHT_MODEL, 1)
    args = reproduce.parse_args(
        ["--output-dir", str(out), "--cross-dataset", f"{synthetic_root},{eight}"]
    )
    assert reproduce.main(args) == 0
    text = (out / "cross_dataset.md").read_text()
    assert text in capsys.readouterr().out
    sections = text.split("\n\n")
    accuracy, f1 = (x for x in sections if x.startswith("| run |"))
    assert sections[0].startswith("Accuracy (%, 95 % bootstrap interval)")
    header = "| run | trained on | synthetic-fer | eight |"
    assert header in accuracy and header in f1
    for run, own in (("seven/seed_2001", "synthetic-fer"), ("eightfold/seed_2001", "eight")):
        line = next(x for x in accuracy.splitlines() if x.startswith(f"| {run} |"))
        cells = line.strip("| ").split(" | ")
        assert cells[1] == own
        for cell, label in zip(cells[2:], ("synthetic-fer", "eight"), strict=True):
            saved = out / "cross_dataset" / run.replace("/", "__") / label / "eval.json"
            record = json.loads(saved.read_text())
            low, high = record["accuracy_ci95"]
            value = f"{record['accuracy']:.2f}"
            value = f"**{value}**" if label == own else value  # the run's own dataset
            assert cell.startswith(f"{value} [{low:.2f}, {high:.2f}]"), (run, label)
    assert sections[-1].splitlines() == [
        "(1) eightfold/seed_2001 on synthetic-fer: 7 of the dataset's 7 classes scored; contempt "
        f"masked (unmasked accuracy {unmasked_accuracy(out):.2f} %)",
        "(2) seven/seed_2001 on eight: 7 of the dataset's 8 classes scored; 4 images of Contempt "
        "excluded",
    ]
    assert accuracy.count("(1)") == accuracy.count("(2)") == 1  # beside their cells

    # Evaluations are kept: a second call evaluates nothing and writes the same tables.
    monkeypatch.setattr(evaluate, "main", lambda argv: 1 / 0)
    assert reproduce.main(args) == 0 and (out / "cross_dataset.md").read_text() == text

    args.cross_dataset = f"{synthetic_root},{tmp_path / 'nowhere'}"
    with pytest.raises(CLIError, match="nowhere has no test/ folder"):
        reproduce.main(args)


def unmasked_accuracy(out) -> float:
    saved = out / "cross_dataset" / "eightfold__seed_2001" / "synthetic-fer" / "eval.json"
    return json.loads(saved.read_text())["cross_dataset"]["unmasked"]["accuracy"]


# ------------------------------------------------------------------ two rows: seeds and runs


def test_compare_two_rows_over_seeds_and_run_by_run(synthetic_root, tmp_path, monkeypatch, capsys):
    """--compare A,B: Welch's t over the seeds' accuracies beside each shared seed's paired
    comparison (evaluate.py --compare: McNemar's exact test) of the two runs' last.pt."""
    out = tmp_path / "runs"
    accuracies = {"emonext_tiny": [73.1, 72.4], "emonext_tiny_no_stn": [71.9, 72.8, 71.2]}
    for k, (row, values) in enumerate(accuracies.items()):
        for seed, accuracy in zip((2001, 2002, 2003), values, strict=False):
            folder = out / row / f"seed_{seed}"
            finished_run(folder, synthetic_root, CLASSES, seed=10 * k + seed - 2001)
            (folder / "results.json").write_text(json.dumps({"test_accuracy": accuracy}))
    (out / "emonext_tiny_no_stn" / "seed_2002" / "last.pt").unlink()  # no run-level test
    argv = ["--output-dir", str(out), "--dataset-path", str(synthetic_root)]
    args = reproduce.parse_args([*argv, "--compare", "emonext_tiny,emonext_tiny_no_stn"])
    assert reproduce.main(args) == 0
    text = (out / "compare_emonext_tiny_vs_emonext_tiny_no_stn.md").read_text()
    assert text in capsys.readouterr().out
    report = json.loads((out / "compare_emonext_tiny_vs_emonext_tiny_no_stn.json").read_text())
    welch = reproduce.welch_test(*accuracies.values())
    # key by key: pytest.approx takes no dict that holds a list (pytest 9.2 raises TypeError)
    assert report["welch"].keys() == welch.keys()
    for key, value in welch.items():
        assert report["welch"][key] == pytest.approx(value), key
    assert (
        f"Seed level (Welch's t over seeds): A - B = {welch['difference']:+.2f} points, 95 % CI "
        f"[{welch['ci95'][0]:+.2f}, {welch['ci95'][1]:+.2f}], t = {welch['t']:.2f} "
        f"({welch['df']:.1f} df), p = {welch['p_value']:.3g}" in text
    )
    interval = reproduce.mean_interval(accuracies["emonext_tiny_no_stn"])
    assert f"| 71.97 ± 0.80 | [{interval[0]:.2f}, {interval[1]:.2f}] |" in text
    assert list(report["per_run"]) == ["2001"]  # the only seed with both last.pt files
    saved = out / "compare" / "emonext_tiny_vs_emonext_tiny_no_stn" / "seed_2001" / "eval.json"
    paired = json.loads(saved.read_text())["compare"]
    assert report["per_run"]["2001"] == paired
    mcnemar = paired["mcnemar"]
    assert mcnemar["p_value"] == evaluate.mcnemar_exact(
        mcnemar["a_only_correct"], mcnemar["b_only_correct"]
    )
    low, high = paired["accuracy_difference_ci95"]
    assert (
        f"| 2001 | {paired['accuracy_a']:.2f} | {paired['accuracy_b']:.2f} | "
        f"{paired['accuracy_difference']:+.2f} | [{low:+.2f}, {high:+.2f}] | "
        f"{mcnemar['p_value']:.3g} | {mcnemar['a_only_correct']} | {mcnemar['b_only_correct']} |"
        in text
    )
    # kept: a second call evaluates nothing
    monkeypatch.setattr(evaluate, "main", lambda argv: 1 / 0)
    assert reproduce.main(args) == 0
    assert (out / "compare_emonext_tiny_vs_emonext_tiny_no_stn.md").read_text() == text
    for spec, message in (
        ("emonext_tiny", "give two different rows"),
        ("emonext_tiny,emonext_huge", "no row emonext_huge"),
        ("emonext_tiny,simple_cnn", "simple_cnn has no finished seed"),
    ):
        with pytest.raises(CLIError, match=message):
            reproduce.main(reproduce.parse_args([*argv, "--compare", spec]))
