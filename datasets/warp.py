"""The `fast` pipeline's augmentation: one affine warp per image, one grid_sample per batch.

Flips, resize, rotation and crop composed into one affine matrix per image (`make_theta`), the
whole batch sampled by one ``grid_sample`` call on the training device (`fast_warp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transforms import _center_offset


def make_theta(
    src_hw: tuple[int, int],
    resize_hw: tuple[int, int],
    out_size: int,
    top: torch.Tensor,
    left: torch.Tensor,
    angle: torch.Tensor | None = None,
    hflip: torch.Tensor | None = None,
    vflip: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 2, 3) affine_grid thetas reproducing flip -> resize -> rotate -> crop.

    Works backwards from an output pixel (align_corners=False, pixel centres at k + 0.5):
    crop offset -> inverse rotation about the resized image's centre (torchvision/PIL: angle in
    degrees, counter-clockwise) -> inverse resize -> inverse flip -> grid_sample's [-1, 1].
    Composed in float64 on the CPU, so every device gets the same numbers.
    """
    h, w = src_hw
    hr, wr = resize_hw
    b = top.shape[0]
    dt = torch.float64
    top, left = top.to(dt), left.to(dt)
    angle = torch.zeros(b, dtype=dt) if angle is None else angle.to(dt)
    rad = torch.deg2rad(angle)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # Output normalised x -> resized/rotated pixel X = (x + 1) * S / 2 + left, then rotation
    # about c = (wr / 2, hr / 2): P = c + [[cos, -sin], [sin, cos]] (X - c).
    half = out_size / 2.0
    cx, cy = wr / 2.0, hr / 2.0
    tx = half + left - cx  # X - c at x = 0
    ty = half + top - cy
    # P (resized pixels) as an affine function of normalised output (x, y).
    px = torch.stack([cos * half, -sin * half, cx + cos * tx - sin * ty], dim=1)
    py = torch.stack([sin * half, cos * half, cy + sin * tx + cos * ty], dim=1)
    # Resized pixel -> source pixel (scale w / wr) -> normalised source 2 * s / w - 1.
    theta = torch.stack([px * (2.0 / wr), py * (2.0 / hr)], dim=1)
    theta[:, 0, 2] -= 1.0
    theta[:, 1, 2] -= 1.0
    # A flip of the source is a sign change in normalised source coordinates.
    if hflip is not None:
        theta[:, 0] *= torch.where(hflip, -1.0, 1.0).to(dt)[:, None]
    if vflip is not None:
        theta[:, 1] *= torch.where(vflip, -1.0, 1.0).to(dt)[:, None]
    return theta.float()


def _affine_grid(theta: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, 1, out_h, out_w), align_corners=False), as one broadcast add.

    The grid is separable (x part depends on the column, y part on the row); building it with a
    single add is several times faster on CPU than affine_grid's batched matmul.
    """
    dev = theta.device
    xs = (torch.arange(out_w, device=dev, dtype=theta.dtype) + 0.5) * (2.0 / out_w) - 1.0
    ys = (torch.arange(out_h, device=dev, dtype=theta.dtype) + 0.5) * (2.0 / out_h) - 1.0
    col = theta[:, None, :, 0] * xs[None, :, None]  # (B, W, 2)
    row = theta[:, None, :, 1] * ys[None, :, None] + theta[:, None, :, 2]  # (B, H, 2)
    return row[:, :, None, :] + col[:, None, :, :]  # (B, H, W, 2)


def fast_warp(
    images: torch.Tensor, theta: torch.Tensor, out_size: int, mask_outside: bool = True
) -> torch.Tensor:
    """Warp grayscale images (B, H, W) (uint8 or float) by thetas (B, 2, 3) -> (B, 1, S, S).

    Bilinear sampling with border clamping reproduces PIL's resize at the image edges; points
    that fall outside the source after rotation are set to 0 (RandomRotation's fill) with a
    validity mask from a nearest-neighbour sample of ones (cheap: no interpolation weights).
    """
    x = images.unsqueeze(1)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    grid = _affine_grid(theta.to(x.device), out_size, out_size)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask_outside:
        ones = torch.ones((1, 1, 1, 1), device=x.device).expand_as(x)
        valid = F.grid_sample(ones, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out.mul_(valid)
    return out


def _fixed_views_grid(
    src_hw: tuple[int, int], resize_hw: tuple[int, int], size: int, views: list[tuple]
) -> torch.Tensor:
    """One (1, K*S, S, 2) grid holding K fixed views (top, left, hflip) stacked vertically.

    Val/test views are the same for every image, so the batch goes in grid_sample's channel
    dimension and one small grid serves the whole batch.
    """
    top = torch.tensor([v[0] for v in views])
    left = torch.tensor([v[1] for v in views])
    hflip = torch.tensor([v[2] for v in views])
    theta = make_theta(src_hw, resize_hw, size, top, left, hflip=hflip)
    return _affine_grid(theta, size, size).reshape(1, len(views) * size, size, 2)


def ten_crop_views(resize_hw: tuple[int, int], size: int) -> list[tuple[int, int, bool]]:
    """(top, left, hflip) of torchvision's TenCrop: tl, tr, bl, br, centre of the image, then
    the same five of the mirrored image (a mirrored source resized = the resized image mirrored).
    """
    hr, wr = resize_hw
    ct, cl = _center_offset(hr, size), _center_offset(wr, size)
    five = [(0, 0), (0, wr - size), (hr - size, 0), (hr - size, wr - size), (ct, cl)]
    return [(t, l, False) for t, l in five] + [(t, l, True) for t, l in five]
