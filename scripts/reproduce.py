"""The paper's table as a reproducible suite: one train.py command per row and seed, and a table.

    python scripts/reproduce.py --dry-run                       # every run's command
    python scripts/reproduce.py --dataset-path FER2013 --rows emonext_tiny,convnext_tiny
    python scripts/reproduce.py --rows emonext_tiny,emonext_tiny_no_stn --seeds 3
    python scripts/reproduce.py --rows simple_cnn -- --batch-size 128   # extra train.py flags
    python scripts/reproduce.py --table-only                    # rebuild OUT/results.md
    python scripts/reproduce.py --cross-dataset FER2013,FERPlus,RAF-DB   # train-on-X, test-on-Y
    python scripts/reproduce.py --compare emonext_tiny,emonext_tiny_no_stn   # seeds and McNemar
    python scripts/reproduce.py --config configs/rafdb.yaml --config configs/ferplus.yaml

Each row runs with `--seeds N` seeds, 2001 (the official seed) and the next N - 1, into
`OUT/ROW/seed_SEED/`. Runs go one after another. A run whose results.json exists is done and
skipped; one with last.pt but no results.json was interrupted and is resumed from it. After each
run the table `OUT/results.md` is rewritten: per row the paper's accuracy, ours (mean +- standard
deviation over the finished seeds), the 95 % interval of that mean over seeds (t distribution),
the test-set 95 % bootstrap interval, macro-F1, the difference, epochs, GPU hours, device, date
and commit; "not run" for rows without results.

--config FILE adds a row that runs `train.py -c FILE` (a recipe of configs/, or a run's
config.yaml), named after the file, with the file's own dataset (--dataset-path overrides it);
given without --rows, only the config rows run. Every file is checked by train.py's parser
before anything runs.

--compare A,B compares two rows: a seed-level test (Welch's t over the seeds' test accuracies,
with the 95 % interval of the difference of the means) beside, for every seed both rows have
finished, the per-run paired comparison of evaluate.py --compare (paired bootstrap, McNemar's
exact test) on --dataset-path's test split; written to OUT/compare_A_vs_B.md (trains nothing).

--cross-dataset evaluates every finished run found under OUT (any folder with results.json and
last.pt, this suite's or not) on the test split of each dataset named, with evaluate.py's
protocol (final EMA weights, TenCrop; classes matched by name, docs/EVALUATION.md), and writes
the train-on-X, test-on-Y tables with 95 % intervals to OUT/cross_dataset.md. Evaluations are
kept in OUT/cross_dataset/ and reused until the run's last.pt changes.
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

from utils import ArgumentParser, CLIError, add_device_argument, run_command  # noqa: E402

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
DEFAULT_DATASET = "FER2013"


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dataset-path",
        default=None,
        help="dataset folder passed to train.py (docs/DATA.md) (default: FER2013; a --config "
        "row's own dataset_path)",
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
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a row that trains with `train.py -c FILE`, named after the file (may be given more "
        "than once; without --rows, only these rows run)",
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
        "--cross-dataset",
        default="",
        metavar="DATASETS",
        help="comma-separated dataset folders: evaluate every finished run under --output-dir on "
        "each one's test split and write OUTPUT_DIR/cross_dataset.md (trains nothing)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="ROW_A,ROW_B",
        help="compare two rows' finished seeds: Welch's t over seeds and each seed's McNemar "
        "test on --dataset-path's test split; writes OUTPUT_DIR/compare_A_vs_B.md (trains "
        "nothing; may be given more than once)",
    )
    add_device_argument(parser)  # for train.py and the evaluations of --cross-dataset, --compare
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


def config_rows(paths: list[str]) -> list[dict]:
    """A row for each train.py config file (--config), named after the file, each checked by
    train.py's parser (one line naming the file and the key) before anything runs."""
    if not paths:
        return []
    import train  # torch: only config rows need train.py's parser

    rows = []
    for path in paths:
        parser = train.get_args_parser()
        args = parser.parse_args(parser.expand_config(["-c", path], train.ARG_RULES))
        name = Path(path).stem
        if name in ROW_IDS or name in [r["row"] for r in rows]:
            raise CLIError(f"--config {path}: another row is named {name}; rename the file")
        model = parser.model_name(args, default_size="tiny")
        row = _row(name, model, source=f"train.py -c {path}")
        rows.append({**row, "config": path, "dataset_path": args.dataset_path})
    return rows


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
    cmd = ["python", "train.py"] + (["-c", str(row["config"])] if "config" in row else [])
    dataset = args.dataset_path or row.get("dataset_path") or DEFAULT_DATASET
    cmd += ["--dataset-path", str(dataset)]
    cmd += ["--output-dir", str(folder.parent), "--run-name", folder.name, "--seed", str(seed)]
    if "config" not in row:  # a config row's model and precision are its file's
        cmd += ["--model", row["model"], "--amp", *row["flags"]]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if getattr(args, "device", None):
        cmd += ["--device", args.device]
    if run_status(row, seed, args.output_dir) == "resume":
        cmd += ["--resume", str(folder / "last.pt")]
    return cmd + list(args.extra)


def finished_seeds(row: str, output_dir: str | Path) -> dict[int, Path]:
    """{seed: run folder} of every finished seed (with results.json) of a row, by seed."""
    runs = {}
    for path in (Path(output_dir) / row).glob("seed_*/results.json"):
        seed = path.parent.name.removeprefix("seed_")
        if seed.lstrip("-").isdigit():
            runs[int(seed)] = path.parent
    return dict(sorted(runs.items()))


def read_results(row: dict, output_dir: str | Path) -> list[dict]:
    """results.json of every finished seed of a row, by seed."""
    runs = finished_seeds(row["row"], output_dir).values()
    return [json.loads((run / "results.json").read_text()) for run in runs]


def _numbers(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if isinstance(r.get(key), (int, float))]


def _spread(values: list[float]) -> str:
    """'72.50' for one run, '72.50 +- 0.31' (mean +- sample standard deviation) for several."""
    if not values:
        return "?"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def mean_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """The `level` interval of the mean of `values` (one per seed) by Student's t with n - 1
    degrees of freedom, as scipy.stats computes it; None for fewer than two values."""
    from scipy import stats  # only the tables need scipy

    if len(values) < 2:
        return None
    values = np.asarray(values, dtype=float)
    if values.std() == 0:  # t's scale is 0: scipy gives NaN where the interval is a point
        return [float(values[0])] * 2
    low, high = stats.t.interval(level, len(values) - 1, values.mean(), stats.sem(values))
    return [float(low), float(high)]


def welch_test(a: list[float], b: list[float], level: float = 0.95) -> dict | None:
    """Welch's t-test of mean(a) = mean(b) over seeds (unequal variances): the difference of
    the means, its `level` interval, t, its Welch-Satterthwaite degrees of freedom and the
    two-sided p-value; None unless each side has two values or more."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    difference = float(np.mean(a) - np.mean(b))
    if np.var(a) == 0 and np.var(b) == 0:  # no spread on either side: t is undefined
        return {"difference": difference, "ci95": None, "t": None, "df": None, "p_value": None}
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(level)
    return {
        "difference": difference,
        "ci95": [float(interval.low), float(interval.high)],
        "t": float(result.statistic),
        "df": float(result.df),
        "p_value": float(result.pvalue),
    }


def _interval(interval: list[float] | None, signed: bool = False) -> str:
    """'[low, high]' with two decimals (and signs for differences); '' for none."""
    if not interval:
        return ""
    spec = "+.2f" if signed else ".2f"
    return f"[{interval[0]:{spec}}, {interval[1]:{spec}}]"


def _seed_interval(values: list[float]) -> str:
    return _interval(mean_interval(values))


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
    "mean's 95 % CI",
    "95 % CI",
    "macro-F1",
    "macro-F1 95 % CI",
]
TABLE_COLUMNS += ["difference", "epochs", "GPU hours", "device", "date", "commit"]


def make_table(rows: list[dict], output_dir: str | Path) -> str:
    """A markdown table of `rows` with their results under `output_dir`; "not run" where none.

    "ours" and macro-F1 are means +- standard deviations over the finished seeds; "mean's 95 %
    CI" is the interval of the mean accuracy over seeds (t distribution, two seeds or more), the
    seed-to-seed noise; the other 95 % CIs are the test-set bootstrap intervals of the runs
    (train.py's results.json), averaged over seeds; GPU hours add up all seeds.
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
            _seed_interval(accuracies),
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


def write_table(output_dir: str | Path, extra: list[dict] = ()) -> Path:
    """OUT/results.md: every row of the paper's table, run or not, and the `extra` rows."""
    path = Path(output_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(make_table(ROWS + list(extra), output_dir))
    return path


# --------------------------------------------------------------------------- cross-dataset


def find_runs(output_dir: str | Path) -> list[Path]:
    """Finished runs under `output_dir`: every folder holding results.json and last.pt."""
    found = Path(output_dir).rglob("results.json")
    return sorted(p.parent for p in found if (p.parent / "last.pt").is_file())


def dataset_label(path: str | Path | None) -> str:
    """A dataset's name: its manifest's (download_dataset.py writes one), else its folder's."""
    if not path:
        return "?"
    try:
        name = json.loads((Path(path) / "manifest.json").read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name or Path(path).name)


def evaluate_run(
    run: Path, dataset: str, out: Path, device: str | None, compare: Path | None = None
) -> dict:
    """evaluate.py's eval.json for `run`'s last.pt on `dataset`'s test split (written to `out`),
    with `--compare` the run `compare`'s last.pt; the one already there while it is newer than
    the checkpoints. A CLIError (no class in common, ...) is returned as {"error": message}."""
    cached = out / "eval.json"
    checkpoints = [run / "last.pt"] + ([compare / "last.pt"] if compare else [])
    newest = max(c.stat().st_mtime_ns for c in checkpoints)
    if cached.is_file() and cached.stat().st_mtime_ns >= newest:
        return json.loads(cached.read_text())
    import evaluate  # torch and the models: only the evaluations need them

    argv = ["--checkpoint", str(run / "last.pt"), "--dataset-path", dataset]
    argv += ["--split", "test", "--output", str(out)] + (["--device", device] if device else [])
    argv += ["--compare", str(compare / "last.pt")] if compare else []
    try:
        return evaluate.main(evaluate.parse_args(argv))
    except CLIError as err:
        print(f"{run} on {dataset}: {err}")
        return {"error": str(err)}


def _cell(record: dict, metric: str, diagonal: bool) -> str:
    if "error" in record:
        return "n/a"
    value = f"{record[metric]:.2f}"
    interval = record.get(f"{metric}_ci95")
    text = f"**{value}**" if diagonal else value
    return text + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _note(run: str, dataset: str, record: dict) -> str | None:
    """What a cell's figure leaves out: excluded images, masked classes (evaluate.py)."""
    if "error" in record:
        return f"{run} on {dataset}: {record['error']}"
    cross = record.get("cross_dataset")
    if not cross or not (cross["excluded_images"] or cross["masked_classes"]):
        return None  # the same classes, perhaps named or ordered otherwise: nothing left out
    shared, total = len(cross["shared_classes"]), len(cross["dataset_classes"])
    parts = [f"{shared} of the dataset's {total} classes scored"]
    if cross["excluded_images"]:
        excluded = ", ".join(cross["excluded_classes"])
        parts.append(f"{cross['excluded_images']} images of {excluded} excluded")
    if cross["masked_classes"]:
        accuracy = cross.get("unmasked", {}).get("accuracy", float("nan"))
        masked = ", ".join(cross["masked_classes"])
        parts.append(f"{masked} masked (unmasked accuracy {accuracy:.2f} %)")
    return f"{run} on {dataset}: " + "; ".join(parts)


def cross_dataset_table(
    runs: list[str], datasets: list[str], records: dict[tuple[str, str], dict]
) -> str:
    """Markdown: accuracy and macro-F1 (percent, 95 % bootstrap intervals) of each run (row) on
    each dataset's test split (column); the run's own dataset in bold; numbered notes say what
    a cross-dataset figure leaves out."""
    labels = [dataset_label(d) for d in datasets]
    notes: list[str] = []
    tables = []
    for metric, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")):
        lines = [
            f"{title} (%, 95 % bootstrap interval) on each dataset's test split (columns) of the "
            f"runs (rows); bold: the dataset a run was trained on",
            "",
            "| run | trained on | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        for run in runs:
            trained = next(
                (
                    r["trained_on"]
                    for (x, _), r in records.items()
                    if x == run and r.get("trained_on")
                ),
                None,
            )
            cells = []
            for dataset, label in zip(datasets, labels, strict=True):
                record = records[(run, dataset)]
                same = bool(trained) and Path(trained).resolve() == Path(dataset).resolve()
                cell = _cell(record, metric, same)
                note = _note(run, label, record)
                if note:
                    if note not in notes:
                        notes.append(note)
                    cell += f" ({notes.index(note) + 1})"
                cells.append(cell)
            lines.append(f"| {run} | {dataset_label(trained)} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    text = "\n\n".join(tables) + "\n"
    if notes:
        text += "\n" + "\n".join(f"({i}) {note}" for i, note in enumerate(notes, 1)) + "\n"
    return text


def cross_dataset(args: argparse.Namespace) -> Path:
    """--cross-dataset: every finished run under OUT on every dataset; OUT/cross_dataset.md."""
    datasets = [d.strip() for d in args.cross_dataset.split(",") if d.strip()]
    for dataset in datasets:
        if not (Path(dataset) / "test").is_dir():
            raise CLIError(f"--cross-dataset: {dataset} has no test/ folder (docs/DATA.md)")
    runs = find_runs(args.output_dir)
    if not runs:
        raise CLIError(f"no finished run (results.json and last.pt) under {args.output_dir}")
    root = Path(args.output_dir)
    records, names = {}, []
    for run in runs:
        name = str(run.relative_to(root)) if run != root else run.name
        names.append(name)
        for dataset in datasets:
            out = root / "cross_dataset" / name.replace("/", "__") / dataset_label(dataset)
            records[(name, dataset)] = evaluate_run(run, dataset, out, args.device)
    path = root / "cross_dataset.md"
    path.write_text(cross_dataset_table(names, datasets, records))
    return path


# --------------------------------------------------------------------------- two rows


def parse_pair(spec: str, output_dir: str | Path) -> tuple[str, str]:
    """--compare ROW_A,ROW_B: two different rows of the table (or run folders under OUT)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) != 2 or names[0] == names[1]:
        raise CLIError(f"--compare {spec}: give two different rows, ROW_A,ROW_B")
    for name in names:
        if name not in ROW_IDS and not (Path(output_dir) / name).is_dir():
            raise CLIError(
                f"--compare {spec}: no row {name}; known: {', '.join(ROW_IDS)}, or a folder of "
                f"seed_* runs under {output_dir}"
            )
    return names[0], names[1]


def compare_rows(a: str, b: str, args: argparse.Namespace) -> dict:
    """Row A against row B: per row the seeds' test accuracies with mean, sd and the mean's
    interval; Welch's t over seeds; per seed both have finished, evaluate.py --compare's paired
    comparison (final EMA weights, TenCrop) on --dataset-path's test split."""
    runs = {name: finished_seeds(name, args.output_dir) for name in (a, b)}
    for name, found in runs.items():
        if not found:
            raise CLIError(f"--compare: {name} has no finished seed under {args.output_dir}")
    accuracy = {
        name: {
            seed: json.loads((run / "results.json").read_text()).get("test_accuracy")
            for seed, run in found.items()
        }
        for name, found in runs.items()
    }
    values = {name: [v for v in acc.values() if isinstance(v, (int, float))]
              for name, acc in accuracy.items()}  # fmt: skip
    report = {
        "rows": [a, b],
        "metric": "test_accuracy",
        "seeds": {
            name: {
                "accuracy": accuracy[name],
                "mean": float(np.mean(values[name])) if values[name] else None,
                "sd": float(np.std(values[name], ddof=1)) if len(values[name]) > 1 else None,
                "mean_ci95": mean_interval(values[name]),
            }
            for name in (a, b)
        },
        "welch": welch_test(values[a], values[b]),
        "dataset_path": str(args.dataset_path),
        "per_run": {},
    }
    shared = [s for s in runs[a] if s in runs[b]]
    shared = [s for s in shared if all((runs[n][s] / "last.pt").is_file() for n in (a, b))]
    if not (Path(args.dataset_path) / "test").is_dir():
        report["per_run_note"] = f"{args.dataset_path} has no test/ folder (--dataset-path)"
        return report
    for seed in shared:
        out = Path(args.output_dir) / "compare" / f"{a}_vs_{b}" / f"seed_{seed}"
        record = evaluate_run(
            runs[a][seed], str(args.dataset_path), out, args.device, compare=runs[b][seed]
        )
        report["per_run"][seed] = record.get("compare") or {"error": record.get("error", "?")}
    return report


def format_comparison(report: dict) -> str:
    """compare_rows's report as markdown: the seeds, the seed-level test, the per-run tests."""
    a, b = report["rows"]
    lines = [
        f"## {a} (A) against {b} (B): test accuracy (%)",
        "",
        "| row | seeds | accuracy per seed | mean ± sd | mean's 95 % CI (t) |",
        "|---|---|---|---|---|",
    ]
    for name in (a, b):
        seeds = report["seeds"][name]
        per_seed = ", ".join(f"{s}: {v:.2f}" for s, v in seeds["accuracy"].items() if v is not None)
        spread = f"{seeds['mean']:.2f}" if seeds["mean"] is not None else "?"
        spread += f" ± {seeds['sd']:.2f}" if seeds["sd"] is not None else ""
        cells = [name, str(len(seeds["accuracy"])), per_seed, spread, _interval(seeds["mean_ci95"])]
        lines.append("| " + " | ".join(cells) + " |")
    welch = report["welch"]
    lines.append("")
    if welch is None:
        lines.append("Seed level: no test; Welch's t needs two finished seeds of each row or more.")
    elif welch["p_value"] is None:
        lines.append(
            f"Seed level: A - B = {welch['difference']:+.2f} points; no test: neither row's "
            "accuracy varies over its seeds."
        )
    else:
        lines.append(
            f"Seed level (Welch's t over seeds): A - B = {welch['difference']:+.2f} points, "
            f"95 % CI {_interval(welch['ci95'], signed=True)}, t = {welch['t']:.2f} "
            f"({welch['df']:.1f} df), p = {welch['p_value']:.3g}"
        )
    lines += ["", "Per run, on the same test images (evaluate.py --compare: paired bootstrap, "
              "McNemar's exact test):", ""]  # fmt: skip
    if "per_run_note" in report:
        return "\n".join(lines + [f"none: {report['per_run_note']}"]) + "\n"
    lines += [
        "| seed | A | B | A - B | 95 % CI (paired bootstrap) | McNemar p | A alone right | "
        "B alone right |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, c in report["per_run"].items():
        if "error" in c:
            lines.append(f"| {seed} | {c['error']} |" + " |" * 6)
            continue
        cells = [
            str(seed), f"{c['accuracy_a']:.2f}", f"{c['accuracy_b']:.2f}",
            f"{c['accuracy_difference']:+.2f}",
            _interval(c["accuracy_difference_ci95"], signed=True) or "none (--bootstrap 0)",
            f"{c['mcnemar']['p_value']:.3g}", str(c["mcnemar"]["a_only_correct"]),
            str(c["mcnemar"]["b_only_correct"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if not report["per_run"]:
        lines.append("| no seed that both rows have finished (with last.pt) |" + " |" * 7)
    return "\n".join(lines) + "\n"


def compare(args: argparse.Namespace) -> list[Path]:
    """--compare: OUT/compare_A_vs_B.md (and .json) for every pair given."""
    written = []
    for spec in args.compare:
        a, b = parse_pair(spec, args.output_dir)
        report = compare_rows(a, b, args)
        path = Path(args.output_dir) / f"compare_{a}_vs_{b}.md"
        path.write_text(format_comparison(report))
        path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        written.append(path)
    return written


def main(args: argparse.Namespace) -> int:
    if args.cross_dataset or args.compare:
        args.dataset_path = args.dataset_path or DEFAULT_DATASET
        paths = ([cross_dataset(args)] if args.cross_dataset else []) + compare(args)
        for path in paths:
            print(path.read_text(), end="")
            print(f"written to {path}")
        return 0
    configs = config_rows(args.config)
    rows = (select_rows(args.rows) if args.rows or not configs else []) + configs
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
        args.dataset_path = str(Path(args.dataset_path).resolve()) if args.dataset_path else None
        args.output_dir = str(Path(args.output_dir).resolve())
        for row in configs:
            row["config"] = str(Path(row["config"]).resolve())
            row["dataset_path"] = str(Path(row["dataset_path"]).resolve())
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
                write_table(args.output_dir, configs)
                if result.returncode != 0:
                    print(f"{name} failed (exit code {result.returncode}); rerun to resume")
                    return result.returncode
    path = write_table(args.output_dir, configs)
    print(path.read_text(), end="")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("reproduce.py", main, parse_args()))
