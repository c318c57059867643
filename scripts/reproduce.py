"""The paper's table as a reproducible suite: one train.py command per row, and a results table.

    python scripts/reproduce.py --dry-run                       # every row's command
    python scripts/reproduce.py --dataset-path FER2013 --rows emonext_tiny,convnext_tiny
    python scripts/reproduce.py --rows simple_cnn -- --batch-size 128   # extra train.py flags
    python scripts/reproduce.py --table-only                    # rebuild OUT/results.md

Rows run one after another. A row whose `OUT/ROW/results.json` exists is done and skipped; a row
with `OUT/ROW/last.pt` but no results.json was interrupted and is resumed from it. After each row
the table `OUT/results.md` is rewritten: row, paper accuracy, ours, difference, epochs, GPU hours,
device, date, commit, and "not run" for rows without results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from anywhere, like the other scripts of the repo

# The paper's table. `paper` is the published FER2013 PrivateTest accuracy (percent) or None;
# `source` says where a number comes from, or why there is none; `paper_note`, if any, is shown
# beside the number in the results table. EmoNeXt and ConvNeXt rows start from ImageNet-22k
# weights, as the paper did (docs/RECIPE.md).
EMONEXT_ACCURACY = {"tiny": 73.34, "small": 74.33, "base": 74.91, "large": 75.57, "xlarge": 76.12}


def _row(
    row: str,
    model: str,
    *flags: str,
    paper: float | None = None,
    source: str = "not published",
    paper_note: str = "",
) -> dict:
    return {
        "row": row,
        "model": model,
        "flags": list(flags),
        "paper": paper,
        "source": source,
        "paper_note": paper_note,
    }


ROWS: list[dict] = [
    *[
        _row(f"emonext_{s}", f"emonext_{s}", "--in_22k", paper=acc, source="EmoNeXt paper")
        for s, acc in EMONEXT_ACCURACY.items()
    ],
    *[
        _row(f"convnext_{s}", f"convnext_{s}", "--in_22k", source="not published (the paper's "
             "baseline; it gives its parameter counts only)")
        for s in EMONEXT_ACCURACY
    ],
    # Ablations of EmoNeXt-Tiny. Without all three it is ConvNeXt-Tiny plus an attention module
    # whose output is unused (only its initialisation draws from the random generator).
    _row("emonext_tiny_no_stn", "emonext_tiny", "--in_22k", "--no-stn"),
    _row("emonext_tiny_no_se", "emonext_tiny", "--in_22k", "--no-se"),
    _row("emonext_tiny_no_sa", "emonext_tiny", "--in_22k", "--sa-weight", "0"),
    _row("emonext_tiny_no_stn_se_sa", "emonext_tiny", "--in_22k", "--no-stn", "--no-se",
         "--sa-weight", "0"),
    # Baselines from the field, trained with this project's recipe (same data, loop, EMA, TTA).
    _row("resemotenet", "resemotenet", "--pretrained", "none", paper=79.79,
         paper_note="claimed by ResEmoteNet paper", source="claimed by the ResEmoteNet paper "
         "(Roy et al. 2024, arXiv 2409.10545) with its own recipe; widely unreproduced"),
    _row("simple_cnn", "simple_cnn", "--pretrained", "none",
         source="none: this project's from-scratch floor"),
    _row("timm_vit_base_patch16_224", "timm:vit_base_patch16_224", "--pretrained", "timm"),
    _row("timm_convnext_tiny", "timm:convnext_tiny", "--pretrained", "timm"),
    _row("timm_convnextv2_tiny", "timm:convnextv2_tiny", "--pretrained", "timm"),
]  # fmt: skip
ROW_IDS = [r["row"] for r in ROWS]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "EmoNeXt reproduction suite", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--dataset-path",
        default="FER2013",
        help="FER2013 folder passed to train.py (docs/DATA.md)",
    )
    parser.add_argument(
        "--output-dir",
        default="output/reproduce",
        help="runs go to OUTPUT_DIR/ROW/, the table to OUTPUT_DIR/results.md",
    )
    parser.add_argument(
        "--rows", default="", help=f"comma-separated row ids (default: all): {', '.join(ROW_IDS)}"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passed to train.py; default: train.py's own default",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rows' commands (with --resume where a run was interrupted) and run nothing",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="only rebuild OUTPUT_DIR/results.md from the results.json found",
    )
    parser.add_argument(
        "extra", nargs="*", help="arguments after `--` are passed to every train.py command"
    )
    return parser


def select_rows(spec: str) -> list[dict]:
    """The rows named in a comma-separated `spec`, in the table's order; all rows if empty."""
    if not spec:
        return list(ROWS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in ROW_IDS]
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)}; known: {', '.join(ROW_IDS)}")
    return [r for r in ROWS if r["row"] in names]


def row_status(row: dict, output_dir: str | Path) -> str:
    """'done' (results.json exists), 'resume' (last.pt without results.json) or 'new'."""
    run_dir = Path(output_dir) / row["row"]
    if (run_dir / "results.json").is_file():
        return "done"
    if (run_dir / "last.pt").is_file():
        return "resume"
    return "new"


def build_command(row: dict, args: argparse.Namespace) -> list[str]:
    """The train.py command line of a row; resumes from OUT/ROW/last.pt if it was interrupted."""
    cmd = ["python", "train.py", "--dataset-path", str(args.dataset_path)]
    cmd += ["--output-dir", str(args.output_dir), "--run-name", row["row"]]
    cmd += ["--model", row["model"], "--amp", *row["flags"]]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if row_status(row, args.output_dir) == "resume":
        cmd += ["--resume", str(Path(args.output_dir) / row["row"] / "last.pt")]
    return cmd + list(args.extra)


def read_results(row: dict, output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / row["row"] / "results.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _number(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "?"


def make_table(rows: list[dict], output_dir: str | Path) -> str:
    """A markdown table of `rows` with their results under `output_dir`; "not run" where none."""
    columns = ["row", "paper accuracy", "ours", "difference", "epochs", "GPU hours", "device"]
    columns += ["date", "commit"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        paper = f"{row['paper']:.2f} %" if row["paper"] is not None else "not published"
        if row.get("paper_note"):
            paper += f" ({row['paper_note']})"
        res = read_results(row, output_dir)
        if res is None:
            lines.append(f"| {row['row']} | {paper} | not run | | | | | | |")
            continue
        ours = res.get("test_accuracy")
        diff = ""
        if row["paper"] is not None and isinstance(ours, (int, float)):
            diff = f"{ours - row['paper']:+.2f}"
        seconds, gpus = res.get("train_seconds"), res.get("num_gpus")
        hours = "?"
        if isinstance(seconds, (int, float)) and isinstance(gpus, int):
            hours = f"{seconds / 3600 * gpus:.2f}"
        cells = [
            row["row"],
            paper,
            _number(ours, ".2f") + (" %" if isinstance(ours, (int, float)) else ""),
            diff,
            str(res.get("epochs_run", "?")),
            hours,
            str(res.get("device", "?")),
            str(res.get("date", "?"))[:10],
            str(res.get("git_commit", "?"))[:7],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(output_dir: str | Path) -> Path:
    """OUT/results.md: every row of the paper's table, run or not."""
    path = Path(output_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(make_table(ROWS, output_dir))
    return path


def main(args: argparse.Namespace) -> int:
    rows = select_rows(args.rows)
    if args.dry_run:
        for row in rows:
            paper = f"{row['paper']:.2f} %" if row["paper"] is not None else "no number"
            print(f"# {row['row']}: {row_status(row, args.output_dir)}; paper {paper}, "
                  f"{row['source']}")  # fmt: skip
            print(shlex.join(build_command(row, args)))
        return 0
    if not args.table_only:
        # train.py runs in the repository root: make relative paths mean the same to both.
        args.dataset_path = str(Path(args.dataset_path).resolve())
        args.output_dir = str(Path(args.output_dir).resolve())
        for row in rows:
            status = row_status(row, args.output_dir)
            if status == "done":
                print(f"{row['row']}: results.json exists, skipped")
                continue
            cmd = build_command(row, args)
            print(f"{row['row']} ({status}): {shlex.join(cmd)}", flush=True)
            cmd[0] = sys.executable  # the interpreter running this script
            result = subprocess.run(cmd, cwd=REPO_ROOT)
            if result.returncode != 0:
                print(f"{row['row']} failed (exit code {result.returncode}); rerun to resume")
                write_table(args.output_dir)
                return result.returncode
            write_table(args.output_dir)
    path = write_table(args.output_dir)
    print(path.read_text(), end="")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
