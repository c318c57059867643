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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="EmoNeXt throughput benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="pil vs fast data pipeline, images per second")
    add_data_args(data)
    data.set_defaults(func=run_data)
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
