"""scripts/reproduce.py: the commands of the paper's table, resuming, and the results table."""

import json
import subprocess
import sys

import pytest

import models
from scripts import reproduce


def args_for(tmp_path, *argv: str):
    return reproduce.get_args_parser().parse_args(
        ["--dataset-path", "data/FER2013", "--output-dir", str(tmp_path), *argv]
    )


def test_dry_run_prints_every_rows_command(repo_root):
    result = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--dry-run"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [line for line in result.stdout.splitlines() if line.startswith("python train.py")]
    assert len(commands) == len(reproduce.ROWS) == 19
    for row, command in zip(reproduce.ROWS, commands, strict=True):
        assert f"--run-name {row['row']} --model {row['model']} --amp" in command
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
    cmd = reproduce.build_command(row, args)
    assert cmd == [
        "python", "train.py", "--dataset-path", "data/FER2013", "--output-dir", str(tmp_path),
        "--run-name", "emonext_tiny_no_se", "--model", "emonext_tiny", "--amp", "--in_22k",
        "--no-se", "--epochs", "3", "--batch-size", "32",
    ]  # fmt: skip
    assert reproduce.row_status(row, tmp_path) == "new"
    run_dir = tmp_path / "emonext_tiny_no_se"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"")  # interrupted: resume from it
    assert reproduce.row_status(row, tmp_path) == "resume"
    cmd = reproduce.build_command(row, args)
    assert cmd[-4:] == ["--resume", str(run_dir / "last.pt"), "--batch-size", "32"]
    (run_dir / "results.json").write_text("{}")  # finished: skipped
    assert reproduce.row_status(row, tmp_path) == "done"
    assert "--resume" not in reproduce.build_command(row, args)


def test_without_epochs_train_py_keeps_its_default(tmp_path):
    cmd = reproduce.build_command(reproduce.ROWS[0], args_for(tmp_path))
    assert "--epochs" not in cmd


def test_unknown_rows_are_refused():
    with pytest.raises(SystemExit, match="unknown rows: emonext_huge"):
        reproduce.select_rows("emonext_tiny,emonext_huge")
    assert [r["row"] for r in reproduce.select_rows("resemotenet,emonext_tiny")] == [
        "emonext_tiny",
        "resemotenet",
    ]


def fake_results(output_dir, row: str, **values) -> None:
    results = {
        "test_accuracy": 72.5,
        "test_accuracy_best": 72.9,
        "macro_f1": 0.70,
        "epochs_run": 120,
        "best_val_accuracy": 71.0,
        "train_seconds": 7200.0,
        "device": "NVIDIA H100 80GB HBM3",
        "num_gpus": 2,
        "git_commit": "0123456789abcdef",
        "date": "2025-01-31T12:00:00",
        **values,
    }
    (output_dir / row).mkdir(parents=True)
    (output_dir / row / "results.json").write_text(json.dumps(results))


def test_table_from_results(tmp_path):
    fake_results(tmp_path, "emonext_tiny")
    fake_results(tmp_path, "resemotenet", test_accuracy=70.0, num_gpus=1, train_seconds=1800)
    fake_results(tmp_path, "simple_cnn", test_accuracy=65.25, device="cpu", num_gpus=0)
    table = reproduce.make_table(reproduce.ROWS, tmp_path)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert len(lines) == len(reproduce.ROWS)
    assert lines["emonext_tiny"] == (
        "| emonext_tiny | 73.34 % | 72.50 % | -0.84 | 120 | 4.00 | NVIDIA H100 80GB HBM3 "
        "| 2025-01-31 | 0123456 |"
    )
    assert (
        "| 79.79 % (claimed by ResEmoteNet paper) | 70.00 % | -9.79 | 120 | 0.50 |"
        in (lines["resemotenet"])
    )
    assert "| simple_cnn | not published | 65.25 % |  | 120 | 0.00 | cpu |" in lines["simple_cnn"]
    assert lines["emonext_small"] == "| emonext_small | 74.33 % | not run | | | | | | |"
    assert sum("not run" in line for line in lines.values()) == len(reproduce.ROWS) - 3
    assert table.splitlines()[0].startswith("| row | paper accuracy | ours | difference |")


def test_table_only_writes_results_md(tmp_path, capsys):
    fake_results(tmp_path, "convnext_tiny")
    assert reproduce.main(args_for(tmp_path, "--table-only")) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| convnext_tiny | not published | 72.50 % |" in text
    assert "not run" in capsys.readouterr().out


@pytest.mark.parametrize("doc", ["README.md", "docs/BASELINES.md"])
def test_docs_table_lists_every_row(repo_root, doc):
    text = (repo_root / doc).read_text()
    for row in reproduce.ROWS:
        assert f"\n| {row['row']} | " in text, row["row"]
