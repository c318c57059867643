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
import json
import os
import sys

import torch
from torch import nn

import datasets
from engine import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ArgumentParser,
    DeviceError,
    amp_settings,
    format_report,
    metrics_with_intervals,
    paired_comparison,
    predict,
    resolve_device,
    save_confusion_matrix,
    write_text_atomic,
)
from models import WeightsError, load_model


class CLIError(RuntimeError):
    """A mistake in the command's input; the command prints the message, without a traceback."""


def model_name_from_args(model: str | None, model_size: str | None) -> str | None:
    """`--model NAME` or `--model-size S` (= "emonext_S"); None lets the checkpoint decide."""
    if model and model_size and model != f"emonext_{model_size}":
        raise CLIError(f"--model {model} and --model-size {model_size} disagree; give one")
    return model or (f"emonext_{model_size}" if model_size else None)


def load_trained_model(
    checkpoint: str, weights: str = "auto", model_name: str | None = None
) -> tuple[nn.Module, list[str], dict, dict]:
    """(model in eval mode on the CPU, class names, data config, checkpoint) from a file.

    Class names and data config come from the checkpoint when it records them (this project's
    checkpoints do); official-trainer checkpoints get `datasets.CLASSES` and the model's default
    config (224 input, resize 236, no normalisation), which is how the official code trained.
    """
    if not os.path.exists(checkpoint):
        raise CLIError(f"checkpoint {checkpoint} does not exist")
    try:
        model, ckpt = load_model(checkpoint, weights, model_name)
    except (WeightsError, ValueError) as err:
        raise CLIError(str(err)) from err
    classes = list(ckpt.get("classes") or datasets.CLASSES)
    if len(classes) != model.num_classes:
        raise CLIError(
            f"{checkpoint}: the model has {model.num_classes} outputs but the checkpoint names "
            f"{len(classes)} classes"
        )
    data_config = dict(model.data_config)
    data_config.update(ckpt.get("data_config") or {})
    model.data_config = data_config
    return model, classes, data_config, ckpt


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


def predictions_csv(paths: list[str], targets, probs, classes: list[str]) -> str:
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "true", "predicted", *classes])
    for path, t, p in zip(paths, targets.tolist(), probs.tolist(), strict=True):
        pred = max(range(len(p)), key=p.__getitem__)
        writer.writerow([path, classes[t], classes[pred], *(f"{x:.6f}" for x in p)])
    return out.getvalue()


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate.py", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="this project's or the official .pt")
    parser.add_argument(
        "--dataset-path", default="FER2013", help="folder with train/val/test/<Class>/ images"
    )
    parser.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="which folder to score"
    )
    parser.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "ema", "model"],
        help="which weights of the checkpoint; auto = EMA where there are some (official test)",
    )
    parser.add_argument(
        "--tta",
        default="tencrop",
        choices=["tencrop", "none"],
        help="tencrop: logits averaged over 10 crops (official protocol); none: one centre crop",
    )
    parser.add_argument("--batch-size", default=64, type=int, help="images per batch")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: a GPU if there is one, else cpu)",
    )
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (fp16 on old GPUs)")
    parser.add_argument(
        "--model-size",
        default=None,
        help="tiny, small, ...: model emonext_SIZE, when the "
        "checkpoint does not say (the official trainer's) or to check it",
    )
    parser.add_argument("--model", default=None, help="full model name, e.g. convnext_tiny")
    parser.add_argument("--predictions", default=None, help="CSV path: one row per image")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="B.pt",
        help="a second checkpoint scored on the same images: both accuracies, A - B with a "
        "paired-bootstrap 95 %% interval and McNemar's exact p-value (docs/EVALUATION.md)",
    )
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None), checked: one line and exit status 2 if wrong."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    parser.check(
        args,
        {
            "batch_size": ("at least 1", lambda v: v >= 1),
            "num_workers": ("at least 0", lambda v: v >= 0),
            "bootstrap": ("at least 0", lambda v: v >= 0),
        },
    )
    return args


def score(
    checkpoint: str, args: argparse.Namespace, device: torch.device, model_name: str | None = None
) -> tuple[nn.Module, list[str], dict, dict, datasets.Loader, torch.Tensor, torch.Tensor]:
    """(model, classes, data config, checkpoint, loader, logits, targets) of one checkpoint."""
    model, classes, data_config, ckpt = load_trained_model(checkpoint, args.weights, model_name)
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
    return model, classes, data_config, ckpt, loader, logits, targets


def compare(
    args: argparse.Namespace, device: torch.device, classes: list[str], logits, targets
) -> dict:
    """--compare B.pt: B scored on the same images, then `engine.paired_comparison` (A - B)."""
    model_b, classes_b, _, ckpt_b, _, logits_b, targets_b = score(args.compare, args, device)
    if [c.lower() for c in classes_b] != [c.lower() for c in classes] or not torch.equal(
        targets, targets_b
    ):
        raise CLIError(f"{args.compare} does not predict the classes of {args.checkpoint}")
    result = paired_comparison(
        logits.argmax(1).numpy(),
        logits_b.argmax(1).numpy(),
        targets.numpy(),
        len(classes),
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
        "model_name_b": model_b.model_name,
        "weights_b": ckpt_b["weights_used"],
        **result,
    }


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model_name = model_name_from_args(args.model, args.model_size)
    model, classes, data_config, ckpt, loader, logits, targets = score(
        args.checkpoint, args, device, model_name
    )
    skipped = loader.split.skipped_paths
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable image(s) (--skip-bad-images): "
            + ", ".join(skipped[:5])
            + (", ..." if len(skipped) > 5 else "")
        )
    metrics = metrics_with_intervals(logits, targets, classes, args.bootstrap, args.bootstrap_seed)
    print(f"{args.checkpoint} ({ckpt['weights_used']} weights), {args.split}, tta {args.tta}")
    print(format_report(metrics))

    output = args.output or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(output, exist_ok=True)
    record = {
        **metrics,
        "checkpoint": os.path.abspath(args.checkpoint),
        "model_name": model.model_name,
        "weights": ckpt["weights_used"],
        "dataset_path": os.path.abspath(args.dataset_path),
        "split": args.split,
        "tta": args.tta,
        "skipped_bad_images": len(skipped),
        "skipped_images": skipped,
        "data_config": data_config,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if args.compare:
        record["compare"] = compare(args, device, classes, logits, targets)
    write_text_atomic(os.path.join(output, "eval.json"), json.dumps(record, indent=2) + "\n")
    save_confusion_matrix(
        metrics,
        os.path.join(output, f"confusion_matrix_{args.split}.png"),
        title=f"{model.model_name} {args.split}: accuracy {metrics['accuracy']:.2f} %",
    )
    print(f"wrote {output}/eval.json and confusion_matrix_{args.split}.png")

    if args.predictions:
        paths = loader.split.paths  # unshuffled: the loader's order is the split's
        if len(paths) != len(targets):
            raise CLIError(f"{len(paths)} image paths for {len(targets)} predictions")
        probs = torch.softmax(logits, 1)
        directory = os.path.dirname(os.path.abspath(args.predictions))
        os.makedirs(directory, exist_ok=True)
        write_text_atomic(args.predictions, predictions_csv(paths, targets, probs, classes))
        print(f"wrote {args.predictions} ({len(paths)} rows)")
    return record


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except CLIError as err:
        sys.exit(f"evaluate.py: error: {err}")
    except DeviceError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)
