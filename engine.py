"""The training and evaluation loops, shared by train.py, evaluate.py and the benchmarks, and
the writing of checkpoints (atomic, in the background).

Plain functions with explicit inputs, as in the official ConvNeXt/DeiT `engine.py`. Metrics are
accumulated on the device and read once per epoch: no host sync per step.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm statistics drift apart under DDP)."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src)


_FAULT_COUNTS: Counter = Counter()


def fault_point(name: str) -> None:
    """A named point where the fault-injection tests stop the process (docs/RELIABILITY.md).

    EMONEXT_FAULT="NAME:N:SIGNAL" (e.g. "step:10:SIGKILL") sends SIGNAL to this process the N-th
    time it reaches NAME, so that a test kills it at an exact point instead of after a guessed
    delay. Unset, this is one dictionary look-up.
    """
    spec = os.environ.get("EMONEXT_FAULT")
    if not spec:
        return
    point, count, sig = spec.rsplit(":", 2)
    if point == name:
        _FAULT_COUNTS[name] += 1
        if _FAULT_COUNTS[name] == int(count):
            os.kill(os.getpid(), getattr(signal, sig))


def reset_fault_points() -> None:
    """Count from zero again (each run of train.main in one process counts its own points)."""
    _FAULT_COUNTS.clear()


# --------------------------------------------------------------------------- devices


class DeviceError(ValueError):
    """A --device value this machine cannot honour; the message names the flag."""


def resolve_device(name: str | None = None, local_rank: int | None = None) -> torch.device:
    """The torch.device for `--device NAME`: None (a GPU if there is one), cpu, cuda or cuda:N.

    CUDA devices always come back with an index (torch.cuda.set_device rejects a bare "cuda"):
    cuda:LOCAL_RANK under torchrun, else cuda:0. An explicit cuda:N under a multi-process
    torchrun would put every rank on one GPU, so it is refused there.
    """
    text = "auto" if name is None else str(name).strip().lower()
    if text in ("auto", ""):
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise DeviceError(f"--device {name!r}: expected cpu, cuda or cuda:N (N a GPU index)")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {name}: no CUDA GPU is visible to PyTorch {torch.__version__} on this "
            "machine; use --device cpu (or install a CUDA build of torch)"
        )
    count = torch.cuda.device_count()
    if match.group(1) is not None:
        index = int(match.group(1))
        if local_rank is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise DeviceError(
                f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; "
                "pass --device cuda (or leave it out)"
            )
    else:
        index = local_rank or 0
    if index >= count:
        raise DeviceError(
            f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            + ("" if match.group(1) is not None else f" (LOCAL_RANK {index})")
        )
    return torch.device("cuda", index)


def peak_memory_gb(device: torch.device) -> float | None:
    """The most GPU memory this process has held on `device` (GiB), None off CUDA. The device is
    named: under torchrun each rank reads its own GPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def amp_settings(
    amp: bool, device: torch.device, official_quirks: bool = False
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None, GradScaler or None) for `--amp` on `device`.

    bf16 where the device has it (no scaler needed: bf16 has fp32's range); fp16 with a
    GradScaler on GPUs without bf16 (before Ampere) and under --official-quirks, which
    reproduces the official fp16 trainer.
    """
    if not amp:
        return None, None
    if official_quirks or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float16, torch.amp.GradScaler(device.type)
    return torch.bfloat16, None


# --------------------------------------------------------------------------- training


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser should hold.

    EmoNeXt's attended output is unused (as in the official code), so `attention.value` never
    gets a gradient and AdamW never changes it; freezing it says so and lets DDP run without
    find_unused_parameters.
    """
    if getattr(model, "has_attention", False):
        model.attention.value.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def defers_checks(
    device: torch.device | str, optimizer: torch.optim.Optimizer, scaler=None
) -> bool:
    """Whether train_one_epoch keeps the non-finite checks on the device (see there): on a GPU,
    with a fused optimiser (which can skip a step by itself) and no GradScaler."""
    fused = bool(optimizer.defaults.get("fused"))
    return torch.device(device).type == "cuda" and fused and scaler is None


@contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """cuDNN's autotuning (`cudnn.benchmark`) off inside when `enabled` is False; as it was after.

    Autotuning times every candidate kernel of each convolution the first time it sees a shape:
    seconds per shape, paid back only by shapes that recur thousands of times. The training
    batch is such a shape; a training epoch's partial last batch and the evaluation batches are
    not. Measured on an H200 (EmoNeXt-Tiny, bf16, channels-last; docs/PERFORMANCE.md): the
    first step of a 37-image batch took 6.7 s autotuned and 2.7 s with cuDNN's heuristics, the
    first 256- and 7-image evaluation batches 2.0 and 1.5 s against 0.66 s each, and later
    calls ran at the same speed either way (31-50 ms and 40.8 ms).
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before and enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class CompileTrainingBatches(nn.Module):
    """`torch.compile` for the one shape that recurs thousands of times: training batches of
    `batch_size`. Every other call, the partial last batch of an epoch and evaluation, runs the
    module as it is, since each new shape is another compilation (46 s for EmoNeXt-Tiny's
    training step on an H200, docs/PERFORMANCE.md) that a shape met once an epoch never pays
    back. The compiled module is the module itself: the same weights either way.
    """

    def __init__(self, module: nn.Module, batch_size: int):
        super().__init__()
        self.module, self.batch_size = module, batch_size
        self.__dict__["compiled"] = torch.compile(module)  # not registered: no second copy

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.training and x.shape[0] == self.batch_size:
            return self.compiled(x, *args, **kwargs)
        return self.module(x, *args, **kwargs)

    def no_sync(self):
        """DistributedDataParallel's, for gradient accumulation; nothing to hold back otherwise."""
        return self.module.no_sync() if hasattr(self.module, "no_sync") else nullcontext()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    ema=None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    accumulation_steps: int = 1,
    clip_grad: float | None = 1.0,
    clip_scaled: bool = False,
    channels_last: bool = False,
    max_nonfinite: int = 10,
    progress: bool = False,
    desc: str = "",
    stop=None,
    defer_checks: bool | None = None,
) -> dict:
    """One pass over `loader`; returns averaged loss parts, accuracy, images/s and step counts.

    Per optimiser step: unscale (fp16), clip to `clip_grad`, step, scheduler step, EMA update.
    `clip_scaled=True` is the official trainer's bug (clipping fp16-scaled gradients), kept for
    exact reproduction studies. A non-finite loss skips the step (counted); `max_nonfinite` in a
    row end the epoch with `stopped="nonfinite"`. `stop` (truthy when set) ends it early.
    Running sums stay on the device; the host reads them every 25 steps for the progress bar
    and once at the end. Only batches of the loader's batch size are autotuned by cuDNN (see
    `cudnn_autotune`): the partial last batch runs on cuDNN's heuristics.

    The finiteness of each step's loss is read by the host every step, except with
    `defer_checks` (default: on a GPU with a fused optimiser and no GradScaler): a host read per
    step would make the CPU wait for the GPU each step, so it could never queue the next step
    while the GPU computes this one. Then the fused optimiser skips a non-finite step itself
    (its `found_inf` input, the mechanism GradScaler uses; the same weights as a skipped
    step), the counters stay on the device, and the `max_nonfinite` stop is checked whenever
    the host reads them: every 25 steps and at the end.
    """
    if defer_checks is None:
        defer_checks = defers_checks(device, optimizer, scaler)
    model.train()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, ce*n, sa*n, correct
    images, steps, nonfinite, streak, stopped = 0, 0, 0, 0, ""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True)
    started = time.time()
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    # deferred checks: non-finite steps, current streak, longest streak (on the device)
    bad_steps = torch.zeros(3, device=device)
    batches = len(loader)
    full_batch = getattr(loader, "batch_size", None)  # else the first batch's size
    for i, (x, y) in enumerate(loader):
        full_batch = full_batch or len(y)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % accumulation_steps == 0 or i + 1 == batches
        sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync, cudnn_autotune(len(y) == full_batch):  # also for the backward's kernels
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                logits, weights = model(x, return_attention=True)
                loss = criterion(logits, weights, y)
            scaled = loss / accumulation_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        fault_point("step")  # gradients computed, weights not yet updated
        n = len(y)
        parts = criterion.parts
        sums += torch.stack(
            [loss.detach() * n, parts["ce"] * n, parts["sa"] * n, (logits.argmax(1) == y).sum()]
        ).double()
        step_loss = step_loss + loss.detach()
        images += n
        if not last_micro:
            continue
        finite = torch.isfinite(step_loss).to(torch.int32)
        if is_distributed():  # every rank must take the same decision, or the weights diverge
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        skip = None  # deferred: 1.0 on the device when this step must be skipped
        if defer_checks:
            skip = (1 - finite).float()
            streak_now = (bad_steps[1] + 1) * skip
            bad_steps = torch.stack(
                [bad_steps[0] + skip, streak_now, torch.maximum(bad_steps[2], streak_now)]
            )
            take_step = True  # the fused optimiser leaves the weights alone where skip is 1
        else:
            take_step = bool(finite.item())  # a host sync per optimiser step
            streak = 0 if take_step else streak + 1
            nonfinite += not take_step
        if take_step:
            if scaler is not None and not clip_scaled:
                scaler.unscale_(optimizer)
            if clip_grad:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            elif skip is not None:
                optimizer.found_inf, optimizer.grad_scale = skip, None
                optimizer.step()
                del optimizer.found_inf, optimizer.grad_scale
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The schedule and the EMA follow optimiser steps, skipped ones included, as officially.
        scheduler.step()
        if ema is not None:
            ema.update()
        steps += 1
        step_loss = torch.zeros((), device=device)
        if defer_checks and (steps % 25 == 0 or i + 1 == batches):
            # read with the counters: the longest run of non-finite steps so far is the streak
            nonfinite, _, streak = (int(v) for v in bad_steps.tolist())
        if bar is not None:
            bar.update(accumulation_steps if i + 1 < batches else bar.total - bar.n)
            if steps % 25 == 0:
                s = sums.tolist()
                bar.set_postfix(
                    loss=f"{s[0] / images:.3f}",
                    acc=f"{100 * s[3] / images:.1f}",
                    img_s=f"{images / (time.time() - started):.0f}",
                )
        if streak >= max_nonfinite:
            stopped = "nonfinite"
            break
        if stop:
            stopped = "interrupted"
            break
    if bar is not None:
        bar.close()
    if defer_checks:
        nonfinite = int(bad_steps[0].item())
    if is_distributed():
        counts = torch.tensor([images, nonfinite], device=device, dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        total_images = int(counts[0].item())
    else:
        total_images = images
    seconds = time.time() - started
    s = sums.tolist()
    denom = max(total_images, 1)
    return {
        "loss": s[0] / denom,
        "ce": s[1] / denom,
        "sa": s[2] / denom,
        "accuracy": 100.0 * s[3] / denom,
        "images": total_images,
        "steps": steps,
        "nonfinite": nonfinite,
        "seconds": seconds,
        "images_per_s": total_images / max(seconds, 1e-9),
        "lr": optimizer.param_groups[0]["lr"],
        "stopped": stopped,
    }


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) in float32 and targets (N,) of every batch, on the CPU.

    Test-time-augmented batches (B, K, C, H, W), e.g. TenCrop's K = 10 views, are scored as B*K
    images and their logits averaged over the K views (the official TenCrop protocol).
    Under torch.distributed each rank returns its own shard; see `gather_predictions`.
    cuDNN's heuristics choose the kernels, without autotuning (see `cudnn_autotune`).
    """
    was_training = model.training
    model.eval()
    all_logits, all_targets = [], []
    device = torch.device(device)
    with cudnn_autotune(False):
        for images, targets in loader:
            fault_point("predict")
            images = images.to(device, non_blocking=True)
            views = images.shape[1] if images.ndim == 5 else 1
            if views > 1:
                images = images.flatten(0, 1)
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                logits = model(images)
            logits = logits.float().view(-1, views, logits.shape[-1]).mean(1)
            all_logits.append(logits)
            all_targets.append(targets.to(device))
    model.train(was_training)
    if not all_logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(all_logits).cpu(), torch.cat(all_targets).cpu()


def gather_predictions(
    logits: torch.Tensor, targets: torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' predictions on every rank (each image once: the loaders shard without padding)."""
    if not is_distributed():
        return logits, targets
    world = dist.get_world_size()
    sizes = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(len(targets), device=device))
    width = logits.shape[1] if logits.ndim == 2 and logits.numel() else 0
    width = torch.tensor(width, device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    longest = int(max(s.item() for s in sizes))
    padded_logits = torch.zeros(longest, int(width), device=device)
    padded_targets = torch.zeros(longest, dtype=torch.long, device=device)
    padded_logits[: len(targets)] = logits.to(device).reshape(len(targets), -1)
    padded_targets[: len(targets)] = targets.to(device)
    out_logits = [torch.zeros_like(padded_logits) for _ in range(world)]
    out_targets = [torch.zeros_like(padded_targets) for _ in range(world)]
    dist.all_gather(out_logits, padded_logits)
    dist.all_gather(out_targets, padded_targets)
    n = [int(s.item()) for s in sizes]
    logits = torch.cat([x[:k] for x, k in zip(out_logits, n, strict=True)]).cpu()
    targets = torch.cat([x[:k] for x, k in zip(out_targets, n, strict=True)]).cpu()
    return logits, targets


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy and macro-F1 in percent, per-class precision/recall/F1/support, confusion matrix."""
    preds = logits.argmax(1).numpy() if len(targets) else np.zeros(0, dtype=int)
    y = targets.numpy()
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, preds, labels=labels, zero_division=0
    )
    return {
        "accuracy": 100.0 * float((preds == y).mean()) if len(y) else 0.0,
        "macro_f1": 100.0 * float(f1.mean()),
        "per_class": {
            name: {
                "precision": 100.0 * float(precision[i]),
                "recall": 100.0 * float(recall[i]),
                "f1": 100.0 * float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y, preds, labels=labels).tolist(),
        "classes": list(classes),
        "num_images": int(len(y)),
    }


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    classes: list[str],
    amp_dtype: torch.dtype | None = None,
    bootstrap: int = 0,
) -> dict:
    """`compute_metrics` over a whole split, every image counted once across ranks; with
    `bootstrap` > 0 also the 95 % intervals of accuracy and macro-F1 (`confidence_intervals`)."""
    logits, targets = predict(model, loader, device, amp_dtype)
    logits, targets = gather_predictions(logits, targets, device)
    return metrics_with_intervals(logits, targets, classes, bootstrap)


# --------------------------------------------------------------------------- statistics
# FER2013's test set has 3,589 images: at 73 % accuracy one run's 95 % interval is about +-1.5
# points, more than most differences between published models. These functions put that noise
# next to every reported figure. Percentile bootstrap over test images (Efron & Tibshirani 1993),
# seeded, so the same predictions always give the same interval.

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap_indices(n: int, resamples: int, seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """Image indices drawn with replacement, `resamples` rows of `n`, in blocks of at most 1,000
    rows (memory stays flat for 10,000+ resamples). The rows are those of
    `np.random.default_rng(seed).integers(0, n, (resamples, n))`: a function of the arguments."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 1000):
        yield rng.integers(0, n, size=(min(1000, resamples - start), n))


def _bootstrap(preds: list[np.ndarray], targets, num_classes, resamples, seed) -> np.ndarray:
    """(len(preds), 2, resamples): accuracy and macro-F1 of each prediction vector on the same
    resamples (the pairing of a paired bootstrap)."""
    blocks = [
        [resampled_scores(p, targets, num_classes, idx) for p in preds]
        for idx in bootstrap_indices(len(targets), resamples, seed)
    ]
    return np.concatenate([np.array(block) for block in blocks], axis=2)


def resampled_scores(
    preds: np.ndarray, targets: np.ndarray, num_classes: int, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 (percent) of every resample: one row of `indices` per resample.

    Vectorised: the per-class counts of all resamples come from three `bincount`s over
    (resample, class) cells. F1 of a class is 2 TP / (true + predicted), 0 where both are 0,
    averaged over all `num_classes`: `compute_metrics` (scikit-learn, zero_division=0) exactly.
    """
    resamples = len(indices)
    y, p = targets[indices], preds[indices]
    correct = y == p
    cell = np.arange(resamples)[:, None] * num_classes
    size = resamples * num_classes
    tp = np.bincount((cell + y)[correct], minlength=size).reshape(resamples, num_classes)
    true = np.bincount((cell + y).ravel(), minlength=size).reshape(resamples, num_classes)
    pred = np.bincount((cell + p).ravel(), minlength=size).reshape(resamples, num_classes)
    denominator = true + pred
    f1 = np.divide(2.0 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    return 100.0 * correct.mean(1), 100.0 * f1.mean(1)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return [float(low), float(high)]


def confidence_intervals(
    preds: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """95 % percentile-bootstrap intervals of accuracy and macro-F1, in percent.

    Resampling the test images measures how much the figure depends on which images happened to
    be in the test set; it says nothing about the training seed (scripts/reproduce.py --seeds).
    """
    preds, targets = np.asarray(preds), np.asarray(targets)
    if len(targets) == 0 or resamples <= 0:
        return {}
    ((acc, f1),) = _bootstrap([preds], targets, num_classes, resamples, seed)
    return {
        "accuracy_ci95": percentile_interval(acc),
        "macro_f1_ci95": percentile_interval(f1),
        "bootstrap": {"resamples": int(resamples), "seed": int(seed), "method": "percentile"},
    }


def metrics_with_intervals(
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """`compute_metrics`, plus `confidence_intervals` when `resamples` > 0."""
    metrics = compute_metrics(logits, targets, classes)
    preds = logits.argmax(1).numpy() if len(targets) else np.zeros(0, dtype=int)
    metrics.update(confidence_intervals(preds, targets.numpy(), len(classes), resamples, seed))
    return metrics


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
    scores = _bootstrap([preds_a, preds_b], targets, num_classes, resamples, seed)
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


def format_interval(interval: list[float] | None) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def format_report(metrics: dict) -> str:
    """The metrics as a plain-text table (per class, then accuracy and macro-F1)."""
    width = max(len(c) for c in metrics["classes"]) + 2
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"{name:<{width}}{m['precision']:>10.2f}{m['recall']:>10.2f}{m['f1']:>10.2f}"
            f"{m['support']:>10d}"
        )
    ci = {k: " 95 % CI " + format_interval(metrics[k]) for k in ("accuracy_ci95", "macro_f1_ci95")
          if metrics.get(k)}  # fmt: skip
    lines.append(
        f"accuracy {metrics['accuracy']:.2f} %{ci.get('accuracy_ci95', '')}   "
        f"macro-F1 {metrics['macro_f1']:.2f} %{ci.get('macro_f1_ci95', '')}   "
        f"({metrics['num_images']} images)"
    )
    return "\n".join(lines)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file, then rename: readers never see half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:  # newline="": CSV text keeps its own line ends
        f.write(text)
    os.replace(tmp, path)


def atomic_save(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a broken file
    (and a failed one, e.g. a full disk, removes its temporary file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fault_point(f"save:{path.name}")
    os.replace(tmp, path)


def same_file(src: Path, dst: Path) -> None:
    """dst becomes a copy of src: a hard link where the file system allows (no second write of
    hundreds of MB; replacing src later leaves dst as it is), else a copy; atomic either way."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    fault_point(f"save:{dst.name}")
    os.replace(tmp, dst)


def host_copy(t: torch.Tensor) -> tuple[torch.Tensor, torch.device | None]:
    """A copy of `t` in host memory, in its layout, and the CUDA device on whose current stream
    the copy is still running (None: the copy is done). A CUDA tensor is copied asynchronously
    into pinned memory (PyTorch's caching host allocator reuses those blocks epoch after epoch)."""
    if t.is_cuda:
        pinned = torch.empty_like(t, device="cpu", pin_memory=True)
        return pinned.copy_(t, non_blocking=True), t.device
    return t.detach().clone(), None


def snapshot(obj, copies_on: set):
    """`obj` with every tensor in its dicts, lists and tuples copied by host_copy (dicts keep
    their class and attributes, e.g. a state dict's _metadata); other values are kept as they
    are. Adds to `copies_on` the CUDA devices whose copies are still running."""
    if isinstance(obj, torch.Tensor):
        out, device = host_copy(obj)
        if device is not None:
            copies_on.add(device)
        return out
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = snapshot(v, copies_on)
        return out
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v, copies_on) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread while training goes on.

    Written in the training loop, a Tiny checkpoint (484.6 MB: weights, EMA weights, AdamW's
    state) kept an H200 idle for 0.46 s every epoch; torch.save releases the GIL while it writes,
    so the loop runs on meanwhile. The next step updates weights and optimiser state in place,
    so `save` writes a copy (snapshot): CUDA tensors are copied into pinned host memory on their
    stream, asynchronously, and the writer waits for an event recorded after the copies before
    it serialises (later in-place updates on that stream run after the copies). The copy costs
    one checkpoint's size of host memory (pinned on CUDA) while it is written. One write at a
    time: `save` waits for the previous one first. The thread is not a daemon, so a run that
    fails meanwhile still finishes its file (written to .tmp, then renamed: a kill never leaves
    a broken one). The writer's error is raised in the main thread by the next `save` or `wait`.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, path: Path, link: Path | None = None) -> None:
        """Write `state` as it is now to `path`, then make `link` the same file (same_file)."""
        self.wait()
        copies_on = set()
        state = snapshot(state, copies_on)
        events = []
        for device in copies_on:
            events.append(torch.cuda.Event())
            events[-1].record(torch.cuda.current_stream(device))
        self._thread = threading.Thread(
            target=self._write, args=(state, events, path, link), name=f"write {path.name}"
        )
        self._thread.start()

    def _write(self, state: dict, events: list, path: Path, link: Path | None) -> None:
        try:
            for event in events:
                event.synchronize()  # the copies to host memory are complete
            atomic_save(state, path)
            if link is not None:
                same_file(path, link)
        except BaseException as err:
            self._error = err

    def wait(self) -> None:
        """Until the file being written is written; raises the writer's error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Every way out waits; the writer's error does not hide one already on its way."""
        try:
            self.wait()
        except BaseException as err:
            if exc is None:
                raise
            print(f"train.py: writing the checkpoint failed as well: {err!r}", file=sys.stderr)


def save_confusion_matrix(metrics: dict, path: str, title: str = "") -> None:
    """A confusion-matrix PNG (row-normalised colours, counts written in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    classes = metrics["classes"]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.2f} %")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default (where it has one) and the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for train.py and evaluate.py: an error is one line (exit status 2, no usage
    block, which for train.py is 20 lines that bury the message); `check` validates ranges;
    `explicit` tells which flags the command line gave."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def flag(self, dest: str) -> str:
        """The option string of `dest` ("gradient_accumulation_steps" -> "--gradient-...")."""
        return next(a.option_strings[0] for a in self._actions if a.dest == dest)

    def check(self, args: argparse.Namespace, rules: dict[str, tuple[str, Callable]]) -> None:
        """`rules`: dest -> (what the value must be, predicate). None values are not checked;
        a float must also be finite."""
        for dest, (requirement, ok) in rules.items():
            value = getattr(args, dest)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                self.error(f"{self.flag(dest)} {value}: must be a finite number")
            if not ok(value):
                self.error(f"{self.flag(dest)} {value}: must be {requirement}")

    def explicit(self, argv: list[str] | None) -> set[str]:
        """The dests that `argv` gives a value to (parsed again with every default suppressed)."""
        saved = [(a, a.default) for a in self._actions]
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            return set(vars(self.parse_args(argv)))
        finally:
            for action, default in saved:
                action.default = default
