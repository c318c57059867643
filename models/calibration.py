"""A trained model's temperature (Guo et al. 2017): softmax(logits / T) are its calibrated
probabilities, with the same argmax as softmax(logits).

`evaluate.py --fit-temperature` fits T on the validation split and stores it where every reader
of the model finds it:

- beside a `.pt` checkpoint, as `<checkpoint>.temperature.json`: the checkpoint itself is left as
  it is (it may be the official trainer's, or a run's last.pt that a resume overwrites). The file
  names the weights it was fitted for and the checkpoint's SHA-256, and applies only while both
  match: a checkpoint trained further is not calibrated by its older self's temperature;
- in a hub folder's `config.json` ("temperature"), which scripts/export.py copies on export;
- in an ONNX or TorchScript export's metadata ("temperature", models/deploy.py).

`models.load_trained_model` reads it (`ckpt["temperature"]`), validated: a finite number > 0.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from models.weights import WeightsError
from utils import file_sha256, write_text_atomic

SUFFIX = ".temperature.json"


def check_temperature(value, where: str) -> float:
    """`value` as a float if it is a finite number > 0; else a WeightsError naming `where`."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        value = repr(value)
    elif value > 0:
        return float(value)
    raise WeightsError(
        f"{where}: temperature {value} is not a finite number > 0; remove it, or fit it again "
        "with evaluate.py --fit-temperature"
    )


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """Where the temperature of a `.pt` checkpoint is stored."""
    return Path(f"{checkpoint}{SUFFIX}")


def read_temperature(source: str | os.PathLike, ckpt: dict) -> tuple[float | None, str]:
    """(the temperature stored for `source`'s weights or None, a note): where it came from, or
    why a stored one does not apply. `ckpt` is the checkpoint as loaded (`weights_used` set)."""
    hub = ckpt.get("hub")
    if isinstance(hub, dict):
        config = hub.get("config") or {}
        if "temperature" not in config:
            return None, ""
        where = f"{hub['source']} (config.json)"
        return check_temperature(config["temperature"], where), where
    path = sidecar_path(source)
    if not path.is_file():
        return None, ""
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not readable JSON ({err}); remove it") from None
    if not isinstance(stored, dict) or "temperature" not in stored:
        raise WeightsError(f"{path} holds no temperature; remove it")
    temperature = check_temperature(stored["temperature"], str(path))
    if stored.get("weights") != ckpt.get("weights_used"):
        return None, (
            f"{path} was fitted for the {stored.get('weights')} weights, not the "
            f"{ckpt.get('weights_used')} weights used: probabilities are not calibrated"
        )
    if stored.get("sha256") != file_sha256(source):
        return None, (
            f"{path} was fitted for another version of {source} (its SHA-256 differs): "
            "probabilities are not calibrated; fit it again with evaluate.py --fit-temperature"
        )
    return temperature, str(path)


def store_temperature(
    source: str | os.PathLike, ckpt: dict, temperature: float, fitted: dict
) -> Path | None:
    """Store `temperature` (with `fitted`: how it was fitted) where `read_temperature` finds it:
    in a local hub folder's config.json, beside a local .pt file; None where there is no local
    place (an hf-hub: name, a URL)."""
    temperature = check_temperature(temperature, "the fitted temperature")
    if isinstance(ckpt.get("hub"), dict):
        if not os.path.isdir(source):
            return None
        path = Path(source) / "config.json"
        config = json.loads(path.read_text())
        config.update(temperature=temperature, calibration=fitted)
        write_text_atomic(path, json.dumps(config, indent=2) + "\n")
        return path
    if not os.path.isfile(source):
        return None
    path = sidecar_path(source)
    record = {
        "temperature": temperature,
        "weights": ckpt["weights_used"],
        "checkpoint": os.path.basename(source),
        "sha256": file_sha256(source),
        **fitted,
    }
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path
