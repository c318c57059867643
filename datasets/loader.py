"""Loaders: batches of one split for one rank, from the `fast` (on-device warp) or `pil`
(torchvision transforms in a DataLoader) pipeline; `build_loader` picks one."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .auto_augment import parse_aa, rand_augment, rand_augment_params, timm_rand_augment
from .folders import DataConfig, SplitData, decode_image, load_split, read_soft_labels
from .random_erasing import erase_params, random_erase, timm_random_erasing
from .sampler import _mix_seed, balanced_epoch_length, balanced_order
from .transforms import _center_offset, _resized_hw, _resolve_augment, pil_transform
from .warp import _fixed_views_grid, fast_warp, make_theta, ten_crop_views


class _PilDataset(torch.utils.data.Dataset):
    """Reads the files with decode_image (as the fast pipeline does; for the RGB images that
    torchvision's ImageFolder reads, the same as its RGB then Grayscale) and applies the
    torchvision transforms.

    Items are (index, sample_seed) pairs: each sample's transform runs on a CPU RNG seeded from
    sample_seed, inside fork_rng so the caller's global RNG is left untouched. The result is
    independent of num_workers and of anything else drawn from the global RNG. timm's
    RandAugment and RandomErasing also draw from Python's and NumPy's global RNGs: with
    `python_rngs` those are seeded from sample_seed too, and restored after.
    """

    def __init__(
        self,
        paths: list[str],
        targets: torch.Tensor,
        transform: T.Compose,
        python_rngs: bool = False,
    ):
        self.paths, self.targets, self.transform = paths, targets, transform
        self.python_rngs = python_rngs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        img = Image.fromarray(decode_image(self.paths[index]))
        if self.python_rngs:
            saved = random.getstate(), np.random.get_state()
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed)
            x = self.transform(img)
        if self.python_rngs:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        return x, self.targets[index]


class Loader:
    """Batches of one split for one rank. Iterate for an epoch; call set_epoch(e) before each.

    The epoch's order and augmentation depend only on (seed, epoch, rank). `sampler` "balanced"
    (training only) draws classes equally often (`balanced_order`) instead of every image once.
    `targets` (training only, `LABEL_TARGETS`): "label", the folder's class (int64); "draw", a
    class drawn from the image's `split.soft_targets` row, anew each epoch (int64); "soft",
    the row itself (float32, (B, classes)).
    """

    def __init__(
        self,
        split: SplitData,
        mode: str,
        batch_size: int,
        data_config: DataConfig,
        device: torch.device,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int,
        world_size: int,
        augment: dict | None,
        sampler: str = "shuffle",
        targets: str = "label",
    ):
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.split, self.mode, self.batch_size = split, mode, batch_size
        self.data_config, self.device = data_config, torch.device(device)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.augment = _resolve_augment(augment)
        # ConvNeXt's recipe: RandAugment's ops fill uncovered borders with the mean gray (timm's
        # img_mean; 128, its default, without normalisation), random erasing after normalising.
        mean = data_config.mean
        self.aa_fill = 128 if mean is None else round(255 * sum(mean) / len(mean))
        self.aa = parse_aa(self.augment["aa"], self.aa_fill) if mode == "train" else None
        self.reprob = self.augment["reprob"] if mode == "train" else 0.0
        self.epoch = 0
        self.classes = list(split.classes)
        self.dataset_size = len(split.targets)
        if sampler not in ("shuffle", "balanced") or (sampler == "balanced" and mode != "train"):
            raise ValueError(f"sampler must be 'shuffle' ('balanced' to train), got {sampler!r}")
        self.sampler = sampler
        if targets not in ("label", "draw", "soft") or (
            targets != "label" and (mode != "train" or split.soft_targets is None)
        ):
            raise ValueError(f"targets {targets!r} needs a training split with soft targets")
        self.targets_kind = targets
        if sampler == "balanced":
            classes = int((torch.bincount(split.targets) > 0).sum())
            self.num_samples = balanced_epoch_length(self.dataset_size, classes, world_size)
            self.num_samples //= world_size
        elif mode == "train":  # DistributedSampler: pad so every rank gets the same count
            self.num_samples = math.ceil(self.dataset_size / world_size)
        else:  # evaluation: rank r gets r::world_size, every image counted exactly once
            self.num_samples = len(range(rank, self.dataset_size, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in order."""
        if self.sampler == "balanced":
            return balanced_order(
                self.split.targets, self.seed, self.epoch, self.rank, self.world_size
            )
        n = self.dataset_size
        if self.shuffle:  # same permutation on every rank (seed, epoch), like DistributedSampler
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.mode == "train":
            total = self.num_samples * self.world_size
            if total > n:
                order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
            return order[self.rank : total : self.world_size]
        return order[self.rank :: self.world_size]

    def examples(self, indices: list[int]) -> torch.Tensor:
        """Images `indices` of the whole split (any rank's), as this val/test loader's batches
        show them: e.g. a fixed set of faces to picture."""
        if self.mode == "train":
            raise ValueError("examples() gives val/test views; training views are random")
        return self._examples(indices)

    def _batch_targets(self) -> list[torch.Tensor] | None:
        """The epoch's targets, batch by batch on the device, for `targets` "draw" and "soft";
        None for "label" (the split's own). The draws come from a stream of their own, seeded by
        (seed, epoch, rank), so a resumed run draws what it would have drawn."""
        if self.targets_kind == "label":
            return None
        batches = list(self._batches())
        if not batches:
            return None
        soft = self.split.soft_targets[torch.cat(batches)]
        if self.targets_kind == "draw":
            soft = torch.multinomial(soft, 1, generator=self._aug_generator(5))[:, 0]
        return list(soft.to(self.device).split([len(b) for b in batches]))

    def _aug_generator(self, stream: int = 1) -> torch.Generator:
        """Stream 1: the warp (fast) or each image's seed (pil); 3: RandAugment, 4: random
        erasing (fast), 5: FER+'s drawn classes; each its own, so that switching one on leaves
        the others' draws alone."""
        return torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank, stream))

    def _batches(self) -> Iterator[torch.Tensor]:
        idx = self.indices()
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, len(idx)), self.batch_size):
            yield idx[start : start + self.batch_size]


class FastLoader(Loader):
    """The split as uint8 on `device`; each batch warped by one grid_sample call."""

    def __init__(self, split: SplitData, *args, contiguous: bool = False, **kwargs):
        super().__init__(split, *args, **kwargs)
        self.contiguous = contiguous
        self.images = split.images.to(self.device)
        self.targets = split.targets.to(self.device)
        h, w = self.images.shape[1:]
        size = self.data_config.image_size
        self.resize_hw = _resized_hw(h, w, self.data_config.resize)
        hr, wr = self.resize_hw
        if hr < h or wr < w:
            # Shrinking needs PIL's antialiasing, which a bilinear warp lacks: resize the whole
            # split once (antialiased, rounded to uint8 as PIL does); the warp then only crops,
            # flips and rotates at scale 1.
            small = F.interpolate(
                self.images.unsqueeze(1).float(),
                size=(hr, wr),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            self.images = small.round_().clamp_(0, 255).to(torch.uint8).squeeze(1)
            h, w = hr, wr
        self.src_hw = (h, w)
        if self.mode in ("val", "test"):
            if self.mode == "val":
                views = [(_center_offset(hr, size), _center_offset(wr, size), False)]
            else:
                views = ten_crop_views(self.resize_hw, size)
            self.views = len(views)
            grid = _fixed_views_grid(self.src_hw, self.resize_hw, size, views)
            self.view_grid = grid.to(self.device)
            # Only a crop larger than the resized image reaches outside it (CenterCrop pads 0).
            self.view_mask = None
            if hr < size or wr < size:
                ones = torch.ones(1, 1, h, w, device=self.device)
                self.view_mask = F.grid_sample(
                    ones, self.view_grid, "nearest", "zeros", align_corners=False
                )
        cfg = self.data_config
        if cfg.mean is not None:
            self.mean = torch.tensor(cfg.mean, device=self.device)
            self.std = torch.tensor(cfg.std, device=self.device)

    def random_params(self, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Augmentation parameters of `b` training images, drawn from `g` (on the CPU).

        Same distributions as the torchvision transforms: Bernoulli flips, a uniform angle,
        integer crop offsets uniform in [0, resized - size].
        """
        aug, size = self.augment, self.data_config.image_size
        hr, wr = self.resize_hw
        hflip = torch.rand(b, generator=g) < aug["hflip"]
        vflip = torch.rand(b, generator=g) < aug["vflip"]
        lo, hi = aug["rotation"]
        angle = torch.empty(b, dtype=torch.float64).uniform_(lo, hi, generator=g)
        if aug["crop"] == "random":
            top = torch.randint(0, max(hr - size, 0) + 1, (b,), generator=g)
            left = torch.randint(0, max(wr - size, 0) + 1, (b,), generator=g)
        else:
            if aug["crop"] == "center":
                t, l = _center_offset(hr, size), _center_offset(wr, size)
            else:
                t, l = aug["crop"]
            top, left = torch.full((b,), t), torch.full((b,), l)
        return {"hflip": hflip, "vflip": vflip, "angle": angle, "top": top, "left": left}

    def _random_theta(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, bool]:
        p = self.random_params(b, g)
        size = self.data_config.image_size
        hr, wr = self.resize_hw
        theta = make_theta(
            self.src_hw,
            self.resize_hw,
            size,
            p["top"],
            p["left"],
            p["angle"],
            p["hflip"],
            p["vflip"],
        )
        # The validity mask is only needed when a view can leave the image.
        top, left = p["top"], p["left"]
        inside = self.augment["rotation"] == (0.0, 0.0) and bool(
            (top >= 0).all()
            and (left >= 0).all()
            and (top <= hr - size).all()
            and (left <= wr - size).all()
        )
        return theta, not inside

    def _to_model_channels(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 1, S, S) in [0, 1] -> repeated to in_chans, then normalised."""
        cfg = self.data_config
        shape = list(x.shape)
        shape[-3] = cfg.in_chans
        # The channel repeat is a broadcast view: materialising 3 identical planes costs more
        # than the warp itself on a CPU, and the first convolution reads the view as it is.
        x = x.expand(shape)
        if cfg.mean is not None:
            view = [-1, 1, 1]
            x = (x - self.mean.view(view)) / self.std.view(view)
        elif self.contiguous:
            x = x.contiguous()
        return x

    def _epoch_plan(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
        """The epoch's index batches and warps, on the device, made before its first batch.

        The random numbers are drawn on the CPU in batch order, as batch-by-batch drawing would;
        the whole epoch then crosses to the device in two copies. Copying each batch's indices
        and warp from pageable memory would wait for the GPU twice a step, so the host could
        never queue the next step while the GPU works on this one.
        """
        batches = list(self._batches())
        sizes = [len(idx) for idx in batches]
        if not batches:
            return [], [], []
        all_idx = torch.cat(batches).to(self.device, non_blocking=True)
        if self.mode != "train":
            return list(all_idx.split(sizes)), [None] * len(sizes), [False] * len(sizes)
        g = self._aug_generator()
        thetas, outside = [], []
        for b in sizes:
            theta, out = self._random_theta(b, g)
            thetas.append(theta)
            outside.append(out)
        all_theta = torch.cat(thetas)
        if self.device.type == "cuda":
            all_theta = all_theta.pin_memory()
        all_theta = all_theta.to(self.device, non_blocking=True)
        return list(all_idx.split(sizes)), list(all_theta.split(sizes)), outside

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.data_config.image_size
        # Made only when switched on: a default run draws nothing more than before.
        g_aa = self._aug_generator(3) if self.aa is not None else None
        g_re = self._aug_generator(4) if self.reprob > 0 else None
        soft = self._batch_targets()
        for k, (idx, theta, outside) in enumerate(zip(*self._epoch_plan(), strict=True)):
            imgs = self.images[idx]
            targets = self.targets[idx] if soft is None else soft[k]
            if self.mode != "train":
                yield self._to_model_channels(self._fixed_views(imgs)), targets
                continue
            x = fast_warp(imgs, theta, size, mask_outside=outside)
            if g_aa is not None:  # on the gray plane, as timm's on the PIL "L" image
                params = rand_augment_params(self.aa, len(idx), g_aa)
                x = rand_augment(x, self.aa, params, float(self.aa_fill))
            x = self._to_model_channels(x)
            if g_re is not None:  # on the normalised channels, last, as timm
                params = erase_params(
                    len(idx), size, size, self.reprob, self.augment["recount"], g_re
                )
                noise_seed = int(torch.randint(0, 2**62, (1,), generator=g_re))
                x = random_erase(x, params, self.augment["remode"], noise_seed)
            yield x, targets

    def _fixed_views(self, imgs: torch.Tensor) -> torch.Tensor:
        """val/test: (B, H, W) uint8 -> (B, 1, S, S) or (B, 10, 1, S, S) in [0, 1].

        The views are the same for every image: batch in the channel dimension, all views
        stacked in one grid, one grid_sample call: (1, B, K*S, S).
        """
        size = self.data_config.image_size
        src = imgs.unsqueeze(0).float().div_(255.0)
        x = F.grid_sample(src, self.view_grid, "bilinear", "border", align_corners=False)
        if self.view_mask is not None:
            x = x * self.view_mask
        x = x.view(imgs.shape[0], self.views, 1, size, size)
        return x[:, 0] if self.mode == "val" else x

    def _examples(self, indices: list[int]) -> torch.Tensor:
        idx = torch.tensor(indices, dtype=torch.int64, device=self.device)
        return self._to_model_channels(self._fixed_views(self.images[idx]))


class PilLoader(Loader):
    """The reference: torchvision transforms per image in a DataLoader."""

    def __init__(self, split: SplitData, *args, num_workers: int = 0, **kwargs):
        super().__init__(split, *args, **kwargs)
        self.num_workers = num_workers
        after_crop = [timm_rand_augment(self.augment["aa"], self.aa_fill)] if self.aa else []
        last = []
        if self.reprob > 0:
            last = [
                timm_random_erasing(self.reprob, self.augment["remode"], self.augment["recount"])
            ]
        transform = pil_transform(self.mode, self.data_config, self.augment, after_crop, last)
        timm_parts = bool(after_crop or last)
        self.dataset = _PilDataset(split.paths, split.targets, transform, python_rngs=timm_parts)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        g = self._aug_generator()
        sample_seeds = torch.randint(0, 2**62, (len(idx),), generator=g).tolist()
        items = list(zip(idx.tolist(), sample_seeds, strict=True))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=items,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
            # Worker seeds are irrelevant (each sample is seeded), but keep them reproducible.
            generator=torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank)),
        )
        soft = self._batch_targets()
        for k, (x, y) in enumerate(loader):
            y = y if soft is None else soft[k]
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _examples(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.dataset[(i, 0)][0] for i in indices]).to(self.device)


def build_loader(
    root: str | os.PathLike,
    split: str,
    *,
    mode: str,
    pipeline: str = "fast",
    batch_size: int = 64,
    data_config: DataConfig | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    shuffle: bool | None = None,
    drop_last: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    skip_bad_images: bool = False,
    augment: dict | None = None,
    contiguous: bool = False,
    cache: bool = True,
    sampler: str = "shuffle",
    targets: str = "label",
) -> Loader:
    """Batches (images float32 on `device`, targets int64 on `device`) of root/split.

    mode "train": official augmentation, (B, C, S, S); "val": resize + centre crop,
    (B, C, S, S); "test": TenCrop, (B, 10, C, S, S). Values in [0, 1], then normalised if
    data_config has mean/std. In the fast pipeline the C channels are a broadcast view of one
    plane unless `contiguous` (or normalisation) materialises them. num_workers applies to the
    pil pipeline only. rank/world_size shard the split (train: padded like DistributedSampler;
    val/test: rank r gets r::world_size, so every image is counted once). sampler "balanced"
    (mode "train"): every class equally often per epoch (`balanced_order`). `targets` other
    than "label" (mode "train"; `LABEL_TARGETS`) read root/soft_labels.csv (`read_soft_labels`)
    and yield its draws or rows as the targets.
    """
    data_config = data_config or DataConfig()
    if shuffle is None:
        shuffle = mode == "train"
    data = load_split(root, split, skip_bad_images=skip_bad_images, cache=cache)
    if targets != "label" and mode == "train":
        data.soft_targets = read_soft_labels(root, data)
    common = dict(
        mode=mode,
        batch_size=batch_size,
        data_config=data_config,
        device=torch.device(device),
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
        augment=augment,
        sampler=sampler,
        targets=targets,
    )
    if pipeline == "fast":
        return FastLoader(data, contiguous=contiguous, **common)
    if pipeline == "pil":
        return PilLoader(data, num_workers=num_workers, **common)
    raise ValueError(f"pipeline must be 'fast' or 'pil', got {pipeline!r}")


def denormalize(images: torch.Tensor, data_config: DataConfig) -> torch.Tensor:
    """Undo the mean/std normalisation (for visualisation); identity when there is none."""
    if data_config.mean is None:
        return images
    shape = [1] * (images.dim() - 3) + [-1, 1, 1]
    mean = torch.tensor(data_config.mean, device=images.device).view(shape)
    std = torch.tensor(data_config.std, device=images.device).view(shape)
    return images * std + mean
