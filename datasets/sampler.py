"""The epoch's order of a training split: the seed mixing every stream of the loaders uses, and
`--sampler balanced` (every class drawn equally often, with replacement)."""

from __future__ import annotations

import math

import numpy as np
import torch


def _mix_seed(*values: int) -> int:
    """One 63-bit seed from several ints, stable across platforms and processes."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def balanced_epoch_length(dataset_size: int, num_classes: int, world_size: int) -> int:
    """Images in one epoch of `balanced_order`, over all ranks: the dataset's size rounded up to
    a multiple of classes x ranks, so that every class and every rank gets a whole share."""
    step = num_classes * world_size
    return math.ceil(dataset_size / step) * step


def balanced_order(
    targets: torch.Tensor, seed: int, epoch: int, rank: int, world_size: int
) -> torch.Tensor:
    """This rank's image indices for one epoch of `--sampler balanced`.

    Every class present in `targets` is drawn exactly `balanced_epoch_length / classes` times,
    each draw an image of the class chosen uniformly with replacement; the draws are shuffled and
    rank r takes r::world_size of them. The order depends only on (targets, seed, epoch), the
    same on every rank (the shuffle's rule), so a resumed run draws what it would have drawn.
    """
    counts = torch.bincount(targets)
    present = torch.nonzero(counts)[:, 0]
    length = balanced_epoch_length(len(targets), len(present), world_size)
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch, 2))  # 2: not the shuffle's stream
    by_class = torch.argsort(targets, stable=True)  # image indices, class after class
    first = torch.cumsum(counts, 0) - counts  # where each class starts in by_class
    drawn = present.repeat_interleave(length // len(present))
    # uniform in [0, count): float64 keeps floor(u * count) < count for any dataset size
    within = (torch.rand(length, generator=g, dtype=torch.float64) * counts[drawn]).long()
    order = by_class[first[drawn] + within][torch.randperm(length, generator=g)]
    return order[rank::world_size]
