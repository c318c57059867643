"""Throughput benchmarks.

    python scripts/benchmark.py data --dataset-path FER2013 [--batch-size 64] [--device cpu]
                                     [--num-workers 0] [--recipe convnext] [--json]

    python scripts/benchmark.py train --model emonext_tiny --amp [--setups ours,timm]
                                      [--epochs 2] [--dataset-path FER2013] [--json]

`data`: images per second of the `pil` pipeline (torchvision transforms in a DataLoader with
--num-workers workers) and of the `fast` pipeline (one grid_sample per batch on --device), on the
same split, mode and batch size, in one run, and their ratio; `--recipe convnext` adds ConvNeXt's
RandAugment and random erasing (datasets.CONVNEXT_AUGMENT) to both training pipelines, and its
Mixup 0.8 / CutMix 1.0 (CONVNEXT_MIXUP: timm's Mixup on each batch, as train.py's loop applies
it to either pipeline's batches). Without --dataset-path a synthetic dataset is drawn into a
temporary folder.

`train`: each setup (official, ours, timm) runs `python train.py ...` in a process of its own for
--epochs real epochs on the same data (synthetic faces at FER2013's split sizes by default) and
reports train.py's own metrics.jsonl and results.json: the first epoch, the steady one, training
images/s, the whole run's time and peak GPU memory, and the ratios between setups.
docs/PERFORMANCE.md has the figures.

    python scripts/benchmark.py infer [--models emonext_tiny,emonext_atto@64,emonext_micro@48]
                                      [--precisions torch,fp32,int8,fp16] [--runs 5] [--json]

`infer`: predict.py's path for one webcam frame, stage by stage: decode (a 640 x 480 JPEG of the
astronaut photograph, predict.read_image), detect (YuNet), crop (the face's crop and its
validation transform) and model (batch of one), for each model (random weights, NAME@INPUT) and
precision: PyTorch, ONNX Runtime float32, int8 (models/deploy.quantize_int8, calibrated on
synthetic faces) and fp16. The configurations take turns, --runs rounds of --frames frames
each; every figure is the median over the rounds. docs/INFERENCE.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402


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


def epoch_iter(
    loader: datasets.Loader, mixup: datasets.BatchMixup | None = None
) -> Callable[[], Iterable]:
    """A new epoch of `loader` per call, each batch mixed by `mixup` when given."""
    state = {"epoch": 0}

    def make():
        loader.set_epoch(state["epoch"])
        if mixup is not None:
            mixup.set_epoch(state["epoch"])
        state["epoch"] += 1
        return iter(loader) if mixup is None else (mixup(x, y) for x, y in loader)

    return make


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


# ConvNeXt's Mixup and CutMix (its main.py's --mixup, --cutmix, --smoothing), for --recipe convnext
CONVNEXT_MIXUP = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}


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
    utils.add_device_argument(parser)  # where the fast pipeline's batches go
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers of the pil pipeline"
    )
    parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    parser.add_argument("--image-size", type=int, default=224, help="output crop size")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument(
        "--recipe",
        choices=["paper", "convnext"],
        default="paper",
        help="training augmentation: the paper's, or with ConvNeXt's RandAugment "
        "(rand-m9-mstd0.5-inc1), random erasing (0.25), Mixup (0.8) and CutMix (1.0) on both "
        "pipelines",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")


def run_data(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.resolve_device(args.device)
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
        augment = datasets.CONVNEXT_AUGMENT if args.recipe == "convnext" else None
        common = dict(mode=mode, batch_size=args.batch_size, data_config=cfg, seed=args.seed)
        common["augment"] = augment if mode == "train" else None
        datasets.check_dataset(root, (args.split,))  # a classifier's data: 2 classes or more
        datasets.load_split(root, args.split)  # decode + cache once, outside the timings
        pil = datasets.build_loader(
            root, args.split, pipeline="pil", device=device, num_workers=args.num_workers, **common
        )
        fast = datasets.build_loader(root, args.split, pipeline="fast", device=device, **common)
        mixups = [None, None]
        if args.recipe == "convnext" and mode == "train":  # the same draws for both
            mixups = [datasets.BatchMixup(len(pil.classes), **CONVNEXT_MIXUP) for _ in "ab"]
        pil_ips = images_per_second(epoch_iter(pil, mixups[0]), device, args.batches)
        fast_ips = images_per_second(epoch_iter(fast, mixups[1]), device, args.batches)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = {
        "pil_images_per_s": round(pil_ips, 1),
        "fast_images_per_s": round(fast_ips, 1),
        "ratio": round(fast_ips / pil_ips, 2),
        "batch_size": args.batch_size,
        "device": str(device),
        "recipe": args.recipe,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"split {args.split} (mode {mode}, recipe {args.recipe}), batch {args.batch_size}, "
            f"{args.image_size}px, "
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

# 7 classes x these: 28,707 / 3,591 / 3,591 images, FER2013's split sizes within two images.
FER_SIZED_PER_CLASS = (4101, 513, 513)
# Dense bf16/fp16 tensor-core peaks (FLOP/s), for the utilisation figure.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}

# What each setup adds to train.py's command line. official: the official trainer's settings
# (torchvision transforms with one worker, fp16 + GradScaler with clipping of scaled gradients
# under --amp, NCHW, validation at batch size 1); ours: train.py's defaults; timm: timm's plain
# ConvNeXt of the same size through the same loop (no STN, SE or attention), the ceiling.
SETUPS = {
    "official": ["--official-quirks", "--data-pipeline", "pil", "--num-workers", "1",
                 "--val-batch-size", "1", "--no-channels-last"],
    "ours": [],
    "timm": [],
}  # fmt: skip


def add_train_args(parser: argparse.ArgumentParser) -> None:
    utils.add_model_arguments(parser, models.SIZES, default_size="tiny")
    parser.add_argument(
        "--dataset-path",
        default=None,
        help="dataset root; default: synthetic faces at FER2013's split sizes in a temp folder",
    )
    parser.add_argument(
        "--synthetic-per-class",
        type=int,
        nargs=3,
        default=FER_SIZED_PER_CLASS,
        metavar=("TRAIN", "VAL", "TEST"),
        help="images per class of the synthetic set (default: FER2013's split sizes)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument(
        "--input-size", type=int, default=None, help="input side (default: the model's, 224)"
    )
    utils.add_device_argument(parser)
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="epochs per setup: the first shows the warm-up cost, the last is the steady one",
    )
    parser.add_argument(
        "--project-epochs",
        type=int,
        default=50,
        help="also report each setup's run of this many epochs, projected from the measured "
        "parts: set-up, first epoch, steady epochs, time between epochs, test",
    )
    parser.add_argument("--amp", action="store_true", help="--amp in every setup")
    parser.add_argument("--compile", action="store_true", help="--compile in `ours`")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--channels-last / --no-channels-last in `ours` and `timm` (default: train.py's)",
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic faces")
    parser.add_argument(
        "--runs-dir",
        default=None,
        help="keep each setup's train.py run folder here (default: a temporary folder, removed)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")


def training_flops_per_image(model: torch.nn.Module, size: int, in_chans: int) -> float:
    """3x the forward FLOPs of one image (forward + backward), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(2, in_chans, size, size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train()
    return 3 * counter.get_total_flops() / 2


def setup_model(kind: str, args: argparse.Namespace) -> str:
    """The model a setup trains: timm's ConvNeXt of the same size for `timm`."""
    return "timm:" + args.model.replace("emonext_", "convnext_") if kind == "timm" else args.model


def setup_argv(kind: str, args: argparse.Namespace, root, out_dir) -> list[str]:
    """train.py's command line for one setup: what `python train.py ARGV` would run."""
    argv = ["--dataset-path", str(root), "--model", setup_model(kind, args), "--pretrained", "none",
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
            "--output-dir", str(out_dir), "--run-name", kind, "--wandb", "disabled",
            "--no-progress", *SETUPS[kind]]  # fmt: skip
    if args.device:
        argv += ["--device", args.device]
    if args.input_size:
        argv += ["--input-size", str(args.input_size)]
    if args.amp:
        argv.append("--amp")
    if kind != "official" and args.channels_last is not None:
        argv.append("--channels-last" if args.channels_last else "--no-channels-last")
    if kind == "ours" and args.compile:
        argv.append("--compile")
    return argv


TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"


def time_setup(kind: str, args: argparse.Namespace, root, out_dir) -> dict:
    """`python train.py ARGV` for one setup on `root`, in a fresh process as a user starts it:
    nothing (CUDA's set-up, cuDNN's autotuning, loaded kernels, compiled graphs) carries over
    from the setup before it. Its own metrics.jsonl and results.json are the result."""
    argv = setup_argv(kind, args, root, out_dir)
    started = time.perf_counter()
    # The run's log goes to stderr, so that with --json stdout holds the one JSON line only.
    done = subprocess.run([sys.executable, str(TRAIN_PY), *argv], stdout=2)
    wall = time.perf_counter() - started  # Python's start and imports included
    if done.returncode != 0:
        raise utils.CLIError(f"the {kind} setup's train.py stopped (status {done.returncode})")
    run_dir = Path(out_dir) / kind
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    from models import create_model

    size = {"img_size": args.input_size} if args.input_size and kind != "timm" else {}
    model = create_model(setup_model(kind, args), verbose=False, **size)
    cfg = model.data_config
    return {
        "command": "python train.py " + " ".join(argv),
        **run_figures(epochs, results["process_seconds"], wall),
        "peak_memory_gb": results["peak_gpu_memory_gb"],
        "flops_per_image": training_flops_per_image(model, cfg["image_size"], cfg["in_chans"]),
        "test_accuracy": results["test_accuracy"],
    }


def run_figures(epochs: list[dict], parts: dict, wall: float) -> dict:
    """A run's figures from train.py's metrics.jsonl lines, its results.json `process_seconds`
    and the run's wall time (start to results.json)."""
    first, steady = epochs[0], epochs[-1]
    return {
        "first_epoch_seconds": first["seconds"],
        "epoch_seconds": steady["seconds"],
        "train_images_per_s": steady["images_per_s"],
        "first_epoch_train_images_per_s": first["images_per_s"],
        "run_seconds": wall,  # start to results.json: set-up, every epoch, checkpoints, test
        # what the epochs' own seconds leave out: set-up, checkpoints, figures, the test
        "outside_epochs_seconds": wall - sum(e["seconds"] for e in epochs),
        "epochs": len(epochs),
        "setup_seconds": parts["setup"],  # data, model, weights: start to the first epoch
        # checkpoint, STN figure, log: after the first epoch (one-time costs too: matplotlib's
        # import), and after each later one (one epoch only: the first's is all there is)
        "after_first_epoch_seconds": parts["after_first_epoch"],
        "between_epochs_seconds": parts["between_epochs"] / (len(epochs) - 1)
        if len(epochs) > 1
        else parts["after_first_epoch"],
        "test_seconds": parts["test"],  # the last checkpoint's write, the TenCrop tests
    }


def projected_run_seconds(setup: dict, epochs: int) -> float:
    """A run of `epochs` epochs from the measured parts: what is paid once (set-up, test), the
    first epoch and the time after it, and steady epochs and the time after each for the rest."""
    after_first, between = setup["after_first_epoch_seconds"], setup["between_epochs_seconds"]
    ran = setup["epochs"]
    once = setup["outside_epochs_seconds"] - after_first - (ran - 1) * between
    return (
        once
        + setup["first_epoch_seconds"]
        + after_first
        + (epochs - 1) * (setup["epoch_seconds"] + between)
    )


def prepare_data(root) -> float:
    """What train.py's first start on a dataset does once and later starts read from caches:
    decoding the splits and the val/test-against-train leak check. Done before any setup is
    timed, so that every setup starts alike, whatever its place in --setups; its seconds."""
    started = time.perf_counter()
    splits = {split: datasets.load_split(root, split) for split in datasets.SPLITS}
    train_split = splits.pop("train")
    datasets.split_overlap(train_split, splits, root)
    return time.perf_counter() - started


def run_train(args: argparse.Namespace) -> dict:
    """Each setup trains --epochs real epochs with train.py; epoch times come from metrics.jsonl.

    What train.py measures is what is reported: the first epoch (the set-up of each new
    shape included) and the last, steady one; nothing is projected from a few steps. The
    --project-epochs run is projected from these and train.py's split of its wall time.
    """
    device = utils.resolve_device(
        args.device
    )  # a --device this machine lacks fails before the data
    kinds = [k for k in args.setups.split(",") if k]
    unknown = set(kinds) - set(SETUPS)
    if unknown:
        raise utils.CLIError(f"unknown setups {sorted(unknown)}; choose from {list(SETUPS)}")
    if args.epochs < 1 or args.project_epochs < 1:
        raise utils.CLIError("--epochs and --project-epochs must be at least 1")
    taken = [
        Path(args.runs_dir) / k
        for k in kinds
        if args.runs_dir and (Path(args.runs_dir) / k).exists()
    ]
    if taken:  # train.py would refuse to start a run there, after the data's preparation
        raise utils.CLIError(
            f"--runs-dir {args.runs_dir} already holds {taken[0]}; give another folder"
        )
    with tempfile.TemporaryDirectory(prefix="emonext-bench-") as tmp:
        root = args.dataset_path
        if root is None:
            from make_synthetic import make_synthetic

            train_n, val_n, test_n = args.synthetic_per_class
            splits = {"train": train_n, "val": val_n, "test": test_n}
            root = make_synthetic(Path(tmp) / "synthetic", seed=args.seed, splits=splits)
        preparation = prepare_data(root)
        runs = Path(args.runs_dir) if args.runs_dir else Path(tmp) / "runs"
        per_setup = {k: time_setup(k, args, root, runs) for k in kinds}
    for v in per_setup.values():
        v["projected_run_seconds"] = projected_run_seconds(v, args.project_epochs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    )
    result = {f"{k}_epoch_seconds": round(v["epoch_seconds"], 2) for k, v in per_setup.items()}
    if "ours" in per_setup:
        ours = per_setup["ours"]
        for other in ("official", "timm"):
            if other in per_setup:  # > 1: ours is faster
                ratio = per_setup[other]["epoch_seconds"] / ours["epoch_seconds"]
                result[f"ours_vs_{other}"] = round(ratio, 2)
        result["first_epoch_ratio"] = round(ours["first_epoch_seconds"] / ours["epoch_seconds"], 2)
        # A run of E epochs against E steady epochs: what warm-up and overheads add in all.
        projected = ours["projected_run_seconds"]
        result[f"ours_projected_{args.project_epochs}_epochs_seconds"] = round(projected, 1)
        result[f"ours_projected_{args.project_epochs}_epochs_over_steady_seconds"] = round(
            projected - args.project_epochs * ours["epoch_seconds"], 1
        )
        if peak:
            used = ours["train_images_per_s"] * ours["flops_per_image"] / peak
            result["ours_flop_utilisation"] = round(used, 3)
    # once per dataset, before the setups (prepare_data): not in any setup's figures
    result["data_preparation_seconds"] = round(preparation, 2)
    result.update({"device": name, "torch": torch.__version__, "model": args.model,
                   "batch_size": args.batch_size, "amp": args.amp,
                   "setups": per_setup})  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return result
    print(f"{args.model}, batch {args.batch_size}, amp {args.amp}, device {name}, torch "
          f"{torch.__version__}; train.py's own epoch times (training + validation)")  # fmt: skip
    print(f"{'setup':<10}{'first epoch s':>15}{'steady epoch s':>16}{'train img/s':>13}"
          f"{'run s':>9}{'outside epochs s':>18}{'peak GB':>9}")  # fmt: skip
    for k, v in per_setup.items():
        mem = f"{v['peak_memory_gb']:.1f}" if v["peak_memory_gb"] is not None else "-"
        print(f"{k:<10}{v['first_epoch_seconds']:>15.1f}{v['epoch_seconds']:>16.1f}"
              f"{v['train_images_per_s']:>13.1f}{v['run_seconds']:>9.1f}"
              f"{v['outside_epochs_seconds']:>18.1f}{mem:>9}")  # fmt: skip
    print(f"{'setup':<10}{'set-up s':>10}{'after 1st epoch s':>19}{'after others s':>16}"
          f"{'test s':>8}{f'{args.project_epochs} epochs s (projected)':>26}")  # fmt: skip
    for k, v in per_setup.items():
        print(f"{k:<10}{v['setup_seconds']:>10.1f}{v['after_first_epoch_seconds']:>19.2f}"
              f"{v['between_epochs_seconds']:>16.2f}{v['test_seconds']:>8.1f}"
              f"{v['projected_run_seconds']:>26.1f}")  # fmt: skip
    print(f"data_preparation_seconds: {result['data_preparation_seconds']} (decoding and the "
          "leak check, once per dataset, before the setups; a first start pays it)")  # fmt: skip
    for key in ("ours_vs_official", "ours_vs_timm", "first_epoch_ratio", "ours_flop_utilisation"):
        if key in result:
            print(f"{key}: {result[key]}")
    for key in [k for k in result if k.startswith("ours_projected_")]:
        print(f"{key}: {result[key]}")
    return result


# --------------------------------------------------------------------------------------------
# infer
# --------------------------------------------------------------------------------------------

PRECISIONS = ("torch", "fp32", "int8", "fp16")
STAGES = ("decode", "detect", "crop", "model")


def add_infer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        default="emonext_tiny,emonext_atto@64,emonext_micro@48",
        help="comma-separated NAME or NAME@INPUT (input side; default the model's own)",
    )
    parser.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help="comma-separated subset of torch (PyTorch float32), fp32, int8, fp16 (ONNX Runtime)",
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds; each figure is their median")
    parser.add_argument("--frames", type=int, default=20, help="frames per configuration a round")
    parser.add_argument(
        "--calibration-images", type=int, default=16, help="synthetic faces that calibrate int8"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of torch and ONNX Runtime (default: theirs, one per core)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")


def infer_frame(folder: Path) -> Path:
    """A 640 x 480 JPEG (quality 90) of the astronaut photograph, its face left of centre."""
    import cv2

    import predict

    rgb = predict.read_image(str(Path(__file__).resolve().parents[1] / "tests/data/astronaut.png"))
    frame = np.full((480, 640, 3), 128, np.uint8)
    frame[:, 40:520] = cv2.resize(rgb, (480, 480), interpolation=cv2.INTER_AREA)
    path = folder / "frame.jpg"
    cv2.imwrite(str(path), frame[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def infer_runner(model: torch.nn.Module, precision: str, calibration: int, threads: int | None):
    """(`run(x) -> logits` of `model` at `precision`, ONNX file size in MB or None); ONNX models
    are made as export.py makes them."""
    from models import deploy

    size, chans = model.data_config["image_size"], model.data_config["in_chans"]
    if precision == "torch":
        return (lambda x: model(x).numpy()), None
    fp32 = deploy.to_onnx(model, torch.zeros(1, chans, size, size))
    if precision == "int8":
        rng = np.random.default_rng(0)
        faces = [datasets.draw_face(rng, c) for c in list(datasets.EXPRESSIONS) * calibration]
        import predict

        x = predict.face_tensor(faces[:calibration], model.data_config).numpy()
        fp32 = deploy.quantize_int8(fp32, [x[i : i + 4] for i in range(0, len(x), 4)])
    elif precision == "fp16":
        fp32 = deploy.to_float16(fp32)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice, one per core
    session = ort.InferenceSession(fp32, options, providers=["CPUExecutionProvider"])
    return (lambda x: session.run(None, {"input": x.numpy()})[0]), len(fp32) / 1e6


def time_frames(frame: Path, detector, run, data_config: dict, frames: int) -> dict:
    """Seconds per frame of each stage, averaged over `frames` frames."""
    import predict

    spent = dict.fromkeys(STAGES, 0.0)
    for _ in range(frames):
        t0 = time.perf_counter()
        rgb = predict.read_image(str(frame))
        t1 = time.perf_counter()
        faces = detector(rgb)
        t2 = time.perf_counter()
        crops = predict.crop_faces(rgb, faces[:1], predict.BOX_SCALE["yunet"])
        x = predict.face_tensor([c for c, _, _ in crops], data_config)
        t3 = time.perf_counter()
        run(x)
        t4 = time.perf_counter()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[stage] += seconds / frames
    return spent


def run_infer(args: argparse.Namespace) -> dict:
    """Every (model, precision) in turn, --runs rounds; medians per stage, frames per second."""
    import predict
    from models import create_model

    if args.threads:
        import cv2

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)  # YuNet's
    precisions = [p for p in args.precisions.split(",") if p]
    if set(precisions) - set(PRECISIONS) or args.runs < 1 or args.frames < 1:
        raise utils.CLIError(
            f"--precisions takes {','.join(PRECISIONS)}; --runs and --frames at least 1"
        )
    configs, sizes = {}, {}
    torch.manual_seed(0)
    for entry in [m for m in args.models.split(",") if m]:
        name, _, side = entry.partition("@")
        try:
            model = create_model(name, verbose=False, **({"img_size": int(side)} if side else {}))
        except (KeyError, ValueError, RuntimeError) as err:
            raise utils.CLIError(f"--models {entry}: {err}") from None
        model.eval()
        for precision in precisions:
            run, megabytes = infer_runner(model, precision, args.calibration_images, args.threads)
            configs[(entry, precision)] = (run, model.data_config)
            sizes[(entry, precision)] = megabytes
    detector = predict.YuNetDetector()
    rounds = {key: [] for key in configs}
    with tempfile.TemporaryDirectory(prefix="emonext-bench-") as tmp, torch.no_grad():
        frame = infer_frame(Path(tmp))
        for run, data_config in configs.values():  # warm-up: first calls, allocations
            time_frames(frame, detector, run, data_config, 2)
        for _ in range(args.runs):
            for key, (run, data_config) in configs.items():
                rounds[key].append(time_frames(frame, detector, run, data_config, args.frames))
    rows = []
    for (entry, precision), spent in rounds.items():
        ms = {s: 1000 * float(np.median([r[s] for r in spent])) for s in STAGES}
        total = float(np.median([sum(r.values()) for r in spent])) * 1000
        row = {"model": entry, "precision": precision}
        row |= {f"{s}_ms": round(v, 2) for s, v in ms.items()}
        row |= {"total_ms": round(total, 2), "fps": round(1000 / total, 1)}
        row |= {"model_fps": round(1000 / ms["model"], 1)}
        megabytes = sizes[(entry, precision)]
        rows.append(row | {"onnx_mb": None if megabytes is None else round(megabytes, 2)})
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "runs": args.runs,
              "frames": args.frames, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print_infer(result, args)
    return result


def print_infer(result: dict, args: argparse.Namespace) -> None:
    threads = f"threads {args.threads or 'default'} (torch {result['threads']})"
    print(f"{result['cpu']}, {threads}; ms per frame, medians of {args.runs} interleaved rounds "
          f"of {args.frames} frames")  # fmt: skip
    print(f"{'model':<22}{'precision':>10}" + "".join(f"{s:>9}" for s in STAGES)
          + f"{'total':>9}{'fps':>8}{'model fps':>11}{'ONNX MB':>9}")  # fmt: skip
    rows = {(r["model"], r["precision"]): r for r in result["rows"]}
    for r in rows.values():
        mb = "-" if r["onnx_mb"] is None else f"{r['onnx_mb']:.1f}"
        print(f"{r['model']:<22}{r['precision']:>10}"
              + "".join(f"{r[f'{s}_ms']:>9.2f}" for s in STAGES)
              + f"{r['total_ms']:>9.2f}{r['fps']:>8.1f}{r['model_fps']:>11.1f}{mb:>9}")  # fmt: skip
    for (model, precision), r in rows.items():
        base = rows.get((model, "fp32"))
        if precision in ("int8", "fp16") and base:
            print(f"{model} {precision} / fp32 frames per second: {r['fps'] / base['fps']:.2f} "
                  f"(model alone {r['model_fps'] / base['model_fps']:.2f})")  # fmt: skip


def cpu_name() -> str:
    """The CPU's model name (Linux), else platform.processor()."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def get_args_parser() -> utils.ArgumentParser:
    parser = utils.ArgumentParser(prog="benchmark.py", description="EmoNeXt throughput benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="pil vs fast data pipeline, images per second")
    add_data_args(data)
    data.set_defaults(func=run_data)
    train = sub.add_parser(
        "train", help="official vs ours vs timm: real train.py epochs, first and steady"
    )
    add_train_args(train)
    train.set_defaults(func=run_train)
    infer = sub.add_parser(
        "infer", help="one webcam frame through predict.py's stages, per model and precision"
    )
    add_infer_args(infer)
    infer.set_defaults(func=run_infer)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None); `train`'s --model becomes the model it names
    (--model NAME or emonext_SIZE, default emonext_tiny)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        args.model = parser.model_name(args, default_size="tiny")
    return args


def main(args: argparse.Namespace | list[str] | None = None):
    """`args` from `parse_args`, or the command line to parse."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    try:
        return args.func(args)
    except datasets.DatasetError as err:  # a dataset a user gave, unreadable: one line
        raise utils.CLIError(str(err)) from None


if __name__ == "__main__":
    utils.run_command("benchmark.py", main, parse_args())
