"""The models EmoNeXt is compared against: ResEmoteNet, a small CNN, and any timm model.

Every model here has the interface the training and evaluation code relies on, like EmoNeXt:
`forward(x, return_attention=False)` returns the logits, or `(logits, None)` when asked for the
attention weights (none of these models has the attention module, so EmoNeXtLoss's SA term is 0),
and `data_config` says what input the model expects (size, channels, normalisation), so that
`datasets` builds the right transforms without flags. See docs/BASELINES.md.
"""

from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from models.emonext import SqueezeExcite
from models.registry import register_model
from models.weights import (
    LoadReport,
    WeightsError,
    check_values,
    clean_state_dict,
    extract_state_dict,
    read_checkpoint,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _forward_with_attention(logits: torch.Tensor, return_attention: bool):
    return (logits, None) if return_attention else logits


# --------------------------------------------------------------------------- ResEmoteNet

# ResEmoteNet (Roy, Rahman, Mondal, Sarkar & Hossain, "ResEmoteNet: Bridging Accuracy and Loss
# Reduction in Facial Emotion Recognition", arXiv 2409.10545, 2024) and its public code
# (github.com/ArnabKumarRoy02/ResEmoteNet, approach/ResEmoteNet.py). Module names follow that
# code, so that its released state dicts load as they are. Every number below is from that code
# unless a comment says otherwise. The paper reports 79.79 % on FER2013; see docs/BASELINES.md.


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BN (the first with the stride), plus a 1x1 conv + BN projection shortcut."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride=stride), nn.BatchNorm2d(out_chans)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResEmoteNet(nn.Module):
    """ResEmoteNet: 3 conv stages (64/128/256), SE, 3 residual blocks (512/1024/2048), MLP head.

    About 80.2 M parameters for 7 classes, almost all in the residual blocks (the 2048-channel one
    alone has 58.7 M). Dropout as in their code: 0.2 on the feature maps after the first two conv
    stages, 0.5 after each hidden layer of the MLP. That is heavy for the head, but we keep it:
    this row exists to test their claim, so the architecture is theirs.
    """

    def __init__(self, num_classes: int = 7, in_chans: int = 3, img_size: int = 64):
        super().__init__()
        self.num_classes, self.num_features = num_classes, 2048
        # Their transforms: Resize((64, 64)), Grayscale(num_output_channels=3), ToTensor,
        # Normalize(ImageNet mean/std). Any size >= 8 runs (adaptive pooling), 64 is theirs.
        # resize_size = image_size: they resize straight to 64, without a crop margin.
        self.data_config = {
            "image_size": img_size,
            "resize_size": img_size,
            "in_chans": in_chans,
            "mean": IMAGENET_MEAN[:in_chans] if in_chans == 3 else (0.449,) * in_chans,
            "std": IMAGENET_STD[:in_chans] if in_chans == 3 else (0.226,) * in_chans,
        }
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(128)
        self.conv3 = nn.Conv2d(128, 256, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(256)
        # Their SEBlock is EmoNeXt's: Linear(C, C/16) -> ReLU -> Linear -> Sigmoid, no biases.
        self.se = SqueezeExcite(256)
        self.res_block1 = ResidualBlock(256, 512, stride=2)
        self.res_block2 = ResidualBlock(512, 1024, stride=2)
        self.res_block3 = ResidualBlock(1024, 2048, stride=2)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, 256)
        self.fc4 = nn.Linear(256, num_classes)
        self.dropout1 = nn.Dropout(0.2)
        self.dropout2 = nn.Dropout(0.5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, 2048)."""
        x = self.dropout1(F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2))
        x = self.dropout1(F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2))
        x = self.se(F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2))
        x = self.res_block3(self.res_block2(self.res_block1(x)))
        return x.mean((2, 3))  # AdaptiveAvgPool2d((1, 1)) + flatten

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout2(F.relu(self.fc1(features)))
        x = self.dropout2(F.relu(self.fc2(x)))
        x = self.dropout2(F.relu(self.fc3(x)))
        return self.fc4(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc4 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        logits = self.forward_head(self.forward_features(x))
        return _forward_with_attention(logits, return_attention)


# --------------------------------------------------------------------------- a small CNN


class SimpleCNN(nn.Module):
    """A VGG-style CNN for FER2013's native 48 x 48 grayscale images, trained from scratch.

    Four blocks of two 3x3 conv + BN + ReLU and a 2x2 max pool (32, 64, 128, 256 channels; 48 ->
    3 pixels), global average pooling, dropout 0.5, one Linear: about 1.2 M parameters. It is
    the floor of the table: what a plain network learns from FER2013 alone, in minutes on a GPU.

    Data: one channel (no repetition, the face is grayscale), values mapped to [-1, 1] by mean and
    std 0.5, which centres the inputs without needing dataset statistics.
    """

    def __init__(
        self,
        num_classes: int = 7,
        in_chans: int = 1,
        img_size: int = 48,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        drop_rate: float = 0.5,
    ):
        super().__init__()
        self.num_classes, self.num_features = num_classes, widths[-1]
        # resize_size None: the project's 236/224 ratio (48 -> 51, then a 48 crop), a few pixels
        # of translation augmentation.
        self.data_config = {
            "image_size": img_size,
            "resize_size": None,
            "in_chans": in_chans,
            "mean": (0.5,) * in_chans,
            "std": (0.5,) * in_chans,
        }
        blocks, chans = [], in_chans
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(chans, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(width, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            chans = width
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        logits = self.head(self.dropout(self.forward_features(x)))
        return _forward_with_attention(logits, return_attention)


register_model("resemotenet", ResEmoteNet)
register_model("simple_cnn", SimpleCNN)


# --------------------------------------------------------------------------- timm models


class TimmModel(nn.Module):
    """Any timm model behind this project's interface; the timm model itself is `self.model`.

    State-dict keys are timm's with a `model.` prefix; `model.model.state_dict()` is a plain timm
    state dict that `timm.create_model(name).load_state_dict` accepts.
    """

    def __init__(self, name: str, num_classes: int = 7, pretrained: bool = False, **kwargs):
        super().__init__()
        net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        self.model, self.timm_name = net, name
        self.num_classes, self.num_features = num_classes, self.model.num_features
        cfg = resolve_data_config(model=self.model)
        # timm's pretrained_cfg keeps the default input size when img_size is overridden.
        size = kwargs.get("img_size", cfg["input_size"][-1])
        size = size[-1] if isinstance(size, (tuple, list)) else size
        # FER faces are grayscale repeated on 3 channels; the mean/std are the pretrained
        # weights'. resize_size None: the project's 236/224 resize-then-crop ratio, not timm's
        # crop_pct (that is for ImageNet photographs; FER faces are already cropped).
        self.data_config = {
            "image_size": int(size),
            "resize_size": None,
            "in_chans": 3,
            "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"]),
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, num_features), before the classifier."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.model.reset_classifier(num_classes)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        return _forward_with_attention(self.model(x), return_attention)


def _timm_pretrained_tag(name: str, source: str) -> str:
    """'timm' -> the model's default weights; 'in1k' / 'in22k' -> a tag trained on that data."""
    if source == "timm" or "." in name:  # "convnext_tiny.fb_in22k" names its weights already
        return name
    tags = timm.list_pretrained(f"{name}.*")
    if not tags:
        raise WeightsError(f"timm has no pretrained weights for {name}")
    if source == "in22k":  # 22k weights not fine-tuned on 1k first, else any with 22k in them
        picks = [t for t in tags if t.endswith(("in22k", "in21k"))]
        picks += [t for t in tags if "in22k" in t or "in21k" in t]
    else:
        picks = [t for t in tags if t.endswith("in1k") and "in2" not in t]
        picks += [t for t in tags if t.endswith("in1k")]
    if not picks:
        raise WeightsError(
            f"timm has no {source} weights for {name}; its weights: {', '.join(tags)}. "
            "Name one (e.g. timm:" + tags[0] + ") or use pretrained='timm' for the default"
        )
    return picks[0]


def _offline_help(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    where = []
    if cfg is not None and cfg.hf_hub_id:
        where.append(f"the Hugging Face repo {cfg.hf_hub_id} (model.safetensors)")
    if cfg is not None and cfg.url:
        where.append(cfg.url)
    what = " or ".join(where) or "its weights file"
    return (
        f"Without network, download {what} on a machine that has it, then either copy the "
        "Hugging Face cache there (HF_HOME / HF_HUB_CACHE) and set HF_HUB_OFFLINE=1, or pass "
        "the file's local path as the pretrained weights (--pretrained PATH)."
    )


def create_timm_model(
    name: str, num_classes: int = 7, pretrained: str | os.PathLike | None = None, **kwargs
) -> TimmModel:
    """`timm:<name>`: pretrained None, 'timm' / 'in1k' / 'in22k' (timm's weights) or a path."""
    source = None if pretrained in (None, "", "none") else str(pretrained)
    if source in ("timm", "in1k", "in22k"):
        tag = _timm_pretrained_tag(name, source)
        try:
            model = TimmModel(tag, num_classes=num_classes, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:  # hub and HTTP errors are OSErrors
            raise WeightsError(
                f"could not get timm's pretrained weights for {tag} "
                f"({type(err).__name__}: {err}). {_offline_help(tag)}"
            ) from err
        cfg = model.model.pretrained_cfg
        if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
            raise WeightsError(f"timm has no pretrained weights for {tag}")
        head = _classifier_prefixes(model.model)
        loaded = [k for k in model.model.state_dict() if not k.startswith(head)]
        model.load_report = LoadReport(
            source=f"timm:{tag}", loaded=len(loaded), new_head=f"{num_classes} classes"
        )
        return model
    model = TimmModel(name, num_classes=num_classes, **kwargs)
    model.load_report = None
    if source is not None:
        model.load_report = load_timm_weights(model, source)
    return model


def _classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a timm model's classifier, from its pretrained_cfg."""
    classifier = net.pretrained_cfg.get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(c + "." for c in classifier)


def read_weights_file(path: str) -> dict:
    """A state dict from a .safetensors file (timm's hub format) or a PyTorch checkpoint."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return read_checkpoint(path)


def load_timm_weights(model: TimmModel, path: str) -> LoadReport:
    """Pretrained weights for a timm model from a local file, its classifier dropped and reset.

    Accepts timm's own files (model.safetensors, pytorch_model.bin), bare timm state dicts and this
    project's checkpoints of the same timm model (their `model.` prefix is removed).
    """
    ckpt = read_weights_file(path)
    if isinstance(ckpt.get("model"), dict) or isinstance(ckpt.get("ema"), dict):
        sd, _ = extract_state_dict(ckpt, "model")
    else:
        sd = clean_state_dict(ckpt.get("state_dict", ckpt))
    if all(k.startswith("model.") for k in sd):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    net = model.model
    head = _classifier_prefixes(net)
    report = LoadReport(source=str(path))
    own = net.state_dict()
    to_load = {}
    for k, v in sd.items():
        if k.startswith(head):
            report.discarded.append(f"{k} {tuple(v.shape)}")
        elif k not in own:
            report.unexpected.append(k)
        elif v.shape != own[k].shape:
            raise WeightsError(
                f"{path}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(own[k].shape)}: the file is for another timm model"
            )
        else:
            to_load[k] = v
    missing = [
        k
        for k in own
        if k not in to_load and not k.startswith(head) and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise WeightsError(
            f"{path} lacks {len(missing)} tensors of this timm model, e.g. "
            f"{', '.join(missing[:5])}: it is not a checkpoint of this architecture"
        )
    check_values(to_load, own, path)
    net.load_state_dict(to_load, strict=False)  # completeness checked above
    report.loaded = len(to_load)
    model.reset_classifier(model.num_classes)
    report.new_head = f"{model.num_classes} classes"
    return report
