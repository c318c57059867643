"""Every kind of weights a researcher has, into EmoNeXt, with a report of what was loaded.

- Pretrained backbones (`load_pretrained`): the official ConvNeXt checkpoints (ImageNet-1k/22k,
  downloaded through the torch hub cache, so `TORCH_HOME` works), local files or URLs in the
  official layout, and timm-layout state dicts. The STN, SE, attention and head are expected to be
  missing; anything else missing or mis-shaped is an error that names it.
- Whole models (`load_checkpoint`, `load_model`, `load_trained_model`): this project's
  checkpoints, the official EmoNeXt trainer's (`model` plus an ema-pytorch `ema`), bare
  state dicts, hub folders and `hf-hub:` names (models/hub.py), loaded strictly.

Every .pt file is read with `torch.load(..., weights_only=True)` and every hub folder's weights
with safetensors: a checkpoint can never run code. A TorchScript file (a program: its code runs
as it loads) is refused by name, never loaded. Every tensor loaded into a model is checked
(`check_values`): floating point where the model's is, and finite.
"""

from __future__ import annotations

import os
import re
import urllib.error
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import nn

from utils import CLIError, is_terminal

_FB = "https://dl.fbaipublicfiles.com/convnext"
PRETRAINED_URLS = {
    **{
        (s, "in1k"): f"{_FB}/convnext_{s}_1k_224_ema.pth"
        for s in ("tiny", "small", "base", "large")
    },
    **{
        (s, "in22k"): f"{_FB}/convnext_{s}_22k_224.pth"
        for s in ("tiny", "small", "base", "large", "xlarge")
    },
}

# Modules that a ConvNeXt checkpoint does not have, or whose shape depends on the task.
_NEW_MODULES = {
    "stn": re.compile(r"^(localization|fc_loc)\."),
    "se": re.compile(r"^downsample_layers\.\d+\.2\."),
    "attention": re.compile(r"^attention\."),
    "head": re.compile(r"^head\."),
}


# The official trainer's class order, which its checkpoints do not record: torchvision's
# ImageFolder over FER2013's train/ folder, i.e. the folder names sorted.
OFFICIAL_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")


class WeightsError(CLIError):
    """Weights that cannot be had or do not fit; the message says which file and what to do.

    A CLIError: a command prints it as one line (`utils.run_command`), without a traceback.
    """


def _group(key: str) -> str:
    for name, pattern in _NEW_MODULES.items():
        if pattern.match(key):
            return name
    return "backbone"


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # module group -> keys
    unexpected: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)  # e.g. the checkpoint's 1000-class head
    new_head: str = ""

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        for group, keys in self.missing.items():
            lines.append(f"  not in checkpoint ({group}, newly initialised): {len(keys)} tensors")
        if self.discarded:
            lines.append(f"  discarded: {', '.join(self.discarded)}")
        if self.new_head:
            lines.append(f"  head: a fresh {self.new_head}")
        if self.unexpected:
            lines.append(f"  unexpected, ignored: {', '.join(self.unexpected)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading files


def _download(url: str) -> dict:
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    file_name = os.path.basename(url.split("?")[0])
    try:
        return torch.hub.load_state_dict_from_url(
            url,
            map_location="cpu",
            weights_only=True,
            file_name=file_name,
            progress=is_terminal(),  # no bar in a log file
        )
    except (urllib.error.URLError, OSError, ConnectionError) as err:
        raise WeightsError(
            f"could not download {url} ({err}). Without network, fetch that file on a machine "
            f"that has it and put it at {hub_dir / file_name} (set TORCH_HOME to choose the "
            "directory), or pass the local file's path instead."
        ) from err


def _unreadable_message(source: str, err: Exception) -> str:
    """One line on why torch.load(weights_only=True) refused a file.

    torch's own message advises re-running with weights_only=False, which would execute
    whatever code the file carries: that advice is never passed on, nor its allow-listing one.
    """
    text = str(err)
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (
            f"{source} was not loaded: it is not a plain weights file, loading it would run "
            f"Python code ({code.group(1)}). A checkpoint needs only tensors and plain values: "
            "use the .pt file that train.py or the official trainer wrote, or re-save yours "
            "as a state dict of tensors"
        )
    useless = ("weights only load failed", "weights_only", "safe_globals", "check the doc")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = next((ln for ln in lines if not any(u in ln.lower() for u in useless)), "")
    reason = reason.split(". ")[0].removeprefix("WeightsUnpickler error: ")[:200]
    return (
        f"{source} is not a readable PyTorch checkpoint (damaged, truncated or another kind "
        f"of file: {reason or type(err).__name__}); use the .pt file that train.py or the "
        "official trainer wrote"
    )


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive (torch.jit.save: a zip with the module's `code/`
    and `constants.pkl`), whatever the file's extension. Loading one runs its code."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def torchscript_refusal(source: str, flag: str = "") -> str:
    """Why a TorchScript file is not loaded: it is a program, not weights. `flag`: the option
    that runs it anyway, where the command has one."""
    run = f"; {flag} runs it, for a file you trust as you would a program" if flag else ""
    return (
        f"{source} is a TorchScript file, not a checkpoint: it holds code, which would run as it "
        "loads, so it is not loaded; use the .pt checkpoint or hub folder it was exported from"
        + run
    )


def read_checkpoint(source: str | os.PathLike) -> dict:
    """A checkpoint dict from a local .pt file, an http(s) URL (both read with weights_only=True),
    a hub folder (`models.hub`: config.json + model.safetensors) or `hf-hub:USER/NAME[@REV]`."""
    from models import hub

    source = str(source)
    if source.startswith(("http://", "https://")):
        return _download(source)
    if hub.is_hub_name(source):
        return hub.read_folder(hub.download(source), source)
    if os.path.isdir(source):
        return hub.read_folder(source)
    if not os.path.isfile(source):
        raise WeightsError(f"checkpoint {source} does not exist")
    if is_torchscript(source):
        raise WeightsError(torchscript_refusal(source))
    if source.endswith(".safetensors"):
        return _read_safetensors(source)
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-torch files
        raise WeightsError(_unreadable_message(source, err)) from None
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{source} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def _read_safetensors(source: str) -> dict:
    """A .safetensors file: its hub folder where config.json sits beside it, else a bare state
    dict (the architecture is then read off the shapes, as for the official files)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models import hub

    folder = os.path.dirname(os.path.abspath(source))
    if os.path.basename(source) == hub.WEIGHTS and os.path.isfile(os.path.join(folder, hub.CONFIG)):
        return hub.read_folder(folder, source)
    try:
        return load_file(source, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{source} is not a readable safetensors file ({err})") from None


def timm_to_official(state_dict: dict) -> dict:
    """timm's ConvNeXt layout -> the official one (the inverse of timm's checkpoint_filter_fn)."""
    if not any(k.startswith("stem.") or ".blocks." in k for k in state_dict):
        return state_dict
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc", ".pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        if ".pwconv" in k and v.ndim == 4:  # timm's conv_mlp variants store 1x1 convolutions
            v = v.flatten(1)
        out[k] = v
    return out


def clean_state_dict(state_dict: dict) -> dict:
    """Strip DDP's `module.` and torch.compile's `_orig_mod.` prefixes.

    Key layouts are left alone: only a target EmoNeXt/ConvNeXt of this project wants timm's
    ConvNeXt layout converted (`to_model_layout`); a `timm:` model's keys must stay timm's.
    """
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def to_model_layout(state_dict: dict, model: nn.Module) -> dict:
    """`state_dict` in the key layout of `model`.

    Into this project's EmoNeXt/ConvNeXt, timm's ConvNeXt layout becomes the official one. Into a
    `timm:` model (a TimmModel, its timm network under `model.`), a plain timm state dict gets the
    `model.` prefix. Anything else is left as is.
    """
    own = model.state_dict()
    if "downsample_layers.0.0.weight" in own:
        return timm_to_official(state_dict)
    if all(k.startswith("model.") for k in own) and not any(
        k.startswith("model.") for k in state_dict
    ):
        return {f"model.{k}": v for k, v in state_dict.items()}
    return state_dict


def extract_state_dict(ckpt: dict, weights: str = "auto") -> tuple[dict, str]:
    """The model weights inside a checkpoint; returns (state_dict, which of model/ema/bare).

    Knows this project's checkpoints and the official trainer's ({"model", "ema", ...}, with the
    EMA in ema-pytorch's layout: `ema_model.*`, `online_model.*`, `initted`, `step`; this project's
    EMA uses the same `ema_model.*` keys), the official ConvNeXt files ({"model"}) and bare state
    dicts. `weights="auto"` takes the EMA weights where there are some (the official test
    protocol evaluates the EMA model), else the online ones.
    """
    if weights not in ("auto", "model", "ema"):
        raise ValueError(f"weights must be auto, model or ema, not {weights!r}")
    if isinstance(ckpt.get("hub"), dict):  # a hub folder holds one set, named in config.json
        held = ckpt["hub"]["weights"]
        if weights not in ("auto", held):
            raise WeightsError(
                f"{ckpt['hub']['source']} holds only the {held} weights of its checkpoint "
                f'(config.json "weights"); use --weights auto or {held}'
            )
        return clean_state_dict(ckpt["model"]), held
    has_model = isinstance(ckpt.get("model"), dict)
    has_ema = isinstance(ckpt.get("ema"), dict)
    if not has_model and not has_ema:
        if weights == "ema":
            raise WeightsError("the checkpoint is a bare state dict: it holds no EMA weights")
        if "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
            return clean_state_dict(ckpt["state_dict"]), "bare"
        return clean_state_dict(ckpt), "bare"
    which = weights if weights != "auto" else ("ema" if has_ema else "model")
    if which == "model":
        if not has_model:
            raise WeightsError("the checkpoint holds no 'model' weights")
        return clean_state_dict(ckpt["model"]), "model"
    if not has_ema:
        raise WeightsError("the checkpoint holds no 'ema' weights; use weights='model'")
    ema = ckpt["ema"]
    sd = {k.removeprefix("ema_model."): v for k, v in ema.items() if k.startswith("ema_model.")}
    return clean_state_dict(sd), "ema"


# --------------------------------------------------------------------------- pretrained backbones


def resolve_pretrained(source: str, size: str | None) -> str:
    """'in1k' / 'in22k' -> the official ConvNeXt URL for `size`; paths and URLs unchanged."""
    if source not in ("in1k", "in22k"):
        return source
    if (size, source) not in PRETRAINED_URLS:
        have = sorted({t for s, t in PRETRAINED_URLS if s == size})
        raise WeightsError(
            f"there are no official {source} ConvNeXt weights for size {size!r}"
            + (f" (available: {', '.join(have)})" if have else "")
            + "; pass a checkpoint path or URL instead"
        )
    return PRETRAINED_URLS[(size, source)]


def load_pretrained(model: nn.Module, source: str, num_classes: int | None = None) -> LoadReport:
    """Load a ConvNeXt backbone (path or URL, official or timm layout) into an EmoNeXt.

    The checkpoint's classifier is discarded and replaced by a fresh `nn.Linear` for
    `num_classes`, as the official code does. Missing STN/SE/attention tensors are expected;
    a missing or mis-shaped backbone tensor is an error naming it.
    """
    sd, _ = extract_state_dict(read_checkpoint(source), "model")
    sd = timm_to_official(sd)
    own = model.state_dict()
    check_values(sd, own, source)
    report = LoadReport(source=str(source))
    to_load = {}
    for k, v in sd.items():
        if _group(k) == "head":
            report.discarded.append(f"{k} {tuple(v.shape)}")
        elif k not in own:
            report.unexpected.append(k)
        else:
            if k == "downsample_layers.0.0.weight" and v.shape[1] != own[k].shape[1]:
                v = adapt_input_conv(own[k].shape[1], v)  # e.g. in_chans=1: sum the RGB filters
            if v.shape != own[k].shape:
                raise WeightsError(
                    f"{source}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                    f"{tuple(own[k].shape)}: the checkpoint is for another model size"
                )
            to_load[k] = v
    for k in own:
        if k not in to_load and not k.endswith("num_batches_tracked"):
            report.missing.setdefault(_group(k), []).append(k)
    if "backbone" in report.missing:
        keys = report.missing["backbone"]
        raise WeightsError(
            f"{source} lacks {len(keys)} backbone tensors of this model, e.g. "
            f"{', '.join(keys[:5])}: it is not a ConvNeXt checkpoint of this size"
        )
    model.load_state_dict(to_load, strict=False)  # completeness checked above, by module
    report.loaded = len(to_load)
    # The official code replaces the head after loading, whatever the checkpoint held.
    report.missing.pop("head", None)
    model.reset_classifier(num_classes if num_classes is not None else model.num_classes)
    report.new_head = f"Linear({model.num_features}, {model.num_classes})"
    return report


def check_values(state_dict: dict, own: dict, source) -> None:
    """Refuse weights that cannot be right, which loading would accept silently: a tensor that is
    not floating point where the model's is (int64 or bool, cast to float on loading), or one
    holding NaN or infinity where the freshly built model's does not (every output NaN)."""
    for key, value in state_dict.items():
        mine = own.get(key)
        if not isinstance(mine, torch.Tensor):
            continue
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        if mine.is_floating_point() and not value.is_floating_point():
            raise WeightsError(
                f"{source}: tensor {key} is {str(value.dtype).removeprefix('torch.')}, where the "
                "model's weights are floating point: these are not weights of this model"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            if torch.isfinite(mine).all():
                bad = int((~torch.isfinite(value)).sum())
                raise WeightsError(
                    f"{source}: tensor {key} holds {bad} NaN or infinite values (of "
                    f"{value.numel()}): the weights are broken (a diverged run?); use another "
                    "checkpoint, e.g. an earlier epoch's"
                )


# --------------------------------------------------------------------------- whole models


def load_checkpoint(
    model: nn.Module, source: str | os.PathLike | dict, weights: str = "auto", name: str = ""
):
    """Load full-model weights strictly; returns the checkpoint dict with `weights_used` set.

    `source` is a path, a URL or an already-read checkpoint dict (`name`: its file, for errors).
    """
    ckpt = source if isinstance(source, dict) else read_checkpoint(source)
    name = name or (str(source) if not isinstance(source, dict) else "checkpoint")
    sd, which = extract_state_dict(ckpt, weights)
    sd = to_model_layout(sd, model)
    own = model.state_dict()
    check_values(sd, own, name)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if wrong:
            parts.append(f"wrong shapes: {', '.join(wrong[:4])}")
        raise WeightsError(
            f"{name} does not fit this model: {'; '.join(parts)}. Check the model name / size "
            "(a checkpoint of this project records it; see infer_architecture for others)."
        )
    # Old BatchNorm checkpoints may lack num_batches_tracked; it never affects results.
    model.load_state_dict(sd, strict=False)
    ckpt = dict(ckpt)
    ckpt["weights_used"] = which
    return ckpt


def infer_architecture(state_dict: dict) -> dict:
    """EmoNeXt constructor arguments read off an official-layout state dict."""
    sd = timm_to_official(clean_state_dict(state_dict))
    if "downsample_layers.0.0.weight" not in sd:
        raise WeightsError("not an EmoNeXt/ConvNeXt state dict: no downsample_layers.0.0.weight")
    dims = (sd["downsample_layers.0.0.weight"].shape[0],) + tuple(
        sd[f"downsample_layers.{i}.1.weight"].shape[0] for i in (1, 2, 3)
    )
    depths = tuple(
        1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"stages\.{i}\.(\d+)\.", k)))
        for i in range(4)
    )
    arch = {
        "depths": depths,
        "dims": dims,
        "in_chans": sd["downsample_layers.0.0.weight"].shape[1],
        "num_classes": sd["head.weight"].shape[0] if "head.weight" in sd else 7,
        "stn": "localization.0.weight" in sd,
        "se": "downsample_layers.1.2.fc.0.weight" in sd,
        "attention": "attention.query.weight" in sd,
    }
    if arch["stn"]:
        side = round((sd["fc_loc.0.weight"].shape[1] / 10) ** 0.5)
        arch["img_size"] = 4 * side + 16  # inverts the STN's conv/pool arithmetic (52 -> 224)
    return arch
