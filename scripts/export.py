"""Export a checkpoint to ONNX or TorchScript, checked against PyTorch before it is kept.

    python scripts/export.py --checkpoint out/checkpoint.pt --format onnx --output emonext.onnx
    python scripts/export.py --checkpoint official.pt --model-size tiny --format torchscript \
        --output emonext.ts

The exported model maps a float32 batch (N, C, S, S), a grayscale face in [0, 1] repeated on C
channels, to logits (N, classes); the batch size is free. Its preprocessing travels with it: ONNX
`metadata_props` / a TorchScript extra file `metadata.json` hold the class names, the data config
(image_size, resize_size, in_chans, mean, std) and a sentence saying how to build the input.
The export is compared with the PyTorch model on random inputs and on a real face (the astronaut
photograph of tests/data, through predict.py's detector and transform); a mismatch above
`--tolerance` is an error and leaves no file behind. The model is traced and checked on
`--device`; the export runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
import utils  # noqa: E402
from predict import FaceDetector, face_tensor, read_image  # noqa: E402

REAL_IMAGE = Path(__file__).resolve().parents[1] / "tests" / "data" / "astronaut.png"


def export_metadata(model: nn.Module, classes: list[str], data_config: dict, source: str) -> dict:
    """String key -> string value, as ONNX metadata_props need."""
    dc = dict(data_config)
    resize = dc.get("resize_size") or round(dc["image_size"] * 236 / 224)
    normalise = dc.get("mean") is not None and dc.get("std") is not None
    return {
        "classes": json.dumps(list(classes)),
        "data_config": json.dumps(dc),
        "model_name": model.model_name,
        "image_size": str(dc["image_size"]),
        "resize_size": str(resize),
        "in_chans": str(dc["in_chans"]),
        "mean": json.dumps(dc.get("mean")) if normalise else "none",
        "std": json.dumps(dc.get("std")) if normalise else "none",
        "input": (
            f"float32 N x {dc['in_chans']} x {dc['image_size']} x {dc['image_size']}: face crop "
            f"-> grayscale -> resize shorter side to {resize} -> centre crop {dc['image_size']} "
            f"-> values in [0, 1] -> repeated to {dc['in_chans']} channels"
            + (" -> (x - mean) / std" if normalise else "; no normalisation")
        ),
        "output": f"float32 N x {len(classes)}: logits (softmax gives probabilities)",
        "source_checkpoint": os.path.basename(source),
    }


def real_input(data_config: dict, image: Path = REAL_IMAGE) -> torch.Tensor:
    """The first face found in `image`, preprocessed as predict.py does (1, C, S, S)."""
    if not image.is_file():
        raise utils.CLIError(f"real test image {image} is missing; pass --real-image")
    rgb = read_image(str(image))
    try:
        boxes = FaceDetector()(rgb)
    except (
        utils.CLIError
    ):  # an OpenCV without its face detector (5.x): the whole photo checks as well
        boxes = []
    x, y, w, h = boxes[0] if boxes else (0, 0, rgb.shape[1], rgb.shape[0])
    return face_tensor([rgb[y : y + h, x : x + w]], data_config)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int, meta: dict):
    import onnx

    torch.onnx.export(
        model,
        (example,),
        path,
        dynamo=False,  # the TorchScript-based exporter handles the STN's affine_grid at opset 20
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(path)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def run_onnx(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str, meta: dict):
    traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, path, _extra_files={"metadata.json": json.dumps(meta)})


def run_torchscript(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    loaded = torch.jit.load(path, map_location="cpu")
    return lambda x: loaded(x)


def max_difference(
    model: nn.Module, run, inputs: list[torch.Tensor], device: torch.device | str = "cpu"
) -> float:
    """Largest |export - PyTorch| logit; the export runs on the CPU, the model on `device`."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = model(x.to(device)).float().cpu()
            worst = max(worst, (run(x) - expected).abs().max().item())
    return worst


def get_args_parser() -> utils.ArgumentParser:
    parser = utils.ArgumentParser(
        prog="export.py", description="Export an EmoNeXt checkpoint to ONNX or TorchScript"
    )
    utils.add_model_arguments(
        parser, models.SIZES, checkpoint_help="this project's or the official trainer's .pt"
    )
    parser.add_argument(
        "--format", required=True, choices=["onnx", "torchscript"], help="file format to write"
    )
    parser.add_argument("--output", required=True, help="file to write (.onnx, .pt / .ts)")
    parser.add_argument(
        "--opset", default=20, type=int, help="ONNX opset; the STN's affine_grid needs >= 20"
    )
    parser.add_argument(
        "--tolerance", default=1e-4, type=float, help="largest accepted |export - PyTorch| logit"
    )
    parser.add_argument(
        "--real-image", default=str(REAL_IMAGE), help="photo with a face for the real-input check"
    )
    utils.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace) -> float:
    """Writes the export; returns the largest logit difference found by the check."""
    model_name = get_args_parser().model_name(args)  # --model NAME or emonext_SIZE, or None
    device = utils.resolve_device(args.device)
    model, classes, data_config, ckpt = models.load_trained_model(
        args.checkpoint, args.weights, model_name
    )
    model.eval().to(device)
    size, chans = data_config["image_size"], data_config["in_chans"]
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, chans, size, size, generator=generator)
    checks = [
        torch.rand(5, chans, size, size, generator=generator),  # another batch size than traced
        real_input(data_config, Path(args.real_image)),
    ]
    meta = export_metadata(model, classes, data_config, args.checkpoint)
    meta["weights"] = ckpt["weights_used"]

    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(args.output)}.tmp")
    try:
        with warnings.catch_warnings():
            # The legacy exporter and torch.jit are chosen on purpose (see the docstring); their
            # deprecation and tracer warnings would only bury the result of the check.
            for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", category)
            if args.format == "onnx":
                export_onnx(model, example.to(device), tmp, args.opset, meta)
                diff = max_difference(model, run_onnx(tmp), checks, device)
            else:
                export_torchscript(model, example.to(device), tmp, meta)
                diff = max_difference(model, run_torchscript(tmp), checks, device)
        if not np.isfinite(diff) or diff > args.tolerance:
            raise utils.CLIError(
                f"the {args.format} export differs from PyTorch by {diff:.2e} (more than "
                f"{args.tolerance:.0e}); nothing written"
            )
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(
        f"wrote {args.output}: {model.model_name} ({ckpt['weights_used']} weights), "
        f"{args.format}, input N x {chans} x {size} x {size}, logits for {len(classes)} classes; "
        f"max |export - PyTorch on {device}| = {diff:.1e} on random and real inputs"
    )
    return diff


if __name__ == "__main__":
    utils.run_command("export.py", main, get_args_parser().parse_args())
