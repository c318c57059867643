"""Random erasing (`--reprob`, `--remode`, `--recount`) as timm.data.RandomErasing defines it:
timm's own transform for the `pil` pipeline, the same draws batched for the `fast` pipeline.

After normalisation, on the model's channels: a gray face repeated to 3 channels gets per-channel
noise in `pixel` and `rand` modes (as timm erases an RGB image), so an erased box is not gray.
"""

from __future__ import annotations

import math

import torch

MODES = ("pixel", "rand", "const")
# timm's RandomErasing defaults (ConvNeXt keeps them): box area in [2 %, 1/3] of the image
# (divided by the box count), aspect ratio log-uniform in [0.3, 1/0.3], 10 tries per box.
MIN_AREA, MAX_AREA, MIN_ASPECT, ATTEMPTS = 0.02, 1 / 3, 0.3, 10


def timm_random_erasing(prob: float, mode: str, count: int):
    """timm's RandomErasing for the pil pipeline's normalised CPU tensors."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(prob, mode=mode, max_count=count, device="cpu")


def erase_params(
    b: int, h: int, w: int, prob: float, count: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Boxes of `b` images (B, count, 4: top, left, height, width; `valid` (B, count)), from `g`.

    timm's RandomErasing._erase, vectorised: the image erased with probability `prob`; n boxes,
    n uniform in [1, count]; each box the first of 10 tries whose size fits, a try being an area
    U(2 %, 1/3) x image / n and an aspect ratio exp(U(log 0.3, log 1/0.3)), sides rounded half
    to even (Python's round), the offsets uniform integers.
    """
    erase = torch.rand(b, generator=g, dtype=torch.float64) <= prob
    n = torch.randint(1, count + 1, (b,), generator=g)
    area = torch.empty(b, count, ATTEMPTS, dtype=torch.float64).uniform_(
        MIN_AREA, MAX_AREA, generator=g
    )
    area = area * (h * w) / n[:, None, None]
    log_r = torch.empty(b, count, ATTEMPTS, dtype=torch.float64)
    log_r.uniform_(math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT), generator=g)
    bh = torch.round(torch.sqrt(area * torch.exp(log_r))).long()
    bw = torch.round(torch.sqrt(area / torch.exp(log_r))).long()
    fits = (bw < w) & (bh < h)
    first = fits.int().argmax(-1, keepdim=True)  # the first try that fits (0 if none does)
    bh, bw = bh.gather(-1, first)[..., 0], bw.gather(-1, first)[..., 0]
    u = torch.rand(b, count, 2, generator=g, dtype=torch.float64)
    top = torch.floor(u[..., 0] * (h - bh + 1)).long()
    left = torch.floor(u[..., 1] * (w - bw + 1)).long()
    valid = fits.any(-1) & erase[:, None] & (torch.arange(count)[None] < n[:, None])
    return {"box": torch.stack([top, left, bh, bw], -1), "valid": valid}


def random_erase(
    x: torch.Tensor, params: dict[str, torch.Tensor], mode: str, noise_seed: int
) -> torch.Tensor:
    """Erase the boxes of `params` from (B, C, H, W) `x` (a new tensor; `x` is untouched):
    N(0, 1) per pixel and channel (`pixel`), per box and channel (`rand`), or 0 (`const`).
    The noise comes from a generator on x's device seeded with `noise_seed`."""
    b, c, h, w = x.shape
    erased = torch.nonzero(params["valid"].any(1))[:, 0]
    if not len(erased):
        return x
    # Only the erased images (a quarter at ConvNeXt's 0.25) get noise and a copy.
    box, valid = params["box"][erased].to(x.device), params["valid"][erased].to(x.device)
    idx, n = erased.to(x.device), len(erased)
    gen = torch.Generator(device=x.device).manual_seed(noise_seed)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    part = x.index_select(0, idx)
    if mode == "pixel":
        noise = torch.randn(part.shape, generator=gen, device=x.device, dtype=x.dtype)
    for k in range(box.shape[1]):  # later boxes over earlier ones, as timm draws them
        top, left, bh, bw = (v.view(n, 1, 1) for v in box[:, k].unbind(-1))
        inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
        inside = (inside & valid[:, k].view(n, 1, 1)).unsqueeze(1)
        if mode == "pixel":
            fill = noise
        elif mode == "rand":
            fill = torch.randn((n, c, 1, 1), generator=gen, device=x.device, dtype=x.dtype)
        else:
            fill = torch.zeros((), device=x.device, dtype=x.dtype)
        part = torch.where(inside, fill, part)
    out = x.clone(memory_format=torch.contiguous_format)  # materialises a broadcast view
    out.index_copy_(0, idx, part)
    return out
