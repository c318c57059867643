"""Export a trained model to ONNX, TorchScript or a hub folder, checked before it is kept.

    python scripts/export.py --checkpoint out/run/last.pt --format onnx --output emonext.onnx
    python scripts/export.py --checkpoint official.pt --model-size tiny --format torchscript \
        --output emonext.ts
    python scripts/export.py --checkpoint out/run/last.pt --format hub --output emonext-fer/ \
        [--push USER/emonext-fer]

ONNX and TorchScript map a float32 batch (N, C, S, S), a grayscale face in [0, 1] repeated on C
channels, to logits (N, classes); the batch size is free. Their preprocessing travels with them:
ONNX `metadata_props` / a TorchScript extra file `metadata.json` hold the class names, the data
config, a sentence saying how to build the input and, when evaluate.py --fit-temperature stored
one for the checkpoint, the calibration temperature (models/deploy.py, models/calibration.py),
and `faces`, the face pipeline of the training data where the checkpoint records one
(models/faces/: download_dataset.py --faces), which predict.py follows.

A hub folder (models/hub.py) is `config.json` (model name and arguments, classes, data config,
grey-to-RGB rule, which weights, the temperature and face pipeline if any; timm's keys too),
`model.safetensors` and a `README.md` model card, with the test scores of the run's results.json
when it sits beside the checkpoint; `--push REPO_ID` uploads it with huggingface_hub.
`models.load_model(DIR or hf-hub:REPO_ID)` and every command's `--checkpoint` read it back.
`--output` is a new or empty folder, or one holding an earlier hub export, replaced with
`--force`; a folder of other files is never written into. Likewise an ONNX or TorchScript
`--output` that exists is replaced only with `--force`, and only when it is an earlier export of
this script (its metadata says so); any other file is never replaced. Files and folders are
written beside `--output` under a temporary name and renamed once checked: a failure at any
point leaves what was there before.

Every export is compared with the PyTorch model on random inputs and on a real face (the
astronaut photograph of tests/data, through predict.py's detector and transform); a mismatch
above `--tolerance` is an error and leaves no file behind. The model is traced and checked on
`--device`; the export runs on the CPU.

`--format onnx --quantize int8|fp16` writes a smaller model for CPUs (docs/INFERENCE.md): int8 by
ONNX Runtime's static quantization, its activation ranges taken on `--calibration-images`
images of the validation split of `--dataset-path` (by default the dataset the checkpoint was
trained on); fp16 by ONNX Runtime's float16 converter. Either is then run on the whole test split
beside the float32 export: the share of images whose top-1 class they keep and the largest
difference of a class probability are printed and stored in the file's metadata; below
`--min-agreement` percent it is an error and nothing is written.

    python scripts/export.py --checkpoint out/run/last.pt --format onnx --quantize int8 \
        --dataset-path FER2013 --output emonext-int8.onnx
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402
from models import deploy, hub  # noqa: E402
from predict import BOX_SCALE, YuNetDetector, crop_faces, face_tensor, read_image  # noqa: E402

REAL_IMAGE = Path(__file__).resolve().parents[1] / "tests" / "data" / "astronaut.png"


def real_input(data_config: dict, image: Path = REAL_IMAGE) -> torch.Tensor:
    """The first face YuNet finds in `image`, preprocessed as predict.py does (1, C, S, S); the
    whole photo where there is none (or no OpenCV that runs YuNet)."""
    if not image.is_file():
        raise utils.CLIError(f"real test image {image} is missing; pass --real-image")
    rgb = read_image(str(image))
    try:
        faces = YuNetDetector()(rgb)
    except utils.CLIError:  # an OpenCV older than 4.8: the whole photo checks as well
        faces = []
    crops = crop_faces(rgb, faces[:1], BOX_SCALE["yunet"])
    return face_tensor([crops[0][0] if crops else rgb], data_config)


def run_onnx(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    session = deploy.onnx_session(path)
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


def check(diff: float, args: argparse.Namespace) -> None:
    if not np.isfinite(diff) or diff > args.tolerance:
        raise utils.CLIError(
            f"the {args.format} export differs from PyTorch by {diff:.2e} (more than "
            f"{args.tolerance:.0e}); nothing written"
        )


def export_file(model, example, checks, meta, args, device) -> float:
    """ONNX or TorchScript to --output, through a temporary file; returns the check's result."""
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(args.output)}.tmp")
    try:
        if args.format == "onnx":
            with open(tmp, "wb") as f:
                f.write(deploy.to_onnx(model, example.to(device), args.opset, meta))
            diff = max_difference(model, run_onnx(tmp), checks, device)
            if args.quantize != "none":
                check(diff, args)  # the float32 export first, then what is made of it
                quantize_file(tmp, args)
        else:
            with warnings.catch_warnings():
                # torch.jit is chosen on purpose: its deprecation and tracer warnings would only
                # bury the result of the check.
                for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
                    warnings.simplefilter("ignore", category)
                export_torchscript(model, example.to(device), tmp, meta)
                diff = max_difference(model, run_torchscript(tmp), checks, device)
        check(diff, args)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return diff


def run_results(checkpoint: str) -> dict | None:
    """The results.json that train.py wrote beside a local checkpoint, if any."""
    path = Path(checkpoint).parent / "results.json"
    if not os.path.isfile(checkpoint) or not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise utils.CLIError(f"{path} is not readable JSON ({err}); move it away") from None
    return results if isinstance(results, dict) else None


def averaged_epochs(ckpt: dict, checkpoint: str) -> list[int] | None:
    """The epochs whose weights scripts/average_checkpoints.py averaged into `ckpt` (None: the
    weights of one epoch), checked: the exports record them."""
    epochs = ckpt.get("averaged_epochs")
    if epochs is None:
        return None
    if (
        not isinstance(epochs, list)
        or not epochs
        or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs)
    ):
        raise utils.CLIError(
            f"{checkpoint}: averaged_epochs {epochs!r} is not a list of epochs; average the run "
            "again with scripts/average_checkpoints.py"
        )
    return epochs


def export_hub(model, classes, data_config, ckpt, checks, args, device) -> float:
    """A hub folder at --output (written beside it, reloaded and checked, then moved into
    place), pushed with --push; returns the check's result."""
    source = {
        "checkpoint": os.path.basename(os.path.normpath(args.checkpoint)),
        "epoch": ckpt.get("epoch"),
        "git_commit": ckpt.get("git_commit"),
        "versions": ckpt.get("versions"),
        "exported_at_commit": utils.git_commit(),
        "averaged_epochs": averaged_epochs(ckpt, args.checkpoint),
    }
    source = {k: v for k, v in source.items() if v is not None}
    config = hub.hub_config(
        model,
        classes,
        data_config,
        ckpt["weights_used"],
        source,
        ckpt.get("temperature"),
        ckpt.get("faces"),
    )
    name = args.push or Path(os.path.abspath(args.output)).name
    card = hub.model_card(config, ckpt, run_results(args.checkpoint), name, args.license)
    tmp = hub.write_folder(args.output, hub.hub_state_dict(model), config, card)
    try:
        reloaded, _ = models.load_model(tmp)
        diff = max_difference(model, reloaded, checks, device)
        check(diff, args)
        hub.publish(tmp, args.output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if args.push:
        print(f"uploaded {args.output} to {hub.push(args.output, args.push, args.private)}")
    return diff


# --------------------------------------------------------------------------- int8 and fp16

# Images per calibration batch: ONNX Runtime keeps every intermediate tensor of a batch until
# its ranges are taken (~0.2 GB per EmoNeXt-Tiny image at 224 pixels).
CALIBRATION_BATCH = 4
METHOD = {
    "int8": "ONNX Runtime static quantization (QDQ) of the MatMul layers: int8 weights per "
    "output channel (7 bits), uint8 activations, their ranges the min/max on {n} images of the "
    "val split of {data}",
    "fp16": "ONNX Runtime's float16 converter: float16 weights and activations (the STN's "
    "AffineGrid and GridSample in float32), float32 input and output",
}


def split_batches(
    root: str, split: str, data_config: dict, batch_size: int, limit: int | None = None
) -> Iterator[np.ndarray]:
    """Float32 batches of `split` as predict.py gives faces to the model (the validation view,
    datasets.pil_transform: one centre crop); `limit` images drawn at random (seed 0), or all
    in order."""
    loader = datasets.build_loader(
        root,
        split,
        mode="val",
        pipeline="pil",
        batch_size=batch_size,
        data_config=datasets.DataConfig.from_dict(data_config),
        shuffle=limit is not None,
    )
    taken = 0
    for images, _ in loader:
        images = images[: limit - taken] if limit is not None else images
        yield np.ascontiguousarray(images.numpy())
        taken += len(images)
        if limit is not None and taken >= limit:
            return


def agreement(reference, candidate, batches: Iterable[np.ndarray]) -> tuple[int, int, float]:
    """(images on which `candidate` predicts the top-1 class of `reference`, images, largest
    |difference| of a class probability): two ONNX Runtime sessions over `batches`. A
    non-finite output disagrees, by an infinite difference."""
    same, n, worst = 0, 0, 0.0
    for x in batches:
        p, q = (
            torch.from_numpy(s.run(None, {"input": x})[0]).float() for s in (reference, candidate)
        )
        p, q = torch.softmax(p, 1), torch.softmax(q, 1)
        finite = torch.isfinite(q).all(1)
        same += int(((p.argmax(1) == q.argmax(1)) & finite).sum())
        worst = max(worst, (p - q).abs().max().item() if finite.all() else float("inf"))
        n += len(x)
    return same, n, worst


def quantize_file(path: str, args: argparse.Namespace) -> None:
    """Replaces the float32 ONNX export at `path` by its `--quantize` form, with its agreement
    on the test split of --dataset-path in its metadata; below --min-agreement a CLIError."""
    fp32 = Path(path).read_bytes()
    meta = {p.key: p.value for p in deploy.onnx_proto(fp32).metadata_props}
    data_config, root = json.loads(meta["data_config"]), args.dataset_path
    data = Path(os.path.abspath(root)).name
    try:
        if args.quantize == "int8":
            images = split_batches(
                root, "val", data_config, CALIBRATION_BATCH, args.calibration_images
            )
            calibration = list(images)
            smaller = deploy.quantize_int8(fp32, calibration)
            n_calibration = sum(len(b) for b in calibration)
        else:
            smaller, n_calibration = deploy.to_float16(fp32), 0
        tests = split_batches(root, "test", data_config, batch_size=32)
        same, n, worst = agreement(deploy.onnx_session(fp32), deploy.onnx_session(smaller), tests)
    except datasets.DatasetError as err:
        raise utils.CLIError(str(err)) from None
    if n == 0:
        raise utils.CLIError(f"--dataset-path {root}: its test split has no images")
    percent = 100.0 * same / n
    shown = math.floor(percent * 100) / 100  # 98.996 % shows as 98.99, never as 99.00
    said = (
        f"{args.quantize}: the float32 model's top-1 class on {same} of {n} test images of "
        f"{data} ({shown:.2f} %), probabilities within {worst:.4f}"
    )
    if not percent >= args.min_agreement:
        raise utils.CLIError(
            f"{said}: below --min-agreement {args.min_agreement:g} %; nothing written"
        )
    print(said)
    meta |= {
        "quantization": args.quantize,
        "quantization_method": METHOD[args.quantize].format(n=n_calibration, data=data),
        "top1_agreement_percent": f"{shown:.2f}",
        "max_probability_difference": f"{worst:.4f}",
        "agreement_on": f"{n} test images of {data}, against the float32 export",
    }
    Path(path).write_bytes(deploy.with_metadata(deploy.onnx_proto(smaller), meta))


def quantization_dataset(args: argparse.Namespace, ckpt: dict) -> str:
    """--dataset-path, else the dataset the checkpoint was trained on, with the splits that
    --quantize reads (int8: val and test; fp16: test)."""
    root = args.dataset_path or (ckpt.get("args") or {}).get("dataset_path")
    if not isinstance(root, str) or not root:
        raise utils.CLIError(
            f"--quantize {args.quantize} needs --dataset-path, a dataset of the checkpoint's "
            "classes (its test split measures the agreement; int8 calibrates on its val split)"
        )
    for split in ("val", "test") if args.quantize == "int8" else ("test",):
        if not os.path.isdir(os.path.join(root, split)):
            given = "--dataset-path" if args.dataset_path else "the checkpoint's dataset"
            raise utils.CLIError(
                f"{given} {root} has no {split} split; give --dataset-path with val/ and test/ "
                "folders (the checkpoint's own dataset)"
            )
    return root


def get_args_parser() -> utils.ArgumentParser:
    parser = utils.ArgumentParser(
        prog="export.py", description="Export a trained model to ONNX, TorchScript or a hub folder"
    )
    utils.add_model_arguments(
        parser,
        models.SIZES,
        checkpoint_help=".pt checkpoint (this project's or the official trainer's), hub folder "
        "or hf-hub:USER/NAME",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=["onnx", "torchscript", "hub"],
        help="file format to write; hub: a folder of config.json, model.safetensors, README.md",
    )
    parser.add_argument("--output", required=True, help="file (.onnx, .ts) or hub folder to write")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the earlier export (file or hub folder) that --output holds; a file or "
        "folder holding anything else is never replaced or written into",
    )
    parser.add_argument(
        "--opset",
        default=deploy.OPSET,
        type=int,
        help=f"ONNX opset, {deploy.MIN_OPSET} to {deploy.MAX_OPSET}: the STN's affine_grid "
        f"exports from {deploy.MIN_OPSET} on, this torch writes up to {deploy.MAX_OPSET}",
    )
    parser.add_argument(
        "--tolerance", default=1e-4, type=float, help="largest accepted |export - PyTorch| logit"
    )
    parser.add_argument(
        "--real-image", default=str(REAL_IMAGE), help="photo with a face for the real-input check"
    )
    small = parser.add_argument_group("smaller ONNX models (--format onnx)")
    small.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "fp16"],
        help="int8: ONNX Runtime static quantization, calibrated on the val split of "
        "--dataset-path; fp16: float16 weights and activations; none: float32",
    )
    small.add_argument(
        "--dataset-path",
        default=None,
        help="with --quantize: dataset whose test split measures the agreement with float32 "
        "(and whose val split calibrates int8); default: the one the checkpoint was trained on",
    )
    small.add_argument(
        "--min-agreement",
        default=99.0,
        type=float,
        help="with --quantize: least percent of test images whose top-1 class must be the "
        "float32 model's; below it nothing is written",
    )
    small.add_argument(
        "--calibration-images",
        default=512,
        type=int,
        help="with --quantize int8: val images (drawn at random, seed 0) whose activation "
        "ranges set the int8 scales",
    )
    hub_group = parser.add_argument_group("hub folders")
    hub_group.add_argument(
        "--push",
        default=None,
        metavar="REPO_ID",
        help="upload the folder to this Hugging Face model repository (USER/NAME; created if "
        "needed; needs `hf auth login` or HF_TOKEN)",
    )
    hub_group.add_argument(
        "--private", action="store_true", help="with --push: create the repository private"
    )
    hub_group.add_argument(
        "--license",
        default="mit",
        help="licence id in the model card (huggingface.co/docs/hub/repositories-licenses)",
    )
    utils.add_device_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None), checked: one line and exit status 2 if wrong."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.push or args.private) and args.format != "hub":
        parser.error("--push and --private need --format hub")
    if args.push and not is_repo_id(args.push):
        parser.error(
            f"--push {args.push}: not a Hugging Face repository id; give USER/NAME (letters, "
            "digits, '-', '_' and '.', at most 96 characters each, no '--' or '..')"
        )
    if args.quantize != "none" and args.format != "onnx":
        parser.error(f"--quantize {args.quantize} needs --format onnx")
    if args.dataset_path is not None and args.quantize == "none":
        parser.error("--dataset-path is read with --quantize int8 or fp16 only")
    if not 0 <= args.min_agreement <= 100:
        parser.error(f"--min-agreement {args.min_agreement}: a percentage, 0 to 100")
    if args.calibration_images < 1:
        parser.error(f"--calibration-images {args.calibration_images}: at least 1")
    if not deploy.MIN_OPSET <= args.opset <= deploy.MAX_OPSET:
        parser.error(
            f"--opset {args.opset}: must be {deploy.MIN_OPSET} to {deploy.MAX_OPSET} (the STN's "
            f"affine_grid has no ONNX form before opset {deploy.MIN_OPSET}; torch "
            f"{torch.__version__} writes up to {deploy.MAX_OPSET})"
        )
    try:
        check_output(args)
    except utils.CLIError as err:
        parser.error(str(err))
    return args


def is_repo_id(repo_id: str) -> bool:
    """USER/NAME as the Hugging Face Hub accepts it (huggingface_hub's own check)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return repo_id.count("/") == 1


def is_hub_export(folder: Path) -> bool:
    """Whether `folder` holds a hub export of this project: its three files and nothing else,
    with the config.json that hub.hub_config writes."""
    names = {p.name for p in folder.iterdir()}
    if not names <= {hub.CONFIG, hub.WEIGHTS, hub.CARD} or hub.CONFIG not in names:
        return False
    try:
        config = json.loads((folder / hub.CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "emonext_hub_format" in config


def check_hub_output(folder: Path, force: bool) -> None:
    """A hub export goes into a new or empty folder, or replaces an earlier one with --force. A
    folder holding anything else (a project's README.md, a user's config.json) is never written
    into, as download_dataset.py never replaces a folder it did not write."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not is_hub_export(folder):
        names = sorted(p.name for p in folder.iterdir())
        mine = (hub.CONFIG, hub.WEIGHTS, hub.CARD)
        example = next((n for n in names if n not in mine), names[0])
        raise utils.CLIError(
            f"--output {folder} holds files that scripts/export.py did not write (e.g. "
            f"{example}); a hub export never replaces or joins them, not even with --force: "
            "give a new or empty folder"
        )
    if not force:
        raise utils.CLIError(
            f"--output {folder} holds an earlier hub export; pass --force to replace it, or "
            "give a new or empty folder"
        )


def is_file_export(path: Path) -> bool:
    """Whether `path` is an ONNX or TorchScript file of this script: its metadata (ONNX
    metadata_props, TorchScript's metadata.json, read from the zip without loading the program)
    holds the keys deploy.onnx_metadata writes."""
    ours = {"classes", "data_config", "input", "source_checkpoint"}
    if deploy.is_torchscript(path):
        try:
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/extra/metadata.json"))
                meta = json.loads(archive.read(name))
        except (OSError, StopIteration, zipfile.BadZipFile, UnicodeDecodeError, ValueError):
            return False
        return isinstance(meta, dict) and ours <= set(meta)
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and onnx's own: not an ONNX file
        return False
    return ours <= {p.key for p in model.metadata_props}


def check_file_output(path: Path, force: bool) -> None:
    """An ONNX or TorchScript export goes to a new path, or replaces an earlier export of this
    script with --force; any other file is never replaced."""
    if not os.path.lexists(path):
        return
    if not path.is_file() or not is_file_export(path):
        raise utils.CLIError(
            f"--output {path} exists and is not a file scripts/export.py wrote; an export never "
            "replaces it, not even with --force: give another path"
        )
    if not force:
        raise utils.CLIError(
            f"--output {path} holds an earlier export; pass --force to replace it, or give "
            "another path"
        )


def check_output(args: argparse.Namespace) -> None:
    """Before the model loads: --output's folder can be written (utils.check_output_dir), a
    file export does not go where a folder is nor over a file it did not write
    (check_file_output), nor a hub folder where a file is or into a folder of other files
    (check_hub_output)."""
    output = Path(args.output)
    if args.format != "hub" and output.is_dir():
        raise utils.CLIError(
            f"--output {args.output} is a folder; give the path of the {args.format} file to write"
        )
    if args.format == "hub" and output.exists() and not output.is_dir():
        raise utils.CLIError(f"--output {args.output} is a file; give a folder for the hub export")
    if args.format == "hub":
        check_hub_output(output, args.force)
    else:
        check_file_output(output, args.force)
    # Both are written beside --output first (a temporary name), then renamed: its folder counts.
    utils.check_output_dir(Path(os.path.abspath(output)).parent, "--output")


def main(args: argparse.Namespace) -> float:
    """Writes the export; returns the largest logit difference found by the check."""
    check_output(args)  # parse_args checked it already; main may be called without it
    model_name = get_args_parser().model_name(args)  # --model NAME or emonext_SIZE, or None
    device = utils.resolve_device(args.device)
    model, classes, data_config, ckpt = models.load_trained_model(
        args.checkpoint, args.weights, model_name
    )
    model.eval().to(device)
    if args.quantize != "none":  # before the export: a missing dataset costs no export
        args.dataset_path = quantization_dataset(args, ckpt)
    size, chans = data_config["image_size"], data_config["in_chans"]
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, chans, size, size, generator=generator)
    checks = [
        torch.rand(5, chans, size, size, generator=generator),  # another batch size than traced
        real_input(data_config, Path(args.real_image)),
    ]
    if args.format == "hub":
        diff = export_hub(model, classes, data_config, ckpt, checks, args, device)
        what = "hub folder (config.json, model.safetensors, README.md)"
    else:
        meta = deploy.onnx_metadata(
            model,
            classes,
            data_config,
            args.checkpoint,
            ckpt["weights_used"],
            ckpt.get("temperature"),
            ckpt.get("faces"),
        )
        if averaged_epochs(ckpt, args.checkpoint) is not None:  # the weights of no one epoch
            meta["averaged_epochs"] = json.dumps(ckpt["averaged_epochs"])
        diff = export_file(model, example, checks, meta, args, device)
        what = f"{args.format}, input N x {chans} x {size} x {size}"
    checked = "export" if args.quantize == "none" else "float32 export"
    if args.quantize != "none":
        what = f"{args.format} {args.quantize}, input float32 N x {chans} x {size} x {size}"
    if ckpt.get("temperature") is not None:
        what += f", calibration temperature {ckpt['temperature']:.4g} ({ckpt['temperature_note']})"
    elif ckpt.get("temperature_note"):
        print(f"export.py: {ckpt['temperature_note']}; exported without it", file=sys.stderr)
    print(
        f"wrote {args.output}: {model.model_name} ({ckpt['weights_used']} weights), {what}, "
        f"logits for {len(classes)} classes; max |{checked} - PyTorch on {device}| = {diff:.1e} "
        "on random and real inputs"
    )
    return diff


if __name__ == "__main__":
    utils.run_command("export.py", main, parse_args())
