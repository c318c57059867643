"""Photos to face crops: YuNet (`cv2.FaceDetectorYN`, the ONNX file beside this module) and the
one pipeline that frames its faces, for predict.py and for scripts/download_dataset.py --faces.

`FacePipeline` holds the settings (detector and its file's SHA-256, score threshold, smallest
face, detection size, box scale, alignment, output size) and travels as a dict: in a dataset's
manifest.json, every checkpoint trained on that dataset, an export's metadata and a hub folder's
config.json, so that a model is fed faces framed as it was trained on (docs/INFERENCE.md).
`face_crops` is the one function that applies it.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

import utils

YUNET_MODEL = Path(__file__).resolve().parent / "face_detection_yunet_2023mar.onnx"
DETECTORS = {"yunet": YUNET_MODEL}  # the detectors a pipeline may name, and their files
# The crop's side over YuNet's box (its larger side): predict.py's framing (FER2013's faces
# include some hair and chin; 1.15 x YuNet's box is the crop 1.2 x Haar's box gave).
YUNET_BOX_SCALE = 1.15
# Where a 5-point alignment puts the eyes, nose tip and mouth corners (right then left, as the
# person sees them; YuNet's order) in a 112 x 112 face: the template of ArcFace (Deng et al.
# 2019, insightface's `arcface_dst`), the usual one for 5-point alignment. Its square spans about
# YuNet's box; `box_scale` widens it as it widens the box.
TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
TEMPLATE_SIDE = 112


@dataclass
class Face:
    """A detection in frame pixels: box (x, y, w, h), score, five (x, y) landmarks (eyes, nose
    tip, mouth corners; right then left, as the person sees them) or None."""

    box: tuple[float, float, float, float]
    score: float | None = None
    landmarks: np.ndarray | None = None


# a detector's file is hashed once per process: every photo's pipeline names it
file_sha256 = functools.cache(utils.file_sha256)


def detector_sha256(detector: str = "yunet") -> str:
    """SHA-256 of a detector's model file; one line (CLIError) when the file is missing."""
    path = DETECTORS[detector]
    if not path.is_file():
        raise utils.CLIError(f"the face detector's model {path} is missing: restore it")
    return file_sha256(str(path))


@dataclass(frozen=True)
class FacePipeline:
    """How a photo becomes the model's face crops (`face_crops`).

    `size` None: crops at the photo's own resolution and in colour, the model's transform
    resizing them (predict.py's framing of a checkpoint that records no pipeline); an integer:
    `size` x `size` 8-bit grayscale squares, as download_dataset.py --faces writes them.
    """

    detector: str = "yunet"
    detector_sha256: str = ""
    min_score: float = 0.7
    min_face: int = 30
    detect_size: int = 640
    box_scale: float = YUNET_BOX_SCALE
    align: bool = False
    size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value, where: str) -> FacePipeline:
        """A pipeline read from a file, every field checked (one-line WeightsError)."""
        from models.schema import check_face_pipeline

        return cls(**check_face_pipeline(value, where))


PIPELINE_FIELDS = tuple(f.name for f in fields(FacePipeline))


def pipeline_for(**settings) -> FacePipeline:
    """A YuNet pipeline with `settings`, naming the detector file's hash as found here."""
    return FacePipeline(detector_sha256=detector_sha256("yunet"), **settings)


# --------------------------------------------------------------------------- framing


def widen_box(box, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The square of side `scale` x the larger side of `box` (x, y, w, h), about its centre,
    clamped to a width x height image."""
    x, y, w, h = (float(v) for v in box)
    cx, cy, side = x + w / 2, y + h / 2, max(w, h) * scale
    x0, y0 = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    x1, y1 = min(width, round(cx + side / 2)), min(height, round(cy + side / 2))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def eye_angle(landmarks: np.ndarray) -> float:
    """Degrees the face is rolled: the angle of the line from the right eye to the left."""
    (rx, ry), (lx, ly) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(ly - ry, lx - rx))


def aligned_crop(rgb: np.ndarray, face: Face, scale: float, angle: float) -> np.ndarray:
    """The square crop of `widen_box` rotated by `angle` degrees about its centre (so that eyes
    rolled by `angle` come out level); pixels beyond the frame repeat its border."""
    x, y, w, h = face.box
    cx, cy, side = x + w / 2, y + h / 2, max(w, h) * scale
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    matrix[:, 2] += (side / 2 - cx, side / 2 - cy)  # the centre lands in the crop's centre
    size = max(1, round(side))
    return cv2.warpAffine(
        rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def alignment(landmarks: np.ndarray, side: int, box_scale: float) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, translation) that takes the five landmarks
    closest, in least squares, to TEMPLATE in a `side`-pixel square widened by `box_scale`.

    A similarity and not a full affine map: it levels and centres the face without shearing or
    stretching it (an expression changes the mouth corners, which an affine fit would undo).
    OpenCV's LMEDS fit, refined on all points, is deterministic and equals the least-squares one
    on five points that agree."""
    template = (TEMPLATE / TEMPLATE_SIDE - 0.5) / box_scale + 0.5
    matrix, _ = cv2.estimateAffinePartial2D(
        landmarks.astype(np.float64), template * side, method=cv2.LMEDS
    )
    return matrix


def square_about(face: Face, side: int, box_scale: float) -> np.ndarray:
    """The translation that puts the box's centre in the middle of a `side`-pixel square, by
    whole pixels (the crop copies pixels, no interpolation)."""
    x, y, w, h = face.box
    return np.array(
        [[1.0, 0.0, round(side / 2 - (x + w / 2))], [0.0, 1.0, round(side / 2 - (y + h / 2))]]
    )


@dataclass
class FaceCrop:
    """One face of a photo: the detection, the crop given to the model, the box of the frame it
    came from (x, y, w, h) and the roll it corrected (degrees) when aligned."""

    face: Face
    crop: np.ndarray
    box: tuple[int, int, int, int]
    angle: float | None = None


def face_crops(rgb: np.ndarray, pipeline: FacePipeline, detector: YuNetDetector) -> list[FaceCrop]:
    """The face crops of an RGB photo, framed as `pipeline` says: the one function that predict.py
    and download_dataset.py --faces share (the same photo gives the same bytes in both).

    Each face YuNet finds (above `min_score`, at least `min_face` pixels) is framed as the square
    of `box_scale` x its box's larger side about its centre; with `align`, the five landmarks
    (from a close-up detection: YuNet's landmarks of a small face barely follow its roll) are
    mapped onto TEMPLATE by a similarity. Without `size` the square is clamped to the photo and
    kept in colour at its own resolution (predict.py's framing); with it, pixels beyond the photo
    repeat its border and the square becomes `size` x `size` 8-bit grayscale, as the importers
    write faces (Pillow's grayscale, then its antialiased bilinear resize).
    """
    height, width = rgb.shape[:2]
    out = []
    for face in detector(rgb):
        box = widen_box(face.box, pipeline.box_scale, width, height)
        angle = None
        side = max(1, round(pipeline.box_scale * max(face.box[2:])))
        if pipeline.align and face.landmarks is not None:
            matrix = alignment(detector.closeup_landmarks(rgb, face), side, pipeline.box_scale)
            angle = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
        elif pipeline.size is None:
            x, y, w, h = box
            out.append(FaceCrop(face, rgb[y : y + h, x : x + w], box))
            continue
        else:
            matrix = square_about(face, side, pipeline.box_scale)
        crop = cv2.warpAffine(
            rgb,
            matrix,
            (side, side),
            flags=cv2.INTER_LINEAR if angle is not None else cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_REPLICATE,
        )
        if pipeline.size is not None:
            crop = to_dataset_face(crop, pipeline.size)
        out.append(FaceCrop(face, crop, box, angle))
    return out


def to_dataset_face(rgb: np.ndarray, size: int) -> np.ndarray:
    """An RGB crop as the importers write a face: 8-bit grayscale, `size` x `size` (Pillow's
    bilinear filter widens with the scale factor: antialiased when shrinking)."""
    gray = Image.fromarray(rgb).convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(gray)


def box_overlap(a, b) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax, ay, aw, ah = (float(v) for v in a)
    bx, by, bw, bh = (float(v) for v in b)
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    union = aw * ah + bw * bh - w * h
    return w * h / union if union > 0 else 0.0


# YuNet's box and a dataset's box of one face overlap well below 1 (their framings differ: 0.59-0.77
# for the LFW faces of tests/test_face_pipeline.py against their tiles); below this the face the
# dataset labels was not found.
MIN_OVERLAP = 0.3


def pick_face(crops: list[FaceCrop], box=None) -> FaceCrop | None:
    """The one face a dataset keeps of a photo: the one overlapping the dataset's own `box`
    (x, y, w, h) most (None when none overlaps it by MIN_OVERLAP); without a box, the
    highest-scoring (the larger on a tie)."""
    if not crops:
        return None
    if box is not None:
        best = max(crops, key=lambda c: box_overlap(c.face.box, box))
        return best if box_overlap(best.face.box, box) >= MIN_OVERLAP else None
    return max(crops, key=lambda c: (c.face.score or 0.0, c.face.box[2] * c.face.box[3]))


# --------------------------------------------------------------------------- the detector


class YuNetDetector:
    """OpenCV's YuNet (`cv2.FaceDetectorYN`) on the ONNX file beside this module.

    Frames with a side above `detect_size` are downscaled for detection (YuNet finds faces of
    about 10-300 pixels; a 4K frame would also take far longer) and the boxes mapped back.
    Faces whose larger side is under `min_face` pixels, or scoring under `min_score`, are dropped.
    """

    name = "yunet"

    def __init__(
        self,
        min_score: float = 0.7,
        detect_size: int = 640,
        min_face: int = 30,
        model: str | os.PathLike = YUNET_MODEL,
    ):
        version = tuple(int(v) for v in cv2.__version__.split(".")[:2])
        if not hasattr(cv2, "FaceDetectorYN") or version < (4, 8):
            raise utils.CLIError(
                f"OpenCV {cv2.__version__} cannot run YuNet's 2023 model (it needs 4.8 or later): "
                "pip install -U opencv-python-headless, or pass --no-detect with cropped faces"
            )
        if not os.path.isfile(model):
            raise utils.CLIError(f"the face detector's model {model} is missing: restore it")
        self.min_score, self.detect_size, self.min_face = min_score, detect_size, min_face
        # OpenCV 5 warns on every creation that its new DNN engine ignores target settings
        # (which YuNet does not use): nothing for a user to act on.
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self.net = cv2.FaceDetectorYN.create(str(model), "", (320, 320), min_score, 0.3, 5000)
        finally:
            cv2.utils.logging.setLogLevel(level)
        self.input_size = (320, 320)

    @classmethod
    def of(cls, pipeline: FacePipeline) -> YuNetDetector:
        """The detector a pipeline names; its file must be the one the pipeline was made with."""
        found = detector_sha256(pipeline.detector)
        if pipeline.detector_sha256 and found != pipeline.detector_sha256:
            raise utils.CLIError(
                f"the face detector file {DETECTORS[pipeline.detector]} (sha256 {found[:12]}...) "
                f"is not the one the faces were framed with ({pipeline.detector_sha256[:12]}...): "
                "restore that file"
            )
        return cls(pipeline.min_score, pipeline.detect_size, pipeline.min_face)

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        factor = 1.0
        if self.detect_size and max(height, width) > self.detect_size:
            factor = self.detect_size / max(height, width)
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if bgr.shape[1::-1] != self.input_size:
            self.input_size = bgr.shape[1::-1]
            self.net.setInputSize(self.input_size)
        _, rows = self.net.detect(bgr)
        faces = []
        for row in rows if rows is not None else []:
            box = tuple(float(v) / factor for v in row[:4])
            if max(box[2], box[3]) >= self.min_face:
                landmarks = row[4:14].reshape(5, 2).astype(np.float64) / factor
                faces.append(Face(box, float(row[14]), landmarks))
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))

    def closeup_landmarks(self, rgb: np.ndarray, face: Face, side: int = 224) -> np.ndarray:
        """`face`'s five landmarks in frame pixels, from a second detection on a close-up (the
        face scaled to `side` pixels): YuNet's landmarks of small faces barely follow a roll
        (the astronaut's 70-pixel face turned by 20 degrees reads as 1.4 degrees turned from its
        own landmarks, 15.2 from the close-up's; tests/test_faces.py). The frame's own
        landmarks when the close-up loses the face."""
        x, y, w, h = face.box
        factor = side / max(w, h)
        size = round(2 * side)  # the face and as much again around it
        shift = np.array([size / 2 - (x + w / 2) * factor, size / 2 - (y + h / 2) * factor])
        matrix = np.array([[factor, 0, shift[0]], [0, factor, shift[1]]])
        closeup = cv2.warpAffine(
            rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        detect_size, self.detect_size = self.detect_size, 0
        try:
            found = self(closeup)
        finally:
            self.detect_size = detect_size
        if not found:
            return face.landmarks
        centre = np.array([size / 2, size / 2])
        best = min(
            found,
            key=lambda f: np.abs(np.array(f.box[:2]) + np.array(f.box[2:]) / 2 - centre).sum(),
        )
        return (best.landmarks - shift) / factor

    def roll(self, rgb: np.ndarray, face: Face, side: int = 224) -> float:
        """Degrees `face` is rolled, from the eyes of a close-up's landmarks."""
        return eye_angle(self.closeup_landmarks(rgb, face, side))
