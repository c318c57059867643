"""A synthetic FER-like dataset: 48 x 48 grayscale cartoon faces drawn for 7 expressions.

    python scripts/make_synthetic.py --out data/synthetic [--per-class 400] [--seed 0]

Writes OUT/{train,val,test}/<Class>/<index>.png and OUT/manifest.json, the layout of
scripts/download_dataset.py. The command line of `datasets.make_synthetic`, where the faces are
drawn (datasets/synthetic.py; docs/DATA.md describes them). Deterministic by seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# make_synthetic lives in datasets/synthetic.py; importing it from here still works
# (scripts/benchmark.py).
from datasets import SYNTHETIC_SPLITS, DatasetError, make_synthetic  # noqa: E402
from utils import ArgumentParser, CLIError, run_command  # noqa: E402


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="make_synthetic.py",
        description="Draw a synthetic FER-like dataset (48x48 grayscale, 7 expressions).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--per-class", type=int, default=SYNTHETIC_SPLITS["train"], help="train images per class"
    )
    parser.add_argument(
        "--val-per-class", type=int, default=SYNTHETIC_SPLITS["val"], help="val images per class"
    )
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=SYNTHETIC_SPLITS["test"],
        help="test images per class",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed (default: 0); the output is a function of it",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a different dataset written by this project (never a folder of other files)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a class folder without images could not be loaded, so every
    split needs at least one image per class."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    positive = ("a positive integer", lambda n: n > 0)
    parser.check(
        args,
        {
            "per_class": positive,
            "val_per_class": positive,
            "test_per_class": positive,
            "seed": ("a non-negative integer", lambda n: n >= 0),  # numpy refuses negative seeds
        },
    )
    return args


def main(args: argparse.Namespace | list[str] | None = None) -> Path:
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    splits = {"train": args.per_class, "val": args.val_per_class, "test": args.test_per_class}
    return make_synthetic(args.out, seed=args.seed, splits=splits, force=args.force, quiet=False)


def run(args: argparse.Namespace) -> Path:
    """main for the command line: a DatasetError (a folder in the way) becomes a CLIError, which
    run_command prints as one line (exit status 1)."""
    try:
        return main(args)
    except DatasetError as err:
        raise CLIError(str(err)) from None


if __name__ == "__main__":
    run_command("make_synthetic.py", run, parse_args())
