"""Training and evaluation: `train_one_epoch`, `evaluate`, and the statistics of the reports.

Plain functions with explicit inputs, as in the official ConvNeXt/DeiT `engine.py`. Metrics are
accumulated on the device and read once per epoch: no host sync per step. Everything else a
command needs (devices, checkpoint files, the command line) is in utils.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from losses import hard_targets
from utils import fault_point, is_distributed

# --------------------------------------------------------------------------- precision and kernels


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


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast in `amp_dtype` on `device`; a no-op when it is None (fp32)."""
    return torch.autocast(
        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


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


# --------------------------------------------------------------------------- training


def defers_checks(
    device: torch.device | str, optimizer: torch.optim.Optimizer, scaler=None
) -> bool:
    """Whether train_one_epoch keeps the non-finite checks on the device (`NonFiniteSteps`): on
    a GPU, with a fused optimiser (which can skip a step by itself) and no GradScaler."""
    fused = bool(optimizer.defaults.get("fused"))
    return torch.device(device).type == "cuda" and fused and scaler is None


class NonFiniteSteps:
    """Optimiser steps whose loss is not finite: how many (`total`), and `streak`, the run of
    them that stops training at `max_nonfinite` in a row.

    Read by the host every step, except when `deferred` (see `defers_checks`): a host read per
    step would make the CPU wait for the GPU each step, so it could never queue the next step
    while the GPU computes this one. Deferred, the counters stay on the device, the fused
    optimiser skips a non-finite step itself (its `found_inf` input, the mechanism GradScaler
    uses: the same weights as a skipped step), and `read` brings them to the host (every 25
    steps and at the end); `streak` is then the longest run so far.
    """

    def __init__(self, device: torch.device | str, deferred: bool):
        self.deferred = deferred
        self.total, self.streak = 0, 0
        self._counts = torch.zeros(3, device=device)  # deferred: total, streak, longest streak

    def check(self, step_loss: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """(whether to take the optimiser step, the fused optimiser's skip flag when deferred).
        Every rank takes the same decision, or the weights would diverge."""
        finite = torch.isfinite(step_loss).to(torch.int32)
        if is_distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if self.deferred:
            skip = (1 - finite).float()
            total, streak, longest = self._counts
            streak = (streak + 1) * skip
            self._counts = torch.stack([total + skip, streak, torch.maximum(longest, streak)])
            return True, skip
        take = bool(finite.item())  # a host sync per optimiser step
        self.streak = 0 if take else self.streak + 1
        self.total += not take
        return take, None

    def read(self) -> None:
        if self.deferred:
            self.total, _, self.streak = (int(v) for v in self._counts.tolist())


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip_grad: float | None,
    clip_scaled: bool,
    skip: torch.Tensor | None,
) -> None:
    """Unscale (fp16), clip to `clip_grad`, step. `clip_scaled=True` is the official trainer's
    bug (clipping fp16-scaled gradients), kept for exact reproduction studies. `skip` (1.0 on the
    device: a non-finite step) goes to the fused optimiser, which then leaves the weights alone."""
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
    mixup=None,
    distillation=None,
) -> dict:
    """One pass over `loader`; returns averaged loss parts, accuracy, images/s and step counts.

    `mixup` (datasets.BatchMixup) mixes each batch on the device and gives the loss soft
    targets (accuracy counts the first image's label); `distillation` (losses.Distillation)
    adds the teacher's term to the loss, its logits over the same mixed batch.

    Per optimiser step (`optimizer_step`): unscale, clip, step, then the scheduler and the EMA.
    A non-finite loss skips the step (counted by `NonFiniteSteps`); `max_nonfinite` in a row end
    the epoch with `stopped="nonfinite"`. `stop` (utils.StopVote) ends it early, after the same
    step on every rank. Running sums
    stay on the device; the host reads them every 25 steps for the progress bar and once at the
    end. Only batches of the loader's batch size are autotuned by cuDNN (`cudnn_autotune`): the
    partial last batch runs on cuDNN's heuristics.
    """
    if defer_checks is None:
        defer_checks = defers_checks(device, optimizer, scaler)
    model.train()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, ce*n, sa*n, correct
    images, steps, stopped = 0, 0, ""
    nonfinite = NonFiniteSteps(device, defer_checks)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True)
    started = time.time()
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    batches = len(loader)
    full_batch = getattr(loader, "batch_size", None)  # else the first batch's size
    for i, (x, y) in enumerate(loader):
        full_batch = full_batch or len(y)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        target = y
        if mixup is not None:
            x, target = mixup(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % accumulation_steps == 0 or i + 1 == batches
        sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync, cudnn_autotune(len(y) == full_batch):  # also for the backward's kernels
            with autocast(device, amp_dtype):
                logits, weights = model(x, return_attention=True)
                loss = criterion(logits, weights, target)
                if distillation is not None:
                    loss = distillation(loss, logits, x)
            scaled = loss / accumulation_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        fault_point("step")  # gradients computed, weights not yet updated
        n, parts = len(y), criterion.parts
        correct = (logits.argmax(1) == hard_targets(y)).sum()  # y: labels or distributions
        sums += torch.stack([loss.detach() * n, parts["ce"] * n, parts["sa"] * n, correct]).double()
        step_loss = step_loss + loss.detach()
        images += n
        if not last_micro:
            continue
        take_step, skip = nonfinite.check(step_loss)
        if take_step:
            optimizer_step(optimizer, scaler, clip_grad, clip_scaled, skip)
        optimizer.zero_grad(set_to_none=True)
        # The schedule and the EMA follow optimiser steps, skipped ones included, as officially.
        scheduler.step()
        if ema is not None:
            ema.update()
        steps += 1
        step_loss = torch.zeros((), device=device)
        if steps % 25 == 0 or i + 1 == batches:
            nonfinite.read()
        if bar is not None:
            bar.update(accumulation_steps if i + 1 < batches else bar.total - bar.n)
            if steps % 25 == 0:
                show_progress(bar, sums, images, started)
        if nonfinite.streak >= max_nonfinite:
            stopped = "nonfinite"
            break
        if stop is not None and stop.after_step():
            stopped = "interrupted"
            break
    if stop is not None:
        stop.settle()
    if bar is not None:
        bar.close()
    nonfinite.read()
    total_images = images
    if is_distributed():  # the non-finite count is every rank's already (`check`)
        counts = torch.tensor([images], device=device, dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        total_images = int(counts[0].item())
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
        "nonfinite": nonfinite.total,
        "seconds": seconds,
        "images_per_s": total_images / max(seconds, 1e-9),
        "lr": optimizer.param_groups[0]["lr"],
        "stopped": stopped,
    }


def show_progress(bar, sums: torch.Tensor, images: int, started: float) -> None:
    """The running loss, accuracy and speed on the tqdm bar (one host read of the sums)."""
    s = sums.tolist()
    bar.set_postfix(
        loss=f"{s[0] / images:.3f}",
        acc=f"{100 * s[3] / images:.1f}",
        img_s=f"{images / (time.time() - started):.0f}",
    )


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
            with autocast(device, amp_dtype):
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
    """Accuracy, balanced accuracy and macro-F1 in percent, per-class precision/recall/F1/support,
    confusion matrix, and the calibration of the softmax probabilities (`calibration_metrics`:
    ECE in percent, NLL, Brier)."""
    preds = logits.argmax(1).numpy() if len(targets) else np.zeros(0, dtype=int)
    y = targets.numpy()
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, preds, labels=labels, zero_division=0
    )
    # scikit-learn's balanced_accuracy_score: the mean recall of the classes that have images
    present = support > 0
    return {
        "accuracy": 100.0 * float((preds == y).mean()) if len(y) else 0.0,
        "balanced_accuracy": 100.0 * float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": 100.0 * float(f1.mean()),
        **calibration_metrics(logits, targets, len(classes)),
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


def bootstrap_scores(preds: list[np.ndarray], targets, num_classes, resamples, seed) -> np.ndarray:
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
    tp, true, pred = class_counts(preds, targets, num_classes, indices)
    return 100.0 * (tp.sum(1) / indices.shape[1]), class_scores(tp, true, pred)[2].mean(1)


def class_counts(
    preds: np.ndarray, targets: np.ndarray, num_classes: int, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, true, predicted) per resample and class, (resamples, num_classes) each."""
    resamples = len(indices)
    y, p = targets[indices], preds[indices]
    cell = np.arange(resamples)[:, None] * num_classes
    size = resamples * num_classes
    tp = np.bincount((cell + y)[y == p], minlength=size).reshape(resamples, num_classes)
    true = np.bincount((cell + y).ravel(), minlength=size).reshape(resamples, num_classes)
    pred = np.bincount((cell + p).ravel(), minlength=size).reshape(resamples, num_classes)
    return tp, true, pred


def class_scores(tp: np.ndarray, true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and F1 in percent from `class_counts`; 0 where undefined
    (scikit-learn's zero_division=0)."""

    def ratio(a, b):
        return 100.0 * np.divide(a, b, out=np.zeros(np.shape(a)), where=b > 0)

    return ratio(tp, pred), ratio(tp, true), ratio(2.0 * tp, true + pred)


def resampled_class_scores(
    preds: np.ndarray, targets: np.ndarray, num_classes: int, resamples: int, seed: int
) -> tuple[np.ndarray, ...]:
    """Accuracy and balanced accuracy (resamples,) and each class's precision, recall and F1
    (resamples, num_classes), in percent, of the `bootstrap_indices` resamples: one pass of
    `class_counts` for all five. Balanced accuracy averages the recalls of the classes a
    resample has images of (scikit-learn's balanced_accuracy_score)."""
    blocks = []
    for idx in bootstrap_indices(len(targets), resamples, seed):
        tp, true, pred = class_counts(preds, targets, num_classes, idx)
        precision, recall, f1 = class_scores(tp, true, pred)
        balanced = (recall * (true > 0)).sum(1) / (true > 0).sum(1)
        blocks.append((100.0 * (tp.sum(1) / idx.shape[1]), balanced, precision, recall, f1))
    return tuple(np.concatenate(parts) for parts in zip(*blocks, strict=True))


def per_class_intervals(
    preds: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    scores: tuple[np.ndarray, ...] | None = None,
) -> list[dict]:
    """95 % percentile-bootstrap intervals of each class's precision, recall and F1 (percent), on
    the resamples of `confidence_intervals` (the same seed draws the same images); `scores`:
    `resampled_class_scores` already computed."""
    _, _, *per_class = scores or resampled_class_scores(
        preds, targets, num_classes, resamples, seed
    )
    names = ("precision", "recall", "f1")
    return [
        {
            f"{name}_ci95": percentile_interval(values[:, c])
            for name, values in zip(names, per_class, strict=True)
        }
        for c in range(num_classes)
    ]


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
    scores = resampled_class_scores(preds, targets, num_classes, resamples, seed)
    accuracy, balanced, _, _, f1 = scores
    return {
        "accuracy_ci95": percentile_interval(accuracy),
        "balanced_accuracy_ci95": percentile_interval(balanced),
        "macro_f1_ci95": percentile_interval(f1.mean(1)),
        "per_class_ci95": per_class_intervals(preds, targets, num_classes, scores=scores),
        "bootstrap": {"resamples": int(resamples), "seed": int(seed), "method": "percentile"},
    }


def metrics_with_intervals(
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """`compute_metrics`, plus `confidence_intervals` and `calibration_metrics`' intervals when
    `resamples` > 0 (on the same resamples): accuracy_ci95, balanced_accuracy_ci95,
    macro_f1_ci95, ece_ci95, nll_ci95, brier_ci95, and precision_ci95, recall_ci95 and f1_ci95
    in each class's entry."""
    metrics = compute_metrics(logits, targets, classes)
    preds = logits.argmax(1).numpy() if len(targets) else np.zeros(0, dtype=int)
    intervals = confidence_intervals(preds, targets.numpy(), len(classes), resamples, seed)
    for name, class_intervals in zip(classes, intervals.pop("per_class_ci95", []), strict=False):
        metrics["per_class"][name].update(class_intervals)
    metrics.update(intervals)
    if intervals:
        calibration = calibration_metrics(logits, targets, len(classes), resamples, seed)
        metrics.update({k: v for k, v in calibration.items() if k.endswith("_ci95")})
    return metrics


def format_interval(interval: list[float] | None) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def format_report(metrics: dict) -> str:
    """The metrics as a plain-text table (per class, then accuracy and macro-F1, balanced
    accuracy, calibration)."""
    width = max(len(c) for c in metrics["classes"]) + 2
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"{name:<{width}}{m['precision']:>10.2f}{m['recall']:>10.2f}{m['f1']:>10.2f}"
            f"{m['support']:>10d}"
        )

    def ci(key: str) -> str:
        return " 95 % CI " + format_interval(metrics[key]) if metrics.get(key) else ""

    lines.append(
        f"accuracy {metrics['accuracy']:.2f} %{ci('accuracy_ci95')}   "
        f"macro-F1 {metrics['macro_f1']:.2f} %{ci('macro_f1_ci95')}   "
        f"({metrics['num_images']} images)"
    )
    if "balanced_accuracy" in metrics:
        lines.append(
            f"balanced accuracy {metrics['balanced_accuracy']:.2f} %"
            f"{ci('balanced_accuracy_ci95')} (mean per-class recall)"
        )
    if "ece" in metrics:
        nll, brier = metrics.get("nll_ci95"), metrics.get("brier_ci95")
        lines.append(
            f"calibration: ECE {metrics['ece']:.2f} %{ci('ece_ci95')}   "
            f"NLL {metrics['nll']:.4f}"
            + (f" 95 % CI [{nll[0]:.4f}, {nll[1]:.4f}]" if nll else "")
            + f"   Brier {metrics['brier']:.4f}"
            + (f" 95 % CI [{brier[0]:.4f}, {brier[1]:.4f}]" if brier else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- calibration
# Whether the probabilities mean what they say (Guo et al. 2017, "On Calibration of Modern Neural
# Networks"): among images given 80 % confidence, are 80 % right? Three measures of the softmax
# of the logits (TenCrop: of the crops' mean logits), each an average over images, so that the
# bootstrap resamples them as it resamples the accuracy.

CALIBRATION_BINS = 15  # Guo et al.'s and torchmetrics' MulticlassCalibrationError's default


class CalibrationTerms(NamedTuple):
    """Per image: top-1 confidence, whether the top-1 class is right, its NLL and Brier term."""

    confidence: np.ndarray
    correct: np.ndarray
    nll: np.ndarray
    brier: np.ndarray


def calibration_terms(logits: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """The per-image terms of ECE, NLL and Brier, in float64."""
    log_p = torch.log_softmax(logits.double().reshape(len(targets), num_classes), 1)
    p = log_p.exp()
    confidence, top1 = p.max(1)
    one_hot = F.one_hot(targets.long(), num_classes).double()
    return CalibrationTerms(
        confidence=confidence.numpy(),
        correct=(top1 == targets).double().numpy(),
        nll=-log_p.gather(1, targets.long()[:, None])[:, 0].numpy(),
        brier=((p - one_hot) ** 2).sum(1).numpy(),
    )


def confidence_bins(confidence: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Each confidence's bin: [k/bins, (k+1)/bins), and a bin of its own for exactly 1.0, as
    torchmetrics' `_binning_bucketize` (torch.bucketize(right=True) - 1) places them."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges, confidence, side="right") - 1


def resampled_calibration(
    terms: CalibrationTerms, indices: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ECE (percent), NLL and Brier of every resample (one row of `indices` each).

    ECE = sum over bins of (images in bin / n) * |accuracy(bin) - mean confidence(bin)|
        = (1/n) * sum over bins of |sum over the bin's images of (correct - confidence)|,
    the second form summed for all resamples at once by one `bincount` over (resample, bin).
    """
    resamples, n = indices.shape
    cells = (
        np.arange(resamples)[:, None] * (bins + 1)
        + confidence_bins(terms.confidence, bins)[indices]
    )
    gap = (terms.correct - terms.confidence)[indices]
    per_bin = np.bincount(cells.ravel(), gap.ravel(), minlength=resamples * (bins + 1))
    ece = 100.0 * np.abs(per_bin.reshape(resamples, bins + 1)).sum(1) / n
    return ece, terms.nll[indices].mean(1), terms.brier[indices].mean(1)


def calibration_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    resamples: int = 0,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """ECE (15 equal-width bins of top-1 confidence, L1, in percent: torchmetrics'
    MulticlassCalibrationError), NLL (mean -log p(true class), nats) and the Brier score (mean
    over images of sum over classes (p - one-hot)^2, in [0, 2]); with `resamples` > 0 their 95 %
    intervals on the resamples of `confidence_intervals` (the same seed draws the same images)."""
    if len(targets) == 0:
        return {"ece": 0.0, "nll": 0.0, "brier": 0.0}
    terms = calibration_terms(logits, targets, num_classes)
    (ece,), (nll,), (brier,) = resampled_calibration(terms, np.arange(len(targets))[None])
    out = {"ece": float(ece), "nll": float(nll), "brier": float(brier)}
    if resamples > 0:
        blocks = [resampled_calibration(terms, idx) for idx in
                  bootstrap_indices(len(targets), resamples, seed)]  # fmt: skip
        for name, values in zip(("ece", "nll", "brier"), zip(*blocks, strict=True), strict=True):
            out[f"{name}_ci95"] = percentile_interval(np.concatenate(values))
    return out


def reliability_bins(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int, bins: int = CALIBRATION_BINS
) -> dict:
    """The reliability diagram's data: per confidence bin (the last one: confidence exactly 1),
    its images, mean top-1 confidence and accuracy (percent; None for an empty bin)."""
    terms = calibration_terms(logits, targets, num_classes)
    which = confidence_bins(terms.confidence, bins)
    count = np.bincount(which, minlength=bins + 1)
    confidence = np.bincount(which, terms.confidence, minlength=bins + 1)
    correct = np.bincount(which, terms.correct, minlength=bins + 1)

    def mean(total: np.ndarray) -> list:
        return [100.0 * float(t / c) if c else None for t, c in zip(total, count, strict=True)]

    return {
        "edges": np.linspace(0.0, 100.0, bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": mean(confidence),
        "accuracy": mean(correct),
    }


# --------------------------------------------------------------------------- temperature scaling


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (Guo et al. 2017).

    One parameter, fitted as log T by L-BFGS with a strong-Wolfe line search in float64: the
    NLL is convex in 1/T, so the minimum found is the minimum. Dividing by T > 0 keeps every
    argmax, so accuracy is unchanged by construction.
    """
    logits, targets = logits.detach().double(), targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
        tolerance_grad=1e-12, tolerance_change=1e-15,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
