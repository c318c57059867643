"""RandAugment and TrivialAugment (`--aa`): timm's own transform for the `pil` pipeline and the
same ops, batched with per-image parameters, for the `fast` pipeline.

Strings are timm's (`rand-m9-mstd0.5-inc1`, parsed by timm.data.rand_augment_transform itself);
`trivial` is TrivialAugment's rule (one op per image, always applied, magnitude uniform in
[0, 10]) on timm's RandAugment ops and ranges: the timm string `TRIVIAL` below. torchvision's
TrivialAugmentWide is not used: its wider op ranges exist in no timm string, and one definition
for both pipelines is what lets the tests compare them.

The faces are grayscale: the ops run on the one gray plane (PIL mode "L") before it is repeated
to the model's channels, so Color/ColorIncreasing is the identity (a gray image is its own
desaturation; the op still takes its slot) and every other op changes all channels alike.

Geometric ops (Rotate, Shear, Translate) sample bilinearly in both pipelines (ConvNeXt uses
bicubic): torch's bicubic kernel (a = -0.75) is not PIL's (a = -0.5), bilinear is the same in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

TRIVIAL = "rand-n1-p1-mstd101-inc1"
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M is the level M / 10
TRANSLATE_PCT = 0.45  # timm's default translate_pct (TranslateXRel/YRel)
SIGNED = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3}
SIGNED |= {"TranslateXRel": TRANSLATE_PCT, "TranslateYRel": TRANSLATE_PCT}
ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")


@dataclass(frozen=True)
class RandAugmentSpec:
    """What a timm RandAugment string fixes: the ops (uniformly chosen, with replacement), ops
    per image, each op's probability, magnitude, its std (inf: uniform in [0, M]) and cap."""

    ops: tuple[str, ...]
    num_layers: int
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float


def _posterize_pil(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for every Pillow: Pillow 13 refuses 0 bits, which timm's Posterize
    (magnitude < 2.5) and PosterizeIncreasing (magnitude 10, e.g. 9 + noise) ask for; older
    Pillows gave a black image (every bit masked), which is what this keeps."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def pil_op(name: str):
    """timm's PIL function for op `name` (posterize made to work with 0 bits)."""
    from timm.data.auto_augment import NAME_TO_OP

    return _posterize_pil if name.startswith("Posterize") else NAME_TO_OP[name]


def timm_rand_augment(aa: str, fill: int = 128):
    """timm's RandAugment for `aa` (a `rand-...` string or `trivial`), for PIL "L" images:
    bilinear geometric ops, gray `fill` where they uncover the border. ValueError on a bad string.
    """
    from timm.data.auto_augment import rand_augment_transform

    config = TRIVIAL if aa == "trivial" else aa
    hparams = {"img_mean": int(fill), "interpolation": Image.BILINEAR}
    if not config.startswith("rand-") and config != "rand":
        raise ValueError(f"--aa {aa}: expected none, trivial or a timm rand-... string")
    try:
        ra = rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError) as err:
        raise ValueError(f"--aa {aa}: timm cannot parse it ({err or 'unknown section'})") from None
    if ra.choice_weights is not None:
        raise ValueError(f"--aa {aa}: weighted op sets (-t...) are not supported; drop the t part")
    for op in ra.ops:
        op.aug_fn = pil_op(op.name)
    known = set(LEVEL_FN)
    if not {op.name for op in ra.ops} <= known:
        raise ValueError(f"--aa {aa}: ops outside {sorted(known)}")
    return ra


def parse_aa(aa: str, fill: int = 128) -> RandAugmentSpec | None:
    """`--aa` as a RandAugmentSpec (None for `none`), read from timm's own parse of it."""
    if aa == "none":
        return None
    ra = timm_rand_augment(aa, fill)
    op = ra.ops[0]
    return RandAugmentSpec(
        ops=tuple(o.name for o in ra.ops),
        num_layers=int(ra.num_layers),
        prob=float(op.prob),
        magnitude=float(op.magnitude),
        magnitude_std=float(op.magnitude_std),
        magnitude_max=float(op.magnitude_max or LEVEL_DENOM),
    )


# --------------------------------------------------------------------------------------------
# The op arguments: timm's level functions, vectorised (level = magnitude / 10, float64 as
# Python's floats)
# --------------------------------------------------------------------------------------------


def _posterize(lv):
    return torch.floor(lv * 4)


LEVEL_FN = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": "signed",
    "ShearX": "signed",
    "ShearY": "signed",
    "TranslateXRel": "signed",
    "TranslateYRel": "signed",
    "Posterize": _posterize,
    "PosterizeIncreasing": lambda lv: 4 - _posterize(lv),
    "Solarize": lambda lv: torch.clamp(torch.floor(lv * 256), max=256),
    "SolarizeIncreasing": lambda lv: 256 - torch.clamp(torch.floor(lv * 256), max=256),
    "SolarizeAdd": lambda lv: torch.clamp(torch.floor(lv * 110), max=128),
    **{name: lambda lv: lv * 1.8 + 0.1 for name in ENHANCE},
    **{f"{name}Increasing": "enhance_increasing" for name in ENHANCE},
}


def rand_augment_params(spec: RandAugmentSpec, b: int, g: torch.Generator) -> dict:
    """Per-image draws of `b` images, from `g` (CPU): for each of num_layers slots the op index
    into spec.ops, whether it applies and its argument (timm's level_fn of the magnitude).

    The distributions are timm's AugmentOp.__call__: op uniform with replacement; applied with
    probability p; magnitude M, or N(M, mstd), or U(0, M) when mstd is inf, clipped to
    [0, mmax]; a random sign (probability 1/2) for the signed ops and the increasing enhancers.
    """
    n = spec.num_layers
    op = torch.randint(0, len(spec.ops), (b, n), generator=g)
    apply = torch.rand(b, n, generator=g, dtype=torch.float64) <= spec.prob
    mag = torch.full((b, n), spec.magnitude, dtype=torch.float64)
    if math.isinf(spec.magnitude_std):
        mag = torch.rand(b, n, generator=g, dtype=torch.float64) * spec.magnitude
    elif spec.magnitude_std > 0:
        mag = mag + spec.magnitude_std * torch.randn(b, n, generator=g, dtype=torch.float64)
    level = mag.clamp(0.0, spec.magnitude_max) / LEVEL_DENOM
    sign = torch.where(torch.rand(b, n, generator=g, dtype=torch.float64) > 0.5, -1.0, 1.0)
    arg = torch.zeros(b, n, dtype=torch.float64)
    for j, name in enumerate(spec.ops):
        fn, sel = LEVEL_FN[name], op == j
        if fn is None:
            continue
        if fn == "signed":
            value = level * SIGNED[name] * sign
        elif fn == "enhance_increasing":
            value = (1.0 + level * 0.9 * sign).clamp(min=0.1)
        else:
            value = fn(level)
        arg = torch.where(sel, value, arg)
    return {"op": op, "apply": apply, "arg": arg}


# --------------------------------------------------------------------------------------------
# The ops on gray batches (B, 1, H, W), float holding uint8 values, each as PIL computes it.
# Written by hand: torchvision v2's RandAugment/TrivialAugmentWide draw one op and magnitude per
# batch, its functional ops take one scalar per call, and their op set and ranges are not timm's;
# kornia's RandAugment has its own policy too. Every op rounds to uint8 as PIL does.
# --------------------------------------------------------------------------------------------


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend on uint8: in float32, truncated, clipped."""
    f = _per_image(factor.float())
    return torch.trunc(degenerate + f * (x - degenerate)).clamp_(0, 255)


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-image lookup tables (B, 256) applied to x."""
    flat = x.flatten(1).long()
    return torch.gather(lut, 1, flat).view_as(x).to(x.dtype)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).long()
    h = torch.zeros(x.shape[0], 256, dtype=torch.int64, device=x.device)
    return h.scatter_add_(1, flat, torch.ones_like(flat))


def auto_contrast(x: torch.Tensor, _arg=None) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): lo..hi stretched to 0..255, int() truncation."""
    lo = x.flatten(1).amin(1).double()
    hi = x.flatten(1).amax(1).double()
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1), 1.0)
    offset = torch.where(hi > lo, -lo * scale, 0.0)
    i = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = torch.trunc(i * scale[:, None] + offset[:, None]).clamp(0, 255).long()
    return _lut(x, lut)


def equalize(x: torch.Tensor, _arg=None) -> torch.Tensor:
    """ImageOps.equalize: step = (pixels - count of the last used level) // 255, LUT from the
    cumulative histogram; identity when step is 0."""
    h = _histogram(x)
    last = torch.where(h > 0, torch.arange(256, device=x.device), -1).amax(1)
    step = (h.sum(1) - h.gather(1, last[:, None])[:, 0]) // 255
    before = torch.cumsum(h, 1) - h
    lut = (step[:, None] // 2 + before) // step.clamp(min=1)[:, None]
    ident = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(step[:, None] > 0, lut.clamp(max=255), ident)
    return _lut(x, lut)


def invert(x: torch.Tensor, _arg=None) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """timm/PIL: keep `bits` high bits (8 or more: unchanged)."""
    q = torch.pow(2.0, (8 - bits).clamp(min=0, max=9)).to(x.dtype)
    out = x - torch.remainder(x, _per_image(q))
    return torch.where(_per_image(bits >= 8), x, out)


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _per_image(thresh.to(x.dtype)), 255 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 128, (x + _per_image(add.to(x.dtype))).clamp(max=255), x)


def color(x: torch.Tensor, _arg=None) -> torch.Tensor:
    return x  # a gray image is its own desaturation: ImageEnhance.Color leaves it unchanged


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = torch.floor(x.flatten(1).mean(1, dtype=torch.float64) + 0.5).to(x.dtype)
    return _blend(_per_image(mean), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, /13, rounded),
    whose one-pixel border is the image itself."""
    k = torch.ones(1, 1, 3, 3, device=x.device, dtype=x.dtype)
    k[0, 0, 1, 1] = 5.0
    smooth = torch.floor(F.conv2d(x, k) / 13.0 + 0.5).clamp_(0, 255)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def _affine(x: torch.Tensor, coeffs: torch.Tensor, fill: float) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor): the output pixel
    centre (X + 0.5, Y + 0.5) reads the input at (aX + bY + c, dX + eY + f); a point outside
    [0, W) x [0, H) gets `fill`, inside it bilinear with the border clamped, truncated to uint8.
    """
    b, _, h, w = x.shape
    # grid_sample's [-1, 1] folded into the coefficients (float64, as PIL's doubles); the grid
    # itself in float32 on x's device, built separably as warp._affine_grid does.
    a_, b_, c_, d_, e_, f_ = coeffs.to(torch.float64).unbind(1)
    theta = torch.stack(
        [a_ * 2 / w, b_ * 2 / w, c_ * 2 / w - 1, d_ * 2 / h, e_ * 2 / h, f_ * 2 / h - 1]
    )
    theta = theta.T.float().to(x.device).view(b, 2, 3)
    xs = torch.arange(w, device=x.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=x.device, dtype=torch.float32) + 0.5
    col = theta[:, None, :, 0] * xs[None, :, None]  # (B, W, 2)
    row = theta[:, None, :, 1] * ys[None, :, None] + theta[:, None, :, 2]  # (B, H, 2)
    grid = row[:, :, None, :] + col[:, None, :, :]  # (B, H, W, 2)
    gx, gy = grid[..., 0], grid[..., 1]
    outside = gx < -1  # in place from here: this mask costs as much as the sampling
    outside |= gx >= 1
    outside |= gy < -1
    outside |= gy >= 1
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # float32 noise must not drop a whole level; x holds [0, 255], so no clamp is needed
    out = out.add_(1e-3).trunc_()
    return out.masked_fill_(outside.unsqueeze(1), fill)


def rotate_coeffs(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Image.rotate(degrees) about (W/2, H/2), counter-clockwise, as its affine matrix (B, 6)."""
    rad = -torch.deg2rad(degrees.double().cpu())
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return torch.stack([cos, sin, c, -sin, cos, f], 1)


def _affine_coeffs(kind: str):
    def coeffs(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        v = v.double().cpu()
        one, zero = torch.ones_like(v), torch.zeros_like(v)
        return torch.stack(
            {
                "ShearX": (one, v, zero, zero, one, zero),
                "ShearY": (one, zero, zero, v, one, zero),
                "TranslateXRel": (one, zero, v * w, zero, one, zero),
                "TranslateYRel": (one, zero, zero, zero, one, v * h),
            }[kind],
            1,
        )

    return coeffs


# Each geometric op as PIL's affine coefficients, one row per image: all of them are `_affine`,
# so one slot's geometric ops run as one call on every image that drew one.
AFFINE_COEFFS = {"Rotate": rotate_coeffs, **{k: _affine_coeffs(k) for k in SIGNED if k != "Rotate"}}


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: float) -> torch.Tensor:
    return _affine(x, rotate_coeffs(degrees, *x.shape[-2:]), fill)


def _affine_op(kind: str):
    def op(x: torch.Tensor, v: torch.Tensor, fill: float) -> torch.Tensor:
        return _affine(x, AFFINE_COEFFS[kind](v, *x.shape[-2:]), fill)

    return op


GEOMETRIC = {"Rotate": rotate, **{k: _affine_op(k) for k in SIGNED if k != "Rotate"}}
OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Posterize": posterize,
    "PosterizeIncreasing": posterize,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    **{name: color for name in ("Color", "ColorIncreasing")},
    **{name: contrast for name in ("Contrast", "ContrastIncreasing")},
    **{name: brightness for name in ("Brightness", "BrightnessIncreasing")},
    **{name: sharpness for name in ("Sharpness", "SharpnessIncreasing")},
}


def apply_op(name: str, x: torch.Tensor, arg: torch.Tensor, fill: float) -> torch.Tensor:
    """One named op on (B, 1, H, W) uint8-valued floats, `arg` one value per image."""
    if name in GEOMETRIC:
        return GEOMETRIC[name](x, arg, fill)
    return OPS[name](x, arg.to(x.device))


def rand_augment(x: torch.Tensor, spec: RandAugmentSpec, params: dict, fill: float) -> torch.Tensor:
    """The fast pipeline's RandAugment: (B, 1, H, W) in [0, 1] -> the same, rounded to uint8
    steps as PIL's image is. Each slot applies each op to the images that drew it (one call per
    op present, so the cost does not grow with the number of ops times the batch); the slot's
    geometric ops, all affine maps, in one call with each image's own coefficients."""
    x = (x * 255.0).round_()
    op, apply, arg = params["op"], params["apply"], params["arg"]
    h, w = x.shape[-2:]
    for k in range(spec.num_layers):
        geometric, coeffs = [], []
        for j in torch.unique(op[:, k]).tolist():
            sel = torch.nonzero((op[:, k] == j) & apply[:, k])[:, 0]
            if not len(sel):
                continue
            name = spec.ops[j]
            if name in AFFINE_COEFFS:
                geometric.append(sel)
                coeffs.append(AFFINE_COEFFS[name](arg[sel, k], h, w))
                continue
            idx = sel.to(x.device)  # index_select/index_copy_: x[idx] is slower on CPU
            x.index_copy_(0, idx, OPS[name](x.index_select(0, idx), arg[sel, k].to(x.device)))
        if geometric:
            idx = torch.cat(geometric).to(x.device)
            x.index_copy_(0, idx, _affine(x.index_select(0, idx), torch.cat(coeffs), fill))
    return x.div_(255.0)
