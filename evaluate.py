"""Measure a trained checkpoint on a split of FER2013: accuracy, macro-F1, per-class scores.

    python evaluate.py --checkpoint out/checkpoint.pt --dataset-path FER2013
    python evaluate.py --checkpoint official.pt --model-size tiny --weights ema --tta tencrop
    python evaluate.py --checkpoint A.pt --compare B.pt --dataset-path FER2013

Accepts this project's checkpoints and the official trainer's (`{"model", "ema", "best_acc"}`,
whose architecture is read off the tensors; `--model-size` checks or overrides it). The default
protocol is the official one: EMA weights where the file has them, TenCrop, logits averaged over
the ten crops. Accuracy and macro-F1 come with 95 % bootstrap intervals; `--compare B.pt` adds a
paired comparison (docs/EVALUATION.md). Writes `eval.json` and `confusion_matrix_<split>.png`
beside the checkpoint (or to `--output`) and, with `--predictions`, one CSV row per image.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import nn

import datasets
import models
from engine import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    amp_settings,
    bootstrap_scores,
    format_report,
    metrics_with_intervals,
    percentile_interval,
    predict,
    resampled_scores,
)
from utils import (
    ArgumentParser,
    CLIError,
    add_device_argument,
    add_model_arguments,
    resolve_device,
    run_command,
    save_confusion_matrix,
    write_text_atomic,
)

# --------------------------------------------------------------------------- command line


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate.py", description=__doc__)
    group = add_model_arguments(
        parser, models.SIZES, checkpoint_help="this project's or the official trainer's .pt"
    )
    group.add_argument(
        "--compare",
        default=None,
        metavar="B.pt",
        help="a second checkpoint scored on the same images: both accuracies, A - B with a "
        "paired-bootstrap 95 %% interval and McNemar's exact p-value (docs/EVALUATION.md)",
    )
    parser.add_argument(
        "--dataset-path", default="FER2013", help="folder with train/val/test/<Class>/ images"
    )
    parser.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="which folder to score"
    )
    parser.add_argument(
        "--tta",
        default="tencrop",
        choices=["tencrop", "none"],
        help="tencrop: logits averaged over 10 crops (official protocol); none: one centre crop",
    )
    parser.add_argument("--batch-size", default=64, type=int, help="images per batch")
    add_device_argument(parser)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (fp16 on old GPUs)")
    parser.add_argument("--predictions", default=None, help="CSV path: one row per image")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        help=f"resamples of the 95 %% bootstrap intervals (default {BOOTSTRAP_RESAMPLES}; 0: none)",
    )
    parser.add_argument(
        "--bootstrap-seed", type=int, default=BOOTSTRAP_SEED, help="seed of the resampling"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder for eval.json and the confusion matrix (default: the checkpoint's folder)",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable images (damaged, not images, too large to decode) instead of "
        "failing; they are counted and listed in eval.json",
    )
    parser.add_argument("--num-workers", default=0, type=int, help="data loader workers")
    parser.add_argument(
        "--data-pipeline",
        default="fast",
        choices=["fast", "pil"],
        help="fast: tensor transforms; pil: the torchvision reference transforms",
    )
    return parser


# What each numeric flag must be: parse_args refuses anything else in one line.
ARG_RULES = {
    "batch_size": ("at least 1", lambda v: v >= 1),
    "num_workers": ("at least 0", lambda v: v >= 0),
    "bootstrap": ("at least 0", lambda v: v >= 0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None), checked: one line and exit status 2 if wrong."""
    return get_args_parser().parse_checked(argv, ARG_RULES)


# --------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """One checkpoint run over one split."""

    model: nn.Module
    classes: list[str]  # the model's outputs, in order
    data_config: dict
    ckpt: dict  # the checkpoint as read, with `weights_used`
    loader: datasets.Loader  # unshuffled: its split's paths are in the order of `logits`
    logits: torch.Tensor  # (images, classes), float32, on the CPU; TenCrop: the crops' mean
    targets: torch.Tensor  # (images,)


def check_classes(model_classes: list[str], data_classes: list[str], checkpoint: str) -> None:
    """The dataset's folder order must be the model's output order (case aside: some FER2013
    copies use lowercase folder names)."""
    if len(model_classes) != len(data_classes):
        raise CLIError(
            f"{checkpoint} predicts {len(model_classes)} classes ({', '.join(model_classes)}) "
            f"but the dataset has {len(data_classes)} ({', '.join(data_classes)})"
        )
    if [c.lower() for c in model_classes] != [c.lower() for c in data_classes]:
        raise CLIError(
            f"the checkpoint's classes {model_classes} are not the dataset's {data_classes}"
        )


def score(
    checkpoint: str, args: argparse.Namespace, device: torch.device, model_name: str | None = None
) -> Scores:
    """`checkpoint` run over `args.split` of `args.dataset_path` as the flags say."""
    model, classes, data_config, ckpt = models.load_trained_model(
        checkpoint, args.weights, model_name
    )
    model.to(device)
    split_dir = os.path.join(args.dataset_path, args.split)
    if not os.path.isdir(split_dir):
        raise CLIError(
            f"no {args.split} split at {split_dir}. Get FER2013 with "
            "`python scripts/download_dataset.py` (or pass --dataset-path)"
        )
    try:
        loader = datasets.build_loader(
            args.dataset_path,
            args.split,
            mode="test" if args.tta == "tencrop" else "val",
            pipeline=args.data_pipeline,
            batch_size=args.batch_size,
            data_config=datasets.DataConfig.from_dict(data_config),
            device=str(device),
            num_workers=args.num_workers,
            shuffle=False,
            skip_bad_images=args.skip_bad_images,
        )
    except datasets.DatasetError as err:
        raise CLIError(str(err)) from err
    check_classes(classes, list(loader.classes), checkpoint)
    logits, targets = predict(model, loader, device, amp_settings(args.amp, device)[0])
    return Scores(model, classes, data_config, ckpt, loader, logits, targets)


# --------------------------------------------------------------------------- two models


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of `a_only` in a_only + b_only trials.

    `a_only` images only model A gets right, `b_only` only B; images both get right (or wrong)
    say nothing about which is better. Exact integer arithmetic: no normal approximation, no
    continuity correction, no underflow for thousands of discordant pairs.
    """
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0 or 2 * k == n:
        return 1.0
    tail, term = 0, 1  # term = C(n, i)
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def paired_comparison(
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """Model A against model B on the same images: accuracies, A - B with a paired-bootstrap 95 %
    interval (both models scored on the same resamples), macro-F1 likewise, and McNemar's exact
    test on the images exactly one of them gets right."""
    preds_a, preds_b, targets = np.asarray(preds_a), np.asarray(preds_b), np.asarray(targets)
    right_a, right_b = preds_a == targets, preds_b == targets
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    scores = bootstrap_scores([preds_a, preds_b], targets, num_classes, resamples, seed)
    (acc_a, f1_a), (acc_b, f1_b) = scores
    full = np.arange(len(targets))[None]
    (acc_a0,), (f1_a0,) = resampled_scores(preds_a, targets, num_classes, full)
    (acc_b0,), (f1_b0,) = resampled_scores(preds_b, targets, num_classes, full)
    return {
        "accuracy_a": float(acc_a0),
        "accuracy_b": float(acc_b0),
        "accuracy_difference": float(acc_a0 - acc_b0),
        "accuracy_difference_ci95": percentile_interval(acc_a - acc_b),
        "macro_f1_a": float(f1_a0),
        "macro_f1_b": float(f1_b0),
        "macro_f1_difference": float(f1_a0 - f1_b0),
        "macro_f1_difference_ci95": percentile_interval(f1_a - f1_b),
        "mcnemar": {"a_only_correct": a_only, "b_only_correct": b_only,
                    "p_value": mcnemar_exact(a_only, b_only)},
        "num_images": int(len(targets)),
        "bootstrap": {"resamples": int(resamples), "seed": int(seed), "method": "percentile"},
    }  # fmt: skip


def compare(args: argparse.Namespace, device: torch.device, a: Scores) -> dict:
    """--compare B.pt: B scored on the same images as A, then `paired_comparison` (A - B)."""
    b = score(args.compare, args, device)
    same_classes = [c.lower() for c in b.classes] == [c.lower() for c in a.classes]
    if not same_classes or not torch.equal(a.targets, b.targets):
        raise CLIError(f"{args.compare} does not predict the classes of {args.checkpoint}")
    result = paired_comparison(
        a.logits.argmax(1).numpy(),
        b.logits.argmax(1).numpy(),
        a.targets.numpy(),
        len(a.classes),
        max(args.bootstrap, 1),
        args.bootstrap_seed,
    )
    mcnemar, (low, high) = result["mcnemar"], result["accuracy_difference_ci95"]
    print(
        f"A {args.checkpoint}: {result['accuracy_a']:.2f} %   B {args.compare}: "
        f"{result['accuracy_b']:.2f} %\nA - B = {result['accuracy_difference']:+.2f} points, "
        f"95 % CI [{low:+.2f}, {high:+.2f}] (paired bootstrap, {result['bootstrap']['resamples']} "
        f"resamples); McNemar exact p = {mcnemar['p_value']:.3g} (A alone right on "
        f"{mcnemar['a_only_correct']} images, B alone on {mcnemar['b_only_correct']})"
    )
    return {
        "checkpoint_b": os.path.abspath(args.compare),
        "model_name_b": b.model.model_name,
        "weights_b": b.ckpt["weights_used"],
        **result,
    }


# --------------------------------------------------------------------------- outputs


def predictions_csv(paths: list[str], targets, probs, classes: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "true", "predicted", *classes])
    for path, t, p in zip(paths, targets.tolist(), probs.tolist(), strict=True):
        pred = max(range(len(p)), key=p.__getitem__)
        writer.writerow([path, classes[t], classes[pred], *(f"{x:.6f}" for x in p)])
    return out.getvalue()


def write_predictions(path: str, scores: Scores) -> None:
    """--predictions: one CSV row per image, its path, true and predicted class, probabilities."""
    paths = scores.loader.split.paths  # unshuffled: the loader's order is the split's
    if len(paths) != len(scores.targets):
        raise CLIError(f"{len(paths)} image paths for {len(scores.targets)} predictions")
    probs = torch.softmax(scores.logits, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, predictions_csv(paths, scores.targets, probs, scores.classes))
    print(f"wrote {path} ({len(paths)} rows)")


def main(args: argparse.Namespace) -> dict:
    # --model NAME or emonext_SIZE (None: the checkpoint says); exit status 2 if they disagree
    model_name = get_args_parser().model_name(args)
    device = resolve_device(args.device)
    scores = score(args.checkpoint, args, device, model_name)
    skipped = scores.loader.split.skipped_paths
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable image(s) (--skip-bad-images): "
            + ", ".join(skipped[:5])
            + (", ..." if len(skipped) > 5 else "")
        )
    metrics = metrics_with_intervals(
        scores.logits, scores.targets, scores.classes, args.bootstrap, args.bootstrap_seed
    )
    print(
        f"{args.checkpoint} ({scores.ckpt['weights_used']} weights), {args.split}, tta {args.tta}"
    )
    print(format_report(metrics))

    output = args.output or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(output, exist_ok=True)
    record = {
        **metrics,
        "checkpoint": os.path.abspath(args.checkpoint),
        "model_name": scores.model.model_name,
        "weights": scores.ckpt["weights_used"],
        "dataset_path": os.path.abspath(args.dataset_path),
        "split": args.split,
        "tta": args.tta,
        "skipped_bad_images": len(skipped),
        "skipped_images": skipped,
        "data_config": scores.data_config,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if args.compare:
        record["compare"] = compare(args, device, scores)
    write_text_atomic(os.path.join(output, "eval.json"), json.dumps(record, indent=2) + "\n")
    save_confusion_matrix(
        metrics,
        os.path.join(output, f"confusion_matrix_{args.split}.png"),
        title=f"{scores.model.model_name} {args.split}: accuracy {metrics['accuracy']:.2f} %",
    )
    print(f"wrote {output}/eval.json and confusion_matrix_{args.split}.png")
    if args.predictions:
        write_predictions(args.predictions, scores)
    return record


if __name__ == "__main__":
    run_command("evaluate.py", main, parse_args())
