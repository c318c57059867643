"""Train EmoNeXt (or a baseline) on FER2013: the official recipe without its defects.

    python train.py --dataset-path FER2013 --model-size tiny --amp --in_22k
    torchrun --nproc_per_node=4 train.py ...   # DistributedDataParallel, batch size per process
    python train.py --demo                      # synthetic faces, small model, CPU, minutes

docs/RECIPE.md describes the recipe and the official trainer's defects fixed here. Outputs go to
`--output-dir/<run-name>/`: best.pt, last.pt, metrics.jsonl, stn_epoch_NNN.png,
confusion_matrix.png and results.json. `--resume RUN/last.pt` continues a run with the arguments
it was started with; docs/RELIABILITY.md lists what may change on resume.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import datasets
import engine
import models
from ema import EMA
from losses import EmoNeXtLoss

DEMO_DATA = "data/synthetic"


def get_args_parser() -> argparse.ArgumentParser:
    p = engine.ArgumentParser(prog="train.py", description=__doc__)
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
        "--input-size",
        type=int,
        default=None,
        help="input side in pixels (default: the model's, 224 for EmoNeXt)",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model-size",
        default="tiny",
        choices=[
            "tiny",
            "small",
            "base",
            "large",
            "xlarge",
            "atto",
            "femto",
            "pico",
            "nano",
            "micro",
        ],
        help="EmoNeXt size, i.e. --model emonext_SIZE",
    )
    g.add_argument(
        "--model",
        default=None,
        help="any create_model name (emonext_tiny, convnext_base, resemotenet, "
        "timm:NAME, ...); overrides --model-size",
    )
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
    g.add_argument("--label-smoothing", type=float, default=0.2, help="cross-entropy smoothing")
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

    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--val-batch-size",
        type=int,
        default=256,
        help="validation/test batch size (the official code used 1)",
    )

    g = p.add_argument_group("run")
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
    g.add_argument("--seed", type=int, default=2001, help="random seed (the official one)")
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic cuDNN kernels (slower); otherwise cudnn.benchmark",
    )
    g.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: a GPU if there is one; cuda:LOCAL_RANK under torchrun)",
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
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument(
        "--demo",
        action="store_true",
        help="train a small EmoNeXt on synthetic faces on the CPU in a few minutes "
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
        "model": "emonext_atto",
        "pretrained": "none",
        "input_size": 48,  # the faces' own size: no upsampling, fast on a CPU
        "epochs": 30,
        "batch_size": 64,
        "warmup_steps": 32,
        "cycle_steps": 2048,  # one cosine over the whole demo (about 1,300 steps)
        "ema_update_every": 1,  # a short run: average over the last ~100 steps, not ~1,600
        "vflip": 0.0,  # upside-down cartoon faces turn smiles into frowns
        "rotation": 0.0,  # the synthetic faces come with their own random pose
        "device": "cpu",
        "wandb": "disabled",
    }
    if "model_size" in explicit:
        del demo["model"]
    for key, value in demo.items():
        if key not in explicit:
            setattr(args, key, value)


def model_name(args: argparse.Namespace) -> str:
    return args.model or f"emonext_{args.model_size}"


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
    "sa_weight": ("at least 0", lambda v: v >= 0),
    "ema_beta": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "ema_update_every": ("at least 1", lambda v: v >= 1),
    "patience": ("at least 1", lambda v: v >= 1),
    "max_nonfinite_steps": ("at least 1", lambda v: v >= 1),
    "drop_path": ("in [0, 1)", lambda v: 0 <= v < 1),
    "hflip": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "vflip": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "rotation": ("in [0, 180] degrees", lambda v: 0 <= v <= 180),
    "input_size": ("at least 1", lambda v: v >= 1),
    "num_workers": ("at least 0", lambda v: v >= 0),
}

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
    "deterministic",
    "compile",
    "channels_last",
    "grad_checkpointing",
    "no_progress",
    "wandb",
}


def check_args(parser: engine.ArgumentParser, args: argparse.Namespace) -> None:
    """Every value in range and every combination possible, or one line and exit status 2."""
    parser.check(args, ARG_RULES)
    if args.warmup_steps >= args.cycle_steps:
        parser.error(
            f"--warmup-steps {args.warmup_steps}: must be less than --cycle-steps "
            f"{args.cycle_steps} (the warm-up is the start of each cycle)"
        )
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr}: must not exceed --lr {args.lr}")
    name = model_name(args)
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
    if args.checkpoint and "://" not in args.checkpoint and not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    run_dir = Path(args.output_dir) / (args.run_name or "")
    if not args.resume and args.run_name and (run_dir / "last.pt").exists():
        parser.error(
            f"--run-name {args.run_name}: {run_dir} already holds a run; continue it with "
            f"`{resume_command(run_dir / 'last.pt')}` or choose another --run-name"
        )


def peek_checkpoint(parser: engine.ArgumentParser, path: str | Path) -> dict:
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


def describe(flag: str, value) -> str:
    if value is True:
        return flag
    if value is False or value is None:
        return f"no {flag}"
    return f"{flag} {value}"


def resume_args(
    parser: engine.ArgumentParser, args: argparse.Namespace, explicit: set[str]
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
        (describe(parser.flag(d), getattr(args, d)), describe(parser.flag(d), merged[d]))
        for d in sorted(explicit - RESUMABLE - {"resume", "model", "model_size"})
        if getattr(args, d) != merged[d]
    ]
    if explicit & {"model", "model_size"} and model_name(args) != model_name(run):
        given = (
            f"--model {args.model}" if "model" in explicit else f"--model-size {args.model_size}"
        )
        changed.insert(0, (given, f"model {model_name(run)}"))
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
    """The command line (sys.argv when None) as main's arguments: --demo's and a resumed run's
    values filled in, everything checked."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    explicit = parser.explicit(argv)
    parser.check(args, ARG_RULES)  # the values given, before a resumed run's replace them
    if args.resume:
        args = resume_args(parser, args, explicit)
    elif args.demo:
        apply_demo_defaults(args, explicit)
    check_args(parser, args)
    return args


def resume_command(last: str | Path, world_size: int = 1) -> str:
    """The command that continues the run of `last`, as typed in the current folder."""
    python = os.path.basename(sys.executable)
    launcher = [python if shutil.which(python) else sys.executable]
    if world_size > 1:
        launcher = ["torchrun", f"--nproc_per_node={world_size}"]
    script = os.path.relpath(Path(__file__).resolve())
    return shlex.join([*launcher, script, "--resume", str(last)])


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


# --------------------------------------------------------------------------- helpers


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Rank, world size and device, from torchrun's environment (one process when absent).

    Each process uses cuda:LOCAL_RANK on a GPU machine (engine.resolve_device); a --device the
    machine cannot honour is a one-line error.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        device = engine.resolve_device(args.device, local_rank)
    except engine.DeviceError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:  # started by torchrun: DDP, even for one process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    state = {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":  # this process's GPU only: under DDP each rank saves its own
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if device.type == "cuda" and isinstance(cuda_state, torch.Tensor):
        torch.cuda.set_rng_state(cuda_state, device)


def drop_unsaved_metrics(path: Path, saved_epoch: int, log) -> None:
    """Remove metrics.jsonl lines of epochs after `saved_epoch` (-1: all), left by a kill
    between the metrics line and last.pt: the run trains those epochs again and writes them."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["epoch"] <= saved_epoch]
    if len(kept) < len(lines):
        engine.write_text_atomic(path, "".join(kept))
        log(
            f"{path}: dropped {len(lines) - len(kept)} line(s) of epochs that last.pt does not hold"
        )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def build_model(args: argparse.Namespace, num_classes: int, load_weights: bool = True):
    """(model, the name of its pretrained weights); without load_weights (a resumed run, whose
    checkpoint has the weights) nothing is downloaded or read."""
    name = model_name(args)
    overrides = {}
    if name.startswith(("emonext_", "convnext_")):
        overrides["drop_path_rate"] = args.drop_path
        if args.input_size:
            overrides["img_size"] = args.input_size
        if args.no_stn:
            overrides["stn"] = False
        if args.no_se:
            overrides["se"] = False
    pretrained = resolve_pretrained(args, name)
    model = models.create_model(
        name, num_classes=num_classes, pretrained=pretrained if load_weights else None, **overrides
    )
    return model, pretrained


def stn_examples(val_loader: datasets.Loader) -> tuple[torch.Tensor, list[str]]:
    """The first validation image of each class (in folder order: the same faces every epoch
    and every run), as validation shows them, and their class names."""
    targets = val_loader.split.targets.tolist()
    first = [targets.index(c) for c in sorted(set(targets))]
    return val_loader.examples(first), [val_loader.classes[targets[i]] for i in first]


def stn_figure(model: torch.nn.Module, images: torch.Tensor, labels: list[str], title: str = ""):
    """A matplotlib Figure: one column per face, labelled with its class; the top row is the
    face given to the model ("input"), the bottom row what the STN makes of it ("STN output").
    Each face is stretched to its own range, as torchvision's save_image(scale_each=True)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    was_training = model.training
    model.eval()  # in train mode the STN's BatchNorm would learn from these images
    with torch.no_grad():
        warped = model.stn(images)
    model.train(was_training)
    rows = []
    for batch in (images, warped):
        faces = batch[:, 0].float().cpu()  # every channel holds the same grayscale face
        low = faces.amin((1, 2), keepdim=True)
        faces = (faces - low) / (faces.amax((1, 2), keepdim=True) - low).clamp_min(1e-8)
        rows.append(torch.cat(list(faces), dim=1))
    size, n = images.shape[-1], len(labels)
    # One image with tick labels, not 2 x n axes: a quarter of the drawing time.
    fig = Figure(figsize=(1.2 + 1.1 * n, 2.8))
    ax = fig.add_subplot()
    ax.imshow(torch.cat(rows).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([(i + 0.5) * size - 0.5 for i in range(n)], labels)
    ax.set_yticks([0.5 * size - 0.5, 1.5 * size - 0.5], ["input", "STN output"])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if title:
        ax.set_xlabel(title)
    return fig


def save_stn_grid(
    model: torch.nn.Module, images: torch.Tensor, labels: list[str], path: Path, title: str = ""
) -> None:
    """stn_figure as a PNG, written atomically."""
    tmp = path.with_name(path.name + ".tmp.png")
    stn_figure(model, images, labels, title).savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def init_wandb(args: argparse.Namespace, run_dir: Path, run_name: str, run_id: str | None):
    mode = args.wandb
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: not logging to it")
        return None
    if mode == "auto":  # verify=False: no network needed to know whether a key is stored
        mode = "online" if wandb.login(prompt=False, verify=False) else "offline"
    not_logged_in = args.wandb == "auto" and mode == "offline"
    print(f"wandb: logging {mode}" + (" (not logged in)" if not_logged_in else ""))
    run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes into it from the start
    return wandb.init(
        project="EmoNeXt",
        name=run_name,
        id=run_id,  # a resumed run goes on logging into its own wandb run
        dir=str(run_dir.resolve()),
        mode=mode,
        config=vars(args),
        resume="allow",
        # Quiet: its banners and end-of-run summary are ~40 lines; ours is one.
        settings=wandb.Settings(silent=True),
    )


# --------------------------------------------------------------------------- main


class Interrupted:
    """SIGTERM / Ctrl-C: finish the current step, keep last.pt (last finished epoch), exit.

    Once `exit_message` is set (training is over), a signal exits at once with that message.
    """

    def __init__(self):
        self.signum = 0
        self.exit_message: str | None = None
        self.previous = {
            sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def restore(self) -> None:
        """The handlers from before (matters when main runs in-process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.exit_message is not None:
            self.restore()
            if self.exit_message:
                print(self.exit_message)
            raise SystemExit(128 + signum)
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return bool(self.signum)


def main(args: argparse.Namespace) -> dict | None:
    """Train and test as `args` (from parse_args) say; the results dict on rank 0. It returns or
    raises only once the last checkpoint is written (in-process callers read it at once)."""
    with engine.CheckpointWriter() as writer:
        return train_and_test(args, writer)


def train_and_test(args: argparse.Namespace, writer: engine.CheckpointWriter) -> dict | None:
    """main's work; rank 0 writes the checkpoints with `writer`."""
    main_started = time.time()
    engine.reset_fault_points()
    rank, world_size, device = setup_distributed(args)
    distributed = engine.is_distributed()
    master = rank == 0
    log = print if master else (lambda *a, **k: None)

    resume_ckpt = None
    if args.resume:
        resume_ckpt = models.read_checkpoint(args.resume)
        run_dir = Path(args.resume).parent
        processes = len(resume_ckpt["rng"])
        if processes != world_size:  # the batch, the data shards and the random streams differ
            raise SystemExit(
                f"error: {args.resume} was trained by {processes} process(es), not "
                f"{world_size}; resume it with `{resume_command(args.resume, processes)}`"
            )
    else:
        name = model_name(args).replace(":", "_")
        # Recorded in the checkpoints: the run's folder, as --run-name would give it.
        args.run_name = args.run_name or f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.output_dir) / args.run_name

    if args.demo and not Path(args.dataset_path).is_dir():
        if master:
            from scripts.make_synthetic import make_synthetic

            log(f"making synthetic faces in {args.dataset_path}")
            make_synthetic(args.dataset_path, seed=0)
        if distributed:
            dist.barrier()
    if not Path(args.dataset_path).is_dir():
        raise SystemExit(
            f"error: no dataset at {args.dataset_path}. Get FER2013 with "
            "`python scripts/download_dataset.py --csv fer2013.csv` (or --kaggle, --gdrive, "
            "--folder), or run `python train.py --demo`, which needs no data."
        )
    try:
        classes = datasets.check_dataset(args.dataset_path)
    except datasets.DatasetError as err:
        raise SystemExit(f"error: {err}") from None

    seed_everything(args.seed)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cudnn.deterministic = args.deterministic
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        model, pretrained = build_model(args, len(classes), load_weights=resume_ckpt is None)
        if args.checkpoint and resume_ckpt is None:
            models.load_checkpoint(model, args.checkpoint, weights="auto")
            log(f"initialised from {args.checkpoint}")
    except models.WeightsError as err:
        raise SystemExit(f"error: {err}") from None
    model.to(device)
    # None: the device decides (faster on CUDA, slower on CPUs); the run keeps "auto" on resume
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise SystemExit(f"error: {model.model_name} has no --grad-checkpointing support")
        model.set_grad_checkpointing(True)
    data_config = datasets.DataConfig.from_dict(model.data_config)

    augment = {"hflip": args.hflip, "vflip": args.vflip, "rotation": args.rotation}

    def loader(split: str, mode: str, batch_size: int):
        return datasets.build_loader(
            args.dataset_path,
            split,
            mode=mode,
            pipeline=args.data_pipeline,
            batch_size=batch_size,
            data_config=data_config,
            device=device,
            num_workers=args.num_workers,
            seed=args.seed,
            rank=rank,
            world_size=world_size,
            skip_bad_images=args.skip_bad_images,
            augment=augment if mode == "train" else None,
        )

    try:
        train_loader = loader("train", "train", args.batch_size)
        val_loader = loader("val", "val", args.val_batch_size)
        test_loader = loader("test", "test", max(1, args.val_batch_size // 10))
    except datasets.DatasetError as err:
        raise SystemExit(f"error: {err}") from None
    loaders = {"train": train_loader, "val": val_loader, "test": test_loader}
    data_sizes = {split: x.dataset_size for split, x in loaders.items()}
    if resume_ckpt is not None and resume_ckpt.get("data_sizes", data_sizes) != data_sizes:
        raise SystemExit(
            f"error: the dataset at {args.dataset_path} is not the run's: it has "
            f"{data_sizes} images, the run had {resume_ckpt['data_sizes']}; give the run's data "
            "with --dataset-path"
        )
    skipped = {split: x.split.skipped_paths for split, x in loaders.items()}
    for split, paths in skipped.items():
        if paths:
            more = f" and {len(paths) - 3} more (all in results.json)" if len(paths) > 3 else ""
            log(f"skipped {len(paths)} unreadable {split} images: {', '.join(paths[:3])}{more}")
    # Evaluation images that also occur in training inflate every reported figure: say so.
    overlap, warning = {}, ""
    if master:
        evaluation = {"val": val_loader.split, "test": test_loader.split}
        overlap, warning = datasets.split_overlap(train_loader.split, evaluation, args.dataset_path)
    if warning:
        log(warning)

    ema = EMA(model, beta=args.ema_beta, update_every=args.ema_update_every)
    params = engine.trainable_parameters(model)
    optimizer = torch.optim.AdamW(
        params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    scheduler = build_scheduler(optimizer, args)
    amp_dtype, scaler = engine.amp_settings(args.amp, device, args.official_quirks)
    criterion = EmoNeXtLoss(args.label_smoothing, args.sa_weight)

    train_model = model
    if distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        train_model = engine.CompileTrainingBatches(train_model, args.batch_size)

    start_epoch, step, best_acc, bad_epochs = 0, 0, -1.0, 0
    train_seconds = 0.0
    saved_epoch = None  # the epoch that last.pt holds
    if resume_ckpt is not None:
        try:
            model.load_state_dict(resume_ckpt["model"])
        except RuntimeError as err:
            raise SystemExit(
                f"error: {args.resume}: its weights do not fit the model its arguments describe "
                f"({str(err).splitlines()[0]})"
            ) from None
        ema.load_state_dict(resume_ckpt["ema"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        if scaler is not None and resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = resume_ckpt["epoch"] + 1
        step, best_acc = resume_ckpt["step"], resume_ckpt["best_accuracy"]
        bad_epochs, train_seconds = resume_ckpt["bad_epochs"], resume_ckpt["train_seconds"]
        set_rng_state(resume_ckpt["rng"][rank], device)
        saved_epoch = resume_ckpt["epoch"]
        log(f"resumed from {args.resume} at epoch {start_epoch}")
    if master:
        drop_unsaved_metrics(
            run_dir / "metrics.jsonl", -1 if saved_epoch is None else saved_epoch, log
        )

    if master:
        log(
            f"run folder {run_dir}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
            f"parameters; {train_loader.dataset_size} train images, device {device}, "
            f"{world_size} process(es), amp {amp_dtype}"
        )
    commit = git_commit()  # recorded in every checkpoint and in results.json
    wandb_id = resume_ckpt.get("wandb_id") if resume_ckpt is not None else None
    wandb_run = init_wandb(args, run_dir, run_dir.name, wandb_id) if master else None

    def checkpoint(epoch: int) -> dict:
        rngs = [rng_state(device)]
        if distributed:
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng_state(device))
        return {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": epoch,
            "step": step,
            "best_accuracy": best_acc,
            "bad_epochs": bad_epochs,
            "train_seconds": train_seconds,
            "rng": rngs,
            "args": {k: v for k, v in vars(args).items()},
            "data_sizes": data_sizes,
            "wandb_id": wandb_run.id if wandb_run is not None else None,
            "model_name": model.model_name,
            "model_kwargs": model.model_kwargs,
            "classes": classes,
            "data_config": model.data_config,
            "pretrained": pretrained,
            "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]},
            "git_commit": commit,
        }

    interrupted = Interrupted()
    stn_images = None
    if master and getattr(model, "has_stn", False):
        stn_images, stn_labels = stn_examples(val_loader)  # one face of each class
    metrics_path = run_dir / "metrics.jsonl"
    epoch = start_epoch - 1
    stop_reason = "epochs"
    epochs = range(start_epoch, args.epochs)
    if bad_epochs >= args.patience:  # a resumed run that had stopped early stays stopped
        stop_reason, epochs = "early_stopping", range(0)
    loop_started, epochs_seconds = time.time(), 0.0
    after_first_epoch = None  # seconds between this process's first epoch and the next one
    for epoch in epochs:
        train_loader.set_epoch(epoch)
        started = time.time()
        stats = engine.train_one_epoch(
            train_model,
            criterion,
            train_loader,
            optimizer,
            scheduler,
            device,
            ema=ema,
            scaler=scaler,
            amp_dtype=amp_dtype,
            accumulation_steps=args.gradient_accumulation_steps,
            clip_grad=args.clip_grad,
            clip_scaled=args.official_quirks,
            channels_last=channels_last,
            max_nonfinite=args.max_nonfinite_steps,
            progress=master and not args.no_progress,
            desc=f"epoch {epoch}",
            stop=interrupted,
        )
        step += stats["steps"]
        if stats["stopped"] == "interrupted":
            stop_reason = "interrupted"
            break
        if stats["stopped"] == "nonfinite":
            stop_reason = "nonfinite"
            log(
                f"stopping: {args.max_nonfinite_steps} consecutive steps had a non-finite loss. "
                "Try a lower --lr, --clip-grad, or --amp off (or bf16 instead of fp16)."
            )
            break
        engine.sync_buffers(model)  # rank 0's BatchNorm statistics, as saved in last.pt
        engine.sync_buffers(ema.ema_model)
        val = engine.evaluate(train_model, val_loader, device, classes, amp_dtype)
        train_seconds += time.time() - started
        improved = val["accuracy"] > best_acc
        best_acc = max(best_acc, val["accuracy"])
        bad_epochs = 0 if improved else bad_epochs + 1
        record = {
            "epoch": epoch,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": stats["loss"],
            "train_ce": stats["ce"],
            "train_sa": stats["sa"],
            "train_accuracy": stats["accuracy"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "best_val_accuracy": best_acc,
            "nonfinite_steps": stats["nonfinite"],
            "images_per_s": stats["images_per_s"],
            "seconds": time.time() - started,
        }
        epochs_seconds += record["seconds"]
        ckpt = checkpoint(epoch)  # collective under DDP: every rank builds it
        if master:
            # Made now, not at the start: a run that ends before its first epoch leaves nothing.
            run_dir.mkdir(parents=True, exist_ok=True)
            # This order keeps every state that a kill can leave resumable from last.pt: metrics
            # of an epoch that last.pt does not hold are dropped on resume, and a best.pt ahead
            # of last.pt is written again when that epoch is trained again. The checkpoint is
            # written in the background while the next epoch trains (engine.CheckpointWriter); the
            # previous epoch's is on disk before this epoch's metrics line (a wait that is over
            # long before), so a kill leaves at most one epoch that last.pt does not hold.
            writer.wait()
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:  # then last.pt: the same bytes, linked rather than written twice
                writer.save(ckpt, run_dir / "best.pt", link=run_dir / "last.pt")
            else:
                writer.save(ckpt, run_dir / "last.pt")
            if stn_images is not None:
                stn_path = run_dir / f"stn_epoch_{epoch:03d}.png"
                save_stn_grid(model, stn_images, stn_labels, stn_path, f"epoch {epoch}")
            log(
                f"epoch {epoch}: loss {stats['loss']:.4f} train {stats['accuracy']:.2f} % "
                f"val {val['accuracy']:.2f} % (best {best_acc:.2f} %) "
                f"{stats['images_per_s']:.0f} img/s"
            )
            if wandb_run is not None:
                import wandb

                log_items = {k: v for k, v in record.items() if k != "epoch"}
                if stn_images is not None:
                    log_items["stn"] = wandb.Image(str(stn_path))
                wandb_run.log(log_items, step=epoch)
        del ckpt
        saved_epoch = epoch  # once the writer is done
        if after_first_epoch is None:
            after_first_epoch = time.time() - started - record["seconds"]
        if bad_epochs >= args.patience:
            stop_reason = "early_stopping"
            log(f"early stopping: no better validation accuracy for {args.patience} epochs")
            break
        if interrupted:
            stop_reason = "interrupted"
            break
    # The last checkpoint's write, waited for once per run, counts with the test: after the loop.
    loop_ended = time.time()
    writer.wait()  # last.pt and best.pt hold saved_epoch from here on
    after_first_epoch = after_first_epoch or 0.0  # None: no epoch finished
    between_epochs = loop_ended - loop_started - epochs_seconds - after_first_epoch
    if stop_reason == "interrupted":
        interrupted.restore()
        if saved_epoch is None:
            log(
                f"interrupted in epoch {start_epoch}, before any epoch finished: no checkpoint "
                "was saved. Run the same command again to start over."
            )
        else:
            log(
                f"interrupted: {run_dir / 'last.pt'} holds epoch {saved_epoch}, the last "
                f"finished one; continue with `{resume_command(run_dir / 'last.pt', world_size)}`"
            )
        if distributed:
            dist.destroy_process_group()
        raise SystemExit(128 + interrupted.signum)
    if not master:
        interrupted.exit_message = ""
    elif saved_epoch is None:  # stopped by non-finite losses in its first epoch
        interrupted.exit_message = "interrupted while testing; no checkpoint was saved"
    else:
        interrupted.exit_message = (
            f"interrupted while testing: {run_dir / 'last.pt'} holds epoch {saved_epoch}, the "
            f"last one; `{resume_command(run_dir / 'last.pt', world_size)}` tests it again"
        )

    # The official protocol: the final EMA weights, TenCrop, logits averaged over the crops.
    results = {"stop_reason": stop_reason}
    test = engine.evaluate(
        ema.ema_model, test_loader, device, classes, amp_dtype, engine.BOOTSTRAP_RESAMPLES
    )
    best_path = run_dir / "best.pt"
    if distributed:
        dist.barrier()
    test_best, best_epoch = {}, None  # best.pt's online ("model") and EMA weights
    if best_path.is_file():
        best = models.read_checkpoint(best_path)  # once: it holds both weights
        best_epoch = best["epoch"]
        # One model for both: loading replaces every parameter and buffer in place.
        best_model = models.create_model(model.model_name, verbose=False, **model.model_kwargs)
        best_model.to(device)
        if channels_last:  # as the EMA model, a copy of the trained one: the same kernels
            best_model.to(memory_format=torch.channels_last)
        for weights in ("model", "ema"):
            models.load_checkpoint(best_model, best, weights=weights)
            test_best[weights] = engine.evaluate(
                best_model, test_loader, device, classes, amp_dtype
            )
    weights_checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    checksums = [float(weights_checksum)]
    if distributed:
        checksums = [None] * world_size
        dist.all_gather_object(checksums, float(weights_checksum))
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)  # a run stopped in its first epoch has none
        engine.save_confusion_matrix(
            test,
            str(run_dir / "confusion_matrix.png"),
            f"test, EMA weights, TenCrop: {test['accuracy']:.2f} %",
        )
        best_accuracy = {w: m["accuracy"] for w, m in test_best.items()}
        results.update(
            {
                "test_accuracy": test["accuracy"],
                "test_accuracy_best_online": best_accuracy.get("model"),
                "test_accuracy_best_ema": best_accuracy.get("ema"),
                "test_weights": {
                    "test_accuracy": "final EMA weights (last.pt's ema): the official protocol",
                    "test_accuracy_best_online": f"best.pt's online weights (epoch {best_epoch})",
                    "test_accuracy_best_ema": f"best.pt's EMA weights (epoch {best_epoch})",
                },
                "test_accuracy_ci95": test["accuracy_ci95"],
                "macro_f1": test["macro_f1"],
                "macro_f1_ci95": test["macro_f1_ci95"],
                "split_overlap": overlap,
                "per_class": test["per_class"],
                "confusion_matrix": test["confusion_matrix"],
                "classes": classes,
                "best_val_accuracy": best_acc,
                "best_epoch": best_epoch,
                "epochs_run": epoch + 1,
                "steps": step,
                "train_seconds": train_seconds,
                # This process's wall time (a resumed run's from its resume), for
                # benchmark.py: what a run costs besides its epochs' own seconds.
                "process_seconds": {
                    "setup": loop_started - main_started,
                    "epochs": epochs_seconds,
                    # checkpoint, STN figure and log after this process's first epoch, with
                    # one-time costs (matplotlib's import), and after the later ones
                    "after_first_epoch": after_first_epoch,
                    "between_epochs": between_epochs,
                    "test": time.time() - loop_ended,
                },
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                # this process's, training and tests; benchmark.py reports it
                "peak_gpu_memory_gb": engine.peak_memory_gb(device),
                "num_gpus": world_size if device.type == "cuda" else 0,
                "world_size": world_size,
                "weights_checksum_per_rank": checksums,
                "model": model.model_name,
                "skipped_images_count": sum(len(paths) for paths in skipped.values()),
                "skipped_images": skipped,
                "git_commit": commit,
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
            }
        )
        engine.write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2))
        log(engine.format_report(test))
        log(
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
            import wandb

            wandb_run.summary.update(
                {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
            )
            wandb_run.log({"confusion_matrix": wandb.Image(str(run_dir / "confusion_matrix.png"))})
            wandb_run.finish()
            if wandb_run.settings.mode == "offline":
                offline = Path(wandb_run.dir).parent
                log(f"wandb: logged offline; upload with `wandb sync {offline}`")
    interrupted.restore()
    if distributed:
        dist.destroy_process_group()
    return results if master else None


if __name__ == "__main__":
    main(parse_args())
