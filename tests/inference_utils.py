"""Checkpoints and helpers for the tests of evaluate.py, predict.py and scripts/export.py."""

from pathlib import Path

import torch

from ema import EMA
from models import create_model

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
# An eight-class model's classes as another project may name and order them (cross-dataset tests).
EIGHT_MODEL = [
    "happiness",
    "anger",
    "contempt",
    "disgust",
    "fear",
    "neutral",
    "sadness",
    "surprise",
]
DATA_DIR = Path(__file__).resolve().parent / "data"
ASTRONAUT = DATA_DIR / "astronaut.png"


def make_project_checkpoint(path: Path, classes: list[str] = CLASSES, seed: int = 0) -> Path:
    """A checkpoint as train.py writes one, of a small random EmoNeXt at 64 x 64 input."""
    torch.manual_seed(seed)
    model = create_model("emonext_micro", num_classes=len(classes), img_size=64)
    ema = EMA(model)
    ema.update()
    torch.save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "model_name": model.model_name,
            "model_kwargs": model.model_kwargs,
            "classes": list(classes),
            "data_config": model.data_config,
            "args": {},
            "epoch": 0,
        },
        path,
    )
    return path


def make_official_checkpoint(golden_dir: Path, path: Path) -> Path:
    """The official trainer's checkpoint {"model", "ema", "best_acc"} (emonext_micro at 224)."""
    golden = torch.load(golden_dir / "official_emonext_micro.pt", weights_only=True)
    torch.save(golden["checkpoint"], path)
    return path


def command_error(capsys, path: Path, argv: list) -> tuple[int, str]:
    """(exit status, stderr) of a command's `__main__` block (`run_script`) that must fail."""
    import pytest

    capsys.readouterr()  # what came before is not this command's
    with pytest.raises(SystemExit) as exit_info:
        run_script(path, argv)
    return exit_info.value.code, capsys.readouterr().err


def run_script(path: Path, argv: list) -> None:
    """Run a command's `__main__` block in this process, as `python path argv...` would."""
    import runpy
    import sys

    saved = sys.argv
    sys.argv = [str(path), *(str(a) for a in argv)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
