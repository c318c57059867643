"""Measure a trained checkpoint on a split of a dataset: accuracy, macro-F1, per-class scores.

    python evaluate.py --checkpoint out/checkpoint.pt --dataset-path FER2013
    python evaluate.py --checkpoint official.pt --model-size tiny --weights ema --tta tencrop
    python evaluate.py --checkpoint A.pt --compare B.pt --dataset-path FER2013
    python evaluate.py --checkpoint ferplus_run/last.pt --dataset-path RAF-DB   # cross-dataset
    python evaluate.py --checkpoint run/last.pt --dataset-path FER2013 --fit-temperature

Accepts this project's checkpoints and the official trainer's (`{"model", "ema", "best_acc"}`,
whose architecture is read off the tensors; `--model-size` checks or overrides it). The default
protocol is the official one: EMA weights where the file has them, TenCrop, logits averaged over
the ten crops. Accuracy and macro-F1 come with 95 % bootstrap intervals; `--compare B.pt` adds a
paired comparison (docs/EVALUATION.md). A dataset whose classes differ from the model's (a FER+
model on FER2013, a FER2013 model on FER+ or CK+) is scored on the classes both have, matched by
name: images of classes the model lacks are excluded and counted, the model's extra classes are
masked out of the argmax, and the figures without the mask are reported too. Balanced accuracy and
the calibration of the probabilities (ECE, NLL, Brier) come with intervals too; `--fit-temperature`
fits temperature scaling on the val split and stores it for predict.py and the exports. Writes
`eval.json`, `confusion_matrix_<split>.png` and `reliability_<split>.png` beside the checkpoint
(or to `--output`) and, with `--predictions`, one CSV row per image.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

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
    calibration_metrics,
    confidence_intervals,
    fit_temperature,
    format_interval,
    format_report,
    metrics_with_intervals,
    percentile_interval,
    predict,
    reliability_bins,
    resampled_scores,
)
from utils import (
    ArgumentParser,
    CLIError,
    add_allow_torchscript_argument,
    add_device_argument,
    add_model_arguments,
    check_output_dir,
    resolve_device,
    run_command,
    save_confusion_matrix,
    save_figure,
    write_text_atomic,
)

# --------------------------------------------------------------------------- command line


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate.py", description=__doc__)
    group = add_model_arguments(
        parser,
        models.SIZES,
        checkpoint_help="this project's or the official trainer's .pt, a hub folder, or a "
        "TorchScript file of scripts/export.py with --allow-torchscript",
    )
    add_allow_torchscript_argument(group)
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
        "--fit-temperature",
        action="store_true",
        help="fit temperature scaling (Guo et al. 2017) on the val split, report the split's "
        "calibration before and after, and store the temperature for predict.py and "
        "scripts/export.py (beside a .pt file, in a hub folder's config.json)",
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
    """The command line (sys.argv when None), checked: one line and exit status 2 if wrong,
    before anything is read; where the results go included (an evaluation takes minutes)."""
    parser = get_args_parser()
    args = parser.parse_checked(argv, ARG_RULES)
    if args.fit_temperature and args.split == "val":
        parser.error("--fit-temperature fits on the val split: report another --split (test)")
    try:
        check_outputs(args)
    except CLIError as err:
        parser.error(str(err))
    return args


def output_folder(args: argparse.Namespace) -> str:
    """Where eval.json goes: --output, else the checkpoint's folder (the current one for an
    hf-hub:USER/NAME checkpoint)."""
    if args.output:
        return args.output
    if models.hub.is_hub_name(args.checkpoint):
        return "."
    return os.path.dirname(os.path.abspath(args.checkpoint))


def check_outputs(args: argparse.Namespace) -> None:
    """eval.json's folder and the --predictions file can be written (utils.check_output_dir);
    a CLIError naming the flag if not."""
    flag = "--output" if args.output else "--output (default: the checkpoint's folder)"
    check_output_dir(output_folder(args), flag)
    if args.fit_temperature and os.path.exists(args.checkpoint):  # a hub folder, or beside a .pt
        ckpt = Path(os.path.abspath(args.checkpoint))
        where = ckpt if ckpt.is_dir() else ckpt.parent
        check_output_dir(where, "--checkpoint (--fit-temperature stores the temperature there)")
    if args.predictions:
        path = Path(args.predictions)
        if path.is_dir():
            raise CLIError(f"--predictions {path}: is a folder; give the path of a CSV file")
        check_output_dir(path.absolute().parent if path.exists() else path, "--predictions")


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


def normalised_class(name: str) -> str:
    """A class name as datasets.canonical_class_name spells it ('anger', 'ANGRY' -> 'Angry');
    a name it does not know, in lowercase letters only (a model's own classes match a
    dataset's only by a known name or exactly so)."""
    try:
        return datasets.canonical_class_name(name)
    except ValueError:
        return "".join(ch for ch in name.lower() if ch.isalpha())


@dataclass
class ClassMatch:
    """A model's classes against a dataset's, matched by normalised name."""

    model_classes: list[str]
    data_classes: list[str]
    shared: list[str]  # the classes both have, by the dataset's names, in the dataset's order
    model_index: list[int]  # the model output of each shared class
    data_index: list[int]  # the dataset target of each shared class
    missing: list[str]  # dataset classes the model lacks: their images are excluded
    extra: list[str]  # model classes the dataset lacks: masked out of the argmax

    @property
    def identical(self) -> bool:
        """The same classes in the same order: the model's outputs are the dataset's targets."""
        n = len(self.model_classes)
        return len(self.data_classes) == n and self.model_index == self.data_index == list(range(n))


def match_classes(model_classes: list[str], data_classes: list[str], checkpoint: str) -> ClassMatch:
    """The classes `checkpoint`'s model and the dataset share; a CLIError when none."""
    model_keys = [normalised_class(c) for c in model_classes]
    if len(set(model_keys)) < len(model_keys):
        raise CLIError(f"{checkpoint} names one class twice (its classes: {model_classes})")
    position = {key: i for i, key in enumerate(model_keys)}
    shared, model_index, data_index, missing = [], [], [], []
    for j, name in enumerate(data_classes):
        i = position.get(normalised_class(name))
        if i is None:
            missing.append(name)
        else:
            shared.append(name)
            model_index.append(i)
            data_index.append(j)
    if not shared:
        raise CLIError(
            f"{checkpoint} predicts {', '.join(model_classes)}; the dataset has "
            f"{', '.join(data_classes)}: no class in common to score"
        )
    extra = [c for i, c in enumerate(model_classes) if i not in model_index]
    return ClassMatch(
        list(model_classes), list(data_classes), shared, model_index, data_index, missing, extra
    )


@dataclass
class Restricted:
    """Scores seen through a ClassMatch: the images of shared classes, the shared outputs."""

    keep: torch.Tensor  # (images,) bool: the image's class is one the model has
    logits: torch.Tensor  # (kept images, shared classes): the extra classes masked out
    targets: torch.Tensor  # (kept images,) index into `shared`
    winner: np.ndarray  # (kept images,) the model output of the argmax over all its outputs


def restrict(scores: Scores, match: ClassMatch) -> Restricted:
    """The images whose class the model has, their targets as indices into `match.shared` and
    the model's logits of the shared classes only (the mask)."""
    to_shared = torch.full((len(match.data_classes),), -1, dtype=torch.long)
    to_shared[match.data_index] = torch.arange(len(match.shared))
    shared_targets = to_shared[scores.targets]
    keep = shared_targets >= 0
    logits = scores.logits[keep]
    winner = logits.argmax(1).numpy() if len(logits) else np.zeros(0, dtype=int)
    return Restricted(keep, logits[:, match.model_index], shared_targets[keep], winner)


def unmasked_metrics(view: Restricted, match: ClassMatch, resamples: int, seed: int) -> dict:
    """Accuracy and macro-F1 when the model's extra classes compete for the argmax (predicting
    one is wrong), with bootstrap intervals; macro-F1 averages the shared classes only."""
    k, y = len(match.shared), view.targets.numpy()
    output_to_shared = np.full(len(match.model_classes), k)
    output_to_shared[match.model_index] = np.arange(k)
    p = output_to_shared[view.winner]
    # One more "class" stands for the extra outputs: no image is of it, so its F1 is 0 in every
    # resample, and the mean over k + 1 classes is the mean over the k shared ones times k/(k+1).
    (accuracy,), (f1,) = resampled_scores(p, y, k + 1, np.arange(len(y))[None])
    out = {"accuracy": float(accuracy), "macro_f1": float(f1) * (k + 1) / k}
    intervals = confidence_intervals(p, y, k + 1, resamples, seed)
    if intervals:
        out["accuracy_ci95"] = intervals["accuracy_ci95"]
        out["macro_f1_ci95"] = [v * (k + 1) / k for v in intervals["macro_f1_ci95"]]
    winners = Counter(view.winner.tolist())
    out["predicted_as"] = {c: winners[match.model_classes.index(c)] for c in match.extra}
    return out


def cross_dataset_report(
    view: Restricted, match: ClassMatch, resamples: int, seed: int, excluded: dict[str, int]
) -> dict:
    """What eval.json's `cross_dataset` holds: the matching, the exclusions, the mask."""
    report = {
        "model_classes": match.model_classes,
        "dataset_classes": match.data_classes,
        "shared_classes": match.shared,
        "excluded_classes": excluded,
        "excluded_images": sum(excluded.values()),
        "scored_images": int(view.keep.sum()),
        "masked_classes": match.extra,
    }
    if match.extra and len(view.targets):
        report["unmasked"] = unmasked_metrics(view, match, resamples, seed)
    return report


def describe_cross_dataset(report: dict, split: str) -> str:
    """The report's lines on the matching: what was excluded, what was masked, and the figures
    without the mask."""
    model, data = report["model_classes"], report["dataset_classes"]
    lines = [
        f"classes: the model's {len(model)} and the dataset's {len(data)}, matched by name: "
        f"{len(report['shared_classes'])} shared ({', '.join(report['shared_classes'])})"
    ]
    if report["excluded_classes"]:
        what = ", ".join(f"{n} of {c}" for c, n in report["excluded_classes"].items())
        lines.append(
            f"excluded: {report['excluded_images']} {split} images of classes the model lacks "
            f"({what}); scored: {report['scored_images']}"
        )
    if report["masked_classes"]:
        line = (
            f"masked: {', '.join(report['masked_classes'])} (the model's, not the dataset's) "
            f"out of the argmax in the figures above"
        )
        unmasked = report.get("unmasked")
        if unmasked:
            ci = {k: " 95 % CI " + format_interval(unmasked[k])
                  for k in ("accuracy_ci95", "macro_f1_ci95") if unmasked.get(k)}  # fmt: skip
            taken = [f"{n} as {c}" for c, n in unmasked["predicted_as"].items() if n]
            line += (
                f"; unmasked: accuracy {unmasked['accuracy']:.2f} %{ci.get('accuracy_ci95', '')}"
                f"   macro-F1 {unmasked['macro_f1']:.2f} %{ci.get('macro_f1_ci95', '')} "
                f"(images predicted {', '.join(taken) or 'as a masked class: none'})"
            )
        lines.append(line)
    return "\n".join(lines)


class Exported(nn.Module):
    """A TorchScript export in the place of a model: its module, and the model's name."""

    def __init__(self, module: nn.Module, model_name: str):
        super().__init__()
        self.module, self.model_name = module, model_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def load_torchscript(
    path: str, args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, list[str], dict, dict]:
    """(model, classes, data config, checkpoint record) of a TorchScript export of
    scripts/export.py, as models.load_trained_model gives them; only with --allow-torchscript,
    since loading it runs its code."""
    if not args.allow_torchscript:
        raise CLIError(models.weights.torchscript_refusal(path, "--allow-torchscript"))
    if args.fit_temperature:
        raise CLIError(
            f"--fit-temperature stores the temperature with a checkpoint, and {path} is an "
            "export; fit it on the .pt checkpoint or hub folder it was exported from"
        )
    module, meta = models.deploy.read_torchscript(path, str(device))  # its output count checked
    classes, data_config = models.deploy.read_metadata(meta, path)
    name = meta.get("model_name") if isinstance(meta.get("model_name"), str) else "torchscript"
    weights = meta.get("weights") if isinstance(meta.get("weights"), str) else "exported"
    record = {"weights_used": f"{weights} (TorchScript)", "args": {}, "temperature": None}
    return Exported(module, name), classes, data_config, record | {"temperature_note": None}


def score(
    checkpoint: str, args: argparse.Namespace, device: torch.device, model_name: str | None = None
) -> Scores:
    """`checkpoint` run over `args.split` of `args.dataset_path` as the flags say."""
    if os.path.isfile(checkpoint) and models.deploy.is_torchscript(checkpoint):
        model, classes, data_config, ckpt = load_torchscript(checkpoint, args, device)
    else:
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
        datasets.check_dataset(args.dataset_path, (args.split,))  # one class: a meaningless 100 %
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
    test on the images exactly one of them gets right. `resamples` 0: no intervals (None), never
    one from a single resample."""
    preds_a, preds_b, targets = np.asarray(preds_a), np.asarray(preds_b), np.asarray(targets)
    right_a, right_b = preds_a == targets, preds_b == targets
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    accuracy_ci = f1_ci = None
    if resamples > 0:
        scores = bootstrap_scores([preds_a, preds_b], targets, num_classes, resamples, seed)
        (acc_a, f1_a), (acc_b, f1_b) = scores
        accuracy_ci, f1_ci = percentile_interval(acc_a - acc_b), percentile_interval(f1_a - f1_b)
    full = np.arange(len(targets))[None]
    (acc_a0,), (f1_a0,) = resampled_scores(preds_a, targets, num_classes, full)
    (acc_b0,), (f1_b0,) = resampled_scores(preds_b, targets, num_classes, full)
    return {
        "accuracy_a": float(acc_a0),
        "accuracy_b": float(acc_b0),
        "accuracy_difference": float(acc_a0 - acc_b0),
        "accuracy_difference_ci95": accuracy_ci,
        "macro_f1_a": float(f1_a0),
        "macro_f1_b": float(f1_b0),
        "macro_f1_difference": float(f1_a0 - f1_b0),
        "macro_f1_difference_ci95": f1_ci,
        "mcnemar": {"a_only_correct": a_only, "b_only_correct": b_only,
                    "p_value": mcnemar_exact(a_only, b_only)},
        "num_images": int(len(targets)),
        "bootstrap": {"resamples": int(resamples), "seed": int(seed),
                      "method": "percentile" if resamples > 0 else "none: --bootstrap 0"},
    }  # fmt: skip


def compare(
    args: argparse.Namespace, device: torch.device, a: Scores, match: ClassMatch, view: Restricted
) -> dict:
    """--compare B.pt: B scored on the same images as A, then `paired_comparison` (A - B); on a
    dataset of other classes both are scored on the classes all three share, each masked."""
    b = score(args.compare, args, device)
    match_b = match_classes(b.classes, list(b.loader.classes), args.compare)
    if match_b.shared != match.shared or not torch.equal(a.targets, b.targets):
        raise CLIError(
            f"{args.compare} does not predict the classes of {args.checkpoint} on this dataset "
            f"({', '.join(match_b.shared)} against {', '.join(match.shared)})"
        )
    view_b = restrict(b, match_b)
    result = paired_comparison(
        view.logits.argmax(1).numpy(),
        view_b.logits.argmax(1).numpy(),
        view.targets.numpy(),
        len(match.shared),
        args.bootstrap,
        args.bootstrap_seed,
    )
    mcnemar, interval = result["mcnemar"], result["accuracy_difference_ci95"]
    if interval is None:
        interval = "no interval: --bootstrap 0"
    else:
        interval = (
            f"95 % CI [{interval[0]:+.2f}, {interval[1]:+.2f}] (paired bootstrap, "
            f"{result['bootstrap']['resamples']} resamples)"
        )
    print(
        f"A {args.checkpoint}: {result['accuracy_a']:.2f} %   B {args.compare}: "
        f"{result['accuracy_b']:.2f} %\nA - B = {result['accuracy_difference']:+.2f} points, "
        f"{interval}; McNemar exact p = {mcnemar['p_value']:.3g} (A alone right on "
        f"{mcnemar['a_only_correct']} images, B alone on {mcnemar['b_only_correct']})"
    )
    return {
        "checkpoint_b": os.path.abspath(args.compare),
        "model_name_b": b.model.model_name,
        "weights_b": b.ckpt["weights_used"],
        **result,
    }


# --------------------------------------------------------------------------- calibration


def fitted_temperature(
    args: argparse.Namespace, device: torch.device, a: Scores, match: ClassMatch, model_name
) -> tuple[float, dict, str | None]:
    """--fit-temperature: (T fitted on the val split's logits, under the same protocol, what to
    record of the fit, where T was stored or None: models.calibration.store_temperature)."""
    if not match.identical:
        raise CLIError(
            f"--fit-temperature: {args.checkpoint}'s classes are not the dataset's; fit it on "
            "the dataset it was trained on"
        )
    val = score(args.checkpoint, argparse.Namespace(**{**vars(args), "split": "val"}), device,
                model_name)  # fmt: skip
    temperature = fit_temperature(val.logits, val.targets)
    k = len(a.classes)
    fit = {
        "fitted_on": {"dataset_path": os.path.abspath(args.dataset_path), "split": "val",
                      "tta": args.tta, "images": len(val.targets)},
        "val_nll_before": calibration_metrics(val.logits, val.targets, k)["nll"],
        "val_nll_after": calibration_metrics(val.logits / temperature, val.targets, k)["nll"],
        "method": "temperature scaling (Guo et al. 2017): argmin over T of the NLL of "
        "softmax(logits / T), L-BFGS on log T",
    }  # fmt: skip
    stored = models.calibration.store_temperature(args.checkpoint, a.ckpt, temperature, fit)
    return temperature, fit, str(stored) if stored else None


def temperature_report(
    args: argparse.Namespace, device: torch.device, a: Scores, match: ClassMatch, view, model_name
) -> dict | None:
    """eval.json's `temperature`: the fitted (--fit-temperature) or stored temperature, and this
    split's calibration before and after dividing the logits by it (the argmax, hence accuracy,
    is the same); None without either."""
    if args.fit_temperature:
        temperature, fit, stored = fitted_temperature(args, device, a, match, model_name)
        report = {"value": temperature, "stored_in": stored, **fit}
    elif a.ckpt.get("temperature") is not None:
        temperature = a.ckpt["temperature"]
        report = {"value": temperature, "stored_in": a.ckpt["temperature_note"]}
    else:
        if a.ckpt.get("temperature_note"):
            print(a.ckpt["temperature_note"])
        return None
    k = len(match.shared)
    scaled = view.logits / temperature
    before = calibration_metrics(view.logits, view.targets, k, args.bootstrap, args.bootstrap_seed)
    after = calibration_metrics(scaled, view.targets, k, args.bootstrap, args.bootstrap_seed)
    same = torch.equal(scaled.argmax(1), view.logits.argmax(1)) if len(scaled) else True
    report.update(before=before, after=after, same_predictions=bool(same))
    report["reliability_after"] = reliability_bins(scaled, view.targets, k)
    return report


def describe_temperature(report: dict, split: str) -> str:
    before, after = report["before"], report["after"]
    if report.get("fitted_on"):
        how = f"fitted on val ({report['fitted_on']['images']} images)"
        where = f"stored in {report['stored_in']}" if report["stored_in"] else (
            "not stored: the checkpoint is not a local file or folder")  # fmt: skip
    else:
        how, where = "stored", f"from {report['stored_in']}"
    return (
        f"temperature scaling: T = {report['value']:.4f} {how}; {split} ECE {before['ece']:.2f} % "
        f"-> {after['ece']:.2f} %, NLL {before['nll']:.4f} -> {after['nll']:.4f}, Brier "
        f"{before['brier']:.4f} -> {after['brier']:.4f}; predictions "
        f"{'unchanged' if report['same_predictions'] else 'CHANGED'}; {where}"
    )


def reliability_figure(curves: dict[str, dict], title: str):
    """The reliability diagram: accuracy against mean top-1 confidence per bin (engine's
    `reliability_bins`), one line per set of probabilities in `curves`, the diagonal being
    perfect calibration; below it, the images per bin."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 100], [0, 100], color="grey", linestyle="--", label="perfectly calibrated")
    for (label, bins), marker in zip(curves.items(), "os^", strict=False):
        full = [i for i, c in enumerate(bins["count"]) if c]
        x = [bins["confidence"][i] for i in full]
        top.plot(x, [bins["accuracy"][i] for i in full], marker=marker, label=label)
        bottom.plot(x, [bins["count"][i] for i in full], marker=marker, label=label)
    top.set_xlim(0, 100)
    top.set_ylim(0, 100)
    top.set_ylabel("accuracy in the bin (%)")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("mean top-1 confidence in the bin (%)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- outputs


def predictions_csv(columns: dict[str, list], probs: torch.Tensor, classes: list[str]) -> str:
    """One row per image: `columns` (path, true, predicted, ...), then each class's probability."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*columns, *classes])
    for i, p in enumerate(probs.tolist()):
        writer.writerow([*(values[i] for values in columns.values()), *(f"{x:.6f}" for x in p)])
    return out.getvalue()


def write_predictions(path: str, scores: Scores, match: ClassMatch) -> None:
    """--predictions: one CSV row per image, its path, true and predicted class, probabilities.
    On a dataset of other classes `predicted` is among the shared classes (the mask), beside
    `predicted_unmasked` (any of the model's) and `scored` (0: a class the model lacks)."""
    paths = scores.loader.split.paths  # unshuffled: the loader's order is the split's
    if len(paths) != len(scores.targets):
        raise CLIError(f"{len(paths)} image paths for {len(scores.targets)} predictions")
    true = [match.data_classes[t] for t in scores.targets.tolist()]
    masked = scores.logits[:, match.model_index].argmax(1).tolist()
    columns = {"path": paths, "true": true, "predicted": [match.shared[i] for i in masked]}
    if not match.identical:
        winners = scores.logits.argmax(1).tolist()
        columns["predicted_unmasked"] = [scores.classes[i] for i in winners]
        columns["scored"] = [int(c in match.shared) for c in true]
    probs = torch.softmax(scores.logits, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, predictions_csv(columns, probs, scores.classes))
    print(f"wrote {path} ({len(paths)} rows)")


def main(args: argparse.Namespace) -> dict:
    # --model NAME or emonext_SIZE (None: the checkpoint says); exit status 2 if they disagree
    model_name = get_args_parser().model_name(args)
    device = resolve_device(args.device)
    scores = score(args.checkpoint, args, device, model_name)
    match = match_classes(scores.classes, list(scores.loader.classes), args.checkpoint)
    view = restrict(scores, match)  # everything, unless the dataset's classes are not the model's
    skipped = scores.loader.split.skipped_paths
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable image(s) (--skip-bad-images): "
            + ", ".join(skipped[:5])
            + (", ..." if len(skipped) > 5 else "")
        )
    metrics = metrics_with_intervals(
        view.logits, view.targets, match.shared, args.bootstrap, args.bootstrap_seed
    )
    print(
        f"{args.checkpoint} ({scores.ckpt['weights_used']} weights), {args.split}, tta {args.tta}"
    )
    print(format_report(metrics))

    output = output_folder(args)
    record = {
        **metrics,
        "checkpoint": os.path.abspath(args.checkpoint),
        "model_name": scores.model.model_name,
        "weights": scores.ckpt["weights_used"],
        "dataset_path": os.path.abspath(args.dataset_path),
        "trained_on": (scores.ckpt.get("args") or {}).get("dataset_path"),
        "split": args.split,
        "tta": args.tta,
        "skipped_bad_images": len(skipped),
        "skipped_images": skipped,
        "data_config": scores.data_config,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if not match.identical:
        excluded = {
            c: int((scores.targets == j).sum())
            for j, c in enumerate(match.data_classes)
            if c in match.missing
        }
        record["cross_dataset"] = cross_dataset_report(
            view, match, args.bootstrap, args.bootstrap_seed, excluded
        )
        print(describe_cross_dataset(record["cross_dataset"], args.split))
    if args.compare:
        record["compare"] = compare(args, device, scores, match, view)
    record["reliability"] = reliability_bins(view.logits, view.targets, len(match.shared))
    curves = {f"softmax(logits): ECE {metrics['ece']:.2f} %": record["reliability"]}
    temperature = temperature_report(args, device, scores, match, view, model_name)
    if temperature is not None:
        record["temperature"] = temperature
        print(describe_temperature(temperature, args.split))
        label = (
            f"softmax(logits / {temperature['value']:.3g}): ECE {temperature['after']['ece']:.2f} %"
        )
        curves[label] = temperature["reliability_after"]
    os.makedirs(output, exist_ok=True)  # now: a failure before leaves no empty folder behind
    write_text_atomic(os.path.join(output, "eval.json"), json.dumps(record, indent=2) + "\n")
    save_confusion_matrix(
        metrics,
        os.path.join(output, f"confusion_matrix_{args.split}.png"),
        title=f"{scores.model.model_name} {args.split}: accuracy {metrics['accuracy']:.2f} %",
    )
    save_figure(
        reliability_figure(curves, f"{scores.model.model_name} {args.split}: reliability"),
        os.path.join(output, f"reliability_{args.split}.png"),
    )
    print(
        f"wrote {output}/eval.json, confusion_matrix_{args.split}.png, reliability_{args.split}.png"
    )
    if args.predictions:
        write_predictions(args.predictions, scores, match)
    return record


if __name__ == "__main__":
    run_command("evaluate.py", main, parse_args())
