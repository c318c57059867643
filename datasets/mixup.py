"""Mixup and CutMix on training batches (ConvNeXt's `--mixup`/`--cutmix` recipe): timm's `Mixup`,
with its random draws made reproducible.

timm's `Mixup` mixes a batch in place on any device and returns soft targets with label
smoothing; it draws lambda, the switch and CutMix's box from numpy's global generator. Here it
draws from a generator of its own, seeded per (seed, epoch, rank) at `set_epoch`: a resumed run
(which restarts at an epoch boundary) draws exactly what it would have drawn, and nothing else
that uses numpy's global generator shifts the draws or is shifted by them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from timm.data import Mixup

MIXUP_STREAM = 6  # the seed stream of Mixup's draws (1-5 are the loaders': Loader._aug_generator)
MIXUP_MODES = ("batch", "pair", "elem")


@contextlib.contextmanager
def numpy_global_state(rng: np.random.RandomState) -> Iterator[None]:
    """numpy's global generator runs from `rng`'s state inside; `rng` keeps where it got to and
    the global generator is put back as it was."""
    saved = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(saved)


class BatchMixup:
    """timm's `Mixup` (the same arguments and meanings as timm's and ConvNeXt's flags) with its
    own generator; `mixup(x, y)` returns (mixed images, soft targets (B, num_classes)).

    `off_epoch` (ConvNeXt's `--mixup-off-epoch`, 0: never) turns the mixing off from that epoch
    on; the targets keep their label smoothing, as in timm. `x` is mixed in place where it can
    be: a broadcast view (the fast pipeline's grey channels) is made contiguous first.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.1,
        off_epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
    ):
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            cutmix_minmax=cutmix_minmax,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.off_epoch, self.seed, self.rank = off_epoch, seed, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """This epoch's generator, and whether it still mixes (before `off_epoch`)."""
        self.rng = np.random.RandomState(
            np.random.SeedSequence([self.seed, epoch, self.rank, MIXUP_STREAM]).generate_state(4)
        )
        self.mixup.mixup_enabled = not (self.off_epoch and epoch >= self.off_epoch)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if 0 in x.stride():  # an expanded view: in-place mixing would write one pixel thrice
            x = x.contiguous()
        with numpy_global_state(self.rng):
            return self.mixup(x, y)


def mixup_active(mixup_alpha: float, cutmix_alpha: float, cutmix_minmax) -> bool:
    """Whether the flags ask for Mixup or CutMix at all (timm's and ConvNeXt's rule)."""
    return mixup_alpha > 0 or cutmix_alpha > 0 or cutmix_minmax is not None
