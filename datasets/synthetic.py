"""Synthetic faces: a data source for demos and tests (as torchvision.datasets.FakeData)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .duplicates import dct_basis
from .folders import CLASSES, DatasetError
from .manifest import (
    check_replaceable,
    content_hash,
    publish_dataset,
    read_manifest,
    write_manifest,
)

# 48 x 48 grayscale cartoon faces for the 7 expressions, written in the FER2013 layout (what
# train.py --demo, the tests and the benchmarks train on; scripts/make_synthetic.py is the
# command). Each face is drawn from expression parameters (mouth curve and opening, brow angle
# and height, eye opening) with per-face jitter large enough that neighbouring expressions
# overlap (fear/surprise, anger/disgust, sadness/neutral), then moved by a random pose (rotation,
# scale, translation) that the STN can learn to undo, lit by a random gradient and covered in
# noise. Deterministic by seed; docs/DATA.md has how learnable it is.

SYNTHETIC_SIZE = 48
SUPERSAMPLE = 2  # draw at 96 x 96 and average down: smooth strokes at FER2013's resolution

# Expression parameters (means): mouth curve (+ smile, - frown), mouth opening, mouth width,
# mouth asymmetry, brow angle (+ inner ends raised), brow height, eye opening.
# Values are in units of the face radius; the jitter below blurs the classes into each other.
EXPRESSIONS = {
    "Angry": dict(curve=-0.06, open=0.02, width=0.34, skew=0.0, brow=-0.22, brow_h=-0.06, eye=0.6),
    "Disgust": dict(curve=-0.08, open=0.03, width=0.30, skew=0.1, brow=-0.1, brow_h=-0.03, eye=0.5),
    "Fear": dict(curve=-0.03, open=0.09, width=0.42, skew=0.0, brow=0.2, brow_h=0.08, eye=1.3),
    "Happy": dict(curve=0.16, open=0.04, width=0.44, skew=0.0, brow=0.0, brow_h=0.02, eye=0.8),
    "Neutral": dict(curve=0.0, open=0.0, width=0.36, skew=0.0, brow=0.0, brow_h=0.0, eye=1.0),
    "Sad": dict(curve=-0.12, open=0.0, width=0.34, skew=0.0, brow=0.18, brow_h=-0.02, eye=0.75),
    "Surprise": dict(curve=0.0, open=0.2, width=0.24, skew=0.0, brow=0.06, brow_h=0.14, eye=1.45),
}
JITTER = dict(curve=0.05, open=0.03, width=0.05, skew=0.05, brow=0.09, brow_h=0.04, eye=0.22)
SYNTHETIC_SPLITS = {"train": 400, "val": 60, "test": 60}  # images per class
BACKDROP_STD = 40.0  # grey levels; see _backdrop()
SYNTHETIC_VERSION = 2  # the manifest's generator_version; 2: faces before a random backdrop


def _backdrop(rng: np.random.Generator, size: int, level: float) -> Image.Image:
    """A smooth random backdrop around `level`: what stands behind a photographed face.

    Low spatial frequencies (up to 5 cycles across, amplitudes falling as 1/f) with random
    weights. Without it two faces with alike expression, pose and lighting are near-identical
    pictures, which the dataset audit (scripts/audit_dataset.py) rightly calls near-duplicates;
    with it every face is its own picture, as in a real dataset.
    """
    k = 6
    weights = rng.normal(0.0, 1.0, (k, k)) / (1.0 + np.add.outer(np.arange(k), np.arange(k)))
    weights[0, 0] = 0.0  # the mean is `level`
    basis = dct_basis(size, k)
    field = basis.T @ weights @ basis
    field *= BACKDROP_STD / max(float(field.std()), 1e-6)
    return Image.fromarray(np.clip(np.rint(level + field), 0, 255).astype(np.uint8))


def draw_face(rng: np.random.Generator, expression: str) -> np.ndarray:
    """One 48 x 48 uint8 face showing `expression`, at a random pose, lighting and noise."""
    p = {k: v + rng.normal(0.0, JITTER[k]) for k, v in EXPRESSIONS[expression].items()}
    s = SYNTHETIC_SIZE * SUPERSAMPLE
    bg = rng.uniform(20, 120)
    skin = rng.uniform(130, 220)
    feature = skin - rng.uniform(70, 120)
    im = _backdrop(rng, s, bg)
    d = ImageDraw.Draw(im)
    c = s / 2
    r = s * 0.36  # face radius
    rx, ry = r * rng.uniform(0.85, 0.95), r * rng.uniform(1.05, 1.2)
    d.ellipse([c - rx, c - ry, c + rx, c + ry], fill=int(skin))
    lw = max(2, round(s / 40))

    # Eyes: ellipses whose height is the eye opening; a dark pupil inside.
    eye_y = c - 0.22 * r
    eye_dx = 0.38 * r
    eye_w = 0.16 * r
    eye_h = max(0.02, 0.09 * p["eye"]) * r
    for side in (-1, 1):
        ex = c + side * eye_dx
        d.ellipse([ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h], fill=240)
        pr = min(eye_h, eye_w * 0.55)
        d.ellipse([ex - pr, eye_y - pr, ex + pr, eye_y + pr], fill=int(feature * 0.5))

    # Brows: lines above the eyes; `brow` tilts them (inner ends up for fear/sadness).
    brow_y = eye_y - (0.24 + p["brow_h"]) * r
    for side in (-1, 1):
        inner = (c + side * 0.12 * r, brow_y - p["brow"] * r)
        outer = (c + side * 0.6 * r, brow_y + p["brow"] * 0.4 * r)
        d.line([inner, outer], fill=int(feature), width=lw + 1)

    # Mouth: a quadratic curve from corner to corner (corners up = smile), opened into a
    # filled shape when `open` is large, skewed (one corner raised) for disgust.
    mouth_y = c + 0.45 * r
    half_w = max(0.08, p["width"]) * r
    n = 16
    xs = np.linspace(-1.0, 1.0, n)
    upper = [
        (c + x * half_w, mouth_y - p["curve"] * r * (x * x - 0.3) - p["skew"] * r * x) for x in xs
    ]
    opening = max(0.0, p["open"]) * r
    if opening > 0.02 * r:
        lower = [(x, y + opening * (1 - t * t)) for (x, y), t in zip(upper, xs, strict=True)]
        d.polygon(upper + lower[::-1], fill=int(feature * 0.4))
    d.line(upper, fill=int(feature), width=lw)

    # Pose: rotation, scale and translation about the centre (inverse map for PIL's AFFINE).
    angle = math.radians(rng.uniform(-18, 18))
    scale = rng.uniform(0.85, 1.15)
    tx, ty = rng.uniform(-0.08, 0.08, size=2) * s
    ca, sa = math.cos(angle) / scale, math.sin(angle) / scale
    inv = (ca, sa, c - ca * (c + tx) - sa * (c + ty), -sa, ca, c + sa * (c + tx) - ca * (c + ty))
    im = im.transform(
        (s, s), Image.Transform.AFFINE, inv, Image.Resampling.BILINEAR, fillcolor=int(bg)
    )
    im = im.reduce(SUPERSAMPLE)

    # Lighting: a linear gradient in a random direction, a contrast change and sensor noise.
    a = np.asarray(im, dtype=np.float32)
    yy, xx = np.mgrid[0:SYNTHETIC_SIZE, 0:SYNTHETIC_SIZE] / (SYNTHETIC_SIZE - 1) - 0.5
    phi = rng.uniform(0, 2 * math.pi)
    a = a + rng.uniform(0, 60) * (math.cos(phi) * xx + math.sin(phi) * yy)
    a = (a - a.mean()) * rng.uniform(0.7, 1.2) + a.mean() + rng.uniform(-20, 20)
    a = a + rng.normal(0.0, rng.uniform(3, 12), size=a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def make_synthetic(
    out_dir: str | os.PathLike,
    per_class: int = SYNTHETIC_SPLITS["train"],
    seed: int = 0,
    splits: dict[str, int] | None = None,
    force: bool = False,
    quiet: bool = True,
) -> Path:
    """Write the synthetic dataset to out_dir (atomically); return its path.

    Layout OUT/{train,val,test}/<Class>/<index>.png and OUT/manifest.json, as
    scripts/download_dataset.py writes FER2013. `splits` maps split -> images per class (default:
    train `per_class`, val and test 60); each needs at least one, or the class folders could not
    be loaded. An existing folder made with the same settings is kept as it is ("already
    there"); a different dataset of this project is replaced only with force=True; a folder of
    anything else never (check_replaceable).
    """
    out = Path(out_dir)
    splits = dict(splits) if splits else {**SYNTHETIC_SPLITS, "train": per_class}
    if any(n < 1 for n in splits.values()):
        raise ValueError(f"every split needs at least 1 image per class, got {splits}")
    source = {
        "type": "synthetic",
        "seed": seed,
        "per_class": splits,
        "generator_version": SYNTHETIC_VERSION,
    }
    if out.exists():
        manifest = read_manifest(out)
        if manifest is not None and manifest.get("source") == source:
            if not quiet:
                print(f"{out} already there (same settings); nothing to do")
            return out
        check_replaceable(out)  # what this project did not write is never replaced
        if not force:
            raise DatasetError(f"{out} exists and was not made with these settings; use --force")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # The dataset is a folder made inside the private (0700) temporary one, so that it gets the
    # mode every folder gets (0755 under the usual umask), as download_dataset.py's do.
    tmp = work / "dataset"
    tmp.mkdir()
    try:
        counts = {}
        index = 0
        for split_id, (split, n) in enumerate(splits.items()):
            counts[split] = {}
            for class_id, name in enumerate(CLASSES):
                # One stream per (split, class): changing one split's size leaves the others.
                rng = np.random.default_rng([seed, split_id, class_id])
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for _ in range(n):
                    Image.fromarray(draw_face(rng, name)).save(folder / f"{index}.png")
                    index += 1
                counts[split][name] = n
        manifest = {
            "dataset": "synthetic-fer",
            "source": source,
            "format": "png",
            "counts": counts,
            "total": index,
            "content_hash": content_hash(tmp),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_manifest(tmp, manifest)
        publish_dataset(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"wrote {index} images to {out}")
    return out
