"""Throughput benchmarks.

    python scripts/benchmark.py data --dataset-path FER2013 [--batch-size 64] [--device cpu]
                                     [--num-workers 0] [--json]

`data`: images per second of the `pil` pipeline (torchvision transforms in a DataLoader with
--num-workers workers) and of the `fast` pipeline (one grid_sample per batch on --device), on the
same split, mode and batch size, in one run, and their ratio. Without --dataset-path a synthetic
dataset is drawn into a temporary folder. More subcommands (e.g. `train`) plug into the same
parser and reuse the timing helpers below.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets  # noqa: E402


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches_forever(make_iter: Callable[[], Iterable]) -> Iterator:
    """Batches across as many epochs as needed, so small splits can be timed too."""
    while True:
        empty = True
        for batch in make_iter():
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the loader yielded no batches")


def time_batches(
    make_iter: Callable[[], Iterable], device: torch.device, batches: int, warmup: int = 2
) -> tuple[float, int]:
    """(seconds, images) of `batches` batches, after `warmup` untimed ones (first-use costs)."""
    stream = _batches_forever(make_iter)
    for _ in range(warmup):
        next(stream)
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(stream)[0].shape[0]
    synchronize(device)
    return time.perf_counter() - start, images


def images_per_second(
    make_iter: Callable[[], Iterable], device: torch.device, batches: int, warmup: int = 2
) -> float:
    seconds, images = time_batches(make_iter, device, batches, warmup)
    return images / seconds


def epoch_iter(loader: datasets.Loader) -> Callable[[], Iterable]:
    state = {"epoch": 0}

    def make():
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        return iter(loader)

    return make


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset-path",
        default=None,
        help="dataset root ({train,val,test}/<Class>/); default: a synthetic set in a temp folder",
    )
    parser.add_argument("--split", default="train", choices=datasets.SPLITS, help="split to read")
    parser.add_argument(
        "--mode",
        default=None,
        choices=["train", "val", "test"],
        help="transform mode (default: train for the train split, else val)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--device", default="cpu", help="device of the fast pipeline's output")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers of the pil pipeline"
    )
    parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    parser.add_argument("--image-size", type=int, default=224, help="output crop size")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")


def run_data(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode = args.mode or ("train" if args.split == "train" else "val")
    tmp = None
    root = args.dataset_path
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="emonext-bench-")
        from make_synthetic import make_synthetic

        per = max(1, (args.batches + 3) * args.batch_size // 7 + 1)
        root = make_synthetic(Path(tmp.name) / "synthetic", seed=args.seed, per_class=per)
    try:
        cfg = datasets.DataConfig(image_size=args.image_size)
        common = dict(mode=mode, batch_size=args.batch_size, data_config=cfg, seed=args.seed)
        datasets.load_split(root, args.split)  # decode + cache once, outside the timings
        pil = datasets.build_loader(
            root, args.split, pipeline="pil", device=device, num_workers=args.num_workers, **common
        )
        fast = datasets.build_loader(root, args.split, pipeline="fast", device=device, **common)
        pil_ips = images_per_second(epoch_iter(pil), device, args.batches)
        fast_ips = images_per_second(epoch_iter(fast), device, args.batches)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = {
        "pil_images_per_s": round(pil_ips, 1),
        "fast_images_per_s": round(fast_ips, 1),
        "ratio": round(fast_ips / pil_ips, 2),
        "batch_size": args.batch_size,
        "device": str(device),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"split {args.split} (mode {mode}), batch {args.batch_size}, {args.image_size}px, "
            f"pil workers {args.num_workers}, fast on {device}, torch threads "
            f"{torch.get_num_threads()}"
        )
        print(f"pil : {pil_ips:10.1f} images/s")
        print(f"fast: {fast_ips:10.1f} images/s")
        print(f"ratio fast/pil: {fast_ips / pil_ips:.2f}x")
    return result


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------

# FER2013's split sizes: what one epoch (training, then validation) processes.
FER_TRAIN_IMAGES, FER_VAL_IMAGES = 28_709, 3_589
# Dense bf16/fp16 tensor-core peaks (FLOP/s), for the utilisation figure.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="emonext_tiny", help="EmoNeXt/ConvNeXt model name")
    parser.add_argument(
        "--dataset-path",
        default=None,
        help="dataset root; default: synthetic faces in a temporary folder",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument(
        "--input-size", type=int, default=None, help="input side (default: the model's, 224)"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per setup")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--val-images",
        type=int,
        default=512,
        help="validation images timed per setup (official: at batch size 1)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision (official: fp16 + GradScaler; ours: bf16)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile in `ours`")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last memory format in `ours` and `timm` (as train.py's flag)",
    )
    parser.add_argument(
        "--official-workers", type=int, default=1, help="DataLoader workers of the official setup"
    )
    parser.add_argument(
        "--setups",
        default="official,ours,timm",
        help="comma-separated subset of official,ours,timm",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for the utilisation figure (default: by device name)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and init seed")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")


class Window:
    """The next `steps` batches of a stream (`_batches_forever`), as one 'epoch' for the engine.

    Consecutive windows share the stream, so DataLoader workers start once, not per window.
    """

    def __init__(self, stream: Iterator, steps: int):
        self.stream, self.steps = stream, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield next(self.stream)


def training_flops_per_image(model: torch.nn.Module, size: int, in_chans: int) -> float:
    """3x the forward FLOPs of one image (forward + backward), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(2, in_chans, size, size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train()
    return 3 * counter.get_total_flops() / 2


def build_setup(kind: str, args: argparse.Namespace, device: torch.device, root) -> dict:
    """Model, optimiser, precision and loaders of one benchmarked configuration.

    official: the official trainer (pil pipeline with its worker count, eager, NCHW, fp16 +
      GradScaler under --amp with clipping of the scaled gradients, validation batch 1);
    ours: this project's defaults (fast pipeline, bf16 under --amp, fused AdamW on GPUs, large
      validation batches; --channels-last and --compile as in train.py);
    timm: timm's plain ConvNeXt of the same shape on the same batches, the ceiling.
    """
    import timm

    import engine
    import models
    from train import warm_restart_lr

    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    overrides = {"img_size": args.input_size} if args.input_size else {}
    reference = models.create_model(args.model, verbose=False, **overrides)
    cfg = datasets.DataConfig.from_dict(reference.data_config)
    if kind == "timm":
        model = timm.models.convnext.ConvNeXt(
            depths=reference.depths, dims=reference.dims, num_classes=7, drop_path_rate=0.1
        )
    else:
        model = reference
    official = kind == "official"
    channels_last = args.channels_last and not official
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = engine.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=cuda and not official)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: warm_restart_lr(i + 1, 1.0))
    amp_dtype, scaler = None, None
    if args.amp:
        amp_dtype = torch.float16 if official else torch.bfloat16
        scaler = torch.amp.GradScaler(device.type) if official else None
    pipeline = "pil" if official else "fast"
    workers = args.official_workers if official else 0
    common = dict(data_config=cfg, device=device, seed=args.seed, pipeline=pipeline,
                  num_workers=workers)  # fmt: skip
    train_loader = datasets.build_loader(root, "train", mode="train", batch_size=args.batch_size,
                                         **common)  # fmt: skip
    val_loader = datasets.build_loader(root, "val", mode="val",
                                       batch_size=1 if official else 256, **common)  # fmt: skip
    forward = LogitsOnly(model) if kind == "timm" else model
    if args.compile and not official:
        forward = torch.compile(forward)
    return dict(model=model, forward=forward, optimizer=optimizer, scheduler=scheduler,
                amp_dtype=amp_dtype, scaler=scaler, clip_scaled=official,
                channels_last=channels_last, train_loader=train_loader, val_loader=val_loader,
                cfg=cfg)  # fmt: skip


class LogitsOnly(torch.nn.Module):
    """timm's model with EmoNeXt's call signature: (logits, None) when attention is asked for."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        logits = self.model(x)
        return (logits, None) if return_attention else logits


def time_setup(kind: str, args: argparse.Namespace, device: torch.device, root) -> dict:
    import engine
    from losses import EmoNeXtLoss

    s = build_setup(kind, args, device, root)
    model = s["forward"]
    criterion = EmoNeXtLoss()
    stream = _batches_forever(epoch_iter(s["train_loader"]))

    def train(steps: int) -> dict:
        return engine.train_one_epoch(
            model, criterion, Window(stream, steps), s["optimizer"], s["scheduler"], device,
            scaler=s["scaler"], amp_dtype=s["amp_dtype"], clip_scaled=s["clip_scaled"],
            channels_last=s["channels_last"],
        )  # fmt: skip

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train(args.warmup)
    synchronize(device)
    stats = train(args.steps)
    synchronize(device)
    train_ips = stats["images"] / stats["seconds"]

    val_batches = max(1, args.val_images // s["val_loader"].batch_size)
    val_stream = _batches_forever(epoch_iter(s["val_loader"]))
    engine.predict(model, Window(val_stream, 2), device, s["amp_dtype"])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    logits, _ = engine.predict(model, Window(val_stream, val_batches), device, s["amp_dtype"])
    synchronize(device)
    val_ips = len(logits) / (time.perf_counter() - start)
    epoch_seconds = FER_TRAIN_IMAGES / train_ips + FER_VAL_IMAGES / val_ips
    result = {
        "train_images_per_s": train_ips,
        "val_images_per_s": val_ips,
        "images_per_s": (FER_TRAIN_IMAGES + FER_VAL_IMAGES) / epoch_seconds,
        "epoch_seconds": epoch_seconds,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
        "flops_per_image": training_flops_per_image(s["model"], s["cfg"].image_size,
                                                    s["cfg"].in_chans),
    }  # fmt: skip
    s.clear()  # free the model and optimiser before the next setup is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_train(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kinds = [k for k in args.setups.split(",") if k]
    unknown = set(kinds) - {"official", "ours", "timm"}
    if unknown:
        raise SystemExit(f"error: unknown setups {sorted(unknown)}")
    tmp = None
    root = args.dataset_path
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="emonext-bench-")
        from make_synthetic import make_synthetic

        per = max(2, (args.steps + args.warmup) * args.batch_size // 7 + 1)
        splits = {"train": per, "val": max(2, args.val_images // 7 + 1), "test": 1}
        root = make_synthetic(Path(tmp.name) / "synthetic", seed=args.seed, splits=splits)
    try:
        per_setup = {k: time_setup(k, args, device, root) for k in kinds}
    finally:
        if tmp is not None:
            tmp.cleanup()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    )
    result = {f"{k}_images_per_s": round(v["images_per_s"], 1) for k, v in per_setup.items()}
    if "ours" in per_setup:
        ours = per_setup["ours"]
        for other in ("official", "timm"):
            if other in per_setup:
                ratio = ours["images_per_s"] / per_setup[other]["images_per_s"]
                result[f"ours_vs_{other}"] = round(ratio, 2)
        result["epoch_seconds"] = round(ours["epoch_seconds"], 1)
        if peak:
            used = ours["train_images_per_s"] * ours["flops_per_image"] / peak
            result["ours_flop_utilisation"] = round(used, 3)
    result.update({"device": name, "model": args.model, "batch_size": args.batch_size,
                   "amp": args.amp, "setups": per_setup})  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}, batch {args.batch_size}, amp {args.amp}, device {name}")
        print(f"{'setup':<10}{'train img/s':>13}{'val img/s':>12}{'epoch img/s':>13}"
              f"{'epoch s':>10}{'peak GB':>9}")  # fmt: skip
        for k, v in per_setup.items():
            mem = f"{v['peak_memory_gb']:.1f}" if v["peak_memory_gb"] is not None else "-"
            print(f"{k:<10}{v['train_images_per_s']:>13.1f}{v['val_images_per_s']:>12.1f}"
                  f"{v['images_per_s']:>13.1f}{v['epoch_seconds']:>10.1f}{mem:>9}")  # fmt: skip
        for key in ("ours_vs_official", "ours_vs_timm", "ours_flop_utilisation"):
            if key in result:
                print(f"{key}: {result[key]}")
        print("epoch_seconds is projected for FER2013: 28,709 training + 3,589 validation images")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="EmoNeXt throughput benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="pil vs fast data pipeline, images per second")
    add_data_args(data)
    data.set_defaults(func=run_data)
    train = sub.add_parser("train", help="official vs ours vs timm training, images per second")
    add_train_args(train)
    train.set_defaults(func=run_train)
    return parser


def main(args: argparse.Namespace | list[str] | None = None):
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)
    return args.func(args)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except datasets.DatasetError as e:
        sys.exit(f"error: {e}")
