"""Models by name: `create_model("emonext_tiny", pretrained="in22k")`, `load_model(path)`."""

from __future__ import annotations

import os

from torch import nn

from models import emonext  # noqa: F401  (registers emonext_* and convnext_*)
from models.emonext import SIZES, EmoNeXt
from models.registry import list_models, model_constructor, model_meta, register_model
from models.weights import (
    LoadReport,
    WeightsError,
    infer_architecture,
    load_checkpoint,
    load_pretrained,
    read_checkpoint,
    resolve_pretrained,
)

__all__ = [
    "EmoNeXt",
    "LoadReport",
    "WeightsError",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "register_model",
]


def create_model(
    name: str,
    num_classes: int = 7,
    pretrained: str | os.PathLike | None = None,
    verbose: bool = True,
    **overrides,
) -> nn.Module:
    """Build a registered model; `pretrained` is None, "in1k", "in22k", a path or a URL.

    Overrides go to the constructor, e.g. `stn=False`, `se=False`, `drop_path_rate=0.0`,
    `in_chans=1`, `img_size=64`. With pretrained weights the report of what was loaded is kept on
    `model.load_report` (and printed when `verbose`).
    """
    model = model_constructor(name)(num_classes=num_classes, **overrides)
    model.model_name = name
    model.model_kwargs = {"num_classes": num_classes, **overrides}
    model.load_report = None
    if pretrained not in (None, "", "none"):
        source = resolve_pretrained(str(pretrained), model_meta(name).get("size"))
        model.load_report = load_pretrained(model, source, num_classes)
        if verbose:
            print(model.load_report)
    return model


def load_model(
    source: str | os.PathLike,
    weights: str = "auto",
    model_name: str | None = None,
    **overrides,
) -> tuple[nn.Module, dict]:
    """A model rebuilt from a checkpoint, with its weights; returns (model in eval mode, ckpt).

    This project's checkpoints record the model name and arguments. For others (the official
    trainer's checkpoints, bare state dicts) the architecture is read off the tensors' shapes;
    `model_name` (e.g. "emonext_tiny") may be given to check or override that.
    """
    ckpt = read_checkpoint(source)
    if model_name is None and "model_name" in ckpt:
        model_name = ckpt["model_name"]
        kwargs = dict(ckpt.get("model_kwargs", {}))
    else:
        from models.weights import extract_state_dict

        arch = infer_architecture(
            extract_state_dict(ckpt, "model" if "model" in ckpt else "auto")[0]
        )
        kwargs = {k: v for k, v in arch.items() if k not in ("depths", "dims")}
        if model_name is None:
            size = next(
                (s for s, dd in SIZES.items() if dd == (arch["depths"], arch["dims"])), None
            )
            if size is None:
                raise WeightsError(
                    f"{source}: depths {arch['depths']} / dims {arch['dims']} match no known size"
                )
            model_name = f"emonext_{size}"
    kwargs.update(overrides)
    kwargs.setdefault("drop_path_rate", 0.0)
    model = create_model(model_name, **kwargs)
    ckpt = load_checkpoint(model, ckpt, weights)
    return model.eval(), ckpt
