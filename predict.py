"""Facial expressions of the faces in images, folders, videos or a webcam, on the CPU.

    python predict.py photo.jpg --checkpoint out/checkpoint.pt
    python predict.py photos/ clip.mp4 --checkpoint model.onnx --output annotated/ --json
    python predict.py --webcam 0 --checkpoint out/checkpoint.pt --smooth 5

Faces are found with OpenCV's bundled Haar cascade (`haarcascade_frontalface_default.xml`, inside
`opencv-python-headless` < 5: no download). OpenCV's DNN detector (`cv2.FaceDetectorYN`) would be
more robust but needs an ONNX file that no package ships. Each box is widened (`--box-scale`)
because FER2013 faces include some hair and chin, clamped to the image, and the crop goes through
exactly the validation transform the model was trained with (`datasets.pil_transform("val")`:
grayscale, resize, centre crop, [0, 1], repeated to the model's channels).

Output: one record per face (`source`, `frame`, `box` = [x, y, width, height] of the crop given
to the model, `label`, `probabilities`), as JSON lines with `--json`; a frame without a face gives
one record with `box`, `label` and `probabilities` null and `note: "no face found"`.
`--checkpoint` takes this project's checkpoints, the official trainer's, or an ONNX file written
by scripts/export.py.
"""

from __future__ import annotations

import argparse
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

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
NO_FACE = "no face found"


# --------------------------------------------------------------------------- faces


def widen_box(box, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) grown by `scale` about its centre, clamped to a width x height image."""
    x, y, w, h = (float(v) for v in box)
    cx, cy = x + w / 2, y + h / 2
    w, h = w * scale, h * scale
    x0, y0 = max(0, round(cx - w / 2)), max(0, round(cy - h / 2))
    x1, y1 = min(width, round(cx + w / 2)), min(height, round(cy + h / 2))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


class FaceDetector:
    """OpenCV's frontal-face Haar cascade; boxes widened by `box_scale`, sorted left to right."""

    def __init__(self, box_scale: float = 1.2, min_size: int = 30, min_neighbors: int = 5):
        if not hasattr(cv2, "CascadeClassifier"):  # seen on a GPU machine's OpenCV 5
            raise utils.CLIError(
                f"OpenCV {cv2.__version__} has no face detector (CascadeClassifier was removed "
                "in 5.0): pip install 'opencv-python-headless<5', or pass --no-detect with "
                "cropped faces"
            )
        path = os.path.join(cv2.data.haarcascades, HAAR_CASCADE)
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise utils.CLIError(f"could not load {path}: install opencv-python-headless<5")
        self.box_scale, self.min_size, self.min_neighbors = box_scale, min_size, min_neighbors

    def __call__(self, rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        faces = self.cascade.detectMultiScale(
            gray,
            scaleFactor=1.1,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        height, width = gray.shape
        return sorted(widen_box(f, self.box_scale, width, height) for f in faces)


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
    """Class probabilities of face crops, from a PyTorch model or an exported ONNX file."""

    def __init__(
        self, run: Callable[[torch.Tensor], np.ndarray], classes: list[str], data_config: dict
    ):
        self.run, self.classes, self.data_config = run, classes, data_config

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        logits = torch.from_numpy(self.run(face_tensor(crops, self.data_config)))
        return torch.softmax(logits.float(), 1).numpy()


def load_onnx(path: str, device: str = "cpu") -> Classifier:
    """An ONNX export of scripts/export.py; classes and data config from its metadata."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(path, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise utils.CLIError(f"{path} is not a readable ONNX model ({err})") from err
    meta = session.get_modelmeta().custom_metadata_map
    if "classes" not in meta or "data_config" not in meta:
        raise utils.CLIError(f"{path} lacks the classes/data_config metadata of scripts/export.py")
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.numpy()})[0]

    return Classifier(run, json.loads(meta["classes"]), json.loads(meta["data_config"]))


def load_classifier(
    checkpoint: str, weights: str = "auto", model_name: str | None = None, device: str = "cpu"
) -> Classifier:
    """A Classifier from this project's or the official trainer's .pt, or an exported .onnx."""
    if not os.path.isfile(checkpoint):
        raise utils.CLIError(f"checkpoint {checkpoint} does not exist")
    if checkpoint.endswith(".onnx"):
        return load_onnx(checkpoint, device)
    model, classes, data_config, _ = models.load_trained_model(checkpoint, weights, model_name)
    model.to(device)

    @torch.no_grad()
    def run(x: torch.Tensor) -> np.ndarray:
        return model(x.to(device)).float().cpu().numpy()

    return Classifier(run, classes, data_config)


# --------------------------------------------------------------------------- frames -> records


def predict_frames(
    frames: list[tuple[str, int, np.ndarray]],
    classifier: Classifier,
    detector: FaceDetector | None,
) -> list[list[dict]]:
    """Records for each (source, frame index, RGB image); all faces go through one batch.

    Without a detector the whole image is the face (`--no-detect`).
    """
    boxes, crops = [], []
    for _, _, rgb in frames:
        height, width = rgb.shape[:2]
        found = detector(rgb) if detector is not None else [(0, 0, width, height)]
        boxes.append(found)
        crops += [rgb[y : y + h, x : x + w] for x, y, w, h in found]
    probs = iter(classifier(crops))
    out = []
    for (source, index, _), found in zip(frames, boxes, strict=True):
        if not found:
            record = {"source": source, "frame": index, "box": None, "label": None}
            out.append([{**record, "probabilities": None, "note": NO_FACE}])
            continue
        records = []
        for box in found:
            p = next(probs)
            records.append(
                {
                    "source": source,
                    "frame": index,
                    "box": [int(v) for v in box],
                    "label": classifier.classes[int(p.argmax())],
                    "probabilities": {
                        c: float(v) for c, v in zip(classifier.classes, p, strict=True)
                    },
                }
            )
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
    """(path, "image" | "video") for every input; folders give their images, sorted."""
    items = []
    for path in inputs:
        if os.path.isdir(path):
            files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
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
        parser, models.SIZES, checkpoint_help=".pt checkpoint or exported .onnx"
    )
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
    parser.add_argument("--no-detect", action="store_true", help="each input is a cropped face")
    parser.add_argument(
        "--box-scale", default=1.2, type=float, help="widen detected boxes by this factor"
    )
    parser.add_argument("--min-face", default=30, type=int, help="smallest face side in pixels")
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
    "max_frames": ("at least 1", lambda v: v >= 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv when None), checked: one line and exit status 2 if wrong."""
    return get_args_parser().parse_checked(argv, ARG_RULES)


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


def run_images(paths, classifier, detector, args) -> list[dict]:
    out = []
    frames = ((path, 0, read_image(path)) for path in paths)
    for chunk in chunks(frames, args.batch_size):
        for (path, _, rgb), records in zip(
            chunk, predict_frames(chunk, classifier, detector), strict=True
        ):
            emit(records, args.json)
            out += records
            if args.output:
                target = output_path(args.output, f"{Path(path).stem}_pred.png")
                write_image(target, annotate(rgb, records))
    return out


def run_video(capture, source, name, classifier, detector, args) -> list[dict]:
    """Frames of a video file or camera, in chunks; smoothed, printed, optionally written."""
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    smoother, writer, out = Smoother(args.smooth), None, []
    # A camera is answered frame by frame; a file is read in batches of frames.
    size = 1 if args.webcam is not None else args.batch_size
    start, count = time.perf_counter(), 0
    try:
        for chunk in chunks(video_frames(capture, source, args.max_frames), size):
            for (_, _, rgb), records in zip(
                chunk, predict_frames(chunk, classifier, detector), strict=True
            ):
                records = smoother(records)
                emit(records, args.json)
                out += records
                count += 1
                if args.output:
                    frame = annotate(rgb, records)
                    if writer is None:
                        path = output_path(args.output, f"{name}_pred.mp4")
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
    print(
        f"{source}: {count} frames in {seconds:.1f} s, {count / seconds:.1f} fps", file=sys.stderr
    )
    return out


def main(args: argparse.Namespace) -> list[dict]:
    if not args.inputs and args.webcam is None:
        raise utils.CLIError("give at least one INPUT (image, folder, video) or --webcam")
    model_name = get_args_parser().model_name(args)  # --model NAME or emonext_SIZE, or None
    device = utils.resolve_device(args.device)
    items = expand_inputs(args.inputs)
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise utils.CLIError(
            f"--output {args.output} is a file; give a folder for annotated images"
        )
    classifier = load_classifier(args.checkpoint, args.weights, model_name, str(device))
    detector = None if args.no_detect else FaceDetector(args.box_scale, args.min_face)
    out = []

    # Consecutive images share batches; videos run one by one; input order is kept.
    for kind, group in itertools.groupby(items, key=lambda item: item[1]):
        paths = [path for path, _ in group]
        if kind == "image":
            out += run_images(paths, classifier, detector, args)
            continue
        for path in paths:
            capture = cv2.VideoCapture(path)
            if not capture.isOpened():
                raise utils.CLIError(f"OpenCV cannot open the video {path}")
            out += run_video(capture, path, Path(path).stem, classifier, detector, args)
    if args.webcam is not None:
        capture = cv2.VideoCapture(args.webcam)
        if not capture.isOpened():
            raise utils.CLIError(f"cannot open camera {args.webcam}")
        source = f"webcam:{args.webcam}"
        out += run_video(capture, source, f"webcam{args.webcam}", classifier, detector, args)
    return out


if __name__ == "__main__":
    utils.run_command("predict.py", main, parse_args())
