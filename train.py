"""Train EmoNeXt (or a baseline) on FER2013: the official recipe without its defects.

    python train.py --dataset-path FER2013 --model-size tiny --amp --in_22k
    torchrun --nproc_per_node=4 train.py ...   # DistributedDataParallel, batch size per process
    python train.py --demo                      # synthetic faces, small model, CPU, minutes

docs/RECIPE.md describes the recipe and the official trainer's defects fixed here. Outputs go to
`--output-dir/<run-name>/`: best.pt, last.pt, metrics.jsonl, config.yaml, stn_epoch_NNN.png,
confusion_matrix.png and results.json. `-c FILE.yaml` takes flag values from a file (configs/);
`--resume RUN/last.pt` continues a run with the arguments it was started with;
docs/RELIABILITY.md lists what may change on resume.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import datasets
import engine
import losses
import models
import utils
from ema import EMA
from losses import EmoNeXtLoss

DEMO_DATA = "data/synthetic"


def get_args_parser(add_help: bool = True) -> utils.ArgumentParser:
    """train.py's flags; scripts/submit.py adds its own to them (add_help=False there)."""
    p = utils.ArgumentParser(prog="train.py", description=__doc__, add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset-path",
        default="FER2013",
        help="folder with train/ val/ test/ class folders (scripts/download_dataset.py)",
    )
    g.add_argument(
        "--data-pipeline",
        choices=["fast", "pil"],
        default="fast",
        help="fast: decoded once, augmented per batch on the device; pil: the official "
        "torchvision transforms",
    )
    g.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers (pil pipeline only)"
    )
    g.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable images (counted) instead of stopping",
    )
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal-flip probability")
    g.add_argument(
        "--vflip",
        type=float,
        default=0.5,
        help="vertical-flip probability (the official recipe turns faces upside down)",
    )
    g.add_argument("--rotation", type=float, default=20.0, help="random rotation range, degrees")
    g.add_argument(
        "--aa",
        default="none",
        help="RandAugment after the crop: none (the paper's recipe), a timm string such as "
        "rand-m9-mstd0.5-inc1 (ConvNeXt's), or trivial (TrivialAugment: timm's "
        f"{datasets.TRIVIAL})",
    )
    g.add_argument(
        "--reprob",
        type=float,
        default=0.0,
        help="random-erasing probability, on the normalised image (0: off, the paper; "
        "ConvNeXt: 0.25)",
    )
    g.add_argument(
        "--remode",
        choices=["pixel", "rand", "const"],
        default="pixel",
        help="random-erasing fill: per-pixel noise, per-box noise or 0 (timm's; ConvNeXt: pixel)",
    )
    g.add_argument(
        "--recount", type=int, default=1, help="random-erasing boxes per image (ConvNeXt: 1)"
    )
    g.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="input side in pixels (default: the model's, 224 for EmoNeXt)",
    )
    g.add_argument(
        "--sampler",
        choices=["shuffle", "balanced"],
        default="shuffle",
        help="shuffle: every training image once per epoch; balanced: every class equally often, "
        "images drawn with replacement, an epoch as long as the training set rounded up to a "
        "multiple of classes x processes (imbalanced datasets such as AffectNet)",
    )

    g = utils.add_model_arguments(p, models.SIZES, default_size="tiny")
    g.add_argument(
        "--pretrained",
        default="auto",
        help="auto (ImageNet-1k, or 22k with --in_22k, where official weights exist; "
        "none otherwise), none, in1k, in22k, timm, or a checkpoint path/URL",
    )
    g.add_argument(
        "--in_22k",
        action="store_true",
        help="ImageNet-22k weights instead of 1k, as the paper used",
    )
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--no-stn", action="store_true", help="ablation: no Spatial Transformer")
    g.add_argument("--no-se", action="store_true", help="ablation: no Squeeze-and-Excitation")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=300, help="maximum number of epochs")
    g.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    g.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="micro-batches per optimiser step",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak learning rate of the warm-restart schedule. 1e-3 is what the "
        "official code really trained with: its scheduler ignored --lr, so its "
        "README's 1e-4 never took effect",
    )
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of a cycle")
    g.add_argument(
        "--warmup-steps",
        type=int,
        default=128,
        help="linear warm-up at the start of every cycle (optimiser steps)",
    )
    g.add_argument(
        "--cycle-steps",
        type=int,
        default=1024,
        help="length of one warm-restart cycle (optimiser steps)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=0.01,
        help="AdamW weight decay (PyTorch's default, as in the official code)",
    )
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument(
        "--label-smoothing",
        "--smoothing",
        type=float,
        default=0.2,
        help="cross-entropy label smoothing; with Mixup/CutMix it smooths the mixed targets, as "
        "timm does (--smoothing: timm's and ConvNeXt's name; ConvNeXt fine-tunes with 0.1)",
    )
    g.add_argument(
        "--loss-weighting",
        choices=["none", "inverse-frequency", "effective-number"],
        default="none",
        help="weigh each image's cross-entropy by its class: 1 / images of the class, or 1 / "
        "the class's effective number of samples (Cui et al. 2019); normalised to mean 1 over "
        "the classes",
    )
    g.add_argument(
        "--effective-number-beta",
        type=float,
        default=0.9999,
        help="beta of --loss-weighting effective-number, in [0, 1): 0 weighs classes equally, "
        "towards 1 as inverse-frequency",
    )
    g.add_argument(
        "--logit-adjustment",
        type=float,
        default=0.0,
        metavar="TAU",
        help="logit-adjusted loss (Menon et al. 2021): the cross-entropy sees logits + TAU * "
        "log(class prior); 1 is the paper's choice, 0 is off",
    )
    g.add_argument(
        "--sa-weight",
        type=float,
        default=1.0,
        help="weight of the self-attention regulariser (0: ablation)",
    )
    g.add_argument("--ema-beta", type=float, default=0.99, help="EMA decay cap")
    g.add_argument("--ema-update-every", type=int, default=16, help="EMA update period (steps)")
    g.add_argument(
        "--patience",
        type=int,
        default=12,
        help="early stopping: epochs without a better validation accuracy",
    )
    g.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=10,
        help="stop after this many consecutive steps with a non-finite loss",
    )
    g.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: bf16 where the device supports it, else fp16 with a GradScaler",
    )
    g.add_argument(
        "--official-quirks",
        action="store_true",
        help="reproduce the official trainer exactly: fp16 with --amp, gradients "
        "clipped while still scaled",
    )

    g.add_argument(
        "--layer-decay",
        type=float,
        default=1.0,
        help="layer-wise lr decay: the lr of a layer k groups below the head is scaled by "
        "this^k (timm's param_groups_layer_decay; ConvNeXt fine-tunes with e.g. 0.8); 1.0 is "
        "off (the paper's recipe)",
    )

    g = p.add_argument_group("mixup and cutmix (ConvNeXt's and timm's flags; off by default)")
    g.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        help="Mixup alpha, mixup on when > 0 (ConvNeXt fine-tunes with 0.8; 0: off, the paper's)",
    )
    g.add_argument(
        "--cutmix",
        type=float,
        default=0.0,
        help="CutMix alpha, cutmix on when > 0 (ConvNeXt fine-tunes with 1.0; 0: off)",
    )
    g.add_argument(
        "--cutmix-minmax",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="CutMix box side ratios drawn uniformly in [MIN, MAX] instead of from alpha "
        "(enables CutMix; default: none)",
    )
    g.add_argument(
        "--mixup-prob",
        type=float,
        default=1.0,
        help="probability of mixing a batch (or element) when Mixup or CutMix is on",
    )
    g.add_argument(
        "--mixup-switch-prob",
        type=float,
        default=0.5,
        help="probability of CutMix instead of Mixup when both are on",
    )
    g.add_argument(
        "--mixup-mode",
        choices=["batch", "pair", "elem"],
        default="batch",
        help="draw mixing parameters per batch, per pair or per element",
    )
    g.add_argument(
        "--mixup-off-epoch",
        type=int,
        default=0,
        help="turn Mixup/CutMix off from this epoch on (0: never)",
    )

    g = p.add_argument_group("knowledge distillation (timm train.py's flags; off by default)")
    g.add_argument(
        "--kd-model-name",
        default=None,
        help="the teacher: a checkpoint or hub folder this project reads (as evaluate.py); its "
        "classes must be the student's (default: none, no distillation)",
    )
    g.add_argument(
        "--kd-distill-type",
        choices=["logit"],
        default="logit",
        help="logit: KL divergence between the temperature-softened outputs",
    )
    g.add_argument(
        "--kd-temperature", type=float, default=1.0, help="distillation softmax temperature"
    )
    g.add_argument(
        "--distill-loss-weight",
        type=float,
        default=None,
        help="weight of the distillation loss (timm's rule: given, the task loss keeps "
        "--task-loss-weight or 1; not given, 1 - --task-loss-weight, or 1 without either)",
    )
    g.add_argument(
        "--task-loss-weight",
        type=float,
        default=None,
        help="weight of the task loss (cross-entropy + SA term) under distillation (default 1)",
    )

    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--val-batch-size",
        type=int,
        default=256,
        help="validation/test batch size (the official code used 1)",
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help="YAML file of flag values, keys written with underscores (batch_size: 128), as "
        "timm's train.py reads them; flags on the command line override it. configs/ holds the "
        "recipes; a run folder's config.yaml repeats that run (docs/RECIPE.md)",
    )
    g.add_argument("--output-dir", default="output", help="where run folders are created")
    g.add_argument("--run-name", default=None, help="run folder name (default: model and time)")
    g.add_argument(
        "--checkpoint",
        default=None,
        help="initialise from this checkpoint's weights (fine-tuning; not a resume)",
    )
    g.add_argument(
        "--resume",
        default=None,
        help="continue a run from its last.pt exactly, with the run's own arguments; only "
        "--epochs, --patience, --dataset-path, --device and other flags that do not change the "
        "training may be given (docs/RELIABILITY.md)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=0,
        metavar="N",
        help="keep the N best epochs' checkpoints by validation accuracy as "
        "checkpoint-EPOCH.pt, for scripts/average_checkpoints.py (0: none)",
    )
    g.add_argument("--seed", type=int, default=2001, help="random seed (the official one)")
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic cuDNN kernels (slower); otherwise cudnn.benchmark",
    )
    utils.add_device_argument(g)
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun or SLURM: how long a process waits in a collective for another "
        "that does not answer (its host stopped or cut off) before the run ends in one line; "
        "make it longer than the slowest epoch-end (validation and checkpoint) "
        "(default: torch.distributed's, 30 minutes for gloo, 10 for NCCL)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for full training batches (opt-in: on an H200, 46 s of "
        "compilation, then 1.4x faster training steps; docs/PERFORMANCE.md)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (default: on for CUDA, where it is faster; off on "
        "the CPU)",
    )
    g.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: same results, much less GPU "
        "memory, about a third more compute (fine-tuning the large sizes on smaller GPUs)",
    )
    g.add_argument(
        "--wandb",
        choices=["auto", "online", "offline", "disabled"],
        default="auto",
        help="auto: online when logged in, offline otherwise",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no tqdm progress bars (there are none anyway when the output is not a terminal)",
    )
    g.add_argument(
        "--demo",
        action="store_true",
        help="train a small EmoNeXt on synthetic faces on the CPU in about a minute "
        "(no data or weights needed)",
    )
    return p


def apply_demo_defaults(args: argparse.Namespace, explicit: set[str]) -> None:
    """--demo: a small EmoNeXt on synthetic faces at 48 pixels, from scratch, on the CPU.

    Flags given on the command line (`explicit`) keep their values, so `--demo --epochs 3` and
    `--demo --model-size femto` do what they say.
    """
    demo = {
        "dataset_path": DEMO_DATA,
        # The smallest EmoNeXt: per image a quarter of emonext_atto's CPU time. With these
        # settings it reached 73-83 % over 6 seeds, where atto's 15 epochs reached 55 % in more
        # time; 30 epochs reached 62-77 %, too little margin (docs/PERFORMANCE.md).
        "model": "emonext_micro",
        "pretrained": "none",
        "input_size": 48,  # the faces' own size: no upsampling, fast on a CPU
        "epochs": 40,
        "batch_size": 128,  # a CPU computes more images per second in larger batches
        "lr": 2e-3,
        "warmup_steps": 32,
        # The 880 steps stop 62 % along one cosine, at a third of the peak rate; the EMA
        # averages the rest.
        "cycle_steps": 1400,
        "ema_update_every": 1,  # a short run: average over the last ~100 steps, not ~1,600
        "vflip": 0.0,  # upside-down cartoon faces turn smiles into frowns
        "rotation": 0.0,  # the synthetic faces come with their own random pose
        "device": "cpu",
        "wandb": "disabled",
    }
    if explicit & {"model", "model_size"}:
        del demo["model"]
    for key, value in demo.items():
        if key not in explicit:
            setattr(args, key, value)


# --------------------------------------------------------------------------- arguments

# What each numeric flag must be: (requirement, test). parse_args rejects anything else.
ARG_RULES = {
    "epochs": ("at least 1", lambda v: v >= 1),
    "batch_size": ("at least 1", lambda v: v >= 1),
    "val_batch_size": ("at least 1", lambda v: v >= 1),
    "gradient_accumulation_steps": ("at least 1", lambda v: v >= 1),
    "cycle_steps": ("at least 1", lambda v: v >= 1),
    "warmup_steps": ("at least 0", lambda v: v >= 0),
    "lr": ("positive", lambda v: v > 0),
    "min_lr": ("at least 0", lambda v: v >= 0),
    "weight_decay": ("at least 0", lambda v: v >= 0),
    "clip_grad": ("at least 0 (0: no clipping)", lambda v: v >= 0),
    "label_smoothing": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "effective_number_beta": ("in [0, 1)", lambda v: 0 <= v < 1),
    "logit_adjustment": ("at least 0", lambda v: v >= 0),
    "sa_weight": ("at least 0", lambda v: v >= 0),
    "ema_beta": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "ema_update_every": ("at least 1", lambda v: v >= 1),
    "patience": ("at least 1", lambda v: v >= 1),
    "max_nonfinite_steps": ("at least 1", lambda v: v >= 1),
    "drop_path": ("in [0, 1)", lambda v: 0 <= v < 1),
    "hflip": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "vflip": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "rotation": ("in [0, 180] degrees", lambda v: 0 <= v <= 180),
    "reprob": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "recount": ("at least 1", lambda v: v >= 1),
    "input_size": ("at least 1", lambda v: v >= 1),
    "dist_timeout": ("positive", lambda v: v > 0),
    "num_workers": ("at least 0", lambda v: v >= 0),
    "layer_decay": ("in (0, 1]", lambda v: 0 < v <= 1),
    "mixup": ("at least 0", lambda v: v >= 0),
    "cutmix": ("at least 0", lambda v: v >= 0),
    "mixup_prob": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "mixup_switch_prob": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "mixup_off_epoch": ("at least 0 (0: never)", lambda v: v >= 0),
    "kd_temperature": ("positive", lambda v: v > 0),
    "keep_checkpoints": ("at least 0", lambda v: v >= 0),
}

# The recipe knobs beyond the paper's (docs/RECIPE.md), as results.json reports them.
RECIPE_FLAGS = (
    "label_smoothing",
    "layer_decay",
    "mixup",
    "cutmix",
    "cutmix_minmax",
    "mixup_prob",
    "mixup_switch_prob",
    "mixup_mode",
    "mixup_off_epoch",
    "kd_model_name",
    "kd_distill_type",
    "kd_temperature",
    "distill_loss_weight",
    "task_loss_weight",
    "keep_checkpoints",
)
# ConvNeXt's image augmentations beyond the paper's (datasets/auto_augment.py, random_erasing.py)
AUGMENT_RECIPE = ("aa", "reprob", "remode", "recount")

# Flags that may differ when a run is resumed: how long it goes on and when it stops, where the
# data is, where and how fast it runs, how it reports. --val-batch-size too: evaluation runs in
# eval mode, where the batch size changes memory use, not results (up to float rounding).
# Everything else is the run's own (recorded in its checkpoints) and must not change.
RESUMABLE = {
    "epochs",
    "patience",
    "max_nonfinite_steps",
    "dataset_path",
    "num_workers",
    "val_batch_size",
    "device",
    "dist_timeout",
    "deterministic",
    "compile",
    "channels_last",
    "grad_checkpointing",
    "no_progress",
    "wandb",
    "keep_checkpoints",
}


def check_args(parser: utils.ArgumentParser, args: argparse.Namespace) -> None:
    """Every value in range and every combination possible, or one line and exit status 2."""
    parser.check(args, ARG_RULES)
    if args.warmup_steps >= args.cycle_steps:
        parser.error(
            f"--warmup-steps {args.warmup_steps}: must be less than --cycle-steps "
            f"{args.cycle_steps} (the warm-up is the start of each cycle)"
        )
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr}: must not exceed --lr {args.lr}")
    try:
        datasets.parse_aa(args.aa)
    except ValueError as err:
        parser.error(str(err))
    name = args.model
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name.removeprefix("timm:")):
            close = difflib.get_close_matches(name.removeprefix("timm:"), timm.list_models(), 3)
            parser.error(
                f"--model {name}: timm has no such model"
                + (f" (did you mean {', '.join('timm:' + c for c in close)}?)" if close else "")
                + "; `python -c \"import timm; print(timm.list_models('*convnext*'))\"` lists them"
            )
    elif name not in models.list_models():
        parser.error(
            f"--model {name}: unknown model; known: {', '.join(models.list_models())}, or "
            "timm:NAME for any timm model"
        )
    emonext = name.startswith(("emonext_", "convnext_"))
    if (args.no_stn or args.no_se) and not emonext:
        parser.error(f"--no-stn/--no-se apply to EmoNeXt models, not {name}")
    if emonext and args.input_size is not None and args.input_size < models.MIN_IMG_SIZE:
        parser.error(
            f"--input-size {args.input_size}: too small for {name}, which downsamples by 32; "
            f"give at least {models.MIN_IMG_SIZE}"
        )
    if (
        args.cutmix_minmax is not None
        and not 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1
    ):
        parser.error(
            f"--cutmix-minmax {' '.join(map(str, args.cutmix_minmax))}: give MIN MAX with "
            "0 < MIN < MAX <= 1 (ratios of the image side)"
        )
    if args.layer_decay != 1.0 and not emonext:
        parser.error(f"--layer-decay applies to EmoNeXt and ConvNeXt models, not {name}")
    kd = args.kd_model_name
    if kd and "://" not in kd and not models.hub.is_hub_name(kd) and not os.path.exists(kd):
        parser.error(f"--kd-model-name {kd}: no such checkpoint or hub folder")
    remote = "://" in (args.checkpoint or "") or models.hub.is_hub_name(args.checkpoint or "")
    if args.checkpoint and not remote and not os.path.exists(args.checkpoint):  # file or folder
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    try:  # before any work: where the run will be written
        if args.run_name is not None:
            utils.check_file_name(args.run_name, "--run-name")
        folder = Path(args.resume).parent if args.resume else args.output_dir
        utils.check_output_dir(folder, "--resume" if args.resume else "--output-dir")
    except utils.CLIError as err:
        parser.error(str(err))
    run_dir = Path(args.output_dir) / (args.run_name or "")
    if not args.resume and args.run_name and (run_dir / "last.pt").exists():
        parser.error(
            f"--run-name {args.run_name}: {run_dir} already holds a run; continue it with "
            f"`{resume_command(run_dir / 'last.pt')}` or choose another --run-name"
        )


def peek_checkpoint(parser: utils.ArgumentParser, path: str | Path) -> dict:
    """A last.pt's entries, its tensors mapped from the file rather than read (cheap)."""
    if not os.path.isfile(path):
        parser.error(f"--resume {path}: no such file; give the last.pt of the run to continue")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # random bytes, a truncated file, a pickle that is not plain data
        ckpt = None
    if not isinstance(ckpt, dict):
        parser.error(f"--resume {path}: not a readable checkpoint; give a run's last.pt")
    if not {"optimizer", "args", "epoch"} <= ckpt.keys():
        parser.error(
            f"--resume {path}: not a last.pt of this trainer (no optimiser state); start a new "
            f"run from its weights with --checkpoint {path}"
        )
    return ckpt


def describe_flag(flag: str, value) -> str:
    """How a flag's value reads in an error: "--amp", "no --amp", "--lr 0.001"."""
    if value is True:
        return flag
    if value is False or value is None:
        return f"no {flag}"
    return f"{flag} {value}"


# Flags that name files or folders: a run records them absolute (`absolute_paths`).
PATH_FLAGS = {"dataset_path", "output_dir", "checkpoint", "pretrained"}


def same_value(dest: str, given, recorded) -> bool:
    """A flag's value on resume is the run's: paths compared as absolute paths from here (a
    requeued SLURM job repeats `--output-dir out`; the run recorded /home/me/out)."""
    if dest in PATH_FLAGS and isinstance(given, str) and isinstance(recorded, str):
        return os.path.abspath(given) == os.path.abspath(recorded)
    return given == recorded


def resume_args(
    parser: utils.ArgumentParser, args: argparse.Namespace, explicit: set[str]
) -> argparse.Namespace:
    """The run's recorded arguments, with the RESUMABLE flags that the command line gives.

    Any other flag given with a value that is not the run's is an error naming it, and so is a
    checkpoint that is not the run's latest state (a best.pt behind last.pt).
    """
    path = args.resume
    ckpt = peek_checkpoint(parser, path)
    merged = vars(parser.parse_args([]))  # flags added since the run started: their defaults
    merged.update({k: v for k, v in ckpt["args"].items() if k in merged})
    run = argparse.Namespace(**merged)
    changed = [
        (describe_flag(parser.flag(d), getattr(args, d)), describe_flag(parser.flag(d), merged[d]))
        for d in sorted(explicit - RESUMABLE - {"resume", "model", "model_size"})
        if not same_value(d, getattr(args, d), merged[d])
    ]
    if run.model:  # a run records its resolved model; older runs kept the default size beside it
        run.model_size = None
    run.model = parser.model_name(run, default_size="tiny")
    given = parser.model_name(args)
    if given is not None and given != run.model:
        flag = f"--model {args.model}" if args.model else f"--model-size {args.model_size}"
        changed.insert(0, (flag, f"model {run.model}"))
    if changed:
        given, recorded = changed[0]
        may_change = ", ".join(parser.flag(d) for d in sorted(RESUMABLE))
        parser.error(
            f"{given}: the run {path} has {recorded}; leave it out to resume the run as it was "
            f"(on resume only {may_change} may change), or start a new run"
        )
    for dest in explicit & RESUMABLE:
        setattr(run, dest, getattr(args, dest))
    run.resume = path

    last = Path(path).parent / "last.pt"
    if last.is_file() and not last.samefile(path):
        latest = peek_checkpoint(parser, last)
        if latest["epoch"] > ckpt["epoch"]:
            parser.error(
                f"--resume {path}: holds epoch {ckpt['epoch']}, but the run went on to epoch "
                f"{latest['epoch']}; continue it with `{resume_command(last, len(latest['rng']))}`"
                f", or start a new run from these weights with --checkpoint {path}"
            )
    done = ckpt["epoch"] + 1
    if run.epochs < done:
        parser.error(
            f"--epochs {run.epochs}: the run {path} has trained {done} epochs already; give "
            f"--epochs {done} or more"
        )
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None) as main's arguments: -c FILE's, --demo's and a
    resumed run's values filled in, everything checked. A -c file's values count as flags given
    before the command line's: with --resume they follow the resume rules as typed flags do."""
    parser = get_args_parser()
    argv = parser.expand_config(argv, ARG_RULES)  # -c FILE: its values, as flags given first
    args = parser.parse_args(argv)
    args.config = parser.config_file
    explicit = parser.explicit(argv)
    parser.check(args, ARG_RULES)  # the values given, before a resumed run's replace them
    if args.resume:
        args = resume_args(parser, args, explicit)
    else:
        if args.demo:
            apply_demo_defaults(args, explicit)
        args.model = parser.model_name(args, default_size="tiny")
    check_args(parser, args)
    absolute_paths(args, explicit)
    try:
        check_run_paths(args)
    except utils.CLIError as err:
        parser.error(str(err))
    return args


# The tags --pretrained takes besides a path or URL.
PRETRAINED_TAGS = {"auto", "none", "in1k", "in22k", "timm"}


def absolute_paths(args: argparse.Namespace, explicit: set[str]) -> None:
    """The run's paths made absolute when it starts (and --dataset-path given on resume): its
    checkpoints record them, so a resume from any folder finds the same data."""
    if args.resume:
        args.resume = os.path.abspath(args.resume)
        if "dataset_path" in explicit:
            args.dataset_path = os.path.abspath(args.dataset_path)
        return
    args.dataset_path = os.path.abspath(args.dataset_path)
    args.output_dir = os.path.abspath(args.output_dir)
    if args.checkpoint and os.path.exists(args.checkpoint):  # not a URL or an hf-hub: name
        args.checkpoint = os.path.abspath(args.checkpoint)
    if args.pretrained not in PRETRAINED_TAGS and os.path.exists(args.pretrained):
        args.pretrained = os.path.abspath(args.pretrained)


# The longest name a run writes in its folder: the confusion matrix under its temporary name
# (utils.save_figure); best.pt.tmp, metrics.jsonl, stn_epoch_NNN.png.tmp.png are shorter.
LONGEST_RUN_FILE = "confusion_matrix.png.tmp.png"


def check_run_paths(args: argparse.Namespace) -> None:
    """Every file the run will write fits the file system's limits on names and paths (the
    run folder's lock beside it, `.RUN_NAME.lock`, is the run name plus 6 bytes), before any
    work: a CLIError naming --run-name or --output-dir."""
    if args.resume:
        run_dir, flag = Path(args.resume).parent, "--resume"
    else:  # a default name is the model's and the time's, "-999" at the most
        name = args.run_name or f"{args.model.replace(':', '_')}_20260101-000000-999"
        run_dir, flag = Path(args.output_dir) / name, "--output-dir"
    utils.check_path_fits(run_dir / LONGEST_RUN_FILE, flag, "a file of the run")
    lock_flag = "--run-name" if args.run_name and not args.resume else flag
    utils.check_path_fits(run_lock(run_dir).path, lock_flag, "the run folder's lock file")


# Set by scripts/submit.py in its jobs: submit.py's own command, which resumes a job's run.
RESUME_WITH_ENV = "EMONEXT_RESUME_WITH"


def resume_command(last: str | Path, world_size: int = 1) -> str:
    """The command that continues the run of `last`, from any folder (absolute paths): in a job
    of scripts/submit.py, submit.py's; in a torchrun of several hosts, this host's torchrun
    command (each host runs its own); else python's, or torchrun's on one host."""
    resume = ["--resume", os.path.abspath(last)]
    if os.environ.get(RESUME_WITH_ENV):
        return f"{os.environ[RESUME_WITH_ENV]} {shlex.join(resume)}"
    script = str(Path(__file__).resolve())
    if world_size > 1 and int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        launcher = torchrun_launcher()
        if launcher is not None:
            return shlex.join([*launcher, script, *resume])
    launcher = [python_command()]
    if world_size > 1:
        launcher = ["torchrun", f"--nproc_per_node={world_size}"]
    return shlex.join([*launcher, script, *resume])


def python_command() -> str:
    """This interpreter as a printed command should name it: `python` only when it is this very
    interpreter on PATH (a venv's python started by its path is not the `python` that PATH
    finds; paths compared, not resolved, since a venv's python is a link to the system's)."""
    python = os.path.basename(sys.executable)
    on_path = shutil.which(python)
    same = on_path is not None and os.path.abspath(on_path) == os.path.abspath(sys.executable)
    return python if same else sys.executable


def torchrun_launcher() -> list[str] | None:
    """The torchrun command (script and its flags left out) that started this process, read
    from its parent's command line (Linux's /proc): a multi-host run's rendezvous flags are
    known only there. None where it cannot be read or is not this process's launcher."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            agent = [a.decode() for a in f.read().split(b"\0")[:-1]]
    except (OSError, UnicodeDecodeError):
        return None
    ours = len(sys.argv)  # torchrun starts `python -u SCRIPT ARGS`: SCRIPT ARGS end its own
    if len(agent) <= ours or agent[-ours:] != sys.argv:
        return None
    return agent[:-ours]


# --------------------------------------------------------------------------- schedule


def warm_restart_lr(
    step: int, max_lr: float, warmup: int = 128, cycle: int = 1024, min_lr: float = 0.0
) -> float:
    """The official schedule: learning rate of optimiser step `step` (1, 2, ...).

    Within each cycle of `cycle` steps: linear warm-up from 0 over `warmup` steps, then a cosine
    down to `min_lr`; then it restarts. The official scheduler steps once when it is built, so
    the first optimiser step already uses position 1 of the cycle (lr = max_lr / 128).
    """
    c = step % cycle
    if c < warmup:
        return max_lr * c / warmup
    progress = (c - warmup) / (cycle - warmup)
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    def factor(i: int) -> float:  # i = scheduler steps taken = optimiser steps done
        lr = warm_restart_lr(i + 1, args.lr, args.warmup_steps, args.cycle_steps, args.min_lr)
        return lr / args.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- set-up


def fail(message: str) -> None:
    """A user's mistake found while setting up: one line, exit status 1."""
    raise SystemExit(f"error: {message}")


def open_run(
    args: argparse.Namespace, world_size: int, master: bool
) -> tuple[Path, dict | None, utils.RunLock | None]:
    """The run's folder, the checkpoint it continues (None for a new run) and, on rank 0, the
    folder's lock, held: one process writes a run. A new run without --run-name gets the model's
    name and the time, with a suffix when another run took that name in the same second."""
    ckpt = None
    if args.resume:
        ckpt = models.read_checkpoint(args.resume)
        processes = len(ckpt["rng"])
        if processes != world_size:  # the batch, the data shards and the random streams differ
            fail(
                f"{args.resume} was trained by {processes} process(es), not {world_size}; resume "
                f"it with `{resume_command(args.resume, processes)}`"
            )
        run_dir = Path(args.resume).parent
    lock = None
    if master and args.resume:
        lock = run_lock(run_dir)
        if not lock.acquire():
            fail(f"{run_dir} is being resumed by another process ({lock.holder()}); wait for it")
    elif master and args.run_name:
        lock = run_lock(Path(args.output_dir) / args.run_name)
        if not lock.acquire():
            fail(
                f"--run-name {args.run_name}: {lock.folder} is being written by another process "
                f"({lock.holder()}); choose another --run-name"
            )
    elif master:
        base = f"{args.model.replace(':', '_')}_{time.strftime('%Y%m%d-%H%M%S')}"
        for name in [base, *(f"{base}-{i}" for i in range(2, 1000))]:
            lock = run_lock(Path(args.output_dir) / name)
            if not lock.folder.exists() and lock.acquire():
                args.run_name = name  # recorded in the checkpoints, as --run-name would give it
                break
    if not args.resume:
        args.run_name = utils.broadcast(args.run_name)
        run_dir = Path(args.output_dir) / args.run_name
    return run_dir, ckpt, lock


def run_lock(run_dir: Path) -> utils.RunLock:
    """The lock of a run folder: beside it, so that a run that ends before its first epoch leaves
    no folder behind."""
    return utils.RunLock(run_dir.parent / f".{run_dir.name}.lock", run_dir)


def prepare_dataset(args: argparse.Namespace, master: bool, log) -> list[str]:
    """The dataset's class names; --demo makes its synthetic faces first when they are missing."""
    if args.demo and not Path(args.dataset_path).is_dir():
        if master:
            log(f"making synthetic faces in {args.dataset_path}")
            datasets.make_synthetic(args.dataset_path, seed=0)
        if utils.is_distributed():
            dist.barrier()
    if not Path(args.dataset_path).is_dir() and args.resume:
        # runs started before paths were recorded absolute hold the folder as typed then
        where = "" if os.path.isabs(args.dataset_path) else ", relative to the folder it started in"
        fail(
            f"no dataset at {args.dataset_path}, the run's data{where}; resume with "
            "--dataset-path and the data's folder"
        )
    if not Path(args.dataset_path).is_dir():
        fail(
            f"no dataset at {args.dataset_path}. Get FER2013 with "
            "`python scripts/download_dataset.py --csv fer2013.csv` (or --kaggle, --gdrive, "
            "--folder), or run `python train.py --demo`, which needs no data."
        )
    try:
        classes = datasets.check_dataset(args.dataset_path)
    except datasets.DatasetError as err:  # a single class among them (datasets.check_dataset)
        fail(str(err))
    face_pipeline(args)  # a manifest's wrong face pipeline stops the run before anything is built
    return classes


def set_determinism(args: argparse.Namespace, device: torch.device) -> None:
    """The seed, and cuDNN's and TF32's settings: autotuned kernels unless --deterministic."""
    utils.seed_everything(args.seed)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cudnn.deterministic = args.deterministic
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_pretrained(args: argparse.Namespace, model_name: str) -> str | None:
    """--pretrained auto: ImageNet weights where they exist (timm models: timm's), else none."""
    if args.pretrained != "auto":
        return None if args.pretrained == "none" else args.pretrained
    if model_name.startswith("timm:"):
        return "in22k" if args.in_22k else "timm"
    size = models.model_meta(model_name).get("size")
    tag = "in22k" if args.in_22k or size == "xlarge" else "in1k"  # xlarge exists only as 22k
    if (size, tag) in models.weights.PRETRAINED_URLS:
        return tag
    return None


def freeze_unused_attention(model: nn.Module) -> None:
    """EmoNeXt's attended output is unused (as in the official code), so `attention.value` never
    gets a gradient and AdamW never changes it; freezing it says so and lets DDP run without
    find_unused_parameters."""
    if getattr(model, "has_attention", False):
        model.attention.value.requires_grad_(False)


def build_model(
    args: argparse.Namespace, num_classes: int, device: torch.device, load_weights: bool = True
) -> tuple[nn.Module, str | None, bool]:
    """(model on `device`, the name of its pretrained weights, whether it is channels-last).

    Without `load_weights` (a resumed run, whose checkpoint has the weights) nothing is
    downloaded or read. --checkpoint's weights are loaded here; the frozen attention.value,
    channels-last and gradient checkpointing are set.
    """
    overrides = {}
    if args.model.startswith(("emonext_", "convnext_")):
        overrides["drop_path_rate"] = args.drop_path
        if args.input_size:
            overrides["img_size"] = args.input_size
        if args.no_stn:
            overrides["stn"] = False
        if args.no_se:
            overrides["se"] = False
    pretrained = resolve_pretrained(args, args.model)
    try:
        model = models.create_model(
            args.model,
            num_classes=num_classes,
            pretrained=pretrained if load_weights else None,
            **overrides,
        )
        if args.checkpoint and load_weights:
            models.load_checkpoint(model, args.checkpoint, weights="auto")
    except models.WeightsError as err:
        fail(str(err))
    freeze_unused_attention(model)
    model.to(device)
    # None: the device decides (faster on CUDA, slower on CPUs); the run keeps "auto" on resume
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            fail(f"{model.model_name} has no --grad-checkpointing support")
        model.set_grad_checkpointing(True)
    return model, pretrained, channels_last


def label_mode(args: argparse.Namespace) -> str:
    """The dataset's FER+ training mode (`datasets.label_mode`): majority, or with a
    soft_labels.csv its manifest's probability, crossentropy or multi_target."""
    try:
        return datasets.label_mode(args.dataset_path)
    except datasets.DatasetError as err:
        fail(str(err))


def face_pipeline(args: argparse.Namespace) -> dict | None:
    """The face pipeline that framed the dataset's faces (its manifest's `faces`, written by
    download_dataset.py --faces), checked, for every checkpoint to record; None without one."""
    manifest = datasets.read_manifest(args.dataset_path) or {}
    if manifest.get("faces") is None:
        return None
    where = os.path.join(args.dataset_path, "manifest.json")
    return models.schema.check_face_pipeline(manifest["faces"], where)


def dataset_fields(args: argparse.Namespace) -> dict:
    """What every checkpoint records of its dataset besides the classes: the FER+ `label_mode`
    and, for a dataset of download_dataset.py --faces, the face pipeline (`faces`)."""
    fields = {"label_mode": label_mode(args)}
    faces = face_pipeline(args)
    if faces is not None:
        fields["faces"] = faces
    return fields


def build_loaders(
    args: argparse.Namespace, data_config: dict, device: torch.device, rank: int, world_size: int
) -> dict[str, datasets.Loader]:
    """train (augmented, sharded across ranks; its targets by the dataset's `label_mode`), val
    (centre crop) and test (TenCrop) loaders."""
    augment = {"hflip": args.hflip, "vflip": args.vflip, "rotation": args.rotation}
    augment |= {k: getattr(args, k) for k in AUGMENT_RECIPE}
    batch_sizes = {"train": args.batch_size, "val": args.val_batch_size}
    mixup_on = datasets.mixup_active(args.mixup, args.cutmix, args.cutmix_minmax)
    targets = datasets.LABEL_TARGETS[label_mode(args)]
    if mixup_on and targets == "soft":  # timm's Mixup mixes one-hot labels, not distributions
        raise utils.CLIError(
            f"--mixup/--cutmix: {args.dataset_path} trains on FER+'s {label_mode(args)} targets; "
            "Mixup and CutMix take one label an image (FER+'s majority or probability mode)"
        )
    try:
        return {
            split: datasets.build_loader(
                args.dataset_path,
                split,
                mode=split,
                pipeline=args.data_pipeline,
                # TenCrop: each test image is 10 views, so a tenth of the validation batch
                batch_size=batch_sizes.get(split, max(1, args.val_batch_size // 10)),
                data_config=datasets.DataConfig.from_dict(data_config),
                device=device,
                num_workers=args.num_workers,
                seed=args.seed,
                rank=rank,
                world_size=world_size,
                skip_bad_images=args.skip_bad_images,
                augment=augment if split == "train" else None,
                sampler=args.sampler if split == "train" else "shuffle",
                # timm's Mixup pairs image i with image B - 1 - i: whole batches (as ConvNeXt)
                drop_last=split == "train" and mixup_on,
                targets=targets if split == "train" else "label",
            )
            for split in datasets.SPLITS
        }
    except datasets.DatasetError as err:
        fail(str(err))


def check_data(
    args: argparse.Namespace, loaders: dict, resume_ckpt: dict | None, master: bool, log
) -> tuple[dict, dict, dict]:
    """(images per split, skipped unreadable images per split, the splits' overlap): a resumed
    run must find its own data; skipped images and evaluation images that also occur in
    training (they inflate every reported figure) are said."""
    data_sizes = {split: x.dataset_size for split, x in loaders.items()}
    if resume_ckpt is not None and resume_ckpt.get("data_sizes", data_sizes) != data_sizes:
        fail(
            f"the dataset at {args.dataset_path} is not the run's: it has {data_sizes} images, "
            f"the run had {resume_ckpt['data_sizes']}; give the run's data with --dataset-path"
        )
    mode = label_mode(args)
    if resume_ckpt is not None and resume_ckpt.get("label_mode", "majority") != mode:
        fail(
            f"the dataset at {args.dataset_path} trains in FER+ mode {mode}, the run in "
            f"{resume_ckpt['label_mode']}; give the run's data with --dataset-path"
        )
    skipped = {split: x.split.skipped_paths for split, x in loaders.items()}
    for split, paths in skipped.items():
        if paths:
            more = f" and {len(paths) - 3} more (all in results.json)" if len(paths) > 3 else ""
            log(f"skipped {len(paths)} unreadable {split} images: {', '.join(paths[:3])}{more}")
    overlap, warning = {}, ""
    if master:
        evaluation = {"val": loaders["val"].split, "test": loaders["test"].split}
        overlap, warning = datasets.split_overlap(
            loaders["train"].split, evaluation, args.dataset_path
        )
    if warning:
        log(warning)
    return data_sizes, skipped, overlap


@dataclasses.dataclass
class Training:
    """What the loop updates: the model (saved), the module it calls (DDP and/or compiled around
    the model), the EMA, the optimiser and its schedule, the precision settings, and the
    recipe's optional pieces (Mixup/CutMix, the distillation teacher)."""

    model: nn.Module
    train_model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    channels_last: bool
    mixup: datasets.BatchMixup | None = None
    distillation: losses.Distillation | None = None


def build_criterion(args: argparse.Namespace, class_counts: torch.Tensor) -> EmoNeXtLoss:
    """The EmoNeXt loss with --loss-weighting and --logit-adjustment, from the training split's
    images per class (folders: FER+'s soft modes count an image in its most-voted class), and
    FER+'s multi_target loss when the dataset's `label_mode` asks for it."""
    return EmoNeXtLoss(
        args.label_smoothing,
        args.sa_weight,
        losses.class_weights(class_counts, args.loss_weighting, args.effective_number_beta),
        losses.logit_adjustment(class_counts, args.logit_adjustment),
        multi_target=label_mode(args) == "multi_target",
        mixed_targets=datasets.mixup_active(args.mixup, args.cutmix, args.cutmix_minmax),
    )


def optimizer_groups(model: nn.Module, args: argparse.Namespace) -> list:
    """AdamW's parameters: all trainable ones in one group, or with --layer-decay below 1 timm's
    layer-wise groups (`param_groups_layer_decay` over the model's `group_matcher`), each group's
    lr set to --lr times its scale (the schedule then scales every group alike). Weight decay
    stays on every parameter, as without layer decay (timm's default would exempt 1-D ones)."""
    if args.layer_decay == 1.0:
        return [p for p in model.parameters() if p.requires_grad]
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(
        model, args.weight_decay, layer_decay=args.layer_decay, weight_decay_exclude_1d=False
    )
    for group in groups:
        group["lr"] = args.lr * group["lr_scale"]
    return groups


def build_mixup(args: argparse.Namespace, num_classes: int, rank: int):
    """timm's Mixup/CutMix with the run's flags and its own generator (None when off)."""
    if not datasets.mixup_active(args.mixup, args.cutmix, args.cutmix_minmax):
        return None
    return datasets.BatchMixup(
        num_classes,
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.label_smoothing,
        off_epoch=args.mixup_off_epoch,
        seed=args.seed,
        rank=rank,
    )


def build_distillation(
    args: argparse.Namespace, student: nn.Module, classes: list[str], device: torch.device
) -> losses.Distillation | None:
    """The --kd-model-name teacher on `device`, in eval mode, with timm's loss weights (None
    without a teacher). Its classes and input (size, normalisation) must be the student's."""
    path = args.kd_model_name
    if not path:
        return None
    try:
        teacher, teacher_classes, teacher_config, _ = models.load_trained_model(path)
    except models.WeightsError as err:
        fail(f"--kd-model-name {path}: {err}")
    if list(teacher_classes) != list(classes):
        fail(
            f"--kd-model-name {path}: the teacher's classes {teacher_classes} are not the "
            f"dataset's {classes}; give a teacher trained on the same classes"
        )
    keys = ("image_size", "in_chans", "mean", "std")
    want = {k: student.data_config.get(k) for k in keys}
    have = {k: teacher_config.get(k) for k in keys}
    if have != want:
        fail(f"--kd-model-name {path}: the teacher expects input {have}, the student {want}")
    teacher.to(device)
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    task_weight, distill_weight = losses.distillation_weights(
        args.distill_loss_weight, args.task_loss_weight
    )
    return losses.Distillation(teacher, args.kd_temperature, task_weight, distill_weight)


def build_training(
    args: argparse.Namespace,
    model: nn.Module,
    device: torch.device,
    channels_last: bool,
    class_counts: torch.Tensor,
    classes: list[str] | None = None,
    rank: int = 0,
) -> Training:
    """AdamW over the trainable parameters (fused on CUDA; `optimizer_groups`), the warm-restart
    schedule, the EMA, the loss (`build_criterion`; `class_counts`: the training images per
    class), AMP, the DDP and --compile wrappers, Mixup/CutMix and the distillation teacher."""
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, args),
        lr=args.lr,
        weight_decay=args.weight_decay,
        fused=device.type == "cuda",
    )
    amp_dtype, scaler = engine.amp_settings(args.amp, device, args.official_quirks)
    train_model = model
    if utils.is_distributed():
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        train_model = engine.CompileTrainingBatches(train_model, args.batch_size)
    return Training(
        model=model,
        train_model=train_model,
        ema=EMA(model, beta=args.ema_beta, update_every=args.ema_update_every),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, args),
        scaler=scaler,
        criterion=build_criterion(args, class_counts),
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        mixup=build_mixup(args, len(class_counts), rank),
        distillation=build_distillation(args, model, classes or [], device),
    )


# --------------------------------------------------------------------------- run state


@dataclasses.dataclass
class TrainState:
    """Where a run stands: saved in every checkpoint, restored on resume, advanced by
    `end_epoch` once per epoch. `epoch` is the last finished epoch, `saved_epoch` the one that
    last.pt holds (None: none yet)."""

    epoch: int = -1
    step: int = 0
    best_accuracy: float = -1.0
    bad_epochs: int = 0
    train_seconds: float = 0.0
    saved_epoch: int | None = None
    wandb_id: str | None = None

    def state_dict(self) -> dict:
        """The checkpoint's entries (the keys of every last.pt this trainer wrote)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_accuracy": self.best_accuracy,
            "bad_epochs": self.bad_epochs,
            "train_seconds": self.train_seconds,
            "wandb_id": self.wandb_id,
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.epoch = self.saved_epoch = ckpt["epoch"]
        self.step, self.best_accuracy = ckpt["step"], ckpt["best_accuracy"]
        self.bad_epochs, self.train_seconds = ckpt["bad_epochs"], ckpt["train_seconds"]
        self.wandb_id = ckpt.get("wandb_id")

    def end_epoch(self, epoch: int, val_accuracy: float, seconds: float) -> bool:
        """Count `epoch` as finished; whether its validation accuracy is the best so far."""
        improved = val_accuracy > self.best_accuracy
        self.epoch = epoch
        self.best_accuracy = max(self.best_accuracy, val_accuracy)
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        self.train_seconds += seconds
        return improved


def check_teacher(distillation: losses.Distillation | None, ckpt: dict, path: str) -> None:
    """A resumed run is taught by the teacher it started with: the SHA-256 of its weights as
    last.pt records it (runs from before it was recorded are not checked)."""
    recorded = ckpt.get("kd_teacher_sha256")
    if distillation is None or recorded is None:
        return
    if not isinstance(recorded, str):
        raise utils.CLIError(f"{path}: kd_teacher_sha256 {recorded!r} is not a SHA-256")
    if recorded != distillation.teacher_sha256:
        teacher = ckpt["args"]["kd_model_name"]
        raise utils.CLIError(
            f"--kd-model-name {teacher}: the teacher's weights changed since the run {path} "
            f"started (SHA-256 {recorded[:12]}..., now {distillation.teacher_sha256[:12]}...); "
            "put back the teacher the run was taught by, or start a new run"
        )


def restore(
    training: Training, state: TrainState, ckpt: dict, path: str, device: torch.device
) -> None:
    """A resumed run exactly where last.pt left it: weights, EMA, optimiser, schedule, scaler,
    run state and this rank's random generators."""
    try:
        training.model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        fail(
            f"{path}: its weights do not fit the model its arguments describe "
            f"({str(err).splitlines()[0]})"
        )
    training.ema.load_state_dict(ckpt["ema"])
    training.optimizer.load_state_dict(ckpt["optimizer"])
    training.scheduler.load_state_dict(ckpt["scheduler"])
    if training.scaler is not None and ckpt.get("scaler"):
        training.scaler.load_state_dict(ckpt["scaler"])
    check_teacher(training.distillation, ckpt, path)
    state.load_state_dict(ckpt)
    rank = dist.get_rank() if utils.is_distributed() else 0
    utils.set_rng_state(ckpt["rng"][rank], device)


def make_checkpoint(
    training: Training, state: TrainState, run_info: dict, device: torch.device
) -> dict:
    """Everything a resume needs (weights, EMA, optimiser, schedule, scaler, run state, every
    rank's random generators) and everything a reader of the file needs (`run_info`: the
    arguments, the model's name, classes and preprocessing, versions). Collective under DDP:
    every rank calls it."""
    scaler = training.scaler
    if training.distillation is not None:  # the teacher's fingerprint (`check_teacher`)
        run_info = {**run_info, "kd_teacher_sha256": training.distillation.teacher_sha256}
    return {
        "model": training.model.state_dict(),
        "ema": training.ema.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        **state.state_dict(),
        "rng": utils.all_gather(utils.rng_state(device)),
        **run_info,
    }


class RunClock:
    """This process's wall time in the parts results.json's `process_seconds` reports (a resumed
    run's from its resume), for benchmark.py: what a run costs besides its epochs' own seconds."""

    def __init__(self):
        self.started = time.time()
        self.loop_started = self.loop_ended = self.started
        self.epochs = 0.0  # the epochs' own seconds: training and validation
        self.after_first_epoch: float | None = None  # checkpoint, figure, log after the first

    def start_loop(self) -> None:
        self.loop_started = time.time()

    def end_epoch(self, epoch_started: float, epoch_seconds: float) -> None:
        self.epochs += epoch_seconds
        if self.after_first_epoch is None:  # with one-time costs (matplotlib's import)
            self.after_first_epoch = time.time() - epoch_started - epoch_seconds

    def end_loop(self) -> None:
        self.loop_ended = time.time()

    def process_seconds(self) -> dict:
        after_first = self.after_first_epoch or 0.0  # None: no epoch finished
        loop = self.loop_ended - self.loop_started
        return {
            "setup": self.loop_started - self.started,
            "epochs": self.epochs,
            "after_first_epoch": after_first,
            "between_epochs": loop - self.epochs - after_first,
            "test": time.time() - self.loop_ended,
        }


def drop_unsaved_metrics(path: Path, saved_epoch: int, log) -> None:
    """Remove metrics.jsonl lines of epochs after `saved_epoch` (-1: all), left by a kill
    between the metrics line and last.pt: the run trains those epochs again and writes them."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["epoch"] <= saved_epoch]
    if len(kept) < len(lines):
        utils.write_text_atomic(path, "".join(kept))
        log(
            f"{path}: dropped {len(lines) - len(kept)} line(s) of epochs that last.pt does not hold"
        )


def stn_examples(val_loader: datasets.Loader) -> tuple[torch.Tensor, list[str]]:
    """The first validation image of each class (in folder order: the same faces every epoch
    and every run), as validation shows them, and their class names."""
    targets = val_loader.split.targets.tolist()
    first = [targets.index(c) for c in sorted(set(targets))]
    return val_loader.examples(first), [val_loader.classes[targets[i]] for i in first]


# --------------------------------------------------------------------------- one epoch's outputs


def epoch_record(
    epoch: int, state: TrainState, stats: dict, val: dict, lr: float, seconds: float
) -> dict:
    """The epoch's line of metrics.jsonl."""
    return {
        "epoch": epoch,
        "step": state.step,
        "lr": lr,
        "train_loss": stats["loss"],
        "train_ce": stats["ce"],
        "train_sa": stats["sa"],
        "train_accuracy": stats["accuracy"],
        "val_accuracy": val["accuracy"],
        "val_macro_f1": val["macro_f1"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "best_val_accuracy": state.best_accuracy,
        "nonfinite_steps": stats["nonfinite"],
        "images_per_s": stats["images_per_s"],
        "seconds": seconds,
    }


def write_config(run_dir: Path, ckpt: dict) -> None:
    """RUN/config.yaml: every argument of the run as -c reads it, so that
    `python train.py -c RUN/config.yaml --run-name NEW` trains it again. Written with each epoch,
    as last.pt records them (a resumed run's new --epochs included). -c and --resume are left
    out: they say where the values came from, not what the run is."""
    import yaml

    values = {k: v for k, v in ckpt["args"].items() if k not in ("config", "resume")}
    header = (
        f"# The arguments of the run in this folder (train.py, commit {ckpt['git_commit']}).\n"
        "# python train.py -c THIS_FILE --run-name NEW trains it again; flags override it.\n"
    )
    utils.write_text_atomic(
        run_dir / "config.yaml", header + yaml.safe_dump(values, sort_keys=False)
    )


def best_epochs(metrics: Path, keep: int) -> set[int]:
    """The `keep` epochs of metrics.jsonl with the highest validation accuracy (the earlier
    epoch first on a tie, as best.pt): those whose checkpoints --keep-checkpoints keeps."""
    if keep == 0:
        return set()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    ranked = sorted(records, key=lambda r: (-r["val_accuracy"], r["epoch"]))
    return {r["epoch"] for r in ranked[:keep]}


def write_epoch(
    run_dir: Path,
    writer: utils.CheckpointWriter,
    ckpt: dict,
    record: dict,
    improved: bool,
    stn: tuple | None,
    model: nn.Module,
    wandb_run,
    keep: int = 0,
) -> None:
    """Rank 0's outputs of a finished epoch: its metrics line, last.pt (and best.pt, and with
    `keep` (--keep-checkpoints) the `keep` best epochs' checkpoint-EPOCH.pt), the STN figure,
    the log line and wandb.

    This order keeps every state that a kill can leave resumable from last.pt: metrics of an
    epoch that last.pt does not hold are dropped on resume, and a best.pt ahead of last.pt is
    written again when that epoch is trained again. The checkpoint is written in the background
    while the next epoch trains (utils.CheckpointWriter); the previous epoch's is on disk before
    this epoch's metrics line (a wait that is over long before), so a kill leaves at most one
    epoch that last.pt does not hold.
    """
    # Made now, not at the start: a run that ends before its first epoch leaves nothing.
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, ckpt)
    writer.wait()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    epoch = record["epoch"]
    kept = best_epochs(run_dir / "metrics.jsonl", keep)
    copies = [run_dir / f"checkpoint-{epoch}.pt"] if epoch in kept else []
    if improved:  # then last.pt: the same bytes, linked rather than written twice
        writer.save(ckpt, run_dir / "best.pt", link=[run_dir / "last.pt", *copies])
    else:
        writer.save(ckpt, run_dir / "last.pt", link=copies)
    for path in run_dir.glob("checkpoint-*.pt"):  # epochs no longer among the best `keep`
        if path.stem.removeprefix("checkpoint-") not in {str(e) for e in kept}:
            path.unlink()
    stn_path = run_dir / f"stn_epoch_{epoch:03d}.png"
    if stn is not None:
        utils.save_stn_grid(model, *stn, stn_path, f"epoch {epoch}")
    print(
        f"epoch {epoch}: loss {record['train_loss']:.4f} train {record['train_accuracy']:.2f} % "
        f"val {record['val_accuracy']:.2f} % (best {record['best_val_accuracy']:.2f} %) "
        f"{record['images_per_s']:.0f} img/s"
    )
    if wandb_run is not None:
        import wandb

        log_items = {k: v for k, v in record.items() if k != "epoch"}
        if stn is not None:
            log_items["stn"] = wandb.Image(str(stn_path))
        wandb_run.log(log_items, step=epoch)


def exit_interrupted(
    signum: int, requeued: bool, state: TrainState, run_dir: Path, world_size: int, log
) -> None:
    """Say where the run stands and how to continue it (`requeued`: the job requeues itself),
    then exit with 128 + the signal."""
    saved_epoch = epoch_on_disk(run_dir / "last.pt")  # a second signal may stop a write midway
    if requeued:
        log(
            f"interrupted: the job requeues itself and resumes from {run_dir / 'last.pt'} (epoch "
            f"{saved_epoch}, the last finished one)"
            if saved_epoch is not None
            else f"interrupted in epoch {state.epoch + 1}, before any epoch finished: the job "
            "requeues itself and starts over"
        )
    elif saved_epoch is None:
        log(
            f"interrupted in epoch {state.epoch + 1}, before any epoch finished: no checkpoint "
            "was saved. Run the same command again to start over."
        )
    else:
        log(
            f"interrupted: {run_dir / 'last.pt'} holds epoch {saved_epoch}, the last "
            f"finished one; continue with `{resume_command(run_dir / 'last.pt', world_size)}`"
        )
    raise SystemExit(128 + signum)


def testing_exit_message(state: TrainState, run_dir: Path, world_size: int, master: bool) -> str:
    """What a signal during the test prints before it exits."""
    if not master:
        return ""
    if state.saved_epoch is None:  # stopped by non-finite losses in its first epoch
        return "interrupted while testing; no checkpoint was saved"
    return (
        f"interrupted while testing: {run_dir / 'last.pt'} holds epoch {state.saved_epoch}, the "
        f"last one; `{resume_command(run_dir / 'last.pt', world_size)}` tests it again"
    )


# --------------------------------------------------------------------------- test and report


def test_models(
    training: Training, loaders: dict, run_dir: Path, device: torch.device, classes: list[str]
) -> tuple[dict, dict, int | None]:
    """(test metrics of the final EMA weights, the official protocol: TenCrop, logits averaged
    over the crops, with bootstrap intervals; best.pt's online and EMA weights' metrics; best.pt's
    epoch)."""
    test_loader, amp_dtype = loaders["test"], training.amp_dtype
    test = engine.evaluate(
        training.ema.ema_model, test_loader, device, classes, amp_dtype, engine.BOOTSTRAP_RESAMPLES
    )
    best_path = run_dir / "best.pt"
    if utils.is_distributed():
        dist.barrier()
    test_best, best_epoch = {}, None
    if best_path.is_file():
        best = models.read_checkpoint(best_path)  # once: it holds both weights
        best_epoch = best["epoch"]
        model = training.model
        # One model for both: loading replaces every parameter and buffer in place.
        best_model = models.create_model(model.model_name, verbose=False, **model.model_kwargs)
        best_model.to(device)
        if training.channels_last:  # as the EMA model, a copy of the trained one: same kernels
            best_model.to(memory_format=torch.channels_last)
        for weights in ("model", "ema"):
            models.load_checkpoint(best_model, best, weights=weights)
            test_best[weights] = engine.evaluate(
                best_model, test_loader, device, classes, amp_dtype, engine.BOOTSTRAP_RESAMPLES
            )
    return test, test_best, best_epoch


# results.json's figures of the final EMA weights besides accuracy and macro-F1 (engine's keys)
CALIBRATION_AND_BALANCE = [f"{name}{ci}" for name in ("balanced_accuracy", "ece", "nll", "brier")
                           for ci in ("", "_ci95")]  # fmt: skip


def test_and_report(
    training: Training,
    state: TrainState,
    loaders: dict,
    run_dir: Path,
    device: torch.device,
    facts: dict,
    clock: RunClock,
    wandb_run,
) -> dict | None:
    """Test the final EMA weights and best.pt's; rank 0 writes results.json (`facts`: what the
    run knows besides the tests) and the confusion matrix, logs, closes wandb and returns the
    results (None on the other ranks)."""
    classes = loaders["test"].classes
    test, test_best, best_epoch = test_models(training, loaders, run_dir, device, classes)
    weights_sum = torch.stack([p.detach().double().sum() for p in training.model.parameters()])
    checksums = utils.all_gather(float(weights_sum.sum()))
    if utils.is_distributed() and dist.get_rank() != 0:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)  # a run stopped in its first epoch has none
    utils.save_confusion_matrix(
        test,
        run_dir / "confusion_matrix.png",
        f"test, EMA weights, TenCrop: {test['accuracy']:.2f} %",
    )
    best_accuracy = {w: m["accuracy"] for w, m in test_best.items()}
    best_ci95 = {w: m["accuracy_ci95"] for w, m in test_best.items()}
    results = {
        "stop_reason": facts["stop_reason"],
        "test_accuracy": test["accuracy"],
        "test_accuracy_best_online": best_accuracy.get("model"),
        "test_accuracy_best_ema": best_accuracy.get("ema"),
        "test_weights": {
            "test_accuracy": "final EMA weights (last.pt's ema): the official protocol",
            "test_accuracy_best_online": f"best.pt's online weights (epoch {best_epoch})",
            "test_accuracy_best_ema": f"best.pt's EMA weights (epoch {best_epoch})",
        },
        "test_accuracy_ci95": test["accuracy_ci95"],
        "test_accuracy_best_online_ci95": best_ci95.get("model"),
        "test_accuracy_best_ema_ci95": best_ci95.get("ema"),
        "macro_f1": test["macro_f1"],
        "macro_f1_ci95": test["macro_f1_ci95"],
        # of the final EMA weights too; definitions in docs/EVALUATION.md
        **{k: test[k] for k in CALIBRATION_AND_BALANCE},
        "per_class": test["per_class"],
        "confusion_matrix": test["confusion_matrix"],
        "classes": list(classes),
        "best_val_accuracy": state.best_accuracy,
        "best_epoch": best_epoch,
        "steps": state.step,
        "train_seconds": state.train_seconds,
        **facts,
        # This process's wall time, for benchmark.py: what a run costs besides its epochs.
        "process_seconds": clock.process_seconds(),
        # this process's, training and tests; benchmark.py reports it
        "peak_gpu_memory_gb": utils.peak_memory_gb(device),
        "weights_checksum_per_rank": checksums,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    utils.write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    print(engine.format_report(test))
    print(
        f"test accuracy, TenCrop: final EMA weights {test['accuracy']:.2f} % (the official "
        "protocol)"
        + (
            f"; best.pt (epoch {best_epoch}): online weights {best_accuracy['model']:.2f} %, "
            f"EMA weights {best_accuracy['ema']:.2f} %"
            if test_best
            else ""
        )
    )
    if wandb_run is not None:
        finish_wandb(wandb_run, results, run_dir)
    return results


def finish_wandb(wandb_run, results: dict, run_dir: Path) -> None:
    import wandb

    wandb_run.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
    wandb_run.log({"confusion_matrix": wandb.Image(str(run_dir / "confusion_matrix.png"))})
    wandb_run.finish()
    if wandb_run.settings.mode == "offline":
        print(f"wandb: logged offline; upload with `wandb sync {Path(wandb_run.dir).parent}`")


def epoch_on_disk(last: Path) -> int | None:
    """The epoch that `last` holds, read from the file (None: no readable file)."""
    try:
        return torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # missing, or not a checkpoint
        return None


def check_room(folder: Path, room: int) -> None:
    """Room for one checkpoint where the run is written, before any data is decoded."""
    try:
        utils.check_output_dir(folder, "--output-dir", room)
    except utils.CLIError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def write_errors_explained(run_dir: Path, world_size: int) -> Iterator[None]:
    """A full disk, a quota or an I/O error while writing any of the run's files ends the run
    with one line: the file, the room left, the epoch that last.pt still holds and how to go on.
    The temporary file is already gone (each writer removes its own)."""
    try:
        yield
    except OSError as err:
        if err.errno not in utils.WRITE_ERRNOS:
            raise
        fail(f"{utils.write_failure(err)}; {how_to_go_on(run_dir, world_size, 'there is room')}")


@contextlib.contextmanager
def lost_processes_explained(run_dir: Path, world_size: int) -> Iterator[None]:
    """A collective that fails because another process of the run is gone (killed, or its host
    down or cut off for --dist-timeout) ends this one with one line: the backend's reason, where
    last.pt stands and how to go on. Every surviving process says so in its own log."""
    try:
        yield
    except RuntimeError as err:
        reason = utils.lost_peer(err)
        if reason is None:
            raise
        fail(
            f"another process of this {world_size}-process run stopped or cannot be reached "
            f"({reason}); its own log says why. {how_to_go_on(run_dir, world_size, 'all are back')}"
        )


def how_to_go_on(run_dir: Path, world_size: int, once: str) -> str:
    """After a failure: where the run's last.pt stands, and what to run `once` the cause is
    gone."""
    last = run_dir / "last.pt"
    epoch = epoch_on_disk(last)
    if epoch is None:
        return f"no epoch was saved; once {once}, run the same command again"
    command = resume_command(last, world_size)
    return f"{last} still holds epoch {epoch}; once {once}, continue with `{command}`"


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def memory_errors_explained(args: argparse.Namespace, run_dir: Path, world_size: int):
    """Out of memory (the host's or the GPU's) anywhere in the run ends it with one line: the
    sizes, what to lower (--val-batch-size when it ran out evaluating), and where last.pt stands
    with the command that continues it with less memory."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if not utils.is_out_of_memory(err):
            raise
        frames = traceback.extract_tb(err.__traceback__)
        evaluating = any(f.name in ("evaluate", "predict") and f.filename.endswith("engine.py")
                         for f in frames)  # fmt: skip
        sizes = (f"--batch-size {args.batch_size}, --val-batch-size {args.val_batch_size}, "
                 f"--input-size {args.input_size or 'the model default'}")  # fmt: skip
        last = run_dir / "last.pt"
        epoch = epoch_on_disk(last)
        checkpointing = not args.grad_checkpointing and args.model.startswith(
            ("emonext_", "convnext_")
        )
        if evaluating:
            lower = "lower --val-batch-size (evaluation only: the results stay the same)"
            more = f" --val-batch-size {max(1, args.val_batch_size // 4)}"
        else:
            lower = ("lower --batch-size (--gradient-accumulation-steps keeps the batch the "
                     "optimiser sees) or --input-size"
                     + (", or add --grad-checkpointing" if checkpointing else ""))  # fmt: skip
            more = " --grad-checkpointing" if checkpointing else None
        if epoch is None or more is None:
            fail(f"{utils.out_of_memory_message(err)} ({sizes}); {lower}")
        fail(
            f"{utils.out_of_memory_message(err)} ({sizes}); {last} holds epoch {epoch}: continue "
            f"with `{resume_command(last, world_size)}{more}` (less memory, the same results)"
        )


def cap_workers(args: argparse.Namespace, log) -> None:
    """--num-workers no more than the CPUs this process may use, with one line (DataLoader would
    warn for every loader it makes)."""
    try:
        cpus = len(os.sched_getaffinity(0))  # what DataLoader itself compares with
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    if args.num_workers > cpus:
        log(f"--num-workers {args.num_workers}: this process may use {cpus} CPUs; using {cpus}")
        args.num_workers = cpus


def setup_devices(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """utils.setup_distributed, with a --device this machine cannot honour as one line."""
    try:
        return utils.setup_distributed(args.device, args.dist_timeout)
    except utils.DeviceError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def train_epoch(
    training: Training, loader, args: argparse.Namespace, device, epoch: int, progress: bool, stop
) -> dict:
    """engine.train_one_epoch with the run's objects and flags."""
    return engine.train_one_epoch(
        training.train_model,
        training.criterion,
        loader,
        training.optimizer,
        training.scheduler,
        device,
        ema=training.ema,
        scaler=training.scaler,
        amp_dtype=training.amp_dtype,
        accumulation_steps=args.gradient_accumulation_steps,
        clip_grad=args.clip_grad,
        clip_scaled=args.official_quirks,
        channels_last=training.channels_last,
        max_nonfinite=args.max_nonfinite_steps,
        progress=progress,
        desc=f"epoch {epoch}",
        stop=stop,
        mixup=training.mixup,
        distillation=training.distillation,
    )


# Ctrl-C, `kill` and a closed terminal or SSH session (SIGHUP): each stops the run after its step.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def make_run_info(
    args: argparse.Namespace, model, classes: list[str], data_sizes: dict, pretrained
) -> dict:
    """What every checkpoint of the run says besides the training state."""
    return {
        "args": dict(vars(args)),
        "data_sizes": data_sizes,
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "classes": classes,
        **dataset_fields(args),  # label_mode and, from download_dataset.py --faces, faces
        "data_config": model.data_config,
        "pretrained": pretrained,
        "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]},
        "git_commit": utils.git_commit(),
    }


def main(
    args: argparse.Namespace,
    stop_signals: tuple[int, ...] = STOP_SIGNALS,
    requeue_signal: int | None = None,
) -> dict | None:
    """Train and test as `args` (from parse_args) say; the results dict on rank 0. It returns or
    raises only once the last checkpoint is written (in-process callers read it at once), with
    the signal handlers it found restored and the process group destroyed. A signal of
    `stop_signals` stops the loop after its step, on every rank after the same one, and exits
    with 128 + the signal (a SLURM job launched by scripts/submit.py stops on submitit's
    preemption signal instead of SIGTERM, and says that `requeue_signal` requeues the job)."""
    clock = RunClock()
    utils.reset_fault_points()
    rank, world_size, device = setup_devices(args)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    state = TrainState()
    with contextlib.ExitStack() as cleanup:  # undone in reverse order on every way out
        cleanup.enter_context(utils.process_group_destroyed_on_exit())
        # ---- set up: the run's folder, the data, the model and everything that trains it
        if master and not args.resume:  # a failed start leaves no empty --output-dir
            cleanup.enter_context(utils.made_folders_removed_if_empty(args.output_dir))
        run_dir, resume_ckpt, lock = open_run(args, world_size, master)
        if lock is not None:
            cleanup.callback(lock.release)  # after the last write
        utils.fault_point("setup")  # the reliability tests' Ctrl-C before the loop
        cleanup.enter_context(write_errors_explained(run_dir, world_size))
        cleanup.enter_context(lost_processes_explained(run_dir, world_size))
        cleanup.enter_context(memory_errors_explained(args, run_dir, world_size))
        writer = cleanup.enter_context(utils.CheckpointWriter())
        classes = prepare_dataset(args, master, log)
        cap_workers(args, log)
        set_determinism(args, device)
        model, pretrained, channels_last = build_model(
            args, len(classes), device, load_weights=resume_ckpt is None
        )
        if master:  # weights, EMA and AdamW's two moments, before any data is decoded
            room = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
            check_room(run_dir.parent, room + 2**20 * 16)
        if args.checkpoint and resume_ckpt is None:
            log(f"initialised from {args.checkpoint}")
        loaders = build_loaders(args, model.data_config, device, rank, world_size)
        data_sizes, skipped, overlap = check_data(args, loaders, resume_ckpt, master, log)
        class_counts = torch.bincount(loaders["train"].split.targets, minlength=len(classes))
        training = build_training(args, model, device, channels_last, class_counts, classes, rank)
        run_info = make_run_info(args, model, classes, data_sizes, pretrained)

        # ---- restore: a resumed run goes on exactly where its last.pt left it
        if resume_ckpt is not None:
            restore(training, state, resume_ckpt, args.resume, device)
            log(f"resumed from {args.resume} at epoch {state.epoch + 1}")
        wandb_run = None
        if master:
            drop_unsaved_metrics(run_dir / "metrics.jsonl", state.epoch, log)
            log(
                f"run folder {run_dir}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} "
                f"M parameters; {data_sizes['train']} train images, device {device}, "
                f"{world_size} process(es), amp {training.amp_dtype}"
            )
            wandb_run = utils.init_wandb(args.wandb, run_dir, state.wandb_id, dict(vars(args)))
            state.wandb_id = wandb_run.id if wandb_run is not None else None
        stn = None
        if master and getattr(model, "has_stn", False):
            stn = stn_examples(loaders["val"])  # one face of each class

        # ---- loop: train, validate, save; until the epochs, patience, bad losses or a signal
        with utils.Interrupted(stop_signals) as interrupted:
            stop = utils.StopVote(interrupted, device)  # every rank stops after the same step
            stop_reason = "epochs"
            epochs = range(state.epoch + 1, args.epochs)
            if state.bad_epochs >= args.patience:  # a resumed run that stopped early stays so
                stop_reason, epochs = "early_stopping", range(0)
            epoch = state.epoch
            clock.start_loop()
            try:
                for epoch in epochs:
                    loaders["train"].set_epoch(epoch)
                    if training.mixup is not None:  # its draws and its off-epoch
                        training.mixup.set_epoch(epoch)
                    started = time.time()
                    # bars only for a person watching: a log file would fill with them
                    progress = master and not args.no_progress and utils.is_terminal()
                    stats = train_epoch(training, loaders["train"], args, device, epoch, progress,
                                        stop)  # fmt: skip
                    state.step += stats["steps"]
                    if stats["stopped"]:
                        stop_reason = stats["stopped"]
                        if stop_reason == "nonfinite":
                            log(
                                f"stopping: {args.max_nonfinite_steps} consecutive steps had a "
                                "non-finite loss. Try a lower --lr, --clip-grad, or --amp off (or "
                                "bf16 instead of fp16)."
                            )
                        break
                    # rank 0's BatchNorm statistics, as last.pt saves them
                    utils.sync_buffers(model)
                    utils.sync_buffers(training.ema.ema_model)
                    val = engine.evaluate(
                        training.train_model, loaders["val"], device, classes, training.amp_dtype
                    )
                    improved = state.end_epoch(epoch, val["accuracy"], time.time() - started)
                    lr = max(g["lr"] for g in training.optimizer.param_groups)  # the head's
                    record = epoch_record(epoch, state, stats, val, lr, time.time() - started)
                    ckpt = make_checkpoint(training, state, run_info, device)  # collective in DDP
                    if master:
                        write_epoch(run_dir, writer, ckpt, record, improved, stn, model, wandb_run,
                                    args.keep_checkpoints)  # fmt: skip
                    del ckpt
                    state.saved_epoch = epoch  # once the writer is done
                    clock.end_epoch(started, record["seconds"])
                    if state.bad_epochs >= args.patience:
                        stop_reason = "early_stopping"
                        patience = args.patience
                        log(f"early stopping: no better validation accuracy for {patience} epochs")
                        break
                    if stop.now():  # a signal during validation or the save, on any rank
                        stop_reason = "interrupted"
                        break
            except KeyboardInterrupt:  # a second signal: stop now, in the middle of a step
                stop_reason = "interrupted"
            # The last checkpoint's write, waited for once per run, counts with the test.
            clock.end_loop()
            writer.wait()  # last.pt and best.pt hold state.saved_epoch from here on
            if stop_reason == "interrupted":
                signum = stop.signum or interrupted.signum
                requeued = signum == requeue_signal
                exit_interrupted(signum, requeued, state, run_dir, world_size, log)

            # ---- test and report: a signal from here on exits at once, with its message
            interrupted.exit_message = testing_exit_message(state, run_dir, world_size, master)
            facts = {
                "stop_reason": stop_reason,
                "split_overlap": overlap,
                "epochs_run": epoch + 1,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "num_gpus": world_size if device.type == "cuda" else 0,
                "world_size": world_size,
                "model": model.model_name,
                "skipped_images_count": sum(len(paths) for paths in skipped.values()),
                "skipped_images": skipped,
                "git_commit": run_info["git_commit"],
                "recipe": {k: getattr(args, k) for k in RECIPE_FLAGS},
                "augmentation": {k: getattr(args, k) for k in AUGMENT_RECIPE},
            }
            return test_and_report(
                training, state, loaders, run_dir, device, facts, clock, wandb_run
            )


if __name__ == "__main__":
    try:
        utils.run_command("train.py", main, parse_args())
    except KeyboardInterrupt:  # Ctrl-C before the loop (decoding the data, building the model)
        print("train.py: interrupted while setting up; nothing was trained", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
