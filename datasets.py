"""FER2013-style image folders -> tensors -> augmented batches.

Layout: ``root/{train,val,test}/<Class>/<image>`` (what scripts/download_dataset.py writes, and
``make_synthetic``, the synthetic faces of the demo and the tests: section "Synthetic faces").
Two pipelines with the same semantics:

- ``pil``: the official torchvision transforms, image by image, in a DataLoader. The reference.
- ``fast`` (default): the split decoded once into a uint8 tensor (cached on disk), kept on the
  training device, and augmented per batch: flips, resize, rotation and crop composed into one
  affine warp per image and applied by one ``grid_sample`` call for the whole batch.

Both draw their random numbers from generators seeded by (seed, epoch, rank), never from the
global RNG, so a run resumed at epoch k sees exactly the data an uninterrupted run sees.
docs/DATA.md explains the design and the small numerical differences between the pipelines.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

# Official folder names; sorted, so index i is what torchvision's ImageFolder (and therefore the
# official trainer's checkpoints) calls class i.
CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
SPLITS = ("train", "val", "test")
# fer2013.csv's `emotion` codes, which are NOT alphabetical.
FER2013_CSV_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
FER2013_SPLIT_SIZES = {"train": 28709, "val": 3589, "test": 3589}

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 2  # 2: decode_image (16-bit scaled, alpha on white, EXIF orientation)

# The official training transforms (REFERENCE.md section 5) for 224 input.
OFFICIAL_RESIZE = 236
OFFICIAL_CROP = 224
DEFAULT_AUGMENT = {"hflip": 0.5, "vflip": 0.5, "rotation": 20.0, "crop": "random"}

# Every class a dataset folder may hold: FER2013's seven, and Contempt, the eighth of FER+,
# AffectNet and CK+. Folder names are matched case-insensitively, with these synonyms.
_SYNONYMS = {
    "Angry": ["angry", "anger", "mad", "rage"],
    "Contempt": ["contempt", "contemptuous"],
    "Disgust": ["disgust", "disgusted", "disgusting"],
    "Fear": ["fear", "fearful", "afraid", "scared"],
    "Happy": ["happy", "happiness", "joy", "joyful"],
    "Neutral": ["neutral", "neutrality", "none", "calm"],
    "Sad": ["sad", "sadness", "unhappy"],
    "Surprise": ["surprise", "surprised", "suprise", "surprize"],
}
_CANONICAL = {syn: name for name, syns in _SYNONYMS.items() for syn in syns}
KNOWN_CLASSES = sorted(_SYNONYMS)


class DatasetError(Exception):
    """A data problem the user can fix; the message names the path or row and what to do."""


class UnreadableImageError(DatasetError):
    """An image file that cannot be decoded; the message names the file and says why."""


def canonical_class_name(name: str) -> str:
    """'anger', 'ANGRY', 'Angry' -> 'Angry'; 'happiness' -> 'Happy'; unknown -> ValueError."""
    key = "".join(ch for ch in name.lower() if ch.isalpha())
    if key not in _CANONICAL:
        raise ValueError(
            f"unknown expression class {name!r}; expected one of {KNOWN_CLASSES} or a synonym "
            f"({', '.join(sorted(_CANONICAL))})"
        )
    return _CANONICAL[key]


@dataclass
class DataConfig:
    """What a model expects as input; models publish one, checkpoints store it."""

    image_size: int = OFFICIAL_CROP
    resize_size: int | None = None  # None -> round(image_size * 236 / 224), the official ratio
    in_chans: int = 3  # the grayscale face repeated on this many channels
    mean: tuple[float, ...] | None = None  # None: no normalisation (EmoNeXt sees [0, 1])
    std: tuple[float, ...] | None = None

    @property
    def resize(self) -> int:
        if self.resize_size is not None:
            return self.resize_size
        return round(self.image_size * OFFICIAL_RESIZE / OFFICIAL_CROP)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("mean", "std"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("mean", "std"):
            if kwargs.get(k) is not None:
                kwargs[k] = tuple(float(x) for x in kwargs[k])
        return cls(**kwargs)


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 (N, H, W) grayscale, as stored
    targets: torch.Tensor  # int64 (N,)
    classes: list[str]  # canonical names, alphabetical
    paths: list[str]  # one per image
    skipped: int  # unreadable images skipped (only with skip_bad_images)
    skipped_paths: list[str] = field(default_factory=list)  # which ones


# --------------------------------------------------------------------------------------------
# Layout checks and decoding
# --------------------------------------------------------------------------------------------

_FIX_HINT = (
    "get FER2013 with scripts/download_dataset.py (--csv fer2013.csv, --gdrive, --kaggle or "
    "--folder), or make a synthetic set with scripts/make_synthetic.py"
)


def is_hidden(name: str) -> bool:
    """Whether every listing of a dataset skips a file or folder of this name: hidden ones
    (``.name``), among them the AppleDouble ``._name`` files macOS writes beside every file it
    copies onto a shared drive or into a zip, and ``__MACOSX``, the folder of them in such zips.
    None of them is an image of the dataset, whatever its extension."""
    return name.startswith(".") or name == "__MACOSX"


def _scan_split(root: Path, split: str) -> dict[str, Path]:
    """Canonical class name -> class folder, for one split folder."""
    split_dir = root / split
    if not split_dir.is_dir():
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist; {_FIX_HINT}")
        raise DatasetError(
            f"split folder {split_dir} is missing (expected {root}/{{train,val,test}}/<Class>/); "
            f"{_FIX_HINT} (--folder carves a validation split from train-only copies)"
        )
    found: dict[str, Path] = {}
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir() or is_hidden(entry.name):
            continue  # like ImageFolder: stray files at this level are not classes
        try:
            name = canonical_class_name(entry.name)
        except ValueError as e:
            raise DatasetError(f"{entry}: {e}") from None
        if name in found:
            raise DatasetError(
                f"{found[name]} and {entry} are both class {name!r}; merge or remove one"
            )
        found[name] = entry
    if not found:
        raise DatasetError(f"split folder {split_dir} has no class folders; {_FIX_HINT}")
    return found


def _image_names(class_dir: Path) -> Iterator[str]:
    """Names of the image files in a class folder (hidden and AppleDouble files left out:
    `is_hidden`), in directory order. os.scandir knows from the directory listing which entries
    are files: no stat() per file, as Path.is_file() does (FER2013 has 35,887 images, and a start
    lists them)."""
    with os.scandir(class_dir) as entries:
        for entry in entries:
            name = entry.name
            if Path(name).suffix.lower() in IMG_EXTENSIONS and not is_hidden(name):
                if entry.is_file():
                    yield name


def _image_files(class_dir: Path) -> list[Path]:
    return [class_dir / name for name in sorted(_image_names(class_dir))]


def check_dataset(root: str | os.PathLike, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Validate the layout of `splits` under `root`; return the class list (alphabetical).

    Missing split or class folders, a class present in some splits only, or an empty class
    folder raise DatasetError naming the path.
    """
    root = Path(root)
    scans = {split: _scan_split(root, split) for split in splits}
    classes = sorted(set().union(*scans.values()))
    for split, found in scans.items():
        for name in classes:
            if name not in found:
                others = [s for s in splits if name in scans[s]]
                raise DatasetError(
                    f"class {name!r} is in {others} but {root / split / name} is missing; every "
                    f"split needs the same class folders"
                )
            if next(_image_names(found[name]), None) is None:  # the first image is enough
                raise DatasetError(f"class folder {found[name]} has no images")
    return classes


def _split_listing(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (consistent with the other existing splits) and (relative path, target) pairs."""
    if not (root / split).is_dir():
        _scan_split(root, split)  # raises the right error
    present = tuple(s for s in SPLITS if (root / s).is_dir())
    if split not in present:
        present = present + (split,)
    classes = check_dataset(root, present)
    found = _scan_split(root, split)
    items = []
    for target, name in enumerate(classes):
        folder = os.path.join(split, found[name].name)
        items += [(os.path.join(folder, f), target) for f in sorted(_image_names(found[name]))]
    return classes, items


def _cache_key(root: Path, items: list[tuple[str, int]], skip_bad_images: bool) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} skip={skip_bad_images}\n".encode())
    for rel, target in items:
        st = (root / rel).stat()
        h.update(f"{rel}\t{target}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def user_cache_dir(root: Path) -> Path:
    """The user's cache folder for the dataset at `root`: $XDG_CACHE_HOME/emonext/<tag>
    (~/.cache/... by default), the tag a hash of root's absolute path."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return Path(xdg) / "emonext" / tag


def _cache_dirs(root: Path, in_dataset: bool = True) -> list[Path]:
    """Where a cache of the dataset at `root` is looked for and written, in order: root/.cache
    (unless `in_dataset` is False), then the user cache folder."""
    return ([root / ".cache"] if in_dataset else []) + [user_cache_dir(root)]


def _read_cache(root: Path, name: str, valid: Callable[[dict], bool]) -> dict | None:
    """The cached `name` (root/.cache, then the user cache) that `valid` accepts, or None: a
    missing, stale or broken cache is simply rebuilt (and written by _write_cache)."""
    for cache_dir in _cache_dirs(root):
        try:
            d = torch.load(cache_dir / name, map_location="cpu", weights_only=True)
            if valid(d):  # may raise too, on a file of another structure
                return d
        except Exception:
            continue
    return None


def _write_cache(root: Path, name: str, payload: dict, in_dataset: bool = True) -> None:
    """`payload` as `name` in the first cache folder that takes it (`_cache_dirs`); none: the
    cache is done without."""
    for cache_dir in _cache_dirs(root, in_dataset):
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
            os.close(fd)
            torch.save(payload, tmp)
            os.replace(tmp, cache_dir / name)  # atomic: readers never see half a file
            return
        except OSError:
            if "tmp" in locals() and os.path.exists(tmp):
                os.remove(tmp)
            continue  # read-only dataset folder: try the user cache, else do without


# Transparent pixels are composited on white, as a web page shows them.
ALPHA_BACKGROUND = 255


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Pixel values of Pillow's 16-bit, 32-bit integer and float modes -> uint8, rounded.

    I;16*: v * 255 / 65535. I (32-bit integers: Pillow's mode for 16-bit PGM/PPM, scaled by
    Pillow to 0..65535, and in older Pillow versions for 16-bit PNG): the same when every value
    is in 0..65535. F (float): [0, 1] times 255 (the float image convention of torchvision,
    scikit-image and OpenCV), else [0, 255] as is. Anything else (32-bit data, negative values)
    has its own min..max stretched to 0..255; no value is ever clipped.
    """
    v = values.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"mode {mode} image with NaN or infinite values")
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scale, offset = 255 / 65535, 0.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    else:
        scale, offset = (255 / (hi - lo) if hi > lo else 0.0), lo
    return np.rint((v - offset) * scale).astype(np.uint8)


def _composite(im: Image.Image, mode: str) -> np.ndarray:
    """An image with transparency as `mode` ("L" or "RGB") uint8, composited on white."""
    rgba = im.convert("RGBA")  # also applies a palette's or colour key's transparency
    colour = np.asarray(rgba.convert(mode), dtype=np.uint32)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.uint32)
    if mode == "RGB":
        alpha = alpha[..., None]
    out = (colour * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def decode_image(path: str | os.PathLike, mode: str = "L") -> np.ndarray:
    """An image file as the 8-bit picture a person sees: (H, W) grayscale or (H, W, 3) RGB.

    The project's one decoder (both data pipelines, download_dataset.py --folder, predict.py),
    so a file means the same everywhere, whatever its mode (docs/DATA.md has the table):
    EXIF orientation applied; 1, L, P, RGB, CMYK, YCbCr, ... by Pillow's conversion (grayscale
    = ITU-R 601-2 luma, as torchvision's Grayscale); 16-bit, 32-bit integer and float images
    scaled to 8 bits (`_to_uint8`), never clipped; transparency (LA, RGBA, PA, a palette's or
    colour key's) composited on white. A file that Pillow cannot open or decode, or that has
    more than 2 * Image.MAX_IMAGE_PIXELS pixels (Pillow's decompression bomb limit: 179 million
    in Pillow 13), raises UnreadableImageError naming it.
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x its limit Pillow warns and decodes: a 108-megapixel phone photo
            # (predict.py) is fine; beyond 2x it raises DecompressionBombError, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
    except Exception as e:  # Pillow raises many types on damaged files; all mean "unreadable"
        reason = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, Image.DecompressionBombError):
            reason = f"too large to decode: {reason}"
        raise UnreadableImageError(f"cannot read image {path} ({reason})") from None
    if im.mode.startswith("I") or im.mode == "F":
        try:
            gray = _to_uint8(np.asarray(im), im.mode)
        except ValueError as e:
            raise UnreadableImageError(f"cannot read image {path} ({e})") from None
        return gray if mode == "L" else np.repeat(gray[..., None], 3, axis=2)
    if im.has_transparency_data:
        return _composite(im, mode)
    return np.asarray(im.convert(mode))


# load_split's advice on an unreadable image; a command without --skip-bad-images gives its own.
SKIP_BAD_IMAGES_HINT = "replace or delete it, or pass --skip-bad-images to skip unreadable images"


def load_split(
    root: str | os.PathLike,
    split: str,
    skip_bad_images: bool = False,
    cache: bool = True,
    cache_in_dataset: bool = True,
) -> SplitData:
    """Decode every image of root/split/<Class>/* once into a uint8 (N, H, W) tensor.

    Every file goes through decode_image (any image mode -> 8-bit grayscale). All images
    of a split must share one size: a mismatch is a DatasetError naming an offending file, never
    a silent resize (FER2013 is 48 x 48 throughout; anything else is a sign of a mixed-up
    folder). The decoded split is cached under root/.cache/ (or, where that cannot be written
    or `cache_in_dataset` is False, in the user cache folder, `user_cache_dir`), keyed by the file
    list, sizes and modification times; both places are read.
    """
    root = Path(root)
    classes, items = _split_listing(root, split)
    key = _cache_key(root, items, skip_bad_images)
    cache_name = f"{split}-{key}.pt"

    def valid(d: dict) -> bool:
        return (
            d["version"] == CACHE_VERSION
            and d["images"].dtype == torch.uint8
            and d["images"].shape[0] == d["targets"].shape[0] == len(d["paths"])
            and len(d["paths"]) + int(d["skipped"]) == len(items)
            and len(d.get("skipped_paths", ())) == int(d["skipped"])
            and list(d["classes"]) == classes
        )

    d = _read_cache(root, cache_name, valid) if cache else None
    if d is not None:
        return SplitData(
            images=d["images"],
            targets=d["targets"],
            classes=classes,
            paths=[str(root / p) for p in d["paths"]],
            skipped=int(d["skipped"]),
            skipped_paths=[str(root / p) for p in d["skipped_paths"]],
        )

    arrays, targets, rels, skipped_rels = [], [], [], []
    for rel, target in items:
        try:
            arr = decode_image(root / rel)
        except UnreadableImageError as e:
            if not skip_bad_images:
                raise UnreadableImageError(f"{e}; {SKIP_BAD_IMAGES_HINT}") from None
            skipped_rels.append(rel)
            continue
        arrays.append(arr)
        targets.append(target)
        rels.append(rel)
    present = set(targets)
    for target, name in enumerate(classes):
        if target not in present:
            raise DatasetError(f"class folder {root / split / name} has no readable images")
    sizes = Counter(a.shape for a in arrays)
    if len(sizes) > 1:
        common = sizes.most_common(1)[0][0]
        odd = next(rel for rel, a in zip(rels, arrays, strict=True) if a.shape != common)
        raise DatasetError(
            f"images in {root / split} differ in size: {root / odd} is "
            f"{arrays[rels.index(odd)].shape[1]}x{arrays[rels.index(odd)].shape[0]}, most are "
            f"{common[1]}x{common[0]}; resize them all to one size (FER2013 is 48x48)"
        )
    images = torch.from_numpy(np.stack(arrays))
    targets_t = torch.tensor(targets, dtype=torch.int64)
    if cache:
        payload = {
            "version": CACHE_VERSION,
            "images": images,
            "targets": targets_t,
            "classes": classes,
            "paths": rels,
            "skipped": len(skipped_rels),
            "skipped_paths": skipped_rels,
        }
        _write_cache(root, cache_name, payload, cache_in_dataset)
    return SplitData(
        images,
        targets_t,
        classes,
        [str(root / r) for r in rels],
        len(skipped_rels),
        [str(root / r) for r in skipped_rels],
    )


def content_hash(root: str | os.PathLike) -> str:
    """sha256 over (relative path, file bytes) of every image under root/{train,val,test}: the
    files the loaders read (hidden and AppleDouble files left out, `is_hidden`)."""
    root = Path(root)
    h = hashlib.sha256()
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        for path in sorted((root / split).rglob("*")):
            if any(is_hidden(part) for part in path.relative_to(root).parts):
                continue
            if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
                h.update(str(path.relative_to(root)).encode() + b"\0")
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def count_images(root: str | os.PathLike) -> dict[str, dict[str, int]]:
    """{split: {class folder: number of images}} for the splits present under root."""
    root = Path(root)
    counts = {}
    for split in SPLITS:
        if (root / split).is_dir():
            counts[split] = {
                d.name: len(_image_files(d))
                for d in sorted((root / split).iterdir())
                if d.is_dir() and not is_hidden(d.name)
            }
    return counts


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    path = Path(root) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def publish_dataset(tmp_dataset: Path, out: Path) -> None:
    """Move a finished dataset folder into place; an old one goes only once the new one is in.

    The caller has checked with check_replaceable that an existing `out` may go.
    """
    out = Path(out).resolve()  # "." or "x/.." have no usable name or parent
    if not out.exists():
        os.replace(tmp_dataset, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / "previous")
    except OSError:
        old.rmdir()
        raise
    try:
        os.replace(tmp_dataset, out)
    except OSError:
        os.replace(old / "previous", out)  # put the old dataset back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(root: str | os.PathLike) -> dict | None:
    try:
        manifest = json.loads((Path(root) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_project_manifest(manifest: dict | None) -> bool:
    """A manifest.json that scripts/download_dataset.py or scripts/make_synthetic.py wrote."""
    return (
        manifest is not None
        and isinstance(manifest.get("counts"), dict)
        and "content_hash" in manifest
    )


def _foreign_files(root: Path, manifest: dict) -> list[Path]:
    """Files under a dataset folder that neither its manifest nor the loaders' cache account
    for: things a user put there, which replacing the folder would delete. Besides the images,
    a manifest's `files` ({relative path: sha256}) lists what else the tool wrote (FER+'s
    votes.csv); such a file counts as the tool's only while its content is unchanged."""
    counts = manifest["counts"]
    written = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    foreign, images = [], Counter()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if path.is_dir() and not path.is_symlink():
            continue
        if "/".join(rel) in written and not path.is_symlink():
            if hashlib.sha256(path.read_bytes()).hexdigest() == written["/".join(rel)]:
                continue
        if rel == ("manifest.json",) or (
            len(rel) == 2
            and rel[0] == ".cache"
            and (rel[1].split("-")[0] in SPLITS or rel[1].endswith(".tmp"))
        ):
            continue  # the loaders' cache (load_split) is the project's too
        if (
            len(rel) == 3
            and rel[1] in counts.get(rel[0], {})
            and path.suffix.lower() in IMG_EXTENSIONS
            and not path.is_symlink()
        ):
            images[rel[:2]] += 1
            if images[rel[:2]] <= counts[rel[0]][rel[1]]:
                continue  # more images than the tool wrote: the extra ones are not its own
        foreign.append(path)
    return foreign


def check_replaceable(out: Path) -> None:
    """DatasetError (the reason, one line) unless an existing `out` may be replaced.

    Replaceable: an empty folder, or a dataset this project's tools wrote (its manifest.json is
    there) holding nothing else. Never a folder of the user's own files, whatever --force says,
    nor the current folder or one holding it.
    """
    out = Path(out)
    if out.is_file() or out.is_symlink():
        raise DatasetError(f"{out} is a file or a link, not a dataset folder; choose another --out")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise DatasetError(
            f"--out {out} is the current folder or holds it; a dataset goes into a folder of "
            f"its own: choose another --out (e.g. FER2013)"
        )
    if not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    if not _is_project_manifest(manifest):
        raise DatasetError(
            f"{out} holds files but no dataset written by this project (no manifest.json of "
            f"scripts/download_dataset.py): it is never replaced, not even with --force; "
            f"choose another --out"
        )
    foreign = _foreign_files(out, manifest)
    if foreign:
        raise DatasetError(
            f"{out} holds {len(foreign)} file(s) that its manifest.json does not list (e.g. "
            f"{foreign[0]}); they are never deleted, not even with --force: move them out of "
            f"{out} or choose another --out"
        )


# --------------------------------------------------------------------------------------------
# Duplicates: the same picture twice, within a split or leaking from training into evaluation
# --------------------------------------------------------------------------------------------
# Two stages over the decoded uint8 arrays (docs/DATA.md has the measurements):
# 1. a perceptual fingerprint per image, pHash's 8 x 8 lowest DCT frequencies without the mean
#    (brightness) term, scaled to unit length (contrast); pairs whose fingerprints have a cosine
#    of FINGERPRINT_SIMILARITY or more are candidates (one matrix product per block of images);
# 2. each candidate pair is verified at full resolution: the correlation of the two images,
#    band-passed (without JPEG's pixel noise and without the face-on-background layout that all
#    faces share), at the best of every shift up to MAX_SHIFT pixels. Pairs at
#    NEAR_DUPLICATE_SIMILARITY or more are near-duplicates; identical pixels are exact ones.
# Binary pHash (imagehash) flips up to 18 of its 64 bits when a 48 x 48 face moves by one pixel,
# so a Hamming threshold loose enough for that also matches unrelated faces (docs/DATA.md).

BLANK_STD = 2.0  # grey levels: flatter images are blank or constant and match no other image
FINGERPRINT_SIMILARITY = 0.95  # stage 1: keeps 1-pixel shifts, brightness and JPEG changes
NEAR_DUPLICATE_SIMILARITY = 0.93  # stage 2: the verified correlation of a near-duplicate
MAX_SHIFT = 1  # pixels in each direction tried by stage 2
_DCT_FREQUENCIES = 8
_BLOCK = 2048  # images per matrix-product block (memory: 2048 x N floats)


@dataclass
class ImageHashes:
    """What the duplicate search needs of N images (`hash_images`)."""

    pixels: list[bytes]  # digest of the decoded pixels: equal digests = identical pictures
    fingerprints: np.ndarray  # (N, 63) float32 unit vectors; zero for blank images
    blank: np.ndarray  # (N,) bool: pixel standard deviation below BLANK_STD
    std: np.ndarray  # (N,) float32 pixel standard deviation


def dct_basis(n: int, k: int) -> np.ndarray:
    """The first k DCT-II basis vectors over n samples, (k, n)."""
    return np.cos(np.pi * (2 * np.arange(n) + 1)[None, :] * np.arange(k)[:, None] / (2 * n))


def hash_images(images: np.ndarray | torch.Tensor) -> ImageHashes:
    """Pixel digests, perceptual fingerprints and blank flags of uint8 images (N, H, W)."""
    images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, h, w = images.shape
    pixels = [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]
    rows = dct_basis(h, _DCT_FREQUENCIES).astype(np.float32)
    cols = dct_basis(w, _DCT_FREQUENCIES).astype(np.float32)
    fingerprints = np.zeros((n, _DCT_FREQUENCIES**2 - 1), np.float32)
    std = np.zeros(n, np.float32)
    for start in range(0, n, _BLOCK):
        x = images[start : start + _BLOCK].astype(np.float32)
        std[start : start + len(x)] = x.reshape(len(x), -1).std(1)
        coefficients = (rows @ x @ cols.T).reshape(len(x), -1)[:, 1:]
        norms = np.linalg.norm(coefficients, axis=1, keepdims=True)
        fingerprints[start : start + len(x)] = coefficients / np.maximum(norms, 1e-6)
    blank = std < BLANK_STD
    fingerprints[blank] = 0.0  # a flat image's fingerprint is noise: it matches nothing
    return ImageHashes(pixels, fingerprints, blank, std)


@functools.lru_cache(maxsize=8)
def _band_pass_matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fine, coarse) blurs along one axis of length n as matrices: [1, 2, 1] / 4 once, and nine
    times (a Gaussian of about 2 pixels), edges repeated."""
    fine = np.zeros((n, n))
    for i in range(n):
        for offset, weight in ((-1, 0.25), (0, 0.5), (1, 0.25)):
            fine[i, min(max(i + offset, 0), n - 1)] += weight
    return fine.astype(np.float32), np.linalg.matrix_power(fine, 9).astype(np.float32)


def _band_pass(images: np.ndarray) -> np.ndarray:
    """Images without their pixel-level noise (JPEG) and without the coarse layout every face
    shares (a bright oval on a background): what is left, the features and texture, is what
    tells two photographs apart."""
    x = images.astype(np.float32)
    fine_rows, coarse_rows = _band_pass_matrices(x.shape[1])
    fine_cols, coarse_cols = _band_pass_matrices(x.shape[2])
    return fine_rows @ x @ fine_cols.T - coarse_rows @ x @ coarse_cols.T


def _best_correlation(a: np.ndarray, b: np.ndarray, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """Pairwise correlation coefficient of a's centre (a border of `max_shift` pixels left out)
    with b's window of the same size, at the best shift."""
    m, (h, w) = max_shift, a.shape[1:]
    centre = a[:, m : h - m, m : w - m]
    centre = centre - centre.mean((1, 2), keepdims=True)
    centre /= np.maximum(np.sqrt((centre**2).sum((1, 2), keepdims=True)), 1e-6)
    pixels = centre.shape[1] * centre.shape[2]
    best = np.full(len(a), -1.0, np.float32)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            window = b[:, m + dy : h - m + dy, m + dx : w - m + dx]
            dot = np.einsum("nij,nij->n", centre, window)  # centre has mean 0: no window mean
            total = window.sum((1, 2))
            spread = np.einsum("nij,nij->n", window, window) - total**2 / pixels
            best = np.maximum(best, dot / np.sqrt(np.maximum(spread, 1e-6)))
    return best


def verified_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stage 2 for pairs of uint8 images (a[k], b[k]): 1 for the same picture, about 0.96 or
    more after a 1-pixel shift, brightening or JPEG re-encoding, 0.3-0.9 for different faces."""
    return _best_correlation(_band_pass(a), _band_pass(b))


class DuplicatePairs(NamedTuple):
    """What `duplicate_pairs` finds: pair k is images[i[k]] and others[j[k]]."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray  # the verified similarity (`verified_similarity`)
    mirrored: np.ndarray  # bool: the copy is mirrored left to right


# A fingerprint of an image mirrored left to right: the DCT's horizontal frequency c changes sign
# with (-1)^c, so mirroring is a sign flip of the odd columns of the 8 x 8 block (no new DCT).
_MIRROR_SIGNS = np.where(np.arange(1, _DCT_FREQUENCIES**2) % _DCT_FREQUENCIES % 2, -1.0, 1.0)
_MIRROR_SIGNS = _MIRROR_SIGNS.astype(np.float32)


def _candidates(mine: np.ndarray, theirs: np.ndarray, within: bool) -> tuple[np.ndarray, ...]:
    """Stage 1: (i, j) whose fingerprints have a cosine of FINGERPRINT_SIMILARITY or more; only
    i < j when `within` (the same images on both sides)."""
    first, second = [], []
    for start in range(0, len(mine), _BLOCK):
        cosine = mine[start : start + _BLOCK] @ theirs.T
        i, j = np.nonzero(cosine >= FINGERPRINT_SIMILARITY)
        i += start
        keep = j > i if within else slice(None)
        first.append(i[keep])
        second.append(j[keep])
    if not first:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(first), np.concatenate(second)


def _verify(
    images: np.ndarray, others: np.ndarray, i: np.ndarray, j: np.ndarray, mirror: bool
) -> np.ndarray:
    """Stage 2 for the pairs (images[i], others[j]), others mirrored when `mirror`: each image
    involved is band-passed once (band-passing commutes with mirroring), pairs scored in blocks."""
    rows, row_of = np.unique(i, return_inverse=True)
    cols, col_of = np.unique(j, return_inverse=True)
    a, b = _band_pass(images[rows]), _band_pass(others[cols])
    if mirror:
        b = np.ascontiguousarray(b[:, :, ::-1])
    scores = np.zeros(len(i), np.float32)
    for k in range(0, len(i), 8192):
        block = slice(k, k + 8192)
        scores[block] = _best_correlation(a[row_of[block]], b[col_of[block]])
    return scores


def duplicate_pairs(
    images: np.ndarray | torch.Tensor,
    hashes: ImageHashes,
    others: np.ndarray | torch.Tensor | None = None,
    other_hashes: ImageHashes | None = None,
    similarity: float = NEAR_DUPLICATE_SIMILARITY,
    mirrored: bool = True,
) -> DuplicatePairs:
    """Every near- or exact-duplicate pair: i in `images`, j in `others`, or i < j within
    `images` when `others` is None; with `mirrored`, also copies mirrored left to right (flipped
    copies are common in scraped face datasets, and flip augmentation makes one a leak). A pair
    that matches as it is is not also reported mirrored. Blank images take part in no pair."""
    images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    within = others is None
    if within:
        others, other_hashes = images, hashes
    others = others.numpy() if isinstance(others, torch.Tensor) else np.asarray(others)
    none = np.zeros(0, int)
    if images.shape[1:] != others.shape[1:]:
        return DuplicatePairs(none, none, np.zeros(0, np.float32), np.zeros(0, bool))
    found, direct = [], None
    for mirror in (False, True) if mirrored else (False,):
        theirs = other_hashes.fingerprints * (_MIRROR_SIGNS if mirror else 1.0)
        i, j = _candidates(hashes.fingerprints, theirs, within)
        if mirror:  # the pairs already found as they are
            again = np.isin(i * len(others) + j, direct)
            i, j = i[~again], j[~again]
        scores = _verify(images, others, i, j, mirror)
        keep = scores >= similarity
        found.append((i[keep], j[keep], scores[keep], np.full(int(keep.sum()), mirror)))
        direct = found[0][0] * len(others) + found[0][1]
    return DuplicatePairs(*(np.concatenate(parts) for parts in zip(*found, strict=True)))


def identical(hashes: ImageHashes, i, other_hashes: ImageHashes, j) -> np.ndarray:
    """Which pairs (i[k], j[k]) are the same pixels."""
    pairs = zip(i, j, strict=True)
    return np.array([hashes.pixels[a] == other_hashes.pixels[b] for a, b in pairs], bool)


# Bump when the duplicate search changes in a way its constants do not show (2: mirrored copies).
OVERLAP_METHOD = 2


def _overlap_key(train: SplitData, others: dict[str, SplitData]) -> str:
    """The duplicate search's inputs: its method and constants, and every split's pixels and
    labels (sha256 of 66 MB for FER2013's train split: 0.04 s, against seconds for the search)."""
    constants = (OVERLAP_METHOD, FINGERPRINT_SIMILARITY, NEAR_DUPLICATE_SIMILARITY, MAX_SHIFT)
    h = hashlib.sha256(f"overlap {constants} {BLANK_STD} {_DCT_FREQUENCIES}\n".encode())
    for name, split in {"train": train, **others}.items():
        images, targets = split.images.contiguous(), split.targets.contiguous()
        h.update(f"{name} {tuple(images.shape)} {len(targets)}\n".encode())
        h.update(memoryview(images.numpy()).cast("B"))
        h.update(memoryview(targets.numpy()).cast("B"))
    return h.hexdigest()[:24]


def overlap_counts(train: SplitData, others: dict[str, SplitData]) -> dict:
    """Per evaluation split: `images`, `exact` (an identical picture is in train), `near` (only
    near-duplicates are, mirrored copies among them), `other_label` (of these, a copy in train
    has another label)."""
    train_hashes = hash_images(train.images)
    counts = {}
    for name, split in others.items():
        hashes = hash_images(split.images)
        i, j = duplicate_pairs(split.images, hashes, train.images, train_hashes)[:2]
        exact = identical(hashes, i, train_hashes, j)
        other_label = split.targets.numpy()[i] != train.targets.numpy()[j]
        n_exact = len(np.unique(i[exact]))
        counts[name] = {
            "images": len(split.targets),
            "exact": n_exact,
            "near": len(np.unique(i)) - n_exact,
            "other_label": len(np.unique(i[other_label])),
        }
    return counts


def split_overlap(
    train: SplitData, others: dict[str, SplitData], root: str | os.PathLike = ""
) -> tuple[dict, str]:
    """overlap_counts and a one-line warning ("" when no evaluation image occurs in train).

    With a dataset folder `root`, the counts are cached beside its decoded splits, keyed by the
    splits' pixels and labels: train.py checks at every start and resume, and the search takes
    seconds (4.3 s for FER2013-sized data on 2 CPU cores, mirrored copies included).
    """
    counts, cached = None, bool(root) and Path(root).is_dir()
    if cached:
        cache_name = f"overlap-{_overlap_key(train, others)}.pt"

        def valid(cached_counts: dict) -> bool:
            fields = {"images", "exact", "near", "other_label"}
            return sorted(cached_counts) == sorted(others) and all(
                set(c) == fields and all(type(v) is int for v in c.values())
                for c in cached_counts.values()
            )

        counts = _read_cache(Path(root), cache_name, valid)
    if counts is None:
        counts = overlap_counts(train, others)
        if cached:
            _write_cache(Path(root), cache_name, counts)
    leaks = [
        f"{c['exact'] + c['near']} of {c['images']} {name}"
        for name, c in counts.items()
        if c["exact"] + c["near"]
    ]
    if not leaks:
        return counts, ""
    conflicts = sum(c["other_label"] for c in counts.values())
    script = Path(__file__).resolve().parent / "scripts" / "audit_dataset.py"
    shown = os.path.relpath(script) if not os.path.relpath(script).startswith("..") else script
    return counts, (
        f"warning: {' and '.join(leaks)} images also occur in train (identical or near copies"
        f"{f', {conflicts} under another label' if conflicts else ''}); list them with: "
        f"python {shlex.quote(str(shown))} {shlex.quote(str(root))}"
    )


# --------------------------------------------------------------------------------------------
# Synthetic faces: a data source for demos and tests (as torchvision.datasets.FakeData)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Augmentation parameters
# --------------------------------------------------------------------------------------------


def _resolve_augment(augment: dict | None) -> dict:
    """Defaults (the official ones) + overrides, in one normalised form.

    hflip/vflip: probability (True -> 0.5, False -> 0); rotation: degrees d (uniform in
    [-d, d]) or a (low, high) pair; crop: "random", "center" or a fixed (top, left).
    """
    aug = dict(DEFAULT_AUGMENT)
    for k, v in (augment or {}).items():
        if k not in aug:
            raise ValueError(f"unknown augment option {k!r}; known: {sorted(aug)}")
        aug[k] = v
    for k in ("hflip", "vflip"):
        v = aug[k]
        aug[k] = 0.5 if v is True else 0.0 if v is False else float(v)
    rot = aug["rotation"]
    aug["rotation"] = (-float(rot), float(rot)) if np.isscalar(rot) else tuple(map(float, rot))
    crop = aug["crop"]
    if not (crop in ("random", "center") or (len(crop) == 2 and all(int(c) == c for c in crop))):
        raise ValueError(f"augment crop must be 'random', 'center' or (top, left), got {crop!r}")
    if not isinstance(crop, str):
        aug["crop"] = (int(crop[0]), int(crop[1]))
    return aug


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes `size`, the aspect ratio is kept."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _center_offset(full: int, crop: int) -> int:
    return int(round((full - crop) / 2.0))  # torchvision's center_crop rounding


def _mix_seed(*values: int) -> int:
    """One 63-bit seed from several ints, stable across platforms and processes."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


# --------------------------------------------------------------------------------------------
# The `pil` pipeline: the official torchvision transforms (the reference)
# --------------------------------------------------------------------------------------------


class RepeatChannels(torch.nn.Module):
    """(1, H, W) -> (n, H, W): the grayscale face on every input channel (official: 3)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.n, 1, 1) if self.n != 1 else x


class FixedCrop(torch.nn.Module):
    """RandomCrop with given offsets: lets tests line the pipelines up exactly."""

    def __init__(self, top: int, left: int, size: int):
        super().__init__()
        self.top, self.left, self.size = top, left, size

    def forward(self, img):
        return TF.crop(img, self.top, self.left, self.size, self.size)


class StackCrops(torch.nn.Module):
    """TenCrop's tuple of PIL crops -> (10, C, S, S) tensor."""

    def __init__(self, per_crop: T.Compose):
        super().__init__()
        self.per_crop = per_crop

    def forward(self, crops):
        return torch.stack([self.per_crop(c) for c in crops])


def pil_transform(mode: str, data_config: DataConfig, augment: dict | None = None) -> T.Compose:
    """The official torchvision transforms (REFERENCE.md section 5) for PIL images.

    train: RandomHorizontalFlip, RandomVerticalFlip, Grayscale, Resize, RandomRotation (nearest,
    fill 0), RandomCrop, ToTensor, repeat channels. val: Grayscale, Resize, CenterCrop (the
    official random crop in validation is a defect not repeated). test: Grayscale, Resize, TenCrop.
    """
    size, resize = data_config.image_size, data_config.resize
    to_tensor = [T.ToTensor(), RepeatChannels(data_config.in_chans)]
    if data_config.mean is not None:
        to_tensor.append(T.Normalize(data_config.mean, data_config.std))
    if mode == "train":
        aug = _resolve_augment(augment)
        if aug["crop"] == "random":
            crop = T.RandomCrop(size)
        elif aug["crop"] == "center":
            crop = T.CenterCrop(size)
        else:
            crop = FixedCrop(*aug["crop"], size)
        return T.Compose(
            [
                T.RandomHorizontalFlip(aug["hflip"]),
                T.RandomVerticalFlip(aug["vflip"]),
                T.Grayscale(),
                T.Resize(resize),
                T.RandomRotation(aug["rotation"], interpolation=T.InterpolationMode.NEAREST),
                crop,
                *to_tensor,
            ]
        )
    if mode == "val":
        return T.Compose([T.Grayscale(), T.Resize(resize), T.CenterCrop(size), *to_tensor])
    if mode == "test":
        return T.Compose(
            [T.Grayscale(), T.Resize(resize), T.TenCrop(size), StackCrops(T.Compose(to_tensor))]
        )
    raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")


class _PilDataset(torch.utils.data.Dataset):
    """Reads the files with decode_image (as the fast pipeline does; for the RGB images that
    torchvision's ImageFolder reads, the same as its RGB then Grayscale) and applies the
    torchvision transforms.

    Items are (index, sample_seed) pairs: each sample's transform runs on a CPU RNG seeded from
    sample_seed, inside fork_rng so the caller's global RNG is left untouched. The result is
    independent of num_workers and of anything else drawn from the global RNG.
    """

    def __init__(self, paths: list[str], targets: torch.Tensor, transform: T.Compose):
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        img = Image.fromarray(decode_image(self.paths[index]))
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed)
            x = self.transform(img)
        return x, self.targets[index]


# --------------------------------------------------------------------------------------------
# The `fast` pipeline: one affine warp per image, one grid_sample per batch
# --------------------------------------------------------------------------------------------


def make_theta(
    src_hw: tuple[int, int],
    resize_hw: tuple[int, int],
    out_size: int,
    top: torch.Tensor,
    left: torch.Tensor,
    angle: torch.Tensor | None = None,
    hflip: torch.Tensor | None = None,
    vflip: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 2, 3) affine_grid thetas reproducing flip -> resize -> rotate -> crop.

    Works backwards from an output pixel (align_corners=False, pixel centres at k + 0.5):
    crop offset -> inverse rotation about the resized image's centre (torchvision/PIL: angle in
    degrees, counter-clockwise) -> inverse resize -> inverse flip -> grid_sample's [-1, 1].
    Composed in float64 on the CPU, so every device gets the same numbers.
    """
    h, w = src_hw
    hr, wr = resize_hw
    b = top.shape[0]
    dt = torch.float64
    top, left = top.to(dt), left.to(dt)
    angle = torch.zeros(b, dtype=dt) if angle is None else angle.to(dt)
    rad = torch.deg2rad(angle)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # Output normalised x -> resized/rotated pixel X = (x + 1) * S / 2 + left, then rotation
    # about c = (wr / 2, hr / 2): P = c + [[cos, -sin], [sin, cos]] (X - c).
    half = out_size / 2.0
    cx, cy = wr / 2.0, hr / 2.0
    tx = half + left - cx  # X - c at x = 0
    ty = half + top - cy
    # P (resized pixels) as an affine function of normalised output (x, y).
    px = torch.stack([cos * half, -sin * half, cx + cos * tx - sin * ty], dim=1)
    py = torch.stack([sin * half, cos * half, cy + sin * tx + cos * ty], dim=1)
    # Resized pixel -> source pixel (scale w / wr) -> normalised source 2 * s / w - 1.
    theta = torch.stack([px * (2.0 / wr), py * (2.0 / hr)], dim=1)
    theta[:, 0, 2] -= 1.0
    theta[:, 1, 2] -= 1.0
    # A flip of the source is a sign change in normalised source coordinates.
    if hflip is not None:
        theta[:, 0] *= torch.where(hflip, -1.0, 1.0).to(dt)[:, None]
    if vflip is not None:
        theta[:, 1] *= torch.where(vflip, -1.0, 1.0).to(dt)[:, None]
    return theta.float()


def _affine_grid(theta: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, 1, out_h, out_w), align_corners=False), as one broadcast add.

    The grid is separable (x part depends on the column, y part on the row); building it with a
    single add is several times faster on CPU than affine_grid's batched matmul.
    """
    dev = theta.device
    xs = (torch.arange(out_w, device=dev, dtype=theta.dtype) + 0.5) * (2.0 / out_w) - 1.0
    ys = (torch.arange(out_h, device=dev, dtype=theta.dtype) + 0.5) * (2.0 / out_h) - 1.0
    col = theta[:, None, :, 0] * xs[None, :, None]  # (B, W, 2)
    row = theta[:, None, :, 1] * ys[None, :, None] + theta[:, None, :, 2]  # (B, H, 2)
    return row[:, :, None, :] + col[:, None, :, :]  # (B, H, W, 2)


def fast_warp(
    images: torch.Tensor, theta: torch.Tensor, out_size: int, mask_outside: bool = True
) -> torch.Tensor:
    """Warp grayscale images (B, H, W) (uint8 or float) by thetas (B, 2, 3) -> (B, 1, S, S).

    Bilinear sampling with border clamping reproduces PIL's resize at the image edges; points
    that fall outside the source after rotation are set to 0 (RandomRotation's fill) with a
    validity mask from a nearest-neighbour sample of ones (cheap: no interpolation weights).
    """
    x = images.unsqueeze(1)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    grid = _affine_grid(theta.to(x.device), out_size, out_size)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask_outside:
        ones = torch.ones((1, 1, 1, 1), device=x.device).expand_as(x)
        valid = F.grid_sample(ones, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out.mul_(valid)
    return out


def _fixed_views_grid(
    src_hw: tuple[int, int], resize_hw: tuple[int, int], size: int, views: list[tuple]
) -> torch.Tensor:
    """One (1, K*S, S, 2) grid holding K fixed views (top, left, hflip) stacked vertically.

    Val/test views are the same for every image, so the batch goes in grid_sample's channel
    dimension and one small grid serves the whole batch.
    """
    top = torch.tensor([v[0] for v in views])
    left = torch.tensor([v[1] for v in views])
    hflip = torch.tensor([v[2] for v in views])
    theta = make_theta(src_hw, resize_hw, size, top, left, hflip=hflip)
    return _affine_grid(theta, size, size).reshape(1, len(views) * size, size, 2)


def ten_crop_views(resize_hw: tuple[int, int], size: int) -> list[tuple[int, int, bool]]:
    """(top, left, hflip) of torchvision's TenCrop: tl, tr, bl, br, centre of the image, then
    the same five of the mirrored image (a mirrored source resized = the resized image mirrored).
    """
    hr, wr = resize_hw
    ct, cl = _center_offset(hr, size), _center_offset(wr, size)
    five = [(0, 0), (0, wr - size), (hr - size, 0), (hr - size, wr - size), (ct, cl)]
    return [(t, l, False) for t, l in five] + [(t, l, True) for t, l in five]


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def balanced_epoch_length(dataset_size: int, num_classes: int, world_size: int) -> int:
    """Images in one epoch of `balanced_order`, over all ranks: the dataset's size rounded up to
    a multiple of classes x ranks, so that every class and every rank gets a whole share."""
    step = num_classes * world_size
    return math.ceil(dataset_size / step) * step


def balanced_order(
    targets: torch.Tensor, seed: int, epoch: int, rank: int, world_size: int
) -> torch.Tensor:
    """This rank's image indices for one epoch of `--sampler balanced`.

    Every class present in `targets` is drawn exactly `balanced_epoch_length / classes` times,
    each draw an image of the class chosen uniformly with replacement; the draws are shuffled and
    rank r takes r::world_size of them. The order depends only on (targets, seed, epoch), the
    same on every rank (the shuffle's rule), so a resumed run draws what it would have drawn.
    """
    counts = torch.bincount(targets)
    present = torch.nonzero(counts)[:, 0]
    length = balanced_epoch_length(len(targets), len(present), world_size)
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch, 2))  # 2: not the shuffle's stream
    by_class = torch.argsort(targets, stable=True)  # image indices, class after class
    first = torch.cumsum(counts, 0) - counts  # where each class starts in by_class
    drawn = present.repeat_interleave(length // len(present))
    # uniform in [0, count): float64 keeps floor(u * count) < count for any dataset size
    within = (torch.rand(length, generator=g, dtype=torch.float64) * counts[drawn]).long()
    order = by_class[first[drawn] + within][torch.randperm(length, generator=g)]
    return order[rank::world_size]


class Loader:
    """Batches of one split for one rank. Iterate for an epoch; call set_epoch(e) before each.

    The epoch's order and augmentation depend only on (seed, epoch, rank). `sampler` "balanced"
    (training only) draws classes equally often (`balanced_order`) instead of every image once.
    """

    def __init__(
        self,
        split: SplitData,
        mode: str,
        batch_size: int,
        data_config: DataConfig,
        device: torch.device,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int,
        world_size: int,
        augment: dict | None,
        sampler: str = "shuffle",
    ):
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.split, self.mode, self.batch_size = split, mode, batch_size
        self.data_config, self.device = data_config, torch.device(device)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.augment = _resolve_augment(augment)
        self.epoch = 0
        self.classes = list(split.classes)
        self.dataset_size = len(split.targets)
        if sampler not in ("shuffle", "balanced") or (sampler == "balanced" and mode != "train"):
            raise ValueError(f"sampler must be 'shuffle' ('balanced' to train), got {sampler!r}")
        self.sampler = sampler
        if sampler == "balanced":
            classes = int((torch.bincount(split.targets) > 0).sum())
            self.num_samples = balanced_epoch_length(self.dataset_size, classes, world_size)
            self.num_samples //= world_size
        elif mode == "train":  # DistributedSampler: pad so every rank gets the same count
            self.num_samples = math.ceil(self.dataset_size / world_size)
        else:  # evaluation: rank r gets r::world_size, every image counted exactly once
            self.num_samples = len(range(rank, self.dataset_size, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in order."""
        if self.sampler == "balanced":
            return balanced_order(
                self.split.targets, self.seed, self.epoch, self.rank, self.world_size
            )
        n = self.dataset_size
        if self.shuffle:  # same permutation on every rank (seed, epoch), like DistributedSampler
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.mode == "train":
            total = self.num_samples * self.world_size
            if total > n:
                order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
            return order[self.rank : total : self.world_size]
        return order[self.rank :: self.world_size]

    def examples(self, indices: list[int]) -> torch.Tensor:
        """Images `indices` of the whole split (any rank's), as this val/test loader's batches
        show them: e.g. a fixed set of faces to picture."""
        if self.mode == "train":
            raise ValueError("examples() gives val/test views; training views are random")
        return self._examples(indices)

    def _aug_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank, 1))

    def _batches(self) -> Iterator[torch.Tensor]:
        idx = self.indices()
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, len(idx)), self.batch_size):
            yield idx[start : start + self.batch_size]


class FastLoader(Loader):
    """The split as uint8 on `device`; each batch warped by one grid_sample call."""

    def __init__(self, split: SplitData, *args, contiguous: bool = False, **kwargs):
        super().__init__(split, *args, **kwargs)
        self.contiguous = contiguous
        self.images = split.images.to(self.device)
        self.targets = split.targets.to(self.device)
        h, w = self.images.shape[1:]
        size = self.data_config.image_size
        self.resize_hw = _resized_hw(h, w, self.data_config.resize)
        hr, wr = self.resize_hw
        if hr < h or wr < w:
            # Shrinking needs PIL's antialiasing, which a bilinear warp lacks: resize the whole
            # split once (antialiased, rounded to uint8 as PIL does); the warp then only crops,
            # flips and rotates at scale 1.
            small = F.interpolate(
                self.images.unsqueeze(1).float(),
                size=(hr, wr),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            self.images = small.round_().clamp_(0, 255).to(torch.uint8).squeeze(1)
            h, w = hr, wr
        self.src_hw = (h, w)
        if self.mode in ("val", "test"):
            if self.mode == "val":
                views = [(_center_offset(hr, size), _center_offset(wr, size), False)]
            else:
                views = ten_crop_views(self.resize_hw, size)
            self.views = len(views)
            grid = _fixed_views_grid(self.src_hw, self.resize_hw, size, views)
            self.view_grid = grid.to(self.device)
            # Only a crop larger than the resized image reaches outside it (CenterCrop pads 0).
            self.view_mask = None
            if hr < size or wr < size:
                ones = torch.ones(1, 1, h, w, device=self.device)
                self.view_mask = F.grid_sample(
                    ones, self.view_grid, "nearest", "zeros", align_corners=False
                )
        cfg = self.data_config
        if cfg.mean is not None:
            self.mean = torch.tensor(cfg.mean, device=self.device)
            self.std = torch.tensor(cfg.std, device=self.device)

    def random_params(self, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Augmentation parameters of `b` training images, drawn from `g` (on the CPU).

        Same distributions as the torchvision transforms: Bernoulli flips, a uniform angle,
        integer crop offsets uniform in [0, resized - size].
        """
        aug, size = self.augment, self.data_config.image_size
        hr, wr = self.resize_hw
        hflip = torch.rand(b, generator=g) < aug["hflip"]
        vflip = torch.rand(b, generator=g) < aug["vflip"]
        lo, hi = aug["rotation"]
        angle = torch.empty(b, dtype=torch.float64).uniform_(lo, hi, generator=g)
        if aug["crop"] == "random":
            top = torch.randint(0, max(hr - size, 0) + 1, (b,), generator=g)
            left = torch.randint(0, max(wr - size, 0) + 1, (b,), generator=g)
        else:
            if aug["crop"] == "center":
                t, l = _center_offset(hr, size), _center_offset(wr, size)
            else:
                t, l = aug["crop"]
            top, left = torch.full((b,), t), torch.full((b,), l)
        return {"hflip": hflip, "vflip": vflip, "angle": angle, "top": top, "left": left}

    def _random_theta(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, bool]:
        p = self.random_params(b, g)
        size = self.data_config.image_size
        hr, wr = self.resize_hw
        theta = make_theta(
            self.src_hw,
            self.resize_hw,
            size,
            p["top"],
            p["left"],
            p["angle"],
            p["hflip"],
            p["vflip"],
        )
        # The validity mask is only needed when a view can leave the image.
        top, left = p["top"], p["left"]
        inside = self.augment["rotation"] == (0.0, 0.0) and bool(
            (top >= 0).all()
            and (left >= 0).all()
            and (top <= hr - size).all()
            and (left <= wr - size).all()
        )
        return theta, not inside

    def _to_model_channels(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 1, S, S) in [0, 1] -> repeated to in_chans, then normalised."""
        cfg = self.data_config
        shape = list(x.shape)
        shape[-3] = cfg.in_chans
        # The channel repeat is a broadcast view: materialising 3 identical planes costs more
        # than the warp itself on a CPU, and the first convolution reads the view as it is.
        x = x.expand(shape)
        if cfg.mean is not None:
            view = [-1, 1, 1]
            x = (x - self.mean.view(view)) / self.std.view(view)
        elif self.contiguous:
            x = x.contiguous()
        return x

    def _epoch_plan(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
        """The epoch's index batches and warps, on the device, made before its first batch.

        The random numbers are drawn on the CPU in batch order, as batch-by-batch drawing would;
        the whole epoch then crosses to the device in two copies. Copying each batch's indices
        and warp from pageable memory would wait for the GPU twice a step, so the host could
        never queue the next step while the GPU works on this one.
        """
        batches = list(self._batches())
        sizes = [len(idx) for idx in batches]
        if not batches:
            return [], [], []
        all_idx = torch.cat(batches).to(self.device, non_blocking=True)
        if self.mode != "train":
            return list(all_idx.split(sizes)), [None] * len(sizes), [False] * len(sizes)
        g = self._aug_generator()
        thetas, outside = [], []
        for b in sizes:
            theta, out = self._random_theta(b, g)
            thetas.append(theta)
            outside.append(out)
        all_theta = torch.cat(thetas)
        if self.device.type == "cuda":
            all_theta = all_theta.pin_memory()
        all_theta = all_theta.to(self.device, non_blocking=True)
        return list(all_idx.split(sizes)), list(all_theta.split(sizes)), outside

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.data_config.image_size
        for idx, theta, outside in zip(*self._epoch_plan(), strict=True):
            imgs, targets = self.images[idx], self.targets[idx]
            if self.mode == "train":
                x = fast_warp(imgs, theta, size, mask_outside=outside)
            else:
                x = self._fixed_views(imgs)
            yield self._to_model_channels(x), targets

    def _fixed_views(self, imgs: torch.Tensor) -> torch.Tensor:
        """val/test: (B, H, W) uint8 -> (B, 1, S, S) or (B, 10, 1, S, S) in [0, 1].

        The views are the same for every image: batch in the channel dimension, all views
        stacked in one grid, one grid_sample call: (1, B, K*S, S).
        """
        size = self.data_config.image_size
        src = imgs.unsqueeze(0).float().div_(255.0)
        x = F.grid_sample(src, self.view_grid, "bilinear", "border", align_corners=False)
        if self.view_mask is not None:
            x = x * self.view_mask
        x = x.view(imgs.shape[0], self.views, 1, size, size)
        return x[:, 0] if self.mode == "val" else x

    def _examples(self, indices: list[int]) -> torch.Tensor:
        idx = torch.tensor(indices, dtype=torch.int64, device=self.device)
        return self._to_model_channels(self._fixed_views(self.images[idx]))


class PilLoader(Loader):
    """The reference: torchvision transforms per image in a DataLoader."""

    def __init__(self, split: SplitData, *args, num_workers: int = 0, **kwargs):
        super().__init__(split, *args, **kwargs)
        self.num_workers = num_workers
        transform = pil_transform(self.mode, self.data_config, self.augment)
        self.dataset = _PilDataset(split.paths, split.targets, transform)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        g = self._aug_generator()
        sample_seeds = torch.randint(0, 2**62, (len(idx),), generator=g).tolist()
        items = list(zip(idx.tolist(), sample_seeds, strict=True))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=items,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
            # Worker seeds are irrelevant (each sample is seeded), but keep them reproducible.
            generator=torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank)),
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _examples(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.dataset[(i, 0)][0] for i in indices]).to(self.device)


def build_loader(
    root: str | os.PathLike,
    split: str,
    *,
    mode: str,
    pipeline: str = "fast",
    batch_size: int = 64,
    data_config: DataConfig | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    shuffle: bool | None = None,
    drop_last: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    skip_bad_images: bool = False,
    augment: dict | None = None,
    contiguous: bool = False,
    cache: bool = True,
    sampler: str = "shuffle",
) -> Loader:
    """Batches (images float32 on `device`, targets int64 on `device`) of root/split.

    mode "train": official augmentation, (B, C, S, S); "val": resize + centre crop,
    (B, C, S, S); "test": TenCrop, (B, 10, C, S, S). Values in [0, 1], then normalised if
    data_config has mean/std. In the fast pipeline the C channels are a broadcast view of one
    plane unless `contiguous` (or normalisation) materialises them. num_workers applies to the
    pil pipeline only. rank/world_size shard the split (train: padded like DistributedSampler;
    val/test: rank r gets r::world_size, so every image is counted once). sampler "balanced"
    (mode "train"): every class equally often per epoch (`balanced_order`).
    """
    data_config = data_config or DataConfig()
    if shuffle is None:
        shuffle = mode == "train"
    data = load_split(root, split, skip_bad_images=skip_bad_images, cache=cache)
    common = dict(
        mode=mode,
        batch_size=batch_size,
        data_config=data_config,
        device=torch.device(device),
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
        augment=augment,
        sampler=sampler,
    )
    if pipeline == "fast":
        return FastLoader(data, contiguous=contiguous, **common)
    if pipeline == "pil":
        return PilLoader(data, num_workers=num_workers, **common)
    raise ValueError(f"pipeline must be 'fast' or 'pil', got {pipeline!r}")


def denormalize(images: torch.Tensor, data_config: DataConfig) -> torch.Tensor:
    """Undo the mean/std normalisation (for visualisation); identity when there is none."""
    if data_config.mean is None:
        return images
    shape = [1] * (images.dim() - 3) + [-1, 1, 1]
    mean = torch.tensor(data_config.mean, device=images.device).view(shape)
    std = torch.tensor(data_config.std, device=images.device).view(shape)
    return images * std + mean
