"""Augmentation: its parameters (the official defaults and overrides) and the `pil` pipeline's
transforms, the official torchvision ones (the reference the `fast` warp reproduces)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .folders import DataConfig

# The official training transforms (REFERENCE.md section 5), then ConvNeXt's recipe switched off:
# RandAugment (`aa`, datasets/auto_augment.py) and random erasing (`re*`, random_erasing.py).
DEFAULT_AUGMENT = {"hflip": 0.5, "vflip": 0.5, "rotation": 20.0, "crop": "random"}
DEFAULT_AUGMENT |= {"aa": "none", "reprob": 0.0, "remode": "pixel", "recount": 1}
# ConvNeXt's fine-tuning values of the same (its main.py defaults; scripts/benchmark.py's recipe).
CONVNEXT_AUGMENT = {"aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel", "recount": 1}


# --------------------------------------------------------------------------------------------
# Augmentation parameters
# --------------------------------------------------------------------------------------------


def _resolve_augment(augment: dict | None) -> dict:
    """Defaults (the official ones) + overrides, in one normalised form.

    hflip/vflip: probability (True -> 0.5, False -> 0); rotation: degrees d (uniform in
    [-d, d]) or a (low, high) pair; crop: "random", "center" or a fixed (top, left); aa: "none",
    "trivial" or a timm "rand-..." string (checked by the loader); reprob: a probability;
    remode: "pixel", "rand" or "const"; recount: at least 1.
    """
    aug = dict(DEFAULT_AUGMENT)
    for k, v in (augment or {}).items():
        if k not in aug:
            raise ValueError(f"unknown augment option {k!r}; known: {sorted(aug)}")
        aug[k] = v
    for k in ("hflip", "vflip"):
        v = aug[k]
        aug[k] = 0.5 if v is True else 0.0 if v is False else float(v)
    rot = aug["rotation"]
    aug["rotation"] = (-float(rot), float(rot)) if np.isscalar(rot) else tuple(map(float, rot))
    crop = aug["crop"]
    if not (crop in ("random", "center") or (len(crop) == 2 and all(int(c) == c for c in crop))):
        raise ValueError(f"augment crop must be 'random', 'center' or (top, left), got {crop!r}")
    if not isinstance(crop, str):
        aug["crop"] = (int(crop[0]), int(crop[1]))
    if not 0 <= float(aug["reprob"]) <= 1:
        raise ValueError(f"augment reprob must be a probability, got {aug['reprob']!r}")
    if aug["remode"] not in ("pixel", "rand", "const"):
        raise ValueError(f"augment remode must be pixel, rand or const, got {aug['remode']!r}")
    if int(aug["recount"]) != aug["recount"] or aug["recount"] < 1:
        raise ValueError(f"augment recount must be an integer >= 1, got {aug['recount']!r}")
    aug["reprob"], aug["recount"] = float(aug["reprob"]), int(aug["recount"])
    return aug


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes `size`, the aspect ratio is kept."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _center_offset(full: int, crop: int) -> int:
    return int(round((full - crop) / 2.0))  # torchvision's center_crop rounding


# --------------------------------------------------------------------------------------------
# The `pil` pipeline: the official torchvision transforms (the reference)
# --------------------------------------------------------------------------------------------


class RepeatChannels(torch.nn.Module):
    """(1, H, W) -> (n, H, W): the grayscale face on every input channel (official: 3)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.n, 1, 1) if self.n != 1 else x


class FixedCrop(torch.nn.Module):
    """RandomCrop with given offsets: lets tests line the pipelines up exactly."""

    def __init__(self, top: int, left: int, size: int):
        super().__init__()
        self.top, self.left, self.size = top, left, size

    def forward(self, img):
        return TF.crop(img, self.top, self.left, self.size, self.size)


class StackCrops(torch.nn.Module):
    """TenCrop's tuple of PIL crops -> (10, C, S, S) tensor."""

    def __init__(self, per_crop: T.Compose):
        super().__init__()
        self.per_crop = per_crop

    def forward(self, crops):
        return torch.stack([self.per_crop(c) for c in crops])


def pil_transform(
    mode: str,
    data_config: DataConfig,
    augment: dict | None = None,
    after_crop: tuple = (),
    last: tuple = (),
) -> T.Compose:
    """The official torchvision transforms (REFERENCE.md section 5) for PIL images.

    train: RandomHorizontalFlip, RandomVerticalFlip, Grayscale, Resize, RandomRotation (nearest,
    fill 0), RandomCrop, `after_crop` (RandAugment: on the PIL image after the geometric
    augmentations, where ConvNeXt's create_transform puts it), ToTensor, repeat channels,
    normalise, `last` (random erasing: on the normalised tensor, as there). val: Grayscale,
    Resize, CenterCrop (the official random crop in validation is a defect not repeated).
    test: Grayscale, Resize, TenCrop.
    """
    size, resize = data_config.image_size, data_config.resize
    to_tensor = [T.ToTensor(), RepeatChannels(data_config.in_chans)]
    if data_config.mean is not None:
        to_tensor.append(T.Normalize(data_config.mean, data_config.std))
    if mode == "train":
        aug = _resolve_augment(augment)
        if aug["crop"] == "random":
            crop = T.RandomCrop(size)
        elif aug["crop"] == "center":
            crop = T.CenterCrop(size)
        else:
            crop = FixedCrop(*aug["crop"], size)
        return T.Compose(
            [
                T.RandomHorizontalFlip(aug["hflip"]),
                T.RandomVerticalFlip(aug["vflip"]),
                T.Grayscale(),
                T.Resize(resize),
                T.RandomRotation(aug["rotation"], interpolation=T.InterpolationMode.NEAREST),
                crop,
                *after_crop,
                *to_tensor,
                *last,
            ]
        )
    if mode == "val":
        return T.Compose([T.Grayscale(), T.Resize(resize), T.CenterCrop(size), *to_tensor])
    if mode == "test":
        return T.Compose(
            [T.Grayscale(), T.Resize(resize), T.TenCrop(size), StackCrops(T.Compose(to_tensor))]
        )
    raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
