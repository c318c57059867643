"""The FER benchmarks beside FER2013's own CSV, from the files their owners distribute.

download_dataset.py turns each into the project's layout, `OUT/{train,val,test}/<Class>/`:

- FER+ (Barsoum et al. 2016): 10 annotators' votes for each row of fer2013.csv
  (`fer2013new.csv`), labelled by the authors' majority rule (`ferplus_majority`).
- RAF-DB basic, AffectNet (the CSV release and the images/annotations release), ExpW and CK+:
  `read_rafdb`, `read_affectnet`, `read_expw`, `read_ckplus` check a folder as its owners lay it
  out and return a `Plan` (which image goes to which split and class, cropped by which face box,
  and what the manifest should record); `split_plan` carves the splits a dataset does not ship
  (validation from train, stratified and seeded; ExpW's and CK+'s folds that never divide a
  photo or a subject); `write_plan` crops, converts to 8-bit grayscale (`datasets.decode_image`),
  resizes and writes the images, in parallel.

Every mistake a user can make (a wrong folder, a malformed label line, a missing image) is a
DatasetError naming the file and what to do; with --skip-bad-images a malformed label entry or a
missing or unreadable image is skipped and counted instead. A face listed twice is imported
once, or, where its entries disagree (label, box, split), left out (`drop_repeats`).
docs/DATA.md gives each format, with the details that are uncertain.
"""

from __future__ import annotations

import concurrent.futures
import csv
import os
import signal
import urllib.error
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets import (
    CLASSES,
    KNOWN_CLASSES,
    DatasetError,
    UnreadableImageError,
    decode_image,
    is_hidden,
)


def visible(paths, root: Path) -> list[Path]:
    """`paths` under `root` without hidden files and folders, among them macOS's AppleDouble
    `._name` files and `__MACOSX` folders (datasets.is_hidden), sorted: a `._0001.png` beside
    every frame of a copied CK+ would otherwise be read as a frame."""
    return sorted(
        p for p in paths if not any(is_hidden(part) for part in p.relative_to(root).parts)
    )


# --------------------------------------------------------------------------------------------
# FER+: labels for fer2013.csv's images
# --------------------------------------------------------------------------------------------

FERPLUS_URL = "https://raw.githubusercontent.com/microsoft/FERPlus/master/fer2013new.csv"
FERPLUS_VOTES = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
    "unknown", "NF",
)  # fmt: skip
# The classes of the first eight vote columns; the last two (unknown, not a face) are no class.
FERPLUS_CLASSES = ("Neutral", "Happy", "Surprise", "Sad", "Angry", "Disgust", "Fear", "Contempt")
UNKNOWN, NOT_A_FACE = 8, 9
FERPLUS_ANNOTATORS = 10  # each image's votes: no column can hold more (and int64 holds them)
# Why a row of fer2013.csv is not in FER+ (majority mode), in the order the rule checks.
FERPLUS_DROPPED = ("no image name", "no majority", "majority unknown", "majority not a face")


@dataclass
class FerPlusVotes:
    """fer2013new.csv, one entry per row of fer2013.csv."""

    usage: list[str]  # Training, PublicTest, PrivateTest
    names: list[str]  # FER+'s image name ("fer0000000.png"); "" where FER+ dropped the image
    votes: np.ndarray  # (rows, 10) int64: FERPLUS_VOTES


def read_ferplus(path: Path) -> FerPlusVotes:
    """fer2013new.csv, validated: its header, 12 fields a row, votes integers 0..10."""
    usage, names, votes = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path} is empty; expected FER+'s fer2013new.csv") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetError(f"{path} is not a readable CSV file: {e}") from None
        want = ["usage", "image name", *(c.lower() for c in FERPLUS_VOTES)]
        if [h.strip().lower() for h in header] != want:
            raise DatasetError(
                f"{path}: header {','.join(header)[:120]!r} is not fer2013new.csv's "
                f"(Usage,Image name,{','.join(FERPLUS_VOTES)}); pass FER+'s label file"
            )
        row = -1
        try:
            for row, fields in enumerate(reader):
                where = f"{path}: row {row} (line {row + 2})"
                if len(fields) != len(want):
                    raise DatasetError(f"{where} has {len(fields)} fields, expected {len(want)}")
                try:
                    counts = [int(v) for v in fields[2:]]
                except ValueError:
                    counts = [-1]
                if min(counts) < 0 or max(counts) > FERPLUS_ANNOTATORS:
                    raise DatasetError(
                        f"{where}: votes must be non-negative integers of at most "
                        f"{FERPLUS_ANNOTATORS} (FER+ has {FERPLUS_ANNOTATORS} annotators an "
                        f"image), got {','.join(fields[2:])[:80]}"
                    )
                usage.append(fields[0].strip())
                names.append(fields[1].strip())
                votes.append(counts)
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: row {row + 1} is not valid CSV: {e}") from None
    if not votes:
        raise DatasetError(f"{path} has a header but no rows")
    return FerPlusVotes(usage, names, np.array(votes, dtype=np.int64))


def ferplus_majority(votes: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """FER+'s majority labels (Barsoum et al. 2016; `_process_data` of the authors' ferplus.py):
    each row's vote column 0..7 (FERPLUS_CLASSES), or -1 with the reason it is dropped.

    A single vote for an emotion is an outlier and removed; the top emotion is the label when it
    holds more than half of the remaining votes, else the image has no majority; an image whose
    majority is unknown or not-a-face is dropped, as is a row without an image name.
    """
    kept = np.where(votes > 1, votes, 0)
    top = kept.argmax(1)  # unique wherever it is a majority: two equal tops cannot both be
    majority = 2 * kept.max(1) > kept.sum(1)
    labels = np.where(majority & (top < UNKNOWN), top, -1)
    labels[[i for i, name in enumerate(names) if not name]] = -1
    reasons = []
    for name, has_majority, column in zip(names, majority.tolist(), top.tolist(), strict=True):
        if not name:
            reasons.append(FERPLUS_DROPPED[0])
        elif not has_majority:
            reasons.append(FERPLUS_DROPPED[1])
        elif column == UNKNOWN:
            reasons.append(FERPLUS_DROPPED[2])
        elif column == NOT_A_FACE:
            reasons.append(FERPLUS_DROPPED[3])
        else:
            reasons.append("")
    return labels, reasons


FERPLUS_MODES = ("majority", "probability", "crossentropy", "multi_target")
MULTI_TARGET_SHARE = 0.3  # multi_target: every emotion with at least 30 % of the votes


def ferplus_distribution(counts: list[int], mode: str) -> list[float] | None:
    """One row's target in a FER+ training mode, as Microsoft's ferplus.py `_process_data` makes
    it and `load_folders` keeps it: the 8 emotions' probabilities (vote columns 0..7, summing to
    1), or None where the image is not used (the rule discards it, or its top column is unknown
    or not-a-face). Votes of 1 are outliers and removed first, in every mode.

    majority: the top emotion, when it has more than half of the votes. probability and
    crossentropy: the top vote counts, taken largest first (all tied columns at once) while they
    hold under 75 % of the votes and fewer than 3 columns; kept when they hold more than half
    and are at most 3 columns; an unknown or not-a-face column reached stops the taking (and is
    left out when emotions were taken before it). multi_target: every column with at least 30 %
    of the votes, kept when they hold more than half.
    """
    raw = [c if c > 1 else 0 for c in counts]
    total = sum(raw)
    taken = [0] * len(raw)
    if mode == "majority":
        top = max(raw)
        if 2 * top > total:
            taken[raw.index(top)] = top
    elif mode in ("probability", "crossentropy"):
        left, share, columns = list(raw), 0, 0
        while 4 * share < 3 * total and columns < 3:  # under 75 % of the votes, under 3 columns
            top = max(left)
            tied = [i for i, c in enumerate(left) if c == top]
            stop = next((i for i in tied if i >= UNKNOWN), None)
            for i in tied if stop is None else [i for i in tied if i <= stop]:
                taken[i], left[i] = top, 0
                share, columns = share + top, columns + 1
            if stop is not None:
                if sum(taken) > top:  # emotions came first: unknown/not-a-face is no target
                    taken[stop], columns = 0, columns - 1
                break
        if columns > 3:
            taken = [0] * len(raw)
    elif mode == "multi_target":
        taken = [c if c >= MULTI_TARGET_SHARE * total else 0 for c in raw]
    else:
        raise ValueError(f"unknown FER+ mode {mode!r}; expected one of {FERPLUS_MODES}")
    kept = sum(taken)
    if 2 * kept <= total or kept == 0 or taken.index(max(taken)) >= UNKNOWN:
        return None
    emotions = taken[:UNKNOWN]
    return [c / sum(emotions) for c in emotions]


def check_ferplus_rows(votes: FerPlusVotes, usages: list[str], csv_path, votes_path) -> None:
    """fer2013new.csv must be fer2013.csv's companion, row for row: same length, same Usage."""
    if len(votes.usage) != len(usages):
        raise DatasetError(
            f"{votes_path} has {len(votes.usage):,} rows but {csv_path} has {len(usages):,}: FER+ "
            f"labels fer2013.csv row for row (35,887 rows in both); use the matching files"
        )
    for row, (theirs, ours) in enumerate(zip(votes.usage, usages, strict=True)):
        if theirs != ours:
            raise DatasetError(
                f"row {row}: {csv_path} says {ours} but {votes_path} says {theirs}; the two "
                f"files are not row for row the same release of FER2013"
            )


def check_ferplus_labels(labels: np.ndarray, usages: list[str], votes_path) -> None:
    """The images the majority rule keeps must make a dataset train.py accepts (every split
    with images, the same classes in each): else a DatasetError, before anything is written."""
    classes = {usage: set() for usage in dict.fromkeys(usages)}
    for label, usage in zip(labels.tolist(), usages, strict=True):
        if label >= 0:
            classes[usage].add(FERPLUS_CLASSES[label])
    every = set().union(*classes.values())
    for usage, found in classes.items():
        missing = sorted(every - found)
        if not found or missing:
            what = "gets a label" if not found else f"is labelled {', '.join(missing)}"
            raise DatasetError(
                f"{votes_path}: by FER+'s majority rule no {usage} row {what}, but train.py "
                f"needs every split (Training, PublicTest, PrivateTest) to hold every class; "
                f"nothing was written: use FER+'s own fer2013new.csv"
            )


def fetch_url(url: str, dest: Path) -> Path:
    """`url` downloaded to `dest` (streamed, with a progress bar on a terminal); any failure, a
    short read among them, is a DatasetError naming the URL."""
    request = urllib.request.Request(url, headers={"User-Agent": "EmoNeXt download_dataset.py"})
    written, expected = 0, None
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as f:
            expected = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=expected, unit="B", unit_scale=True, disable=None, desc=url) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError is a URLError
        raise DatasetError(f"could not download {url}: {e}") from None
    if expected is not None and written != expected:
        raise DatasetError(f"could not download {url}: got {written} of {expected} bytes")
    return dest


def ferplus_file(spec: str, work: Path | None = None) -> Path:
    """--ferplus: a URL (downloaded into `work`), a fer2013new.csv, or a folder holding one."""
    if "://" in spec:
        if work is None:
            raise ValueError("a URL needs a folder to download into")
        return fetch_url(spec, work / "fer2013new.csv")
    path = Path(spec)
    if path.is_dir():
        found = visible(path.rglob("fer2013new.csv"), path)
        if not found:
            raise DatasetError(f"--ferplus {path}: no fer2013new.csv in this folder")
        return found[0]
    if not path.is_file():
        raise DatasetError(f"--ferplus {path}: no such file; pass fer2013new.csv or its URL")
    return path


# --------------------------------------------------------------------------------------------
# Plans: which image goes where
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One face to write: `source` cropped by `box`, as `<split>/<label>/<name>.<format>`."""

    source: Path
    label: str  # a canonical class name (datasets.KNOWN_CLASSES)
    name: str  # the output file's stem, unique within its split and class
    box: tuple[float, float, float, float] | None = None  # left, top, right, bottom; None: all
    group: str = ""  # the photo or subject: the split rules never divide a group


@dataclass
class Plan:
    """A dataset as read: its samples by split ("train"/"test" as shipped, or "all" where the
    owners define no split) and what its manifest records (`info`)."""

    dataset: str
    splits: dict[str, list[Sample]]
    info: dict = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)  # reason -> label entries not imported
    crop_scale: float = 1.0  # a box's side is scaled by this (CK+'s landmark boxes are tight)
    skip_bad_lines: bool = False  # --skip-bad-images: a malformed label entry is skipped

    def bad_line(self, where: str, why: str) -> None:
        """A label entry that cannot be used: a DatasetError naming it and --skip-bad-images,
        or with that flag skipped and counted in `dropped`."""
        if not self.skip_bad_lines:
            raise DatasetError(f"{where}: {why}; fix it, or pass --skip-bad-images to skip it")
        self.dropped["malformed label entry (--skip-bad-images)"] += 1


def _find(
    root: Path, pattern: str | tuple[str, ...], what: str, hint: str, kind: str = "file"
) -> Path:
    """`root/pattern` (or one of the patterns, the names copies give it), or the same up to
    three folders down (an archive's top folder, RAF-DB's `basic/`): the first match in sorted
    order; else a DatasetError saying what to pass."""
    patterns = (pattern,) if isinstance(pattern, str) else pattern
    for depth in range(4):
        for name in patterns:
            found = [
                p
                for p in visible(root.glob("/".join(["*"] * depth + [name])), root)
                if (p.is_file() if kind == "file" else p.is_dir())
            ]
            if found:
                return found[0]
    names = " or ".join(patterns)
    raise DatasetError(f"{root} is not {what}: no {names} in it or below it; {hint}")


def _code(value) -> int | None:
    """A label code written as an integer ('3', '3.0', 3.0 in a .npy), else None."""
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of a text label file's non-empty lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


# ---- RAF-DB basic: Image/aligned/{train,test}_NNNNN_aligned.jpg + EmoLabel/list_patition_label.txt

RAFDB_CLASSES = {
    1: "Surprise",
    2: "Fear",
    3: "Disgust",
    4: "Happy",
    5: "Sad",
    6: "Angry",
    7: "Neutral",
}
RAFDB_LABELS = "EmoLabel/list_patition_label.txt"  # sic: the owners' spelling


def read_rafdb(root: Path, skip_bad_lines: bool = False, originals: bool = False) -> Plan:
    """RAF-DB's basic emotions: the 100 x 100 aligned faces, the official train/test partition
    (the image name's prefix), labels 1-7 (RAFDB_CLASSES). A name may carry the `_aligned` of
    the image file (some copies list those) or not. `originals` (download_dataset.py --faces):
    the full photos of Image/original/ instead, each with the face box of
    Annotation/boundingbox/ where there is one (it picks the face YuNet found)."""
    hint = "pass RAF-DB's basic/ folder (EmoLabel/ and Image/aligned/ inside)"
    label_file = _find(root, RAFDB_LABELS, "RAF-DB basic", hint)
    base = label_file.parent.parent
    folder = "original" if originals else "aligned"
    aligned = base / "Image" / folder
    if not aligned.is_dir():
        raise DatasetError(
            f"{base} has {RAFDB_LABELS} but no Image/{folder}/ folder; extract "
            f"Image/{folder}.zip there"
        )
    plan = Plan("RAF-DB", {"train": [], "test": []}, skip_bad_lines=skip_bad_lines)
    for number, fields in _lines(label_file):
        where = f"{label_file}: line {number}"
        code = _code(fields[-1])
        if len(fields) < 2 or code not in RAFDB_CLASSES:
            plan.bad_line(where, f"expected 'train_00001.jpg 5' (a label 1-7): {fields}")
            continue
        stem = Path(fields[0]).stem.removesuffix("_aligned")
        split = stem.split("_")[0]
        if split not in plan.splits:
            plan.bad_line(where, f"image name {fields[0]!r} starts neither train_ nor test_")
            continue
        if originals:
            box = _rafdb_box(base / "Annotation" / "boundingbox" / f"{stem}_boundingbox.txt")
            sample = Sample(aligned / f"{stem}.jpg", RAFDB_CLASSES[code], stem, box)
        else:
            sample = Sample(aligned / f"{stem}_aligned.jpg", RAFDB_CLASSES[code], stem)
        plan.splits[split].append(sample)
    plan.info = {
        "labels": str(label_file.relative_to(root)),
        "images": f"Image/{folder}" + (" (faces found by YuNet)" if originals else " (100 x 100)"),
        "split": "official train/test; val carved from train",
    }
    return plan


def _rafdb_box(path: Path) -> tuple[float, float, float, float] | None:
    """A face box of RAF-DB's Annotation/boundingbox/ ('left top right bottom'), or None where
    the file is missing or is not four finite numbers making a box."""
    try:
        values = [float(v) for v in path.read_text().split()]
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if len(values) != 4 or not np.all(np.isfinite(values)):
        return None
    left, top, right, bottom = values
    return (left, top, right, bottom) if right > left and bottom > top else None


# ---- AffectNet

# Expression codes 0..7 of both releases; 8 None, 9 Uncertain, 10 No-Face are no class.
AFFECTNET_CLASSES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Angry", "Contempt")
AFFECTNET_OTHER = {8: "None", 9: "Uncertain", 10: "No-Face"}
AFFECTNET_COLUMNS = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
# The lists' names: the owners' and those of copies that renamed them.
AFFECTNET_LISTS = ("training.csv", "Manually_training.csv")
AFFECTNET_HINT = (
    "pass the folder holding Manually_Annotated_file_lists/{training,validation}.csv and "
    "Manually_Annotated_Images/, or train_set/ and val_set/ (images/, annotations/)"
)


def _affectnet_label(code: int, classes: int, plan: Plan) -> str | None:
    """The class of an expression code under the 7- or 8-class protocol; None (counted in
    `plan.dropped`) for the codes that are no class there."""
    if code in AFFECTNET_OTHER:
        plan.dropped[f"expression {code} ({AFFECTNET_OTHER[code]})"] += 1
        return None
    if code == 7 and classes == 7:
        plan.dropped["expression 7 (Contempt; 7-class protocol)"] += 1
        return None
    return AFFECTNET_CLASSES[code]


def _affectnet_csv(path: Path, images: Path, split: str, classes: int, plan: Plan) -> None:
    """One of the CSV release's lists: a header row (some copies of validation.csv have none:
    then the columns are AFFECTNET_COLUMNS in order), one face a row, its box in pixels."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    col = {c.lower(): i for i, c in enumerate(AFFECTNET_COLUMNS)}
    start = 0
    if rows and rows[0] and rows[0][0].strip().lower() == "subdirectory_filepath":
        col, start = {c.strip().lower(): i for i, c in enumerate(rows[0])}, 1
    needed = [
        "subdirectory_filepath",
        "face_x",
        "face_y",
        "face_width",
        "face_height",
        "expression",
    ]
    missing = [c for c in needed if c not in col]
    if missing:
        raise DatasetError(
            f"{path}: header lacks column(s) {missing}; expected {AFFECTNET_COLUMNS}"
        )
    for row in range(start, len(rows)):
        fields = rows[row]
        if not fields:
            continue
        where = f"{path}: line {row + 1}"
        if len(fields) <= max(col[c] for c in needed):
            plan.bad_line(where, f"only {len(fields)} fields: {','.join(fields)[:100]!r}")
            continue
        rel = fields[col["subdirectory_filepath"]].strip()
        box = [fields[col[c]].strip() for c in needed[1:5]]
        try:
            x, y, w, h = (float(v) for v in box)
        except ValueError:
            x = y = w = h = float("nan")
        code = _code(fields[col["expression"]])
        if not rel:
            plan.bad_line(where, "no file name")
        elif not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            plan.bad_line(
                where,
                f"face box (face_x, face_y, face_width, face_height) {','.join(box)!r} is "
                "not four numbers with a positive width and height",
            )
        elif code is None or not 0 <= code <= 10:
            plan.bad_line(where, f"expression {fields[col['expression']]!r} is not a code 0..10")
        elif (label := _affectnet_label(code, classes, plan)) is not None:
            name = str(Path(rel).with_suffix("")).replace("/", "_").replace("\\", "_")
            plan.splits[split].append(Sample(images / rel, label, name, (x, y, x + w, y + h)))


def _affectnet_npy(folder: Path, split: str, classes: int, plan: Plan) -> None:
    """One folder of the images/annotations release: images/N.jpg, annotations/N_exp.npy (the
    expression code, stored as a string or a number); the faces are already cropped."""
    jpegs = visible((folder / "images").iterdir(), folder)
    for image in (p for p in jpegs if p.suffix.lower() == ".jpg" and p.is_file()):
        annotation = folder / "annotations" / f"{image.stem}_exp.npy"
        try:
            value = np.load(annotation, allow_pickle=False).item()
        except (OSError, ValueError, EOFError) as e:
            plan.bad_line(str(annotation), f"cannot read the expression of {image.name}: {e}")
            continue
        code = _code(value)  # '3', 3 or '3.0', as copies store it
        if code is None or not 0 <= code <= 10:
            plan.bad_line(str(annotation), f"expression {value!r} is not a code 0..10")
        elif (label := _affectnet_label(code, classes, plan)) is not None:
            plan.splits[split].append(Sample(image, label, image.stem))


def read_affectnet(root: Path, classes: int = 8, skip_bad_lines: bool = False) -> Plan:
    """AffectNet's manually annotated faces under the 7-class (no Contempt) or 8-class protocol:
    the official validation set is the test set (the test set was never released); crops by the
    face box of the CSV release."""
    plan = Plan("AffectNet", {"train": [], "test": []}, skip_bad_lines=skip_bad_lines)
    try:
        train_csv = _find(root, AFFECTNET_LISTS, "AffectNet", AFFECTNET_HINT)
    except DatasetError:
        train_csv = None
    if train_csv is not None:
        val_csv = train_csv.with_name(train_csv.name.replace("training", "validation"))
        if not val_csv.is_file():
            raise DatasetError(f"{train_csv} has no {val_csv.name} beside it")
        images = _find(root, "Manually_Annotated_Images", "AffectNet", AFFECTNET_HINT, "dir")
        _affectnet_csv(train_csv, images, "train", classes, plan)
        _affectnet_csv(val_csv, images, "test", classes, plan)
        plan.info = {
            "release": "CSV (Manually_Annotated_file_lists, Manually_Annotated_Images)",
            "crop": "face box of the CSV",
        }
    else:
        train = _find(root, "train_set/annotations", "AffectNet", AFFECTNET_HINT, "dir").parent
        val = train.parent / "val_set"
        for folder in (train, val):
            if not (folder / "images").is_dir() or not (folder / "annotations").is_dir():
                raise DatasetError(f"{folder} needs images/ and annotations/; {AFFECTNET_HINT}")
        _affectnet_npy(train, "train", classes, plan)
        _affectnet_npy(val, "test", classes, plan)
        plan.info = {
            "release": "images/annotations (train_set, val_set)",
            "crop": "none (the release's faces are cropped)",
        }
    plan.info.update(
        protocol=f"{classes} classes",
        split="official validation set as test; val carved from train",
    )
    return plan


# ---- ExpW: image/origin/*.jpg + label/label.lst

EXPW_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")  # codes 0..6


def read_expw(root: Path, skip_bad_lines: bool = False) -> Plan:
    """ExpW (Zhang et al. 2018): label.lst lines `image_name face_id top left right bottom
    confidence expression`, faces cropped by their box; no official split ("all")."""
    hint = "pass the folder holding label/label.lst and image/origin/"
    label_file = _find(root, "label.lst", "ExpW", hint)
    images = _find(root, "origin", "ExpW", hint, "dir")
    plan = Plan("ExpW", {"all": []}, skip_bad_lines=skip_bad_lines)
    for number, fields in _lines(label_file):
        where = f"{label_file}: line {number}"
        try:
            face_id, top, left, right, bottom = (int(float(v)) for v in fields[1:6])
            code = int(fields[7])
        except (IndexError, ValueError, OverflowError):
            code = -1
        if len(fields) != 8 or not 0 <= code < len(EXPW_CLASSES):
            plan.bad_line(
                where,
                "expected 'image_name face_id top left right bottom confidence "
                f"expression(0-6)': {' '.join(fields)[:100]!r}",
            )
        elif bottom <= top or right <= left:
            plan.bad_line(
                where,
                f"face box top {top} left {left} right {right} bottom {bottom} is "
                "empty: bottom must be below top and right beyond left",
            )
        else:
            name, box = f"{Path(fields[0]).stem}_{face_id}", (left, top, right, bottom)
            sample = Sample(images / fields[0], EXPW_CLASSES[code], name, box, fields[0])
            plan.splits["all"].append(sample)
    plan.info = {
        "labels": str(label_file.relative_to(root)),
        "crop": "face box of label.lst",
        "split": "none official: folds by photo",
    }
    return plan


# ---- CK+: cohn-kanade-images/S005/001/*.png + Emotion/S005/001/S005_001_00000011_emotion.txt

CKPLUS_CLASSES = {
    1: "Angry",
    2: "Contempt",
    3: "Disgust",
    4: "Fear",
    5: "Happy",
    6: "Sad",
    7: "Surprise",
}  # 0 (neutral) labels no sequence
LANDMARK_MARGIN = 1.25  # the 68 landmarks span brows to chin: a margin keeps the forehead


def _landmark_box(path: Path) -> tuple[float, float, float, float] | None:
    """The bounding box of a CK+ landmarks file (68 lines 'x y'), or None without one."""
    try:
        points = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError):
        return None
    if points.shape[1] != 2 or not len(points):
        return None
    (left, top), (right, bottom) = points.min(0), points.max(0)
    return float(left), float(top), float(right), float(bottom)


def read_ckplus(
    root: Path, last_frames: int = 3, neutral: bool = False, skip_bad_lines: bool = False
) -> Plan:
    """CK+ (Lucey et al. 2010): the `last_frames` frames up to the peak of each labelled
    sequence (its Emotion file names the peak), cropped by the landmarks where the Landmarks
    folder has them, else to the frame's centred square; with `neutral`, also each labelled
    sequence's first frame as Neutral."""
    hint = "pass the folder holding cohn-kanade-images/ and Emotion/ (and Landmarks/)"
    frames_root = _find(root, "cohn-kanade-images", "CK+", hint, "dir")
    emotion_root = _find(root, ("Emotion", "Emotion_labels"), "CK+", hint, "dir")
    try:
        landmarks = _find(root, "Landmarks", "CK+", hint, "dir")
    except DatasetError:
        landmarks = None
    plan = Plan("CK+", {"all": []}, crop_scale=LANDMARK_MARGIN, skip_bad_lines=skip_bad_lines)
    samples, cropped = plan.splits["all"], 0
    for emotion in visible(emotion_root.glob("*/*/*_emotion.txt"), emotion_root):
        subject, sequence = emotion.parent.parent.name, emotion.parent.name
        try:
            value = float(emotion.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            value = -1.0
        if value not in CKPLUS_CLASSES:
            plan.bad_line(str(emotion), "expected one emotion code 1-7 (e.g. 3.0000000e+00)")
            continue
        peak = emotion.name.removesuffix("_emotion.txt")
        folder = frames_root / subject / sequence
        frames = [f for f in visible(folder.glob("*.png"), frames_root) if f.is_file()]
        stems = [f.stem for f in frames]
        if peak not in stems:
            plan.bad_line(str(emotion), f"names frame {peak}, which is not in {folder}")
            continue
        end = stems.index(peak) + 1
        chosen = [(f, CKPLUS_CLASSES[int(value)]) for f in frames[max(0, end - last_frames) : end]]
        if neutral and end > last_frames:
            chosen.append((frames[0], "Neutral"))
        for frame, label in chosen:
            box = None
            if landmarks is not None:
                box = _landmark_box(landmarks / subject / sequence / f"{frame.stem}_landmarks.txt")
            cropped += box is not None
            samples.append(Sample(frame, label, frame.stem, box, subject))
    if not samples and not plan.dropped:
        raise DatasetError(f"{emotion_root} has no S*/NNN/*_emotion.txt files; {hint}")
    plan.info = {
        "frames": f"last {last_frames} of each labelled sequence"
        + (", first frame as Neutral" if neutral else ""),
        "crop": f"{cropped} of {len(samples)} frames by their landmarks (margin "
        f"{LANDMARK_MARGIN}), the others to their centred square",
        "split": "folds by subject",
    }
    return plan


REPEATED = "repeated entry (identical: its face imported once)"
CONFLICTING = "face listed with different labels, boxes or splits (all its entries)"


def drop_repeats(plan: Plan) -> list[str]:
    """A face listed more than once (the same image file and name; ExpW's name holds the face
    id) is imported once where the entries agree; where they differ in label, box or split, all
    of them are left out and counted, so that no face lands in two classes or two splits.
    Returns the names of the faces left out."""
    entries: dict[tuple[Path, str], list[tuple[str, Sample]]] = {}
    for split, samples in plan.splits.items():
        for s in samples:
            entries.setdefault((s.source, s.name), []).append((split, s))
    conflicting = set()
    for key, found in entries.items():
        if any(entry != found[0] for entry in found):
            plan.dropped[CONFLICTING] += len(found)
            conflicting.add(key)
        elif len(found) > 1:
            plan.dropped[REPEATED] += len(found) - 1
    for split, samples in plan.splits.items():
        kept, seen = [], set(conflicting)
        for s in samples:
            if (s.source, s.name) not in seen:
                seen.add((s.source, s.name))
                kept.append(s)
        plan.splits[split] = kept
    return sorted(name for _, name in conflicting)


def drop_missing(plan: Plan, skip: bool) -> list[str]:
    """The samples whose image file is missing (or is no regular file: a folder, a pipe) leave
    the plan before any split is carved (a carved split must not lose them afterwards): a
    DatasetError naming the first, or with `skip` (--skip-bad-images) the list of them."""
    missing = []
    for split, samples in plan.splits.items():
        present = [s.source.is_file() for s in samples]
        missing += [str(s.source) for s, ok in zip(samples, present, strict=True) if not ok]
        plan.splits[split] = [s for s, ok in zip(samples, present, strict=True) if ok]
    if missing and not skip:
        raise DatasetError(
            f"{len(missing)} image(s) that the labels list are missing or no regular files, "
            f"e.g. {missing[0]}; "
            f"restore them, or pass --skip-bad-images to skip them"
        )
    return missing


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

# carve_stratified seeds each class's draw with its index here: FER2013's seven keep the indices
# they had before Contempt was known, so a --folder copy carves the same validation split.
SEED_ORDER = CLASSES + [c for c in KNOWN_CLASSES if c not in CLASSES]


def carve_stratified(by_class: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """({class: items} left, {class: items} carved): round(fraction * n) items of each class
    (at least 1, never all), drawn by a generator seeded with (seed, the class's index)."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction must be in (0, 1), got {fraction}")
    kept, carved = {}, {}
    for class_id, name in enumerate(SEED_ORDER):
        if name not in by_class:
            continue
        items = by_class[name]
        order = np.random.default_rng([seed, class_id]).permutation(len(items))
        k = min(max(1, round(fraction * len(items))), len(items) - 1)
        chosen = set(order[:k].tolist())
        carved[name] = [x for i, x in enumerate(items) if i in chosen]
        kept[name] = [x for i, x in enumerate(items) if i not in chosen]
    return kept, carved


def _by_class(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.label, []).append(s)
    return out


def group_folds(samples: list[Sample], folds: int, seed: int) -> list[int]:
    """Each sample's fold, 0..folds-1: folds stratified by class that never divide a group
    (scikit-learn's StratifiedGroupKFold, shuffled with `seed`)."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = sorted({s.group for s in samples})
    if len(groups) < folds:
        raise DatasetError(
            f"{len(groups)} photos or subjects cannot make {folds} folds; pass a smaller --folds"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = [0] * len(samples)
    labels = [s.label for s in samples]
    index = {g: i for i, g in enumerate(groups)}
    group_ids = [index[s.group] for s in samples]
    with warnings.catch_warnings():  # "the least populated class has fewer members than folds"
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(samples)), labels, group_ids)):
            for i in test:
                fold_of[i] = k
    return fold_of


def split_plan(
    plan: Plan, val_fraction: float, seed: int, folds: int = 10, fold: int = 0
) -> tuple[dict[str, dict[str, list[Sample]]], dict]:
    """{split: {class: samples}} for train/val/test, and how they were made (for the manifest).

    A dataset shipped as train/test gets a validation split carved from train (stratified,
    seeded, as --folder does); one without a split ("all": ExpW, CK+) is divided into `folds`
    folds by photo or subject: fold `fold` is the test set, the next one the validation set.
    """
    if "all" not in plan.splits:
        train, val = carve_stratified(_by_class(plan.splits["train"]), val_fraction, seed)
        out = {"train": train, "val": val, "test": _by_class(plan.splits["test"])}
        rule = {
            "val": "carved from train",
            "fraction": val_fraction,
            "seed": seed,
            "stratified": True,
        }
        return out, rule
    samples = plan.splits["all"]
    fold_of = group_folds(samples, folds, seed)
    split_of = {fold: "test", (fold + 1) % folds: "val"}
    out = {"train": {}, "val": {}, "test": {}}
    groups: dict[str, set] = {"train": set(), "val": set(), "test": set()}
    for sample, k in zip(samples, fold_of, strict=True):
        split = split_of.get(k, "train")
        out[split].setdefault(sample.label, []).append(sample)
        groups[split].add(sample.group)
    labels = {s.label for s in samples}
    for split, classes in out.items():
        missing = [c for c in KNOWN_CLASSES if c in labels and c not in classes]
        if missing:
            raise DatasetError(
                f"fold {fold} of {folds} leaves {split} without {', '.join(missing)} images; "
                f"every split needs every class: pass fewer --folds or another --fold or --seed"
            )
    unit = "subjects" if plan.dataset == "CK+" else "photos"
    rule = {
        "folds": folds,
        "test_fold": fold,
        "val_fold": (fold + 1) % folds,
        "seed": seed,
        "by": unit,
        "stratified": True,
        unit: {s: sorted(g) for s, g in groups.items()}
        if unit == "subjects"
        else {s: len(g) for s, g in groups.items()},
    }
    return out, rule


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def square_crop(
    image: np.ndarray, box: tuple[float, float, float, float] | None, scale: float = 1.0
) -> np.ndarray:
    """The square of side max(width, height) * scale centred on `box`, moved inside the image
    (and cut to it where the image is smaller), so faces keep their aspect ratio; without a
    box, the image's centred square (a 640 x 490 CK+ frame would be squeezed otherwise)."""
    height, width = image.shape[:2]
    if box is None:
        side = min(height, width)
        y0, x0 = (height - side) // 2, (width - side) // 2
        return image[y0 : y0 + side, x0 : x0 + side]
    left, top, right, bottom = box
    if right <= 0 or bottom <= 0 or left >= width or top >= height or right <= left:
        raise ValueError(f"face box {box} lies outside the {width}x{height} image")
    side = max(right - left, bottom - top) * scale
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0 = int(round(min(max(cx - side / 2, 0), max(width - side, 0))))
    y0 = int(round(min(max(cy - side / 2, 0), max(height - side, 0))))
    x1, y1 = min(width, x0 + max(1, round(side))), min(height, y0 + max(1, round(side)))
    return image[y0:y1, x0:x1]


def save_image(array: np.ndarray, path: Path, fmt: str) -> None:
    """PNG (lossless) or JPEG at PIL's default quality 75, as the official script writes them."""
    image = Image.fromarray(array)
    if fmt == "png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=75)


NO_FACE = "no face found"  # _write_one's answer for a photo without one (--faces)
_DETECTORS: dict = {}  # a writer process's YuNet, made once per face pipeline


def write_face(source: Path, box, target: Path, fmt: str, faces: dict) -> str:
    """download_dataset.py --faces: the face of the photo `source` that `box` (left, top,
    right, bottom, or None: the highest-scoring) picks, framed by the face pipeline `faces`
    (models.faces.face_crops, as predict.py frames it), written to `target`; "" when written,
    NO_FACE where there is none, else why the photo could not be read."""
    from models.faces import FacePipeline, YuNetDetector, face_crops, pick_face

    pipeline = FacePipeline(**faces)
    if pipeline not in _DETECTORS:
        _DETECTORS[pipeline] = YuNetDetector.of(pipeline)
    try:
        rgb = decode_image(source, "RGB")
    except UnreadableImageError as e:
        return str(e)
    if box is not None:
        box = (box[0], box[1], box[2] - box[0], box[3] - box[1])
    found = pick_face(face_crops(rgb, pipeline, _DETECTORS[pipeline]), box)
    if found is None:
        return NO_FACE
    save_image(found.crop, target, fmt)
    return ""


def _write_one(task: tuple) -> str:
    """Decode, crop, resize and write one face; "" when written, else why it could not be."""
    source, box, scale, target, size, fmt, faces = task
    if faces is not None:
        return write_face(source, box, target, fmt, faces)
    try:
        face = square_crop(decode_image(source), box, scale)
    except (UnreadableImageError, ValueError) as e:
        return f"{source}: {e}" if isinstance(e, ValueError) else str(e)
    if face.shape != (size, size):
        # Pillow's bilinear filter widens with the scale factor: antialiased when shrinking.
        face = np.asarray(Image.fromarray(face).resize((size, size), Image.Resampling.BILINEAR))
    save_image(face, target, fmt)
    return ""


def write_plan(
    splits: dict[str, dict[str, list[Sample]]],
    dest: Path,
    fmt: str,
    size: int,
    workers: int = 1,
    skip_bad_images: bool = False,
    scale: float = 1.0,
    faces: dict | None = None,
    no_face: list[str] | None = None,
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Every sample as a `size` x `size` 8-bit grayscale image in dest/<split>/<class>/, with
    `workers` processes; ({split: {class: images written}}, the unreadable ones skipped).
    `faces` (download_dataset.py --faces): a face pipeline's dict that finds and frames each
    face (`write_face`) instead of the dataset's box; the photos without one are appended to
    `no_face`."""
    tasks, where = [], []
    for split, classes in splits.items():
        for name, samples in classes.items():
            folder = dest / split / name
            folder.mkdir(parents=True)
            seen = set()
            for s in samples:
                if s.name in seen:
                    raise DatasetError(f"two {split} images of {name} would be named {s.name}")
                seen.add(s.name)
                target = folder / f"{s.name}.{fmt}"
                tasks.append((s.source, s.box, scale, target, size, fmt, faces))
                where.append((split, name))
    expected: dict[str, dict[str, int]] = {s: Counter() for s in splits}
    skipped: list[str] = []
    # A process costs its start-up: at least 64 images for each (tiny datasets run in-process).
    with _executor(min(workers, -(-len(tasks) // 64))) as pool:
        results = pool.map(_write_one, tasks, chunksize=64)
        progress = tqdm(results, total=len(tasks), disable=None, unit="img", desc="writing")
        try:
            for (split, name), task, error in zip(where, tasks, progress, strict=True):
                if not error:
                    expected[split][name] += 1
                elif error == NO_FACE and no_face is not None:
                    no_face.append(str(task[0]))
                elif skip_bad_images:
                    skipped.append(error)
                else:
                    raise UnreadableImageError(f"{error}; fix it, or pass --skip-bad-images")
        except BaseException:  # an error or Ctrl-C: stop now, not after the queued images
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    for split, classes in splits.items():
        for name in classes:
            if not expected[split][name]:
                why = "YuNet found no face in any" if faces else "all were skipped"
                raise DatasetError(f"no readable {split} image of {name} ({why})")
    return {s: dict(c) for s, c in expected.items()}, skipped


class _InProcess:
    """concurrent.futures' interface without processes (workers <= 1: no start-up cost)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(fn, items, chunksize: int = 1):
        return map(fn, items)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


def _executor(workers: int):
    if workers <= 1:
        return _InProcess()
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, initializer=_leave_signals)


def _leave_signals() -> None:
    """A writer process ignores Ctrl-C (the terminal sends it to every process of the group) and
    SIGTERM: the main process stops the pool and removes what was written, in one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers() -> int:
    """Processes that write images: the cores this process may use, at most 8 (beyond that the
    disk, not the decoding, sets the pace)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, usable or 1))
