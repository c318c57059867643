"""What a file may say about a model, checked before anything is built from it.

A hub folder's config.json, this project's .pt checkpoints (`model_name`, `model_kwargs`,
`classes`, `data_config`) and the metadata of ONNX and TorchScript exports name a model, its
classes and how to feed it. Every such value is checked here first; one outside the schema is a
WeightsError of one line that names the file, the key and what is accepted.

Nothing accepted can name a file or a URL: `model_name` is a registered name or `timm:NAME` of
timm's own registry (never timm's `hf-hub:` / `local-dir:`, which download or open folders), and
`model_kwargs` holds numbers, booleans and lists of integers only, under the names the model's
constructor takes, never `pretrained`, `checkpoint_path` or a `pretrained_cfg` (which would load
weights). docs/RELIABILITY.md ("Trust model") has the schema as a table.
"""

from __future__ import annotations

import inspect
import math
import re

from models.weights import WeightsError

IMAGE_SIZE = (16, 2048)  # smallest and largest accepted input side, in pixels
IN_CHANS = (1, 4)  # the grayscale face is repeated on this many channels
NUM_CLASSES = (2, 100_000)
DATA_CONFIG_KEYS = ("image_size", "resize_size", "in_chans", "mean", "std")
# model_kwargs that a timm model may take from a file (train.py passes only num_classes).
TIMM_KWARGS = ("num_classes", "in_chans", "img_size", "drop_rate", "drop_path_rate")
# Constructor arguments that load weights or open files: never taken from a file.
LOADS_FILES = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?")
_DEFAULT_NUM_CLASSES = 7  # models.create_model's default, which a file without it gets


def _show(value) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (a {type(value).__name__})"


def refuse(where: str, key: str, value, accepted: str) -> WeightsError:
    """The one-line error: `where: key is VALUE (a TYPE); accepted: ...`."""
    return WeightsError(f"{where}: {key} is {_show(value)}; accepted: {accepted}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_int(value, where: str, key: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise refuse(where, key, value, f"an integer from {low} to {high}")
    return value


# --------------------------------------------------------------------------- the model


def check_model_name(name, where: str, key: str = "model_name") -> str:
    """A name `models.create_model` builds without reading anything: registered, or `timm:` and
    an architecture of timm's registry (with an optional `.tag`, which names no file)."""
    import timm

    from models.registry import list_models

    known = list_models()
    if isinstance(name, str) and name in known:
        return name
    if isinstance(name, str) and name.startswith("timm:"):
        timm_name = name.removeprefix("timm:")
        if _TIMM_NAME.fullmatch(timm_name) and timm.is_model(timm_name.split(".")[0]):
            return name
    accepted = f"one of {', '.join(known)}, or timm:NAME of a timm model (timm.list_models())"
    raise refuse(where, key, name, accepted + "; never hf-hub: or local-dir:")


def accepted_kwargs(model_name: str) -> dict[str, object]:
    """model_kwargs a file may give `model_name`: argument name -> its default (None for timm's)."""
    from models.emonext import EmoNeXt
    from models.registry import model_constructor, model_meta

    if model_name.startswith("timm:"):
        return dict.fromkeys(TIMM_KWARGS)
    if model_meta(model_name).get("size"):  # emonext_* / convnext_*: depths and dims are the size
        function, fixed = EmoNeXt.__init__, ("self", "depths", "dims")
    else:
        function, fixed = model_constructor(model_name), ("self",)
    parameters = inspect.signature(function).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.name not in fixed and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _check_kwarg(key: str, value, default, where: str) -> None:
    name = f"model_kwargs.{key}"
    if key == "num_classes":
        check_int(value, where, name, *NUM_CLASSES)
    elif key == "in_chans":
        check_int(value, where, name, *IN_CHANS)
    elif key == "img_size":
        check_int(value, where, name, *IMAGE_SIZE)
    elif key in ("drop_rate", "drop_path_rate"):
        if not _is_number(value) or not 0 <= value < 1:
            raise refuse(where, name, value, "a number in [0, 1)")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse(where, name, value, "true or false")
    elif isinstance(default, (tuple, list)):
        if not (
            isinstance(value, (list, tuple))
            and 1 <= len(value) <= 16
            and all(_is_int(v) and 1 <= v <= 65536 for v in value)
        ):
            raise refuse(where, name, value, "a list of 1 to 16 integers from 1 to 65536")
    elif not _is_number(value):
        raise refuse(where, name, value, "a finite number")


def check_model_kwargs(model_name: str, kwargs, where: str) -> dict:
    """`kwargs` for `create_model(model_name, **kwargs)`: only arguments the constructor takes,
    with values of their type and range; never one that loads weights or opens a file."""
    if not isinstance(kwargs, dict):
        raise refuse(where, "model_kwargs", kwargs, "an object of the model's arguments")
    accepted = accepted_kwargs(model_name)
    for key, value in kwargs.items():
        if key in LOADS_FILES:
            why = "a file never makes a model load weights or open files (its weights are its own)"
            raise refuse(where, f"model_kwargs.{key}", value, f"no {key}: {why}")
        if key not in accepted:
            raise WeightsError(
                f"{where}: model_kwargs.{key} is not an argument of {model_name}; accepted: "
                f"{', '.join(accepted)}"
            )
        _check_kwarg(key, value, accepted[key], where)
    return dict(kwargs)


def num_outputs(model_kwargs: dict) -> int:
    """The classes the model's head has, as `create_model` will build it."""
    return model_kwargs.get("num_classes", _DEFAULT_NUM_CLASSES)


# --------------------------------------------------------------------------- classes and input


def check_classes(names, where: str, key: str, outputs: int | None) -> list[str]:
    """Class names in output order: a list of `outputs` distinct, non-empty strings."""
    accepted = (
        f"a list of {outputs} distinct class names (the model has {outputs} outputs)"
        if outputs is not None
        else "a list of at least 2 distinct class names"
    )
    if not isinstance(names, (list, tuple)) or not all(
        isinstance(n, str) and n.strip() and len(n) <= 100 and n.isprintable() for n in names
    ):
        raise refuse(where, key, names, accepted)
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise refuse(where, key, names, f"{accepted}; {repeated[0]!r} appears twice")
    if len(names) < 2 or (outputs is not None and len(names) != outputs):
        raise refuse(where, key, names, accepted)
    return list(names)


def check_data_config(config, where: str, key: str = "data_config", whole: bool = True) -> dict:
    """How to feed the model (datasets.DataConfig's fields). `whole`: image_size and in_chans
    must be there (hub folders, exports); a .pt checkpoint's may be partial (defaults fill it)."""
    if not isinstance(config, dict):
        raise refuse(where, key, config, f"an object with {', '.join(DATA_CONFIG_KEYS)}")
    unknown = [k for k in config if k not in DATA_CONFIG_KEYS]
    if unknown:
        raise WeightsError(
            f"{where}: {key} has an unknown key {unknown[0]!r}; accepted: "
            f"{', '.join(DATA_CONFIG_KEYS)}"
        )
    for name in ("image_size", "in_chans"):
        if whole and name not in config:
            raise WeightsError(f"{where}: {key}.{name} is missing; accepted: an integer")
    size = config.get("image_size")
    if size is not None:
        check_int(size, where, f"{key}.image_size", *IMAGE_SIZE)
    chans = config.get("in_chans")
    if chans is not None:
        check_int(chans, where, f"{key}.in_chans", *IN_CHANS)
    resize = config.get("resize_size")
    if resize is not None:
        check_int(resize, where, f"{key}.resize_size", size or IMAGE_SIZE[0], 2 * IMAGE_SIZE[1])
    mean, std = config.get("mean"), config.get("std")
    if (mean is None) != (std is None):
        raise refuse(where, f"{key}.mean/std", [mean, std], "both null, or both lists")
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        good = (
            isinstance(values, (list, tuple))
            and 0 < len(values) == (chans or len(values))
            and all(_is_number(v) for v in values)
        )
        if not good or (name == "std" and min(values) <= 0):
            positive = " positive" if name == "std" else ""
            accepted = f"null, or a list of in_chans finite{positive} numbers"
            raise refuse(where, f"{key}.{name}", values, accepted)
    return dict(config)


def check_model_fields(ckpt: dict, where: str, hub: bool = False) -> None:
    """The fields of a checkpoint or hub folder that say what to build and how to feed it.
    `hub`: config.json's rules, where label_names and a whole data_config are required."""
    classes_key = "label_names" if hub else "classes"
    name = check_model_name(ckpt.get("model_name"), where)
    kwargs = check_model_kwargs(name, ckpt.get("model_kwargs", {}), where)
    outputs = num_outputs(kwargs)
    if hub or ckpt.get("classes") is not None:
        check_classes(ckpt.get(classes_key), where, classes_key, outputs)
    if hub or ckpt.get("data_config") is not None:
        config = check_data_config(ckpt.get("data_config"), where, whole=hub)
        for arg, field in (("img_size", "image_size"), ("in_chans", "in_chans")):
            if arg in kwargs and field in config and kwargs[arg] != config[field]:
                accepted = f"{kwargs[arg]}, the model's model_kwargs.{arg}"
                raise refuse(where, f"data_config.{field}", config[field], accepted)


# --------------------------------------------------------------------------- config.json

# config.json's keys: required ones first. The informational ones (timm's hub keys, the input
# rule, where the weights came from) are read by nothing here; their types are still checked.
HUB_REQUIRED = ("model_name", "label_names", "data_config")
HUB_TYPES = {
    "model_kwargs": (dict, "an object of the model's arguments"),
    "weights": (str, '"model", "ema" or "bare"'),
    "num_classes": (int, "the number of label_names"),
    "num_features": (int, "an integer"),
    "architecture": (str, "a timm architecture name"),
    "model_args": (dict, "an object (timm's model arguments)"),
    "pretrained_cfg": (dict, "an object (timm's pretrained_cfg)"),
    "input": (str, "a sentence"),
    "grey_to_rgb": (str, "a sentence"),
    "source": (dict, "an object (where the weights came from)"),
    "emonext_hub_format": (int, "an integer from 1 to {format}"),
    # evaluate.py --fit-temperature's; models/calibration.py checks its value when it is read
    "temperature": ((int, float), "a finite number > 0"),
    # the face pipeline of the training data (models/faces/), checked by check_face_pipeline
    "faces": (dict, "an object of the face pipeline (models/faces/)"),
}


def check_hub_config(config, path: str, format_version: int) -> dict:
    """config.json of a hub folder (models/hub.py), checked whole before anything is built."""
    if not isinstance(config, dict):
        raise refuse(path, "the file", config, "a JSON object")
    allowed = HUB_REQUIRED + tuple(HUB_TYPES)
    for key in config:
        if key not in allowed:
            raise WeightsError(f"{path}: unknown key {key!r}; accepted: {', '.join(allowed)}")
    for key in HUB_REQUIRED:
        if key not in config:
            raise WeightsError(
                f"{path}: {key} is missing; it is required (the keys {', '.join(HUB_REQUIRED)} "
                "are: export the model again with scripts/export.py --format hub)"
            )
    for key, (kind, accepted) in HUB_TYPES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise refuse(path, key, value, accepted.format(format=format_version))
    if config.get("weights", "model") not in ("model", "ema", "bare"):
        raise refuse(path, "weights", config["weights"], HUB_TYPES["weights"][1])
    version = config.get("emonext_hub_format", 1)
    if not 1 <= version <= format_version:
        accepted = f"1 to {format_version} (a newer version of this project wrote it)"
        raise refuse(path, "emonext_hub_format", version, accepted)
    check_model_fields(config, path, hub=True)
    if "num_classes" in config and config["num_classes"] != len(config["label_names"]):
        raise refuse(path, "num_classes", config["num_classes"], "the number of label_names")
    if config.get("faces") is not None:
        check_face_pipeline(config["faces"], path, "faces")
    source = config.get("source") or {}
    if not isinstance(source.get("git_commit", ""), str):
        raise refuse(path, "source.git_commit", source["git_commit"], "a commit id")
    return config


# --------------------------------------------------------------------------- face pipeline

# What each field of a face pipeline (models/faces/ FacePipeline) may be: its check and the
# accepted values said in words.
FACE_FIELDS = {
    "detector": (lambda v: v == "yunet", '"yunet"'),
    "detector_sha256": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "64 lowercase hexadecimal digits (the detector file's SHA-256)",
    ),
    "min_score": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "min_face": (lambda v: _is_int(v) and 1 <= v <= 4096, "an integer from 1 to 4096"),
    "detect_size": (
        lambda v: _is_int(v) and (v == 0 or 32 <= v <= 8192),
        "0 (full size) or an integer from 32 to 8192",
    ),
    "box_scale": (lambda v: _is_number(v) and 0.5 <= v <= 4, "a number from 0.5 to 4"),
    "align": (lambda v: isinstance(v, bool), "true or false"),
    "size": (
        lambda v: v is None or (_is_int(v) and 8 <= v <= IMAGE_SIZE[1]),
        f"null or an integer from 8 to {IMAGE_SIZE[1]}",
    ),
}


def check_face_pipeline(value, where: str, key: str = "faces") -> dict:
    """A face pipeline as a file records it (a manifest, a checkpoint, export metadata,
    config.json): every field present, known and of its type and range."""
    if not isinstance(value, dict):
        raise refuse(where, key, value, "an object of the face pipeline's fields")
    for name in value:
        if name not in FACE_FIELDS:
            raise WeightsError(
                f"{where}: unknown key {key}.{name}; accepted: {', '.join(FACE_FIELDS)}"
            )
    for name, (ok, accepted) in FACE_FIELDS.items():
        if name not in value:
            raise WeightsError(f"{where}: {key}.{name} is missing; accepted: {accepted}")
        if not ok(value[name]):
            raise refuse(where, f"{key}.{name}", value[name], accepted)
    return dict(value)
