"""EmoNeXt: ConvNeXt with a Spatial Transformer Network, Squeeze-and-Excitation and self-attention.

Numerically the official EmoNeXt (El Boudouri & Bohi, 2023), with its state-dict layout, so that
checkpoints of the official trainer load without key surgery. See REFERENCE.md section 2.
Differences from the official code: the STN's flattened size is computed from `img_size` instead
of being hard-coded for 224; under autocast the STN's transform and sampling grid stay fp32; on
feature maps of at most 6 x 6 pixels the blocks' depthwise convolution is computed as a matrix
product (the same outputs, faster on the CPU: `depthwise_conv`); and STN, SE and the attention
module can be switched off for the paper's ablations and the plain ConvNeXt baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models import register_model as timm_register_model
from torch import nn

from models.registry import register_model

# Input expectations: the grayscale face repeated on 3 channels, values in [0, 1] and no
# mean/std normalisation (the official transforms end at ToTensor).
DATA_CONFIG = {"image_size": 224, "resize_size": None, "in_chans": 3, "mean": None, "std": None}


# The stem's stride 4 and three stride-2 downsamplings leave 1 x 1 features at 32 pixels.
MIN_IMG_SIZE = 32


def _stn_feature_size(img_size: int) -> int:
    # conv7 -> maxpool2 -> conv5 -> maxpool2, as in the localisation network below.
    return ((img_size - 6) // 2 - 4) // 2


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation as in the official code (Linear layers without bias, in `fc`)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc(x.mean((2, 3)))
        return x * scale[:, :, None, None]


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a block's depthwise k x k convolution ("same" padding), fast on small maps.

    On a map no wider than k - 1 pixels (6 x 6 or less for k = 7: the last two stages at 48
    pixels) most of the kernel lies on the zero padding, where PyTorch's CPU kernels are slow:
    forward and backward on a 1 x 1 map took 13 ms against 0.1 ms here (emonext_atto, batch 64).
    There the convolution is computed as what it is, each channel's (HW x HW) matrix of kernel
    taps times its pixels: the same outputs and gradients up to float rounding. Larger maps, the
    paper's 224-pixel inputs included, take the convolution itself.
    """
    n, c, h, w = x.shape
    k = conv.kernel_size[0]
    if max(h, w) >= k:
        return conv(x)
    # out[p] = sum over q of x[q] * weight[q - p + k // 2], rows and columns alike.
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    row_tap = rows[None, :] - rows[:, None] + k // 2  # [p, q]
    col_tap = cols[None, :] - cols[:, None] + k // 2
    tap = row_tap[:, None, :, None] * k + col_tap[None, :, None, :]  # [pi, pj, qi, qj]
    inside = ((row_tap >= 0) & (row_tap < k))[:, None, :, None]
    inside = inside & ((col_tap >= 0) & (col_tap < k))[None, :, None, :]
    tap = torch.where(inside, tap, 0).reshape(h * w, h * w)
    taps = conv.weight.reshape(c, k * k)[:, tap] * inside.reshape(h * w, h * w)
    y = torch.einsum("ncq,cpq->ncp", x.reshape(n, c, h * w), taps).reshape(n, c, h, w)
    return y if conv.bias is None else y + conv.bias[:, None, None]


class Block(nn.Module):
    """ConvNeXt block with the official layout (`dwconv`, `pwconv1`, `pwconv2`, `gamma`).

    timm's ConvNeXtBlock computes the same thing but names its tensors differently
    (`conv_dw`, `mlp.fc1`, ...); keeping the official names lets official checkpoints load as is.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = depthwise_conv(self.dwconv, x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class SelfAttention(nn.Module):
    """Self-attention over the samples of a batch; its weights feed the loss's SA term.

    Scores are scaled by dim ** -0.25 (a fourth root, as in the official code, not the usual
    square root) and the LayerNorm keeps PyTorch's default eps 1e-5.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.scale = dim**-0.25

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(x)
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return weights @ v + x, weights


class EmoNeXt(nn.Module):
    """EmoNeXt, or plain ConvNeXt with `stn=False, se=False, attention=False`.

    - `model(x)`: logits (N, num_classes); `model(x, return_attention=True)`: (logits, weights)
      with weights the N x N attention matrix (None without the attention module).
    - `forward_features(x)`: pooled, normalised features (N, D), after the STN.
    - `forward_head(features)`: logits; `attention(features)`: (attended, weights); `stn(x)`:
      the warped images.
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        num_classes: int = 7,
        in_chans: int = 3,
        img_size: int = 224,
        drop_path_rate: float = 0.1,
        layer_scale_init_value: float = 1e-6,
        stn: bool = True,
        se: bool = True,
        attention: bool = True,
    ):
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = dims[-1]
        self.has_stn, self.has_se, self.has_attention = stn, se, attention
        self.grad_checkpointing = False
        self.data_config = dict(DATA_CONFIG, image_size=img_size, in_chans=in_chans)

        if stn:
            self.localization = nn.Sequential(
                nn.Conv2d(in_chans, 8, kernel_size=7),
                nn.BatchNorm2d(8),
                nn.MaxPool2d(2, stride=2),
                nn.ReLU(True),
                nn.Conv2d(8, 10, kernel_size=5),
                nn.BatchNorm2d(10),
                nn.MaxPool2d(2, stride=2),
                nn.ReLU(True),
            )
            side = _stn_feature_size(img_size)
            if side < 1:
                raise ValueError(f"img_size {img_size} is too small for the STN (at least 22)")
            self.fc_loc = nn.Sequential(
                nn.Linear(10 * side * side, 32), nn.ReLU(True), nn.Linear(32, 3 * 2)
            )

        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))]
        )
        for i in range(3):
            layers = [LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)]
            if se:
                layers.append(SqueezeExcite(dims[i + 1]))
            self.downsample_layers.append(nn.Sequential(*layers))

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            blocks = [
                Block(dims[i], rates[start + j], layer_scale_init_value) for j in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        if attention:
            self.attention = SelfAttention(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

        self.apply(self._init_weights)
        if stn:
            # Start the STN at the identity transform.
            self.fc_loc[2].weight.data.zero_()
            self.fc_loc[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (the layout of timm's ConvNeXt), for `--layer-decay`
        (timm.optim.param_groups_layer_decay): the stem with the STN, which warps the input
        before it; then each block, a stage's downsampling (its SE included) with the stage's
        first block (`coarse`: one group per stage); the final norm, the attention module and
        the head, which no pattern matches, form the last group, as timm's ConvNeXt head does."""
        return dict(
            stem=r"^(?:downsample_layers\.0|localization|fc_loc)\.",
            blocks=r"^(?:downsample_layers|stages)\.(\d+)\."
            if coarse
            else [(r"^downsample_layers\.(\d+)\.", (0,)), (r"^stages\.(\d+)\.(\d+)\.", None)],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass instead of storing them.

        timm's convention (`checkpoint_seq`, one checkpoint per block): the same loss and
        gradients (the RNG of stochastic depth is replayed), far less memory, about a third more
        compute. For fine-tuning the large variants on smaller GPUs.
        """
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head with PyTorch's default init, as the official code does after loading."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def stn(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_stn:
            return x
        features = torch.flatten(self.localization(x), 1)
        # The warp's geometry in the input's dtype (fp32 for images) even under autocast, which
        # would run fc_loc and affine_grid's matrix product in bf16: its 8-bit mantissa puts
        # sampling positions up to ~0.7 pixel off at the edge of a 224 image (fp16: ~8x less).
        # Both are tiny. grid_sample also needs the input's dtype on some devices.
        with torch.autocast(x.device.type, enabled=False):
            theta = self.fc_loc(features.to(self.fc_loc[0].weight.dtype)).view(-1, 2, 3)
            grid = F.affine_grid(theta.to(x.dtype), list(x.size()), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stn(x)
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = downsample(x)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return self.norm(x.mean((-2, -1)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        features = self.forward_features(x)
        logits = self.forward_head(features)
        if not return_attention:
            return logits
        weights = self.attention(features)[1] if self.has_attention else None
        return logits, weights


SIZES = {
    # name: (depths, dims); the five of the paper, then small ones for CPU work and tests.
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "micro": ((1, 1, 1, 1), (16, 32, 64, 128)),  # the size of the official golden test model
}


def _timm_cfg(resize: int = 236, image_size: int = 224) -> dict:
    """timm's pretrained config of an EmoNeXt: what `timm.data.resolve_data_config` reads. The
    model sees a grayscale face repeated on 3 channels, in [0, 1]: mean 0 and std 1 say "no
    normalisation" to timm's transforms (the grey-to-RGB step is ours: docs/INFERENCE.md)."""
    return {
        "num_classes": 7,
        "input_size": (3, image_size, image_size),
        # The STN's flattened size depends on img_size: the input size is part of the model.
        "fixed_input_size": True,
        "crop_pct": image_size / resize,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "downsample_layers.0.0",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2501.08199",
    }


# timm looks the configs up by this module-level name when an entrypoint registers.
default_cfgs = generate_default_cfgs({f"emonext_{size}": _timm_cfg() for size in SIZES})

# Keys that timm.create_model hands every entrypoint, and the classifier options its scripts
# pass (benchmark.py: global_pool="fast", drop_rate=0.0); none is an EmoNeXt argument.
_TIMM_ONLY = (
    "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args",
    "global_pool", "drop_rate",
)  # fmt: skip


def _timm_entrypoint(name: str, depths: tuple[int, ...], dims: tuple[int, ...]):
    """`timm.create_model(name, ...)`: the same EmoNeXt as `models.create_model(name, ...)` (same
    constructor, keys and initialisation), built through timm's builder, so that timm's tooling
    (pretrained configs, `hf-hub:` / `local-dir:` folders, its benchmark script) works."""

    def build(
        img_size: int | tuple[int, int] = 224,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        **kwargs,
    ) -> EmoNeXt:
        if global_pool not in ("avg", "fast"):  # timm's names for EmoNeXt's average pooling
            raise ValueError(f"EmoNeXt pools by averaging, not global_pool={global_pool!r}")
        if drop_rate:
            raise ValueError("EmoNeXt has no classifier dropout: drop_rate must be 0")
        if not isinstance(img_size, int):  # timm passes input sizes as (H, W)
            if len(set(img_size)) != 1:
                raise ValueError(f"EmoNeXt takes square inputs, not {tuple(img_size)}")
            img_size = int(img_size[0])
        return EmoNeXt(depths, dims, img_size=img_size, **kwargs)

    def entrypoint(pretrained: bool = False, **kwargs) -> EmoNeXt:
        model = build_model_with_cfg(build, name, pretrained, **kwargs)
        # What models.create_model records, so that the project's tools accept this model too.
        args = {k: v for k, v in kwargs.items() if k not in _TIMM_ONLY}
        args["img_size"], args["num_classes"] = model.img_size, model.num_classes
        model.model_name, model.model_kwargs, model.load_report = name, args, None
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name  # timm registers by __name__
    entrypoint.__doc__ = f"EmoNeXt {name.removeprefix('emonext_')} (depths {depths}, dims {dims})"
    return entrypoint


def _register(size: str, depths: tuple[int, ...], dims: tuple[int, ...]) -> None:
    def emonext(**kwargs) -> EmoNeXt:
        return EmoNeXt(depths, dims, **kwargs)

    def convnext(**kwargs) -> EmoNeXt:
        kwargs = {"stn": False, "se": False, "attention": False, **kwargs}
        return EmoNeXt(depths, dims, **kwargs)

    register_model(f"emonext_{size}", emonext, size=size)
    register_model(f"convnext_{size}", convnext, size=size)
    # EmoNeXt sizes in timm's registry too; the plain `convnext_*` stay out of it, where they
    # would replace timm's own ConvNeXt models of the same names.
    timm_register_model(_timm_entrypoint(f"emonext_{size}", depths, dims))


for _size, (_depths, _dims) in SIZES.items():
    _register(_size, _depths, _dims)
