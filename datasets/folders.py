"""Dataset folders: class names, `DataConfig`, layout checks, decoding and its cache, `load_split`.

Layout: ``root/{train,val,test}/<Class>/<image>`` (what scripts/download_dataset.py writes, and
``make_synthetic``). Every image goes through one decoder (`decode_image`); a split is decoded
once into a uint8 tensor and cached on disk. docs/DATA.md explains the rules.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Official folder names; sorted, so index i is what torchvision's ImageFolder (and therefore the
# official trainer's checkpoints) calls class i.
CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
SPLITS = ("train", "val", "test")
# fer2013.csv's `emotion` codes, which are NOT alphabetical.
FER2013_CSV_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
FER2013_SPLIT_SIZES = {"train": 28709, "val": 3589, "test": 3589}

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 2  # 2: decode_image (16-bit scaled, alpha on white, EXIF orientation)

# FER+'s training modes (Barsoum et al. 2016; Microsoft's FERPlus train.py -m): what the training
# split's targets are. All but majority come with SOFT_LABELS, one distribution per training
# image; `LABEL_TARGETS` says what the training loader yields in each (build_loader's `targets`).
SOFT_LABELS = "soft_labels.csv"
LABEL_TARGETS = {
    "majority": "label",  # the folder's class
    "probability": "draw",  # one class drawn from the image's distribution, anew every epoch
    "crossentropy": "soft",  # the distribution itself
    "multi_target": "soft",  # the distribution; the loss takes its non-zero classes as targets
}
SOFT_SUM_TOLERANCE = 1e-6

# The official training transforms (REFERENCE.md section 5) for 224 input.
OFFICIAL_RESIZE = 236
OFFICIAL_CROP = 224

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
    soft_targets: torch.Tensor | None = None  # float32 (N, classes): `read_soft_labels`


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


def check_dataset(
    root: str | os.PathLike, splits: tuple[str, ...] = SPLITS, min_classes: int = 2
) -> list[str]:
    """Validate the layout of `splits` under `root`; return the class list (alphabetical).

    Missing split or class folders, a class present in some splits only, an empty class
    folder, or fewer than `min_classes` classes raise DatasetError naming the path. The commands
    that train, score or benchmark a classifier on a dataset call it with the default 2 before
    they read it (train.py, evaluate.py, scripts/benchmark.py data); `load_split`, which only
    decodes, takes a single class too.
    """
    root = Path(root)
    scans = {split: _scan_split(root, split) for split in splits}
    classes = sorted(set().union(*scans.values()))
    if len(classes) < min_classes:  # one class: every prediction right, a meaningless 100 %
        raise DatasetError(
            f"{root} has {len(classes)} class folder ({', '.join(classes)}) per split; a "
            "classifier needs at least 2"
        )
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
    classes = check_dataset(root, present, min_classes=1)
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


def read_soft_labels(root: str | os.PathLike, data: SplitData) -> torch.Tensor:
    """root/soft_labels.csv as a float32 (N, classes) tensor, row i the distribution of
    `data`'s image i (the training split's).

    Validated, each problem a DatasetError naming the file and row: the header is `path` then
    `data.classes`; every row names an image of the split (relative to root, `/`-separated),
    each image exactly once; its values are finite, non-negative and sum to 1 within
    SOFT_SUM_TOLERANCE. A row of an image skipped as unreadable is allowed (and unused).
    """
    root = Path(root)
    path = root / SOFT_LABELS
    rel = {Path(p).relative_to(root).as_posix(): i for i, p in enumerate(data.paths)}
    skipped = {Path(p).relative_to(root).as_posix() for p in data.skipped_paths}
    soft = torch.full((len(rel), len(data.classes)), float("nan"), dtype=torch.float64)
    seen: set[str] = set()
    want = ["path", *data.classes]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != want:
                raise DatasetError(
                    f"{path}: header {','.join(header or [])[:120]!r} is not "
                    f"{','.join(want)!r} (path, then the dataset's classes in order)"
                )
            for line, fields in enumerate(reader, start=2):
                where = f"{path}: line {line}"
                if len(fields) != len(want):
                    raise DatasetError(f"{where} has {len(fields)} fields, expected {len(want)}")
                name = fields[0]
                if name in seen:
                    raise DatasetError(f"{where}: {name} has a row already; one row per image")
                seen.add(name)
                if name in skipped:
                    continue
                if name not in rel:
                    raise DatasetError(f"{where}: {name} is not an image of {root / 'train'}")
                try:
                    values = [float(v) for v in fields[1:]]
                except ValueError:
                    values = [math.nan]
                if not all(math.isfinite(v) and v >= 0 for v in values) or not (
                    abs(sum(values) - 1) <= SOFT_SUM_TOLERANCE
                ):
                    raise DatasetError(
                        f"{where}: {name}'s probabilities {','.join(fields[1:])[:80]} must be "
                        f"finite, non-negative and sum to 1 (within {SOFT_SUM_TOLERANCE:g})"
                    )
                soft[rel[name]] = torch.tensor(values, dtype=torch.float64)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not a readable CSV file: {e}") from None
    missing = [name for name in rel if name not in seen]
    if missing:
        raise DatasetError(
            f"{path} has no row for {len(missing)} training image(s), e.g. {missing[0]}; every "
            f"training image needs one (rebuild it with scripts/download_dataset.py)"
        )
    return soft.float()
