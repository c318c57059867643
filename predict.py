"""Facial expressions of the faces in images, folders, videos or a webcam.

    python predict.py photo.jpg --checkpoint out/last.pt
    python predict.py photos/ clip.mp4 --checkpoint hf-hub:USER/NAME --output annotated/ --json
    python predict.py --webcam 0 --checkpoint model.onnx --smooth 5

Faces are found with YuNet (`cv2.FaceDetectorYN`, OpenCV >= 4.8 and 5.x) from the ONNX file in
models/faces/ (Apache-2.0, its licence beside it) and framed by the face pipeline
(`models.faces.face_crops`, the one scripts/download_dataset.py --faces builds datasets with):
the one the checkpoint records (that of its training data), else a square about YuNet's box
(`--box-scale` times its larger side: FER2013's faces include some hair and chin), optionally
aligned by its 5 landmarks (`--align`); a flag that overrides a recorded pipeline says so in one
line. Frames larger than `--detect-size` are downscaled for detection and the boxes mapped back.
The crop goes through exactly the validation transform the model was trained with
(`datasets.pil_transform("val")`: grayscale, resize, centre crop, [0, 1], repeated to the model's
channels); `--save-crops DIR` writes the crops. `--detector haar` uses OpenCV 4's Haar cascade
where OpenCV still ships it.

Output: one record per face (`source`, `frame`, `box` = [x, y, width, height] of the crop given
to the model, `score` and `landmarks` of the detector, `label`, `probabilities`, and `calibrated`
and `temperature`: the probabilities are softmax(logits / temperature) where evaluate.py
--fit-temperature stored a temperature for the model, softmax(logits) otherwise), as JSON lines
with `--json`; a frame without a face gives one record with `box`, `label` and `probabilities`
null and `note: "no face found"`. `--checkpoint` takes a .pt checkpoint (this project's or the
official trainer's), a hub folder, `hf-hub:USER/NAME`, or an ONNX or TorchScript file of
scripts/export.py (TorchScript only with `--allow-torchscript`: its code runs as it loads).
`--output` gets one annotated file per input (`output_names`).
Videos, the webcam and many images run on ONNX Runtime by default (exported in memory, checked
against PyTorch), a few images on PyTorch: `--backend`, docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import datasets
import models
import utils
from models.faces import (  # noqa: F401  (predict.Face, predict.widen_box...: as before)
    YUNET_MODEL,
    Face,
    FaceCrop,
    FacePipeline,
    YuNetDetector,
    aligned_crop,
    eye_angle,
    face_crops,
    widen_box,
)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
NO_FACE = "no face found"
# The crop's side over the detector's box (its larger side). 1.2 x Haar's square box was this
# command's framing; YuNet's box is taller, Haar's side 0.95 of its height (median of 96 faces:
# the astronaut and scikit-image's LFW subset), so 1.15 x YuNet's gives the same crop.
BOX_SCALE = {"yunet": 1.15, "haar": 1.2}
# From this many images on, `--backend auto` exports to ONNX Runtime as for videos: the export
# (1.1 s for emonext_tiny, 0.2 s for emonext_atto) is won back after about 30 and 70 images.
IMAGES_FOR_ONNX = 50
# Logits of the ONNX Runtime path must agree with PyTorch's within this (scripts/export.py's
# default tolerance), or predict.py stays on PyTorch.
AGREEMENT = 1e-4


# --------------------------------------------------------------------------- faces


class HaarDetector:
    """OpenCV 4's frontal-face Haar cascade (no landmarks, no score): the old detector, for
    comparison. OpenCV 5 removed CascadeClassifier and its XML files from the main package."""

    name = "haar"

    def __init__(self, min_face: int = 30, min_neighbors: int = 5):
        if not hasattr(cv2, "CascadeClassifier"):
            raise utils.CLIError(
                f"OpenCV {cv2.__version__} has no Haar cascades (5.0 removed CascadeClassifier "
                "from the main package): use --detector yunet, the default"
            )
        path = os.path.join(cv2.data.haarcascades, HAAR_CASCADE)
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise utils.CLIError(f"could not load {path}: use --detector yunet, the default")
        self.min_face, self.min_neighbors = min_face, min_neighbors

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        found = self.cascade.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(self.min_face,) * 2
        )
        return sorted((Face(tuple(float(v) for v in f)) for f in found), key=lambda f: f.box)


def make_detector(
    args: argparse.Namespace, pipeline: FacePipeline
) -> YuNetDetector | HaarDetector | None:
    """The detector the flags and the face pipeline ask for (None with --no-detect)."""
    if args.no_detect:
        return None
    if args.detector == "haar":
        return HaarDetector(pipeline.min_face)
    return YuNetDetector.of(pipeline)


# The flags that override a field of a checkpoint's face pipeline: field -> flag.
PIPELINE_FLAGS = {
    "box_scale": "--box-scale",
    "align": "--align",
    "min_score": "--min-score",
    "min_face": "--min-face",
    "detect_size": "--detect-size",
}
DEFAULT_PIPELINE = FacePipeline()  # a checkpoint that records none: predict.py's own framing


def resolve_pipeline(args: argparse.Namespace, recorded: dict | None) -> FacePipeline:
    """The face pipeline to frame faces with: the one the checkpoint records (that of its
    training data, download_dataset.py --faces), else predict.py's own (FacePipeline's
    defaults; `--detector haar`: its box scale); a flag given overrides its field, and says so
    in one line where the checkpoint recorded another value."""
    if recorded is not None:
        base = FacePipeline(**recorded)
    else:
        base = dataclasses.replace(DEFAULT_PIPELINE, box_scale=BOX_SCALE[args.detector])
    for flag, differs in (
        ("--no-detect", args.no_detect),
        (f"--detector {args.detector}", args.detector != base.detector),
    ):
        if recorded is not None and differs:
            print(
                f"predict.py: {flag} overrides the checkpoint's face pipeline "
                f"({base.detector}, box scale {base.box_scale})",
                file=sys.stderr,
            )
    if recorded is not None and args.detector != base.detector:
        base = dataclasses.replace(base, box_scale=BOX_SCALE[args.detector], align=False)
    changes = {}
    for field, flag in PIPELINE_FLAGS.items():
        value = getattr(args, field)
        if value is None or value == getattr(base, field):
            continue
        changes[field] = value
        if recorded is not None:
            flag = flag if value is not False else "--no-align"
            given = "" if isinstance(value, bool) else f" {value}"
            print(
                f"predict.py: {flag}{given} overrides the checkpoint's face pipeline "
                f"({field} {getattr(base, field)})",
                file=sys.stderr,
            )
    return dataclasses.replace(base, **changes)


def crop_faces(
    rgb: np.ndarray,
    faces: list[Face],
    box_scale: float,
    align: YuNetDetector | None = None,
) -> list[tuple[np.ndarray, tuple[int, int, int, int], float | None]]:
    """(crop, box in the frame, roll angle corrected or None) per face; with `align` (the
    detector that found them) each crop is rotated so that the eyes are level."""
    height, width = rgb.shape[:2]
    out = []
    for face in faces:
        box = widen_box(face.box, box_scale, width, height)
        if align is not None and face.landmarks is not None:
            angle = align.roll(rgb, face)
            out.append((aligned_crop(rgb, face, box_scale, angle), box, angle))
        else:
            x, y, w, h = box
            out.append((rgb[y : y + h, x : x + w], box, None))
    return out


def face_tensor(crops: list[np.ndarray], data_config: dict) -> torch.Tensor:
    """RGB (or grayscale) uint8 crops -> the model's input batch (N, C, S, S), as in validation."""
    transform = datasets.pil_transform("val", datasets.DataConfig.from_dict(data_config))
    return torch.stack([transform(Image.fromarray(c)) for c in crops])


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), decoded as for training (datasets.decode_image:
    EXIF rotation applied, 16-bit scaled to 8, transparency on white)."""
    try:
        return datasets.decode_image(path, "RGB")
    except datasets.UnreadableImageError as err:
        raise utils.CLIError(str(err)) from None


# --------------------------------------------------------------------------- classifiers


class Classifier:
    """Class probabilities of face crops, from a PyTorch model or an ONNX Runtime session:
    softmax(logits / temperature), the calibrated ones when the model has a stored temperature
    (models/calibration.py), else softmax(logits)."""

    def __init__(
        self,
        run: Callable[[torch.Tensor], np.ndarray],
        classes: list[str],
        data_config: dict,
        backend: str = "torch",
        temperature: float | None = None,
    ):
        self.run, self.classes, self.data_config = run, classes, data_config
        self.backend, self.temperature = backend, temperature
        self.faces: dict | None = None  # the face pipeline of the model's training data

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        logits = torch.from_numpy(self.run(face_tensor(crops, self.data_config))).float()
        if self.temperature is not None:
            logits = logits / self.temperature
        return torch.softmax(logits, 1).numpy()


def stored_temperature(meta: dict, path: str) -> float | None:
    """The calibration temperature in an export's metadata (None: none), validated."""
    if "temperature" not in meta:
        return None
    return models.calibration.check_temperature(meta["temperature"], f"{path} (metadata)")


def ort_runner(session) -> Callable[[torch.Tensor], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def load_onnx(path: str, device: str = "cpu") -> Classifier:
    """An ONNX export of scripts/export.py; classes and data config from its metadata."""
    try:
        session = models.deploy.onnx_session(path, device)
    except Exception as err:  # onnxruntime raises its own exception types
        raise utils.CLIError(f"{path} is not a readable ONNX model ({err})") from err
    meta = session.get_modelmeta().custom_metadata_map
    shapes = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    classes, data_config = models.deploy.read_metadata(meta, path, *shapes)
    temperature = stored_temperature(meta, path)
    classifier = Classifier(ort_runner(session), classes, data_config, "onnxruntime", temperature)
    classifier.faces = models.deploy.read_faces(meta, path)
    return classifier


def load_torchscript(path: str, device: str = "cpu") -> Classifier:
    """A TorchScript export of scripts/export.py (always run by PyTorch, as traced); classes and
    data config from its extra file metadata.json."""
    module, meta = models.deploy.read_torchscript(path, device)  # its output count checked
    classes, data_config = models.deploy.read_metadata(meta, path)

    @torch.no_grad()
    def run(x: torch.Tensor) -> np.ndarray:
        return module(x.to(device)).float().cpu().numpy()

    temperature = stored_temperature(meta, path)
    classifier = Classifier(run, classes, data_config, "torchscript", temperature)
    classifier.faces = models.deploy.read_faces(meta, path)
    return classifier


def onnx_of(model: torch.nn.Module, data_config: dict) -> tuple[object, float, float]:
    """(ONNX Runtime session of `model` exported in memory, seconds the export took, largest
    |ONNX Runtime - PyTorch| logit on a fixed random batch)."""
    size, chans = data_config["image_size"], data_config["in_chans"]
    check = torch.rand(3, chans, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    session = models.deploy.onnx_session(models.deploy.to_onnx(model, check[:1]))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        expected = model(check).float().numpy()
    return session, seconds, float(np.abs(ort_runner(session)(check) - expected).max())


def load_classifier(
    checkpoint: str,
    weights: str = "auto",
    model_name: str | None = None,
    device: str = "cpu",
    backend: str = "torch",
    allow_torchscript: bool = False,
) -> Classifier:
    """A Classifier of a checkpoint (.pt, hub folder, hf-hub: name), an exported .onnx file
    (which always runs on ONNX Runtime) or an exported TorchScript file (always on PyTorch, and
    only with `allow_torchscript`: it is code, which runs as it loads).

    backend "onnxruntime" exports the model in memory and runs ONNX Runtime, refused when its
    logits differ from PyTorch's by more than AGREEMENT; "auto" (main's choice for videos) falls
    back to PyTorch then, or when the export fails; "torch" runs the model itself.
    """
    if checkpoint.endswith(".onnx") and os.path.isfile(checkpoint):
        return load_onnx(checkpoint, device)
    if os.path.isfile(checkpoint) and models.deploy.is_torchscript(checkpoint):
        if not allow_torchscript:
            refusal = models.weights.torchscript_refusal(checkpoint, "--allow-torchscript")
            raise utils.CLIError(refusal)
        if backend == "onnxruntime":
            raise utils.CLIError(
                f"{checkpoint} is a TorchScript file: it runs on PyTorch alone; use --backend "
                "torch, or export an ONNX file with scripts/export.py --format onnx"
            )
        return load_torchscript(checkpoint, device)
    model, classes, data_config, ckpt = models.load_trained_model(checkpoint, weights, model_name)
    temperature = ckpt["temperature"]
    if temperature is None and ckpt["temperature_note"]:  # a stored one that does not apply
        print(f"predict.py: {ckpt['temperature_note']}", file=sys.stderr)
    if backend != "torch":
        try:
            session, seconds, diff = onnx_of(model, data_config)
        except Exception as err:  # the exporter's and onnxruntime's own exception types
            session, seconds, diff = None, 0.0, f"the export failed: {type(err).__name__}: {err}"
        if isinstance(diff, float) and diff <= AGREEMENT:
            print(
                f"predict.py: ONNX Runtime (exported in {seconds:.1f} s; its logits within "
                f"{diff:.0e} of PyTorch's)",
                file=sys.stderr,
            )
            runner = ort_runner(session)
            classifier = Classifier(runner, classes, data_config, "onnxruntime", temperature)
            classifier.faces = ckpt.get("faces")
            return classifier
        why = diff if isinstance(diff, str) else f"its logits differ from PyTorch's by {diff:.1e}"
        if backend == "onnxruntime":
            raise utils.CLIError(
                f"--backend onnxruntime: {why.splitlines()[0]}; use --backend torch"
            )
        print(f"predict.py: staying on PyTorch ({why.splitlines()[0]})", file=sys.stderr)
    model.to(device)

    @torch.no_grad()
    def run(x: torch.Tensor) -> np.ndarray:
        return model(x.to(device)).float().cpu().numpy()

    classifier = Classifier(run, classes, data_config, "torch", temperature)
    classifier.faces = ckpt.get("faces")
    return classifier


# --------------------------------------------------------------------------- frames -> records


def predict_frames(
    frames: list[tuple[str, int, np.ndarray]],
    classifier: Classifier,
    detector: YuNetDetector | HaarDetector | None,
    pipeline: FacePipeline = DEFAULT_PIPELINE,
    kept: list | None = None,
) -> list[list[dict]]:
    """Records for each (source, frame index, RGB image); all faces go through one batch.
    YuNet's faces are framed by `face_crops` as `pipeline` says, Haar's by `crop_faces` at its
    box scale; without a detector the whole image is the face (`--no-detect`). `kept`, a list,
    gets each frame's list of crops (`--save-crops`)."""
    found, crops = [], []
    for _, _, rgb in frames:
        height, width = rgb.shape[:2]
        if isinstance(detector, YuNetDetector):
            cropped = face_crops(rgb, pipeline, detector)
        else:
            faces = detector(rgb) if detector is not None else [Face((0, 0, width, height))]
            scale = pipeline.box_scale if detector is not None else 1.0
            cropped = [
                FaceCrop(f, *c) for f, c in zip(faces, crop_faces(rgb, faces, scale), strict=True)
            ]
        found.append(cropped)
        crops += [c.crop for c in cropped]
        if kept is not None:
            kept.append([c.crop for c in cropped])
    probs = iter(classifier(crops))
    out = []
    for (source, index, _), faces in zip(frames, found, strict=True):
        if not faces:
            record = {"source": source, "frame": index, "box": None, "label": None}
            out.append([{**record, "probabilities": None, "note": NO_FACE}])
            continue
        records = []
        for face, box, angle in ((c.face, c.box, c.angle) for c in faces):
            p = next(probs)
            record = {
                "source": source,
                "frame": index,
                "box": [int(v) for v in box],
                "score": None if face.score is None else round(face.score, 4),
                "landmarks": None
                if face.landmarks is None
                else [[round(float(v), 1) for v in point] for point in face.landmarks],
                "label": classifier.classes[int(p.argmax())],
                "probabilities": {c: float(v) for c, v in zip(classifier.classes, p, strict=True)},
                # softmax(logits / temperature): calibrated when the model has a temperature
                "calibrated": classifier.temperature is not None,
                "temperature": classifier.temperature,
            }
            if angle is not None:
                record["angle"] = round(angle, 1)
            records.append(record)
        out.append(records)
    return out


def _distance(a: list[int], b: list[int]) -> float:
    """L1 distance between the centres of two (x, y, w, h) boxes."""
    return abs(a[0] + a[2] / 2 - b[0] - b[2] / 2) + abs(a[1] + a[3] / 2 - b[1] - b[3] / 2)


class Smoother:
    """Probabilities averaged over each face's last K frames (`--smooth K`).

    A face is followed from frame to frame by matching each box to the nearest box of the previous
    frame (centre distance below the box's width); an unmatched face starts a new track. Good
    enough for a few faces that move less than their width between frames.
    """

    def __init__(self, k: int):
        self.k = k
        self.tracks: list[tuple[list[int], deque]] = []  # (last box, last K probability vectors)

    def __call__(self, records: list[dict]) -> list[dict]:
        if self.k <= 1:
            return records
        tracks, free = [], list(self.tracks)
        for r in records:
            if r["box"] is None:
                continue
            best = min(free, key=lambda t: _distance(t[0], r["box"]), default=None)
            if best is not None and _distance(best[0], r["box"]) < r["box"][2]:
                free.remove(best)
                history = best[1]
            else:
                history = deque(maxlen=self.k)
            classes = list(r["probabilities"])
            history.append(np.array([r["probabilities"][c] for c in classes]))
            mean = np.mean(history, axis=0)
            r["probabilities"] = {c: float(v) for c, v in zip(classes, mean, strict=True)}
            r["label"] = classes[int(mean.argmax())]
            tracks.append((r["box"], history))
        self.tracks = tracks
        return records


# --------------------------------------------------------------------------- drawing


def annotate(rgb: np.ndarray, records: list[dict]) -> np.ndarray:
    """A BGR copy of the frame with each face's box, label and a confidence bar per class."""
    scale = max(1, int(np.ceil(360 / max(1, min(rgb.shape[:2])))))  # small images: upscale
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    height, width = image.shape[:2]
    font, green = cv2.FONT_HERSHEY_SIMPLEX, (60, 200, 60)
    for r in records:
        if r["box"] is None:
            cv2.putText(image, NO_FACE, (8, 24), font, 0.7, (0, 0, 255), 2, cv2.LINE_AA)
            continue
        x, y, w, h = (v * scale for v in r["box"])
        probs = r["probabilities"]
        cv2.rectangle(image, (x, y), (x + w, y + h), green, 2)
        title = f"{r['label']} {probs[r['label']]:.0%}"
        cv2.putText(image, title, (x, max(16, y - 6)), font, 0.6, green, 2, cv2.LINE_AA)
        # Bars beside the box (right if there is room, else left, else inside), one per class.
        row, name_w, bar_w = 16, 70, 80
        panel_w = name_w + bar_w + 8
        px = x + w + 6 if x + w + 6 + panel_w <= width else max(0, x - panel_w - 6)
        py = min(max(0, y), max(0, height - row * len(probs)))
        # A darkened panel keeps the text readable on any background.
        panel = image[py : py + row * len(probs) + 4, px : px + panel_w]
        panel[:] = (panel * 0.35).astype(np.uint8)
        for i, (name, p) in enumerate(probs.items()):
            top = py + i * row
            colour = green if name == r["label"] else (200, 200, 200)
            cv2.putText(image, name[:9], (px, top + 12), font, 0.4, colour, 1, cv2.LINE_AA)
            cv2.rectangle(image, (px + name_w, top + 3), (px + name_w + bar_w, top + 13), colour)
            fill = px + name_w + round(bar_w * p)
            cv2.rectangle(image, (px + name_w, top + 3), (fill, top + 13), colour, -1)
    return image


# --------------------------------------------------------------------------- inputs


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(path, "image" | "video") for every input; folders give their images, sorted, without
    hidden files (`.x.png`, macOS's AppleDouble `._x.png`): no image, as in the datasets; nor
    a folder or a pipe named like one (`dir.png/`), which cannot be read as an image."""
    items = []
    for path in inputs:
        if os.path.isdir(path):
            files = sorted(
                p
                for p in Path(path).iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and not datasets.is_hidden(p.name)
                and p.is_file()
            )
            if not files:
                raise utils.CLIError(
                    f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            items += [(str(p), "image") for p in files]
        elif not os.path.isfile(path):
            raise utils.CLIError(f"input {path} does not exist")
        elif Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            items.append((path, "image"))
        elif Path(path).suffix.lower() in VIDEO_EXTENSIONS:
            items.append((path, "video"))
        else:
            items.append((path, sniff(path)))
    return items


def sniff(path: str) -> str:
    """The kind of a file with an unknown extension: image if PIL reads it, video if OpenCV does."""
    try:
        with Image.open(path) as im:
            im.verify()
        return "image"
    except Image.DecompressionBombError:
        return "image"  # one, too large to decode: read_image says so
    except (UnidentifiedImageError, OSError):
        pass
    capture = cv2.VideoCapture(path)
    ok = capture.isOpened() and capture.read()[0]
    capture.release()
    if ok:
        return "video"
    raise utils.CLIError(f"{path} is neither an image nor a video that PIL or OpenCV can read")


def video_frames(
    capture: cv2.VideoCapture, source: str, max_frames: int | None
) -> Iterator[tuple[str, int, np.ndarray]]:
    index = 0
    while max_frames is None or index < max_frames:
        ok, bgr = capture.read()
        if not ok:
            break
        yield source, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        index += 1
    capture.release()


def chunks(frames, size: int) -> Iterator[list]:
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- command line


def get_args_parser() -> utils.ArgumentParser:
    parser = utils.ArgumentParser(
        prog="predict.py", description="Facial expressions in images, videos and a webcam"
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image, folder or video files")
    utils.add_model_arguments(
        parser,
        models.SIZES,
        checkpoint_help=".pt checkpoint, hub folder, hf-hub:USER/NAME, an .onnx file of "
        "scripts/export.py, or its TorchScript file with --allow-torchscript",
    )
    utils.add_allow_torchscript_argument(parser)
    parser.add_argument(
        "--webcam",
        nargs="?",
        const=0,
        default=None,
        type=int,
        metavar="INDEX",
        help="read camera INDEX (default 0) until Ctrl-C or --max-frames",
    )
    parser.add_argument("--output", default=None, help="folder for annotated images/videos")
    parser.add_argument("--json", action="store_true", help="one JSON line per face on stdout")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime"],
        help=f"auto: ONNX Runtime on the CPU for videos, the webcam and {IMAGES_FOR_ONNX}+ images "
        "(exported in memory, used where its logits agree with PyTorch's), PyTorch otherwise",
    )
    faces = parser.add_argument_group("faces")
    faces.add_argument("--no-detect", action="store_true", help="each input is a cropped face")
    faces.add_argument(
        "--detector",
        default="yunet",
        choices=["yunet", "haar"],
        help="yunet: OpenCV's YuNet (models/faces/); haar: OpenCV 4's Haar cascade",
    )
    faces.add_argument(
        "--box-scale",
        default=None,
        type=float,
        help="crop side over the detector's box (default: the checkpoint's face pipeline, else "
        "1.15 for yunet, 1.2 for haar, the same framing)",
    )
    faces.add_argument(
        "--align",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="map each face's 5 landmarks onto a template by a similarity (yunet); --no-align: "
        "do not (default: the checkpoint's face pipeline, else no alignment)",
    )
    faces.add_argument(
        "--min-face",
        default=None,
        type=int,
        help="smallest face side in pixels (default: the checkpoint's face pipeline, else 30)",
    )
    faces.add_argument(
        "--min-score",
        default=None,
        type=float,
        help="smallest YuNet score kept as a face (default: the checkpoint's, else 0.7)",
    )
    faces.add_argument(
        "--detect-size",
        default=None,
        type=int,
        help="detect on frames downscaled to this longest side, 0: full size (default: the "
        "checkpoint's face pipeline, else 640)",
    )
    faces.add_argument(
        "--save-crops",
        default=None,
        metavar="DIR",
        help="write the face crops the model classifies to DIR as PNG (<input>_face<k>.png)",
    )
    parser.add_argument(
        "--smooth",
        default=1,
        type=int,
        metavar="K",
        help="video: average each face's probabilities over its last K frames",
    )
    parser.add_argument("--batch-size", default=32, type=int, help="frames per model batch")
    parser.add_argument("--max-frames", default=None, type=int, help="stop videos after N frames")
    utils.add_device_argument(parser)
    return parser


# What each numeric flag must be: parse_args refuses anything else in one line.
ARG_RULES = {
    "batch_size": ("at least 1", lambda v: v >= 1),
    "box_scale": ("greater than 0", lambda v: v > 0),
    "min_face": ("at least 1", lambda v: v >= 1),
    "min_score": ("between 0 and 1", lambda v: 0 <= v <= 1),
    "detect_size": ("0 or at least 32", lambda v: v == 0 or v >= 32),
    "max_frames": ("at least 1", lambda v: v >= 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None), checked: one line and exit status 2 if wrong."""
    parser = get_args_parser()
    args = parser.parse_checked(argv, ARG_RULES)
    if args.align and (args.no_detect or args.detector != "yunet"):
        parser.error("--align needs the eye landmarks of --detector yunet (and no --no-detect)")
    for folder, flag in ((args.output, "--output"), (args.save_crops, "--save-crops")):
        if folder:  # before the model loads and any image is classified
            try:
                utils.check_output_dir(folder, flag)
            except utils.CLIError as err:
                parser.error(str(err))
    return args


def emit(records: list[dict], as_json: bool) -> None:
    for r in records:
        if as_json:
            print(json.dumps(r), flush=True)
        elif r["box"] is None:
            print(f"{r['source']} frame {r['frame']}: {NO_FACE}", flush=True)
        else:
            p = r["probabilities"]
            rest = ", ".join(f"{c} {v:.2f}" for c, v in sorted(p.items(), key=lambda t: -t[1]))
            print(f"{r['source']} frame {r['frame']} box {r['box']}: {r['label']} ({rest})")


def output_names(items: list[tuple[str, str]]) -> list[str]:
    """The annotated file's name for each (path, kind) input, unique in the run (none overwrites
    another): `<stem>_<ext>_pred.png` for images, `..._pred.mp4` for videos (`x.jpg` and `x.webp`
    differ by their extension); a name an earlier input took gets the input's parent folder in
    front (`d2_face_webp_pred.png`), then `_2`, `_3`... (the same file twice). Compared without
    case, as macOS and Windows name files."""
    taken, names = set(), []
    for path, kind in items:
        p = Path(path)
        base = p.stem + (f"_{p.suffix[1:]}" if p.suffix else "")
        suffix = "_pred.png" if kind == "image" else "_pred.mp4"
        parent = f"{p.absolute().parent.name}_{base}"
        candidates = itertools.chain([base, parent], (f"{parent}_{n}" for n in itertools.count(2)))
        name = next(c + suffix for c in candidates if (c + suffix).casefold() not in taken)
        taken.add(name.casefold())
        names.append(name)
    return names


def output_path(folder: str, name: str) -> str:
    """folder/name; the folder is made on first use, so a run that fails before writing
    anything leaves no empty folder behind."""
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def write_image(path: str, bgr: np.ndarray) -> None:
    """Written under a temporary name, then renamed: never half a file."""
    tmp = f"{path}.tmp{Path(path).suffix}"  # OpenCV picks the format by the extension
    if not cv2.imwrite(tmp, bgr):
        raise utils.CLIError(f"could not write {path}")
    os.replace(tmp, path)


def save_crops(folder: str, stem: str, crops: list[np.ndarray]) -> None:
    """--save-crops: each crop a model classified as `<stem>_face<k>.png`, written as the
    importers write a face (Pillow's PNG): the same face gives the same bytes in both."""
    for k, crop in enumerate(crops):
        path = output_path(folder, f"{stem}_face{k}.png")
        tmp = f"{path}.tmp.png"
        Image.fromarray(crop).save(tmp, format="PNG")
        os.replace(tmp, path)


def run_images(
    paths, classifier, detector, pipeline, args, names: list[str] | None = None
) -> list[dict]:
    """Images in batches; printed, and with --output annotated as `names` (output_names), with
    --save-crops their crops as `<name>_face<k>.png`."""
    names = names or output_names([(path, "image") for path in paths])
    out, index = [], 0  # the index of the image in `paths` (chunks keep the order)
    frames = ((path, 0, read_image(path)) for path in paths)
    for chunk in chunks(frames, args.batch_size):
        kept = []
        records_per_frame = predict_frames(chunk, classifier, detector, pipeline, kept)
        for (_, _, rgb), records, crops in zip(chunk, records_per_frame, kept, strict=True):
            emit(records, args.json)
            out += records
            if args.output:
                write_image(output_path(args.output, names[index]), annotate(rgb, records))
            if args.save_crops:
                save_crops(args.save_crops, names[index].removesuffix("_pred.png"), crops)
            index += 1
    return out


def run_video(capture, source, name, classifier, detector, pipeline, args) -> list[dict]:
    """Frames of a video file or camera, in chunks; smoothed, printed, optionally written to
    --output as `name` (output_names), with --save-crops each frame's crops as
    `<name>_frame<index>_face<k>.png`."""
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    smoother, writer, out = Smoother(args.smooth), None, []
    # A camera is answered frame by frame; a file is read in batches of frames.
    size = 1 if args.webcam is not None else args.batch_size
    start, count = time.perf_counter(), 0
    try:
        for chunk in chunks(video_frames(capture, source, args.max_frames), size):
            kept = []
            found = predict_frames(chunk, classifier, detector, pipeline, kept)
            for (_, index, rgb), records, crops in zip(chunk, found, kept, strict=True):
                if args.save_crops:
                    stem = f"{name.removesuffix('_pred.mp4')}_frame{index:06d}"
                    save_crops(args.save_crops, stem, crops)
                records = smoother(records)
                emit(records, args.json)
                out += records
                count += 1
                if args.output:
                    frame = annotate(rgb, records)
                    if writer is None:
                        path = output_path(args.output, name)
                        fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                        h, w = frame.shape[:2]
                        writer = cv2.VideoWriter(path + ".tmp.mp4", fourcc, fps, (w, h))
                    writer.write(frame)
    except KeyboardInterrupt:
        pass  # how a webcam run ends: keep what was seen
    except BaseException:
        if writer is not None:  # a failed run leaves no half-written video
            writer.release()
            os.remove(path + ".tmp.mp4")
        raise
    if writer is not None:
        writer.release()
        os.replace(path + ".tmp.mp4", path)
    if count == 0:
        raise utils.CLIError(f"{source}: no frame could be read")
    seconds = time.perf_counter() - start
    faces = detector.name if detector is not None else "no detection"
    print(
        f"{source}: {count} frames in {seconds:.1f} s, {count / seconds:.1f} fps "
        f"({classifier.backend}, {faces}, {size} frame{'s' if size > 1 else ''} per batch)",
        file=sys.stderr,
    )
    return out


def choose_backend(
    backend: str, checkpoint: str, items: list[tuple[str, str]], webcam, device: torch.device
) -> str:
    """--backend as load_classifier takes it. auto: ONNX Runtime (with PyTorch as its fallback)
    only on the CPU and over many frames, since its in-memory export (0.2-3 s) pays back only
    over videos, the webcam or IMAGES_FOR_ONNX images (docs/INFERENCE.md: the figures); on a GPU
    PyTorch runs the model there."""
    if backend == "torch" and checkpoint.endswith(".onnx"):
        raise utils.CLIError(f"{checkpoint} is an ONNX file: it runs on ONNX Runtime alone")
    if backend != "auto":
        return backend
    videos = webcam is not None or any(kind == "video" for _, kind in items)
    many_frames = videos or sum(kind == "image" for _, kind in items) >= IMAGES_FOR_ONNX
    return "auto" if many_frames and device.type == "cpu" else "torch"


def main(args: argparse.Namespace) -> list[dict]:
    if not args.inputs and args.webcam is None:
        raise utils.CLIError("give at least one INPUT (image, folder, video) or --webcam")
    model_name = get_args_parser().model_name(args)  # --model NAME or emonext_SIZE, or None
    device = utils.resolve_device(args.device)
    if args.output:  # parse_args checked it already; main may be called without it
        utils.check_output_dir(args.output, "--output")
    items = expand_inputs(args.inputs)
    names = output_names(items)
    backend = choose_backend(args.backend, args.checkpoint, items, args.webcam, device)
    classifier = load_classifier(
        args.checkpoint, args.weights, model_name, str(device), backend, args.allow_torchscript
    )
    pipeline = resolve_pipeline(args, classifier.faces)
    detector = make_detector(args, pipeline)
    out = []

    # Consecutive images share batches; videos run one by one; input order is kept.
    named = zip(items, names, strict=True)
    for kind, group in itertools.groupby(named, key=lambda item: item[0][1]):
        paths, group_names = zip(*((path, name) for (path, _), name in group), strict=True)
        if kind == "image":
            out += run_images(list(paths), classifier, detector, pipeline, args, list(group_names))
            continue
        for path, name in zip(paths, group_names, strict=True):
            capture = cv2.VideoCapture(path)
            if not capture.isOpened():
                raise utils.CLIError(f"OpenCV cannot open the video {path}")
            out += run_video(capture, path, name, classifier, detector, pipeline, args)
    if args.webcam is not None:
        capture = cv2.VideoCapture(args.webcam)
        if not capture.isOpened():
            raise utils.CLIError(f"cannot open camera {args.webcam}")
        source = f"webcam:{args.webcam}"
        name = f"webcam{args.webcam}_pred.mp4"
        out += run_video(capture, source, name, classifier, detector, pipeline, args)
    return out


if __name__ == "__main__":
    utils.run_command("predict.py", main, parse_args())
