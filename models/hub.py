"""Hub folders: how a trained model travels. `config.json` + `model.safetensors` + `README.md`.

- `config.json`: everything needed to rebuild the model and feed it (`model_name`,
  `model_kwargs`, `label_names` = the classes in output order, `data_config`, the `input` rule,
  which `weights` of the checkpoint, the calibration `temperature` where one was fitted:
  models/calibration.py), plus timm's hub keys (`architecture`, `model_args`,
  `pretrained_cfg`) where timm can build the model, so that `timm.create_model("local-dir:DIR")`
  and `"hf-hub:USER/NAME"` load it too once `import models` has registered the EmoNeXt names.
- `model.safetensors`: the weights alone, no pickle (nothing in it can run code).
- `README.md`: a model card, YAML front matter (Hugging Face's `ModelCardData`) and text.

`read_folder` turns a folder into a checkpoint dict that `models.load_model` and every command's
`--checkpoint` accept; `download` fetches `hf-hub:USER/NAME[@REVISION]` through huggingface_hub's
cache (HF_HOME; HF_HUB_OFFLINE=1 uses the cache alone); `push` uploads a folder.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from pathlib import Path

import torch
from torch import nn

from models.schema import DATA_CONFIG_KEYS, check_hub_config
from models.weights import WeightsError

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
HUB_PREFIX = "hf-hub:"
FORMAT = 1  # `emonext_hub_format`: bumped when a reader of older folders needs to know
# PIL's convert("L") (torchvision's Grayscale): ITU-R 601-2 luma.
GREY_TO_RGB = (
    "grayscale by L = 0.299 R + 0.587 G + 0.114 B (PIL's convert('L')), then that one channel "
    "repeated on in_chans channels"
)
CITATION = """@inproceedings{elboudouri2023emonext,
  title={EmoNeXt: an Adapted ConvNeXt for Facial Emotion Recognition},
  author={El Boudouri, Yassine and Bohi, Amine},
  booktitle={2023 IEEE 25th International Workshop on Multimedia Signal Processing (MMSP)},
  year={2023}
}"""


def is_hub_name(source: str | os.PathLike) -> bool:
    return str(source).startswith(HUB_PREFIX)


def input_rule(data_config: dict) -> str:
    """How to turn a face crop into the model's input, in one sentence (config.json, ONNX
    metadata, the model card)."""
    size, chans = data_config["image_size"], data_config["in_chans"]
    resize = data_config.get("resize_size") or round(size * 236 / 224)
    normalise = data_config.get("mean") is not None and data_config.get("std") is not None
    return (
        f"float32 N x {chans} x {size} x {size}: face crop -> grayscale -> resize shorter side "
        f"to {resize} -> centre crop {size} -> values in [0, 1] -> repeated to {chans} channels"
        + (" -> (x - mean) / std" if normalise else "; no normalisation")
    )


# --------------------------------------------------------------------------- writing


def _timm_keys(model: nn.Module, num_classes: int, data_config: dict) -> dict:
    """timm's hub-config keys, where timm can build the model: EmoNeXt sizes (registered with
    timm by `import models`) and `timm:` models. Empty for the others."""
    import timm
    from timm.models._pretrained import filter_pretrained_cfg

    from models.baselines import TimmModel
    from models.emonext import EmoNeXt

    if isinstance(model, TimmModel):
        arch = model.timm_name.split(".")[0]
        cfg = filter_pretrained_cfg(
            dict(model.model.pretrained_cfg), remove_source=True, remove_null=True
        )
    elif isinstance(model, EmoNeXt) and model.model_name.startswith("emonext_"):
        # (this project's convnext_* are not timm's models of those names)
        arch = model.model_name
        cfg = dict(timm.models.get_pretrained_cfg(arch).to_dict())
        cfg = filter_pretrained_cfg(cfg, remove_source=True, remove_null=True)
    else:
        return {}
    size, chans = data_config["image_size"], data_config["in_chans"]
    resize = data_config.get("resize_size") or round(size * 236 / 224)
    mean, std = data_config.get("mean"), data_config.get("std")
    cfg.update(
        architecture=arch,
        num_classes=num_classes,
        input_size=[chans, size, size],
        crop_pct=size / resize,
        crop_mode="center",
        mean=list(mean) if mean is not None else [0.0] * chans,  # 0 and 1: no normalisation
        std=list(std) if std is not None else [1.0] * chans,
    )
    for key in ("tag", "architecture"):  # timm keeps the architecture at the top level only
        cfg.pop(key, None)
    args = {k: v for k, v in model.model_kwargs.items() if k != "num_classes"}
    return {"architecture": arch, "model_args": args, "pretrained_cfg": cfg}


def hub_config(
    model: nn.Module,
    classes: list[str],
    data_config: dict,
    weights: str,
    source: dict,
    temperature: float | None = None,
    faces: dict | None = None,
) -> dict:
    """config.json of a trained model. `weights`: which of the checkpoint's ("ema", "model");
    `source`: where it came from (checkpoint file name, epoch, commit, versions); `temperature`:
    its calibration (models/calibration.py), None for none; `faces`: the face pipeline of its
    training data (models/faces/), None for none."""
    dc = {k: data_config.get(k) for k in DATA_CONFIG_KEYS}  # datasets.DataConfig's fields
    dc.update({k: list(dc[k]) for k in ("mean", "std") if dc[k] is not None})
    timm_keys = _timm_keys(model, len(classes), dc)
    config = {
        "architecture": timm_keys.get("architecture"),
        "num_classes": len(classes),
        "num_features": getattr(model, "num_features", None),
        "label_names": list(classes),
        "model_args": timm_keys.get("model_args"),
        "pretrained_cfg": timm_keys.get("pretrained_cfg"),
        "model_name": model.model_name,
        "model_kwargs": dict(model.model_kwargs),
        "data_config": dc,
        "input": input_rule(dc),
        "grey_to_rgb": GREY_TO_RGB,
        "weights": weights,
        "temperature": temperature,
        "faces": faces,
        "source": source,
        "emonext_hub_format": FORMAT,
    }
    return {k: v for k, v in config.items() if v is not None}


def hub_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as model.safetensors holds them: the model's own keys, except a `timm:` model's,
    which lose their `model.` prefix so that plain timm loads them (read_folder puts it back)."""
    from models.baselines import TimmModel

    net = model.model if isinstance(model, TimmModel) else model
    # safetensors refuses views of shared storage: every tensor its own contiguous copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


def write_folder(folder: str | os.PathLike, state_dict: dict, config: dict, card: str) -> Path:
    """The three files in a new temporary folder beside `folder`; returns it. `publish` moves
    them into place; a failure leaves neither the temporary folder nor a partial `folder`."""
    from safetensors.torch import save_file

    folder = Path(os.path.abspath(folder))  # "." has no name to put a temporary one beside
    if folder.exists() and not folder.is_dir():
        raise WeightsError(f"{folder} is a file; give a folder for the hub files")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        save_file(state_dict, str(tmp / WEIGHTS), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # safetensors writes 0600; a shared folder is read
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(card)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WeightsError(f"could not write the hub folder beside {folder}: {err}") from None
    return tmp


def publish(tmp: Path, folder: str | os.PathLike) -> None:
    """Move the files of `write_folder` into `folder`: a rename of the whole folder when it is
    new, else file by file (each a rename), leaving files the project did not write alone."""
    folder = Path(folder)
    try:
        if not folder.exists():
            os.replace(tmp, folder)
            return
        for name in (WEIGHTS, CARD, CONFIG):  # config.json last: it says the folder is whole
            os.replace(tmp / name, folder / name)
        tmp.rmdir()
    except OSError as err:
        raise WeightsError(f"could not move the hub files into {folder}: {err}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- reading


def read_folder(folder: str | os.PathLike, source: str | None = None) -> dict:
    """A hub folder as a checkpoint dict: {"model": weights, "model_name", "model_kwargs",
    "classes", "data_config", "hub": {"weights", "config", "source"}}. config.json is checked
    against models/schema.py's schema before the weights are read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, name = Path(folder), source or str(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file():
        raise WeightsError(
            f"{name} is a folder without {CONFIG}: give a checkpoint file or a folder written "
            "by scripts/export.py --format hub"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{config_path} is not readable JSON ({err})") from None
    if isinstance(config, dict) and "model_name" not in config:
        raise WeightsError(
            f"{config_path} has no model_name: not a folder of scripts/export.py --format hub "
            "(a plain timm folder loads with timm.create_model('local-dir:...'))"
        )
    # Before anything is built: nothing in it may name a file to open or a URL to download.
    check_hub_config(config, str(config_path), FORMAT)
    if not weights_path.is_file():
        raise WeightsError(f"{name} has {CONFIG} but no {WEIGHTS}")
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(
            f"{weights_path} is not a readable safetensors file (damaged or truncated: {err})"
        ) from None
    return {
        "model": state_dict,
        "model_name": config["model_name"],
        "model_kwargs": dict(config.get("model_kwargs", {})),
        "classes": list(config["label_names"]),
        "data_config": dict(config["data_config"]),
        "git_commit": (config.get("source") or {}).get("git_commit"),
        "faces": config.get("faces"),
        "hub": {"weights": config.get("weights", "model"), "config": config, "source": name},
    }


def split_name(name: str) -> tuple[str, str | None]:
    """ "hf-hub:USER/NAME@REVISION" -> ("USER/NAME", "REVISION" or None)."""
    repo = name.removeprefix(HUB_PREFIX)
    repo, _, revision = repo.partition("@")
    return repo, revision or None


def download(name: str) -> Path:
    """The local folder of `hf-hub:USER/NAME[@REVISION]`: config.json and model.safetensors
    through huggingface_hub's cache (downloaded once; HF_HUB_OFFLINE=1 reads the cache alone)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_name(name)
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    # huggingface_hub logs each failed attempt ("... thrown while requesting HEAD ..."): the
    # failure is said once, in one line, below.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        paths = [
            hf_hub_download(
                repo_id,
                file,
                revision=revision,
                library_name="emonext",
                # HF's own variable, read now rather than only when huggingface_hub was imported
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
            for file in (CONFIG, WEIGHTS)
        ]
    except HFValidationError as err:
        raise WeightsError(f"{name} is not a valid Hugging Face model id ({err})") from None
    except GatedRepoError:
        raise WeightsError(
            f"{name} is gated: accept its conditions on huggingface.co/{repo_id} and log in "
            "(hf auth login, or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise WeightsError(
            f"{name}: no such model on the Hugging Face Hub, or it is private and no token with "
            "access is set (hf auth login, or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise WeightsError(f"{name}: the model has no revision {revision!r}") from None
    except LocalEntryNotFoundError:  # offline (or HF_HUB_OFFLINE=1) and not in the cache
        raise WeightsError(
            f"could not reach the Hugging Face Hub for {name} and it is not in the cache "
            f"({cache}): connect, or copy the folder from a machine that has it and pass its path"
        ) from None
    except EntryNotFoundError:
        raise WeightsError(
            f"{name} has no {CONFIG} and {WEIGHTS}: not a folder of scripts/export.py --format hub"
        ) from None
    except Exception as err:  # HTTP and network errors of huggingface_hub's client
        raise WeightsError(
            f"could not download {name} ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    finally:
        hub_logger.setLevel(level)
    return Path(paths[0]).parent


# --------------------------------------------------------------------------- model card


def applicable_scores(results: dict, ckpt: dict, weights: str) -> dict | None:
    """The test scores of results.json that belong to these weights of this checkpoint.

    results.json scores the final EMA weights (last.pt; with intervals and macro-F1) and best.pt's
    online and EMA weights (accuracy, with its interval since 8a38f7e). Other weights (e.g. an
    earlier epoch's) have none, and neither has an average of epochs (scripts/average_checkpoints.py
    keeps the best epoch's `epoch` and `step` beside weights that results.json never scored).
    """
    if ckpt.get("averaged_epochs") is not None:
        return None
    final = ckpt.get("step") is not None and ckpt.get("step") == results.get("steps")
    if final and weights == "ema":
        return {
            "what": "the final EMA weights (the official protocol)",
            "accuracy": results.get("test_accuracy"),
            "accuracy_ci95": results.get("test_accuracy_ci95"),
            "macro_f1": results.get("macro_f1"),
            "macro_f1_ci95": results.get("macro_f1_ci95"),
        }
    if ckpt.get("epoch") is not None and ckpt.get("epoch") == results.get("best_epoch"):
        key = "test_accuracy_best_ema" if weights == "ema" else "test_accuracy_best_online"
        if results.get(key) is not None:
            kind = "EMA" if weights == "ema" else "online"
            return {
                "what": f"best.pt's {kind} weights",
                "accuracy": results[key],
                "accuracy_ci95": results.get(f"{key}_ci95"),
            }
    return None


def _interval(ci) -> str:
    return f" (95 % CI {ci[0]:.2f}-{ci[1]:.2f})" if isinstance(ci, list | tuple) else ""


def _dataset_name(args: dict) -> str:
    if args.get("demo"):
        return "synthetic"
    path = args.get("dataset_path")
    return Path(str(path)).name.lower() if path else "fer2013"


def card_metadata(config: dict, scores: dict | None, dataset: str, license: str, name: str):
    """The YAML front matter, as huggingface_hub writes it (model-index from the scores)."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    for metric, key, label in (
        ("accuracy", "accuracy", "Test accuracy (TenCrop)"),
        ("f1", "macro_f1", "Test macro-F1 (TenCrop)"),
    ):
        if scores and scores.get(key) is not None:
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Facial expression recognition",
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split="test",
                    metric_type=metric,
                    metric_value=round(float(scores[key]), 2),
                    metric_name=label,
                )
            )
    return ModelCardData(
        library_name="timm" if "architecture" in config else "pytorch",
        tags=["image-classification", "facial-expression-recognition", "emonext", "pytorch"]
        + (["timm"] if "architecture" in config else []),
        license=license,
        datasets=[dataset],
        metrics=["accuracy", "f1"],
        pipeline_tag="image-classification",
        model_name=name,
        eval_results=results or None,
    )


def model_card(
    config: dict,
    ckpt: dict,
    results: dict | None,
    name: str,
    license: str = "mit",
) -> str:
    """README.md of a hub folder: metadata, what the model is, how it scores (when the run's
    results.json is known), how it was trained and how to load it."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    dataset = _dataset_name(args)
    scores = applicable_scores(results, ckpt, config["weights"]) if results else None
    meta = card_metadata(config, scores, dataset, license, name)
    classes = ", ".join(config["label_names"])
    lines = [
        f"# {name}",
        "",
        f"`{config['model_name']}` trained for facial expression recognition with "
        "[EmoNeXt](https://arxiv.org/abs/2501.08199)'s code path (a ConvNeXt with a spatial "
        f"transformer, squeeze-and-excitation and a self-attention loss term), on `{dataset}`. "
        f"Classes, in output order: {classes}.",
        "",
        "## Scores",
        "",
    ]
    if scores:
        lines.append(
            f"On the test split of `{dataset}`, {scores['what']}, TenCrop: accuracy "
            f"{scores['accuracy']:.2f} %{_interval(scores.get('accuracy_ci95'))}"
            + (
                f", macro-F1 {scores['macro_f1']:.2f}{_interval(scores.get('macro_f1_ci95'))}"
                if scores.get("macro_f1") is not None
                else ""
            )
            + " (from the run's results.json; intervals: bootstrap over the test images)."
        )
    else:
        lines.append(
            "No test score is recorded for these weights (no results.json beside the "
            "checkpoint, or it scores other weights): measure with `evaluate.py`."
        )
    if config.get("temperature") is not None:
        lines += [
            "",
            f"Calibrated probabilities are softmax(logits / {config['temperature']:.4g}): "
            "temperature scaling fitted on the validation split (`evaluate.py "
            "--fit-temperature`); config.json's `temperature`. The argmax is the same.",
        ]
    lines += _card_training(config, ckpt, args) + _card_usage(config, name)
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _card_training(config: dict, ckpt: dict, args: dict) -> list[str]:
    source = config.get("source", {})
    keys = (
        "epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "sa_weight",
        "ema_beta", "drop_path", "input_size", "pretrained", "in_22k", "amp", "seed",
    )  # fmt: skip
    recipe = ", ".join(f"`{k}={args[k]}`" for k in keys if k in args)
    epoch = f", epoch {ckpt['epoch'] + 1}" if isinstance(ckpt.get("epoch"), int) else ""
    if source.get("averaged_epochs"):  # epochs counted from 1, as above
        epochs = ", ".join(str(e + 1) for e in source["averaged_epochs"])
        epoch = f" averaged over epochs {epochs} (scripts/average_checkpoints.py)"
    versions = ", ".join(f"{k} {v}" for k, v in (source.get("versions") or {}).items())
    lines = [
        "",
        "## Training",
        "",
        f"Weights: the checkpoint's `{config['weights']}` weights{epoch}, from "
        f"`{source.get('checkpoint', '?')}`; code at commit "
        f"`{source.get('git_commit') or 'unknown'}`" + (f" ({versions})." if versions else "."),
    ]
    if recipe:
        lines += ["", f"Recipe (train.py arguments): {recipe}."]
    if args:
        table = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(args.items()))
        lines += [
            "",
            "<details><summary>Every train.py argument</summary>",
            "",
            "| argument | value |\n|---|---|\n" + table,
            "",
            "</details>",
        ]
    return lines


def _card_usage(config: dict, name: str) -> list[str]:
    ref = name if "/" in name and not os.path.exists(name) else "path/to/this/folder"
    load = f"hf-hub:{ref}" if ref != "path/to/this/folder" else ref
    lines = [
        "",
        "## Use",
        "",
        f"Input: {config['input']} ({config['grey_to_rgb']}). Faces are found and cropped by "
        "`predict.py` (YuNet, `--box-scale`)"
        + (
            ", framed as config.json's `faces` says: the face pipeline of the training data."
            if config.get("faces")
            else "."
        ),
        "",
        "With this project's code (EmoNeXt, reproduced) on the Python path:",
        "",
        "```python",
        "from models import load_trained_model",
        f'model, classes, data_config, _ = load_trained_model("{load}")',
        "```",
        "",
        "```bash",
        f"python predict.py photo.jpg --checkpoint {load}",
        f"python evaluate.py --checkpoint {load} --dataset-path FER2013",
        "```",
    ]
    if "architecture" in config:
        timm_name = load if load.startswith("hf-hub:") else f"local-dir:{ref}"
        lines += [
            "",
            "With timm, once `import models` has registered the EmoNeXt names:",
            "",
            "```python",
            "import timm, models",
            f'model = timm.create_model("{timm_name}", pretrained=True)',
            "```",
        ]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```"]
    return lines


# --------------------------------------------------------------------------- upload


def push(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a hub folder to `repo_id` (created if needed); returns the commit's URL.

    Needs a token with write access (`hf auth login` or HF_TOKEN). Every failure is one line."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    # hf upload REPO FOLDER . puts the folder's files at the repository's root, as below.
    command = ["hf", "upload", repo_id, str(folder), "."] + (["--private"] if private else [])
    again = f"upload it later with `{shlex.join(command)}`"
    if not get_token():
        raise WeightsError(
            f"--push needs a Hugging Face token with write access: run `hf auth login` or set "
            f"HF_TOKEN. {folder} is written; {again}"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, library_name="emonext")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(folder),
            allow_patterns=[CONFIG, WEIGHTS, CARD],
            commit_message="Upload EmoNeXt model (scripts/export.py --format hub)",
        )
    except HFValidationError as err:
        raise WeightsError(f"--push {repo_id}: not a valid repository id ({err})") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        why = {401: "the token is not valid", 403: "the token may not write to it"}.get(
            status, str(err).splitlines()[0]
        )
        raise WeightsError(f"could not upload to {repo_id}: {why}. {again}") from None
    except Exception as err:  # network errors of huggingface_hub's HTTP client
        raise WeightsError(
            f"could not reach the Hugging Face Hub to upload {repo_id} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {again}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
