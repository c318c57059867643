"""Train EmoNeXt (or a baseline) on FER2013: the official recipe without its defects.

    python train.py --dataset-path FER2013 --model-size tiny --amp --in_22k
    torchrun --nproc_per_node=4 train.py ...   # DistributedDataParallel, batch size per process
    python train.py --demo                      # synthetic faces, small model, CPU, minutes

REFERENCE.md section 5 is the recipe; section 7 lists the official defects fixed here. Outputs go to
`--output-dir/<run-name>/`: best.pt, last.pt, metrics.jsonl, stn_epoch_NNN.png,
confusion_matrix.png and results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
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
    p = argparse.ArgumentParser(
        "EmoNeXt training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    g.add_argument("--resume", default=None, help="continue a run from its last.pt exactly")
    g.add_argument("--seed", type=int, default=2001, help="random seed (the official one)")
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic cuDNN kernels (slower); otherwise cudnn.benchmark",
    )
    g.add_argument("--device", default=None, help="cuda, cuda:N, cpu, ... (default: cuda if any)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
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


def apply_demo_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--demo: a small EmoNeXt on synthetic faces at 48 pixels, from scratch, on the CPU.

    Only values left at their defaults are changed, so e.g. `--demo --epochs 3` works.
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
    for key, value in demo.items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)


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
    """Rank, world size and device, from torchrun's environment (one process when absent)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def amp_settings(args: argparse.Namespace, device: torch.device):
    """(autocast dtype or None, GradScaler or None)."""
    if not args.amp:
        return None, None
    if args.official_quirks or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float16, torch.amp.GradScaler(device.type)
    return torch.bfloat16, None


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


def build_model(args: argparse.Namespace, num_classes: int):
    name = args.model or f"emonext_{args.model_size}"
    overrides = {}
    if name.startswith(("emonext_", "convnext_")):
        overrides["drop_path_rate"] = args.drop_path
        if args.input_size:
            overrides["img_size"] = args.input_size
        if args.no_stn:
            overrides["stn"] = False
        if args.no_se:
            overrides["se"] = False
    elif args.no_stn or args.no_se:
        raise SystemExit(f"error: --no-stn/--no-se apply to EmoNeXt models, not {name}")
    pretrained = resolve_pretrained(args, name)
    model = models.create_model(name, num_classes=num_classes, pretrained=pretrained, **overrides)
    return model, pretrained


def save_stn_grid(model: torch.nn.Module, images: torch.Tensor, path: Path) -> None:
    """Validation faces (top row) and what the STN makes of them (bottom row)."""
    from torchvision.utils import save_image

    was_training = model.training
    model.eval()  # in train mode the STN's BatchNorm would learn from these images
    with torch.no_grad():
        warped = model.stn(images)
    model.train(was_training)
    grid = torch.cat([images, warped]).float().cpu()
    if grid.shape[1] not in (1, 3):
        grid = grid[:, :1]
    tmp = path.with_name(path.name + ".tmp.png")
    save_image(grid, tmp, nrow=len(images), normalize=True, scale_each=True)
    os.replace(tmp, path)


def init_wandb(args: argparse.Namespace, run_dir: Path, run_name: str):
    mode = args.wandb
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: not logging to it")
        return None
    if mode == "auto":
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or bool(
            getattr(wandb.api, "api_key", None)
        )
        mode = "online" if logged_in else "offline"
    return wandb.init(
        project="EmoNeXt",
        name=run_name,
        dir=str(run_dir),
        mode=mode,
        config=vars(args),
        resume="allow",
    )


# --------------------------------------------------------------------------- main


class Interrupted:
    """SIGTERM / Ctrl-C: finish the current step, keep last.pt (last finished epoch), exit."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return bool(self.signum)


def main(args: argparse.Namespace) -> dict | None:
    rank, world_size, device = setup_distributed(args)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)

    resume_ckpt = None
    if args.resume:
        resume_ckpt = models.read_checkpoint(args.resume)
        if "optimizer" not in resume_ckpt:
            raise SystemExit(
                f"error: {args.resume} is not a last.pt of this trainer (no "
                "optimiser state); use --checkpoint to fine-tune from it"
            )
        run_dir = Path(args.resume).resolve().parent
    else:
        name = args.model or f"emonext_{args.model_size}"
        run_name = args.run_name or f"{name.replace(':', '_')}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.output_dir) / run_name

    if not args.resume and (run_dir / "metrics.jsonl").exists():
        raise SystemExit(
            f"error: {run_dir} already holds a run; continue it with --resume "
            f"{run_dir / 'last.pt'} or choose another --run-name"
        )
    if args.demo and not Path(args.dataset_path).is_dir():
        if master:
            from scripts.make_synthetic import make_synthetic

            log(f"making synthetic faces in {args.dataset_path}")
            make_synthetic(args.dataset_path, seed=0)
        if world_size > 1:
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

    model, pretrained = build_model(args, len(classes))
    if args.checkpoint:
        models.load_checkpoint(model, args.checkpoint, weights="auto")
        log(f"initialised from {args.checkpoint}")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
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
    amp_dtype, scaler = amp_settings(args, device)
    criterion = EmoNeXtLoss(args.label_smoothing, args.sa_weight)

    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        train_model = torch.compile(train_model)

    start_epoch, step, best_acc, bad_epochs = 0, 0, -1.0, 0
    train_seconds = 0.0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        if scaler is not None and resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = resume_ckpt["epoch"] + 1
        step, best_acc = resume_ckpt["step"], resume_ckpt["best_accuracy"]
        bad_epochs, train_seconds = resume_ckpt["bad_epochs"], resume_ckpt["train_seconds"]
        set_rng_state(resume_ckpt["rng"][min(rank, len(resume_ckpt["rng"]) - 1)])
        log(f"resumed from {args.resume} at epoch {start_epoch}")

    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        log(
            f"run folder {run_dir}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
            f"parameters; {train_loader.dataset_size} train images, device {device}, "
            f"{world_size} process(es), amp {amp_dtype}"
        )
    wandb_run = init_wandb(args, run_dir, run_dir.name) if master else None

    def checkpoint(epoch: int) -> dict:
        rngs = [rng_state()]
        if world_size > 1:
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng_state())
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
            "model_name": model.model_name,
            "model_kwargs": model.model_kwargs,
            "classes": classes,
            "data_config": model.data_config,
            "pretrained": pretrained,
            "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]},
            "git_commit": git_commit(),
        }

    interrupted = Interrupted()
    stn_images = None
    if master and getattr(model, "has_stn", False):
        stn_images = next(iter(val_loader))[0][:8]
    metrics_path = run_dir / "metrics.jsonl"
    epoch = start_epoch - 1
    stop_reason = "epochs"
    for epoch in range(start_epoch, args.epochs):
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
            channels_last=args.channels_last,
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
        ckpt = checkpoint(epoch)  # collective under DDP: every rank builds it
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            atomic_save(ckpt, run_dir / "last.pt")
            if improved:
                atomic_save(ckpt, run_dir / "best.pt")
            if stn_images is not None:
                save_stn_grid(model, stn_images, run_dir / f"stn_epoch_{epoch:03d}.png")
            log(
                f"epoch {epoch}: loss {stats['loss']:.4f} train {stats['accuracy']:.2f} % "
                f"val {val['accuracy']:.2f} % (best {best_acc:.2f} %) "
                f"{stats['images_per_s']:.0f} img/s"
            )
            if wandb_run is not None:
                import wandb

                log_items = {k: v for k, v in record.items() if k != "epoch"}
                if stn_images is not None:
                    log_items["stn"] = wandb.Image(str(run_dir / f"stn_epoch_{epoch:03d}.png"))
                wandb_run.log(log_items, step=epoch)
        del ckpt
        if bad_epochs >= args.patience:
            stop_reason = "early_stopping"
            log(f"early stopping: no better validation accuracy for {args.patience} epochs")
            break
        if interrupted:
            stop_reason = "interrupted"
            break

    if stop_reason == "interrupted":
        log(
            f"interrupted: {run_dir / 'last.pt'} holds the last finished epoch; continue with "
            f"--resume {run_dir / 'last.pt'}"
        )
        if world_size > 1:
            dist.destroy_process_group()
        raise SystemExit(128 + interrupted.signum)

    # The official protocol: the final EMA weights, TenCrop, logits averaged over the crops.
    results = {"stop_reason": stop_reason}
    test = engine.evaluate(
        ema.ema_model, test_loader, device, classes, amp_dtype, engine.BOOTSTRAP_RESAMPLES
    )
    best_path = run_dir / "best.pt"
    if world_size > 1:
        dist.barrier()
    test_best = None
    if best_path.is_file():
        best_model = models.create_model(model.model_name, verbose=False, **model.model_kwargs)
        models.load_checkpoint(best_model, str(best_path), weights="model")
        test_best = engine.evaluate(best_model.to(device), test_loader, device, classes, amp_dtype)
    weights_checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    checksums = [float(weights_checksum)]
    if world_size > 1:
        checksums = [None] * world_size
        dist.all_gather_object(checksums, float(weights_checksum))
    if master:
        results.update(
            {
                "test_accuracy": test["accuracy"],
                "test_accuracy_best": test_best["accuracy"] if test_best else None,
                "test_accuracy_ci95": test["accuracy_ci95"],
                "macro_f1": test["macro_f1"],
                "macro_f1_ci95": test["macro_f1_ci95"],
                "split_overlap": overlap,
                "per_class": test["per_class"],
                "confusion_matrix": test["confusion_matrix"],
                "classes": classes,
                "best_val_accuracy": best_acc,
                "epochs_run": epoch + 1,
                "steps": step,
                "train_seconds": train_seconds,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "num_gpus": world_size if device.type == "cuda" else 0,
                "world_size": world_size,
                "weights_checksum_per_rank": checksums,
                "model": model.model_name,
                "git_commit": git_commit(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
            }
        )
        engine.write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2))
        engine.save_confusion_matrix(
            test,
            str(run_dir / "confusion_matrix.png"),
            f"test, EMA weights, TenCrop: {test['accuracy']:.2f} %",
        )
        log(engine.format_report(test))
        log(
            f"test accuracy (final EMA, TenCrop) {test['accuracy']:.2f} %"
            + (f"; best checkpoint {test_best['accuracy']:.2f} %" if test_best else "")
        )
        if wandb_run is not None:
            import wandb

            wandb_run.summary.update(
                {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
            )
            wandb_run.log({"confusion_matrix": wandb.Image(str(run_dir / "confusion_matrix.png"))})
            wandb_run.finish()
    if world_size > 1:
        dist.destroy_process_group()
    return results if master else None


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    if args.demo:
        apply_demo_defaults(args, parser)
    main(args)
