"""The paper's table as a reproducible suite: one train.py command per row and seed, and a table.

    python scripts/reproduce.py --dry-run                       # every run's command
    python scripts/reproduce.py --dataset-path FER2013 --rows emonext_tiny,convnext_tiny
    python scripts/reproduce.py --rows emonext_tiny,emonext_tiny_no_stn --seeds 3
    python scripts/reproduce.py --rows simple_cnn -- --batch-size 128   # extra train.py flags
    python scripts/reproduce.py --table-only                    # rebuild OUT/results.md

Each row runs with `--seeds N` seeds, 2001 (the official seed) and the next N - 1, into
`OUT/ROW/seed_SEED/`. Runs go one after another. A run whose results.json exists is done and
skipped; one with last.pt but no results.json was interrupted and is resumed from it. After each
run the table `OUT/results.md` is rewritten: per row the paper's accuracy, ours (mean +- standard
deviation over the finished seeds), the test-set 95 % bootstrap interval, macro-F1, the
difference, epochs, GPU hours, device, date and commit; "not run" for rows without results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from anywhere, like the other scripts of the repo

from utils import ArgumentParser, CLIError, run_command  # noqa: E402

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


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0])
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
        "--seeds",
        type=int,
        default=1,
        help="training seeds per row (default 1): --first-seed, --first-seed + 1, ...",
    )
    parser.add_argument(
        "--first-seed", type=int, default=2001, help="the first seed (default: the official 2001)"
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None), checked: one line and exit status 2 if wrong."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    parser.check(args, {"seeds": ("at least 1", lambda v: v >= 1)})
    return args


def select_rows(spec: str) -> list[dict]:
    """The rows named in a comma-separated `spec`, in the table's order; all rows if empty."""
    if not spec:
        return list(ROWS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in ROW_IDS]
    if unknown:
        raise CLIError(f"unknown rows: {', '.join(unknown)}; known: {', '.join(ROW_IDS)}")
    return [r for r in ROWS if r["row"] in names]


def seeds_of(args: argparse.Namespace) -> list[int]:
    return [args.first_seed + k for k in range(args.seeds)]


def run_dir(row: dict, seed: int, output_dir: str | Path) -> Path:
    """Where one seed of a row runs: OUT/ROW/seed_SEED."""
    return Path(output_dir) / row["row"] / f"seed_{seed}"


def run_status(row: dict, seed: int, output_dir: str | Path) -> str:
    """'done' (results.json exists), 'resume' (last.pt without results.json) or 'new'."""
    folder = run_dir(row, seed, output_dir)
    if (folder / "results.json").is_file():
        return "done"
    if (folder / "last.pt").is_file():
        return "resume"
    return "new"


def build_command(row: dict, seed: int, args: argparse.Namespace) -> list[str]:
    """The train.py command of one seed of a row; resumes from its last.pt if interrupted."""
    folder = run_dir(row, seed, args.output_dir)
    cmd = ["python", "train.py", "--dataset-path", str(args.dataset_path)]
    cmd += ["--output-dir", str(folder.parent), "--run-name", folder.name, "--seed", str(seed)]
    cmd += ["--model", row["model"], "--amp", *row["flags"]]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if run_status(row, seed, args.output_dir) == "resume":
        cmd += ["--resume", str(folder / "last.pt")]
    return cmd + list(args.extra)


def read_results(row: dict, output_dir: str | Path) -> list[dict]:
    """results.json of every finished seed of a row, by seed."""
    runs = {}
    for path in (Path(output_dir) / row["row"]).glob("seed_*/results.json"):
        seed = path.parent.name.removeprefix("seed_")
        if seed.lstrip("-").isdigit():
            runs[int(seed)] = json.loads(path.read_text())
    return [runs[seed] for seed in sorted(runs)]


def _numbers(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if isinstance(r.get(key), (int, float))]


def _spread(values: list[float]) -> str:
    """'72.50' for one run, '72.50 +- 0.31' (mean +- sample standard deviation) for several."""
    if not values:
        return "?"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _mean_interval(runs: list[dict], key: str) -> str:
    """The runs' bootstrap intervals averaged over seeds: one run's test-set noise."""
    intervals = [r[key] for r in runs if isinstance(r.get(key), list) and len(r[key]) == 2]
    if not intervals:
        return ""
    low, high = np.mean(intervals, axis=0)
    return f"[{low:.2f}, {high:.2f}]"


TABLE_COLUMNS = [
    "row",
    "paper accuracy",
    "ours",
    "seeds",
    "95 % CI",
    "macro-F1",
    "macro-F1 95 % CI",
]
TABLE_COLUMNS += ["difference", "epochs", "GPU hours", "device", "date", "commit"]


def make_table(rows: list[dict], output_dir: str | Path) -> str:
    """A markdown table of `rows` with their results under `output_dir`; "not run" where none.

    "ours" and macro-F1 are means +- standard deviations over the finished seeds; the 95 % CIs
    are the test-set bootstrap intervals of the runs (train.py's results.json), averaged over
    seeds; GPU hours add up all seeds.
    """
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        paper = f"{row['paper']:.2f} %" if row["paper"] is not None else "not published"
        if row.get("paper_note"):
            paper += f" ({row['paper_note']})"
        runs = read_results(row, output_dir)
        if not runs:
            lines.append(f"| {row['row']} | {paper} | not run |" + " |" * (len(TABLE_COLUMNS) - 3))
            continue
        accuracies = _numbers(runs, "test_accuracy")
        diff = ""
        if row["paper"] is not None and accuracies:
            diff = f"{np.mean(accuracies) - row['paper']:+.2f}"
        hours = [
            r["train_seconds"] / 3600 * r["num_gpus"]
            for r in runs
            if isinstance(r.get("train_seconds"), (int, float))
            and isinstance(r.get("num_gpus"), int)
        ]
        epochs = _numbers(runs, "epochs_run")
        cells = [
            row["row"],
            paper,
            _spread(accuracies) + (" %" if accuracies else ""),
            str(len(runs)),
            _mean_interval(runs, "test_accuracy_ci95"),
            _spread(_numbers(runs, "macro_f1")),
            _mean_interval(runs, "macro_f1_ci95"),
            diff,
            f"{np.mean(epochs):.0f}" if epochs else "?",
            f"{sum(hours):.2f}" if len(hours) == len(runs) else "?",
            ", ".join(sorted({str(r.get("device", "?")) for r in runs})),
            max(str(r.get("date", "?"))[:10] for r in runs),
            ", ".join(sorted({str(r.get("git_commit", "?"))[:7] for r in runs})),
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
            print(f"# {row['row']}: paper {paper}, {row['source']}")
            for seed in seeds_of(args):
                print(f"# seed {seed}: {run_status(row, seed, args.output_dir)}")
                print(shlex.join(build_command(row, seed, args)))
        return 0
    if not args.table_only:
        # train.py runs in the repository root: make relative paths mean the same to both.
        args.dataset_path = str(Path(args.dataset_path).resolve())
        args.output_dir = str(Path(args.output_dir).resolve())
        for row in rows:
            for seed in seeds_of(args):
                name = f"{row['row']} seed {seed}"
                status = run_status(row, seed, args.output_dir)
                if status == "done":
                    print(f"{name}: results.json exists, skipped")
                    continue
                cmd = build_command(row, seed, args)
                print(f"{name} ({status}): {shlex.join(cmd)}", flush=True)
                cmd[0] = sys.executable  # the interpreter running this script
                result = subprocess.run(cmd, cwd=REPO_ROOT)
                write_table(args.output_dir)
                if result.returncode != 0:
                    print(f"{name} failed (exit code {result.returncode}); rerun to resume")
                    return result.returncode
    path = write_table(args.output_dir)
    print(path.read_text(), end="")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("reproduce.py", main, parse_args()))
