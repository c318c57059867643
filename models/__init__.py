"""Models by name: `create_model("emonext_tiny", pretrained="in22k")`, `load_model(source)`,
`load_trained_model(source)` (with its class names and data config, as the inference commands use).

Names: `emonext_<size>`, `convnext_<size>` (models/emonext.py), `resemotenet`, `simple_cnn` and
`timm:<any timm model>` (models/baselines.py). Every model has `model_name`, `model_kwargs`
(`create_model(model_name, **model_kwargs)` rebuilds it), `data_config`, `num_classes` and
`forward(x, return_attention=False)`. Importing this package also registers every `emonext_<size>`
with timm, so `timm.create_model("emonext_tiny", num_classes=7)` builds the same model.

A trained model's `source` is a `.pt` checkpoint (this project's or the official trainer's), a
hub folder (`config.json` + `model.safetensors` + `README.md`, models/hub.py, written by
`scripts/export.py --format hub`) or `hf-hub:USER/NAME[@REVISION]` on the Hugging Face Hub.
"""

from __future__ import annotations

import os

from torch import nn

from models import baselines, calibration, deploy, emonext, hub  # noqa: F401  (registers them)
from models.baselines import TimmModel, create_timm_model
from models.emonext import MIN_IMG_SIZE, SIZES, EmoNeXt
from models.registry import list_models, model_constructor, model_meta, register_model
from models.schema import (
    check_classes,
    check_data_config,
    check_face_pipeline,
    check_model_fields,
)
from models.weights import (
    OFFICIAL_CLASSES,
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
    "MIN_IMG_SIZE",
    "OFFICIAL_CLASSES",
    "SIZES",
    "LoadReport",
    "TimmModel",
    "WeightsError",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "load_trained_model",
    "register_model",
    "calibration",
    "hub",
]


def create_model(
    name: str,
    num_classes: int = 7,
    pretrained: str | os.PathLike | None = None,
    verbose: bool = True,
    **overrides,
) -> nn.Module:
    """Build a model by name; `pretrained` is None, "in1k", "in22k", "timm", a path or a URL.

    Overrides go to the constructor, e.g. `stn=False`, `se=False`, `drop_path_rate=0.0`,
    `in_chans=1`, `img_size=64`. With pretrained weights the report of what was loaded is kept on
    `model.load_report` (and printed when `verbose`).

    - EmoNeXt / ConvNeXt: "in1k" / "in22k" are the official ConvNeXt weights (REFERENCE.md 4).
    - `timm:<name>`: "timm" is timm's default weights for the model, "in1k" / "in22k" a tag
      trained on that data; a path is a timm state dict (its classifier is replaced).
    - resemotenet, simple_cnn: trained from scratch; a path is a whole-model checkpoint.
    """
    has_weights = pretrained not in (None, "", "none")
    if name.startswith("timm:"):
        model = create_timm_model(name.removeprefix("timm:"), num_classes, pretrained, **overrides)
    else:
        model = model_constructor(name)(num_classes=num_classes, **overrides)
        model.load_report = None
        if has_weights and model_meta(name).get("size"):
            source = resolve_pretrained(str(pretrained), model_meta(name).get("size"))
            model.load_report = load_pretrained(model, source, num_classes)
        elif has_weights:
            if str(pretrained) in ("in1k", "in22k", "timm"):
                raise WeightsError(
                    f"{name} has no {pretrained} pretrained weights: it is trained from scratch "
                    "(pretrained=None), or from a checkpoint of the same model given by its path"
                )
            load_checkpoint(model, str(pretrained))
            model.load_report = LoadReport(str(pretrained), loaded=len(model.state_dict()))
    # "in1k" / "in22k" may pick a timm weights tag (timm:convnext_tiny -> .fb_in22k): record it,
    # so that a rebuilt model has the data configuration of the weights it was given.
    model.model_name = f"timm:{model.timm_name}" if isinstance(model, TimmModel) else name
    model.model_kwargs = {"num_classes": num_classes, **overrides}
    if verbose and model.load_report is not None:
        print(model.load_report)
    return model


def load_model(
    source: str | os.PathLike,
    weights: str = "auto",
    model_name: str | None = None,
    **overrides,
) -> tuple[nn.Module, dict]:
    """A model rebuilt from a checkpoint, with its weights; returns (model in eval mode, ckpt).

    `source`: a .pt file or URL, a hub folder or `hf-hub:USER/NAME` (downloaded once into
    huggingface_hub's cache). This project's checkpoints and hub folders record the model name
    and arguments. For others (the official trainer's checkpoints, bare state dicts) the EmoNeXt
    architecture is read off the tensors' shapes; `model_name` (e.g. "emonext_tiny") may be given
    to check or override that, and must be given for other models (e.g. "resemotenet" for a
    state dict of the ResEmoteNet code).
    """
    ckpt = read_checkpoint(source)
    # What the file says to build is checked before anything is built (models/schema.py).
    if "model_name" in ckpt:
        check_model_fields(ckpt, str(source))
    elif ckpt.get("data_config") is not None:
        check_data_config(ckpt["data_config"], str(source), whole=False)
    kwargs = {}
    if "model_name" in ckpt and model_name in (None, ckpt["model_name"]):
        model_name = ckpt["model_name"]
        kwargs = dict(ckpt.get("model_kwargs", {}))
    elif model_name is None or model_meta(model_name).get("size"):  # EmoNeXt / ConvNeXt
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
    if model_meta(model_name).get("size"):  # no stochastic-depth modules in an inference model
        kwargs.setdefault("drop_path_rate", 0.0)
    try:
        model = create_model(model_name, verbose=False, **kwargs)
    except TypeError as err:  # a timm model that takes no such argument (e.g. img_size)
        raise WeightsError(f"{source}: model_kwargs do not fit {model_name} ({err})") from None
    ckpt = load_checkpoint(model, ckpt, weights, name=str(source))
    if isinstance(ckpt.get("data_config"), dict):  # what the model was trained with
        model.data_config = dict(ckpt["data_config"])
    return model.eval(), ckpt


def load_trained_model(
    checkpoint: str | os.PathLike, weights: str = "auto", model_name: str | None = None
) -> tuple[nn.Module, list[str], dict, dict]:
    """(model in eval mode on the CPU, class names, data config, checkpoint) of a trained model:
    what evaluate.py, predict.py and scripts/export.py run.

    `weights` and `model_name` are as in `load_model`. Class names and data config come from the
    checkpoint where it records them (this project's checkpoints do); the official trainer's
    checkpoints get OFFICIAL_CLASSES and the model's default config (224 input, resize 236, no
    normalisation), which is how the official code trained. The checkpoint's `temperature` is
    the one stored for these weights (models/calibration.py) or None, `temperature_note` where
    it came from or why a stored one does not apply. Every mistake is a WeightsError.
    """
    try:
        model, ckpt = load_model(checkpoint, weights, model_name)
    except ValueError as err:  # e.g. a --model name that is not registered
        raise WeightsError(str(err)) from err
    classes = ckpt.get("classes")
    classes = list(OFFICIAL_CLASSES) if classes is None else classes
    classes = check_classes(classes, str(checkpoint), "classes", model.num_classes)
    # What the checkpoint records wins; a key it lacks keeps the model's default.
    data_config = dict(model.data_config)
    data_config.update(ckpt.get("data_config") or {})
    model.data_config = data_config
    ckpt["temperature"], ckpt["temperature_note"] = calibration.read_temperature(checkpoint, ckpt)
    if ckpt.get("faces") is not None:  # the face pipeline of its training data (models/faces/)
        ckpt["faces"] = check_face_pipeline(ckpt["faces"], str(checkpoint))
    return model, classes, data_config, ckpt
