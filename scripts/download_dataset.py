"""Get FER2013, FER+ or another FER benchmark into OUT/{train,val,test}/<Class>/<name>.png.

    python scripts/download_dataset.py --csv fer2013.csv            # or the Kaggle fer2013.tar.gz
    python scripts/download_dataset.py --gdrive FILE_ID_OR_URL      # a Drive copy (csv/tar/zip)
    python scripts/download_dataset.py --kaggle                     # needs Kaggle API credentials
    python scripts/download_dataset.py --folder path/to/images      # an extracted image-folder copy
    python scripts/download_dataset.py --csv fer2013.csv --ferplus fer2013new.csv   # FER+
    python scripts/download_dataset.py --rafdb RAF-DB/basic      # or --affectnet, --expw, --ckplus

FER2013: PublicTest becomes val and PrivateTest test, as in the official script; class folders
carry the official names (Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise) and files the CSV
row index. --ferplus relabels the same images with Microsoft's FER+ votes (a file or its URL;
alone, the authors' GitHub copy) by the authors' majority rule, adds Contempt, names files as
FER+ does and keeps every row's 10 votes in votes.csv; --ferplus-mode probability, crossentropy
or multi_target keeps the training images of that mode of Microsoft's code and writes their
distributions to soft_labels.csv, which train.py trains on. --rafdb, --affectnet, --expw and
--ckplus read those datasets as their owners distribute them (scripts/importers.py), crop faces
by their boxes and write --image-size grayscale squares; val is carved from train (stratified,
seeded) or, for ExpW and CK+, which ship no split, --fold of --folds folds that never divide a
photo or a subject is the test set and the next fold val. Images are PNG (lossless) unless
--format jpg. --faces yunet [--align] finds the faces in the full photos instead (--folder of
photos, RAF-DB's Image/original/, AffectNet, ExpW, CK+) and frames them with the face pipeline
predict.py uses (models/faces/: one face a photo, the dataset's box picking it by overlap; the
photos without one listed in no_face.txt); the manifest records the pipeline, and so does every
checkpoint trained on the dataset.
The dataset is built in a temporary folder next to --out and renamed into place at the end, so an
interrupted (SIGTERM, Ctrl-C: one line) or failed run leaves nothing behind; --out is locked
while a conversion runs (`.OUT.lock` beside it), so a second one into it is refused; a
manifest.json records the source, settings, counts and a content hash, and a second run with the
same source finds it and does nothing.
--force replaces a dataset that this tool wrote (its manifest.json is there), and only once the
new one is complete; a folder holding anything else is never replaced. Every image goes through
datasets.decode_image: 16-bit, colour and transparent images become the 8-bit grayscale a person
sees. docs/DATA.md describes each dataset, its format, licence, split rule and counts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importers  # noqa: E402

from datasets import (  # noqa: E402
    FER2013_CSV_CLASSES,
    FER2013_SPLIT_SIZES,
    IMG_EXTENSIONS,
    KNOWN_CLASSES,
    SOFT_LABELS,
    SPLITS,
    DatasetError,
    UnreadableImageError,
    canonical_class_name,
    check_dataset,
    check_replaceable,
    content_hash,
    count_images,
    decode_image,
    is_hidden,
    publish_dataset,
    read_manifest,
    write_manifest,
)
from utils import (  # noqa: E402
    ArgumentParser,
    CLIError,
    RunLock,
    fault_point,
    file_sha256,
    made_folders_removed_if_empty,
    run_command,
)

KAGGLE_COMPETITION = "challenges-in-representation-learning-facial-expression-recognition-challenge"
KAGGLE_FILE = "fer2013.tar.gz"
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
PIXELS = 48 * 48
# Folder names used by common image-folder copies for each split.
SPLIT_SYNONYMS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "publictest": "val",
    "public_test": "val",
    "test": "test",
    "testing": "test",
    "privatetest": "test",
    "private_test": "test",
}
KAGGLE_HELP = (
    "no Kaggle API credentials found. Create a token at https://www.kaggle.com/settings "
    "('Create New Token'), save it as ~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME "
    "and KAGGLE_KEY; accept the competition rules at https://www.kaggle.com/c/"
    f"{KAGGLE_COMPETITION}/rules. Without Kaggle: --gdrive ID_OR_URL, --csv fer2013.csv or "
    "--folder PATH"
)


# The other benchmarks: source flag -> dataset name (scripts/importers.py reads each).
BENCHMARKS = {"rafdb": "RAF-DB", "affectnet": "AffectNet", "expw": "ExpW", "ckplus": "CK+"}
DEFAULT_OUT = {"FER2013": "FER2013", "FERPlus": "FERPlus", "RAF-DB": "RAF-DB",
               "AffectNet": "AffectNet", "ExpW": "ExpW", "CK+": "CKPlus"}  # fmt: skip
# Output side of the written squares: RAF-DB's aligned faces are 100 x 100; 112 keeps AffectNet's
# 287,651 training faces at 3.6 GB once decoded (datasets.load_split holds a split in memory).
DEFAULT_IMAGE_SIZE = {"RAF-DB": 100, "AffectNet": 112, "ExpW": 112, "CK+": 112}
# --folder --faces: side of the written squares, as the benchmarks' photos get.
FOLDER_FACE_SIZE = 112
# Flags that only some sources take: dest -> (the datasets it applies to, its default).
SOURCE_FLAGS = {
    "image_size": (("RAF-DB", "AffectNet", "ExpW", "CK+"), None),
    "workers": (("RAF-DB", "AffectNet", "ExpW", "CK+"), None),
    "affectnet_classes": (("AffectNet",), 8),
    "folds": (("ExpW", "CK+"), 10),
    "fold": (("ExpW", "CK+"), 0),
    "last_frames": (("CK+",), 3),
    "ckplus_neutral": (("CK+",), False),
}


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="download_dataset.py",
        description="Download or convert FER2013, FER+, RAF-DB, AffectNet, ExpW or CK+ into "
        "OUT/{train,val,test}/<Class>/ (docs/DATA.md).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--kaggle",
        action="store_true",
        help="the official competition file via the Kaggle API (needs credentials)",
    )
    src.add_argument(
        "--gdrive",
        metavar="ID_OR_URL",
        help="a Google Drive file id or URL (any URL gdown can fetch) of fer2013.csv, "
        "the Kaggle fer2013.tar.gz, or a zip/tar of image folders",
    )
    src.add_argument(
        "--csv", metavar="PATH", help="a local fer2013.csv or the .tar.gz/.zip holding it"
    )
    src.add_argument(
        "--folder",
        metavar="PATH",
        help="an extracted image-folder copy (train/[val/]test/<class>/*); without a val folder "
        "a stratified validation split is carved from train",
    )
    src.add_argument(
        "--rafdb", metavar="DIR", help="RAF-DB basic (EmoLabel/, Image/aligned/), or its archive"
    )
    src.add_argument(
        "--affectnet",
        metavar="DIR",
        help="AffectNet: the CSV release (Manually_Annotated_file_lists/, "
        "Manually_Annotated_Images/) or the train_set/, val_set/ release, or its archive",
    )
    src.add_argument(
        "--expw", metavar="DIR", help="ExpW (label/label.lst, image/origin/), or its archive"
    )
    src.add_argument(
        "--ckplus",
        metavar="DIR",
        help="CK+ (cohn-kanade-images/, Emotion/, optionally Landmarks/), or its archive",
    )
    parser.add_argument(
        "--ferplus",
        nargs="?",
        const=importers.FERPLUS_URL,
        default=None,
        metavar="PATH_OR_URL",
        help="with --csv/--gdrive/--kaggle: label fer2013.csv's images with FER+'s votes "
        "(fer2013new.csv, a local file or a URL; without a value the authors' GitHub copy) by "
        "the authors' majority rule: 8 classes, Contempt added (default --out FERPlus)",
    )
    parser.add_argument(
        "--ferplus-mode",
        choices=importers.FERPLUS_MODES,
        default="majority",
        help="with --ferplus: which training images to keep and their targets, as Microsoft's "
        "FERPlus train.py -m (Barsoum et al. 2016): majority (default), probability, "
        "crossentropy or multi_target; the last three also write soft_labels.csv, which "
        "train.py trains on; val and test stay majority-labelled (docs/DATA.md)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: FER2013, FERPlus, RAF-DB, AffectNet, ExpW or CKPlus)",
    )
    parser.add_argument(
        "--format",
        choices=["png", "jpg"],
        default="png",
        help="png: lossless (default); jpg: the official script's layout (lossy)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="--folder without val, --rafdb, --affectnet: fraction of each train class moved "
        "to val (default 0.1)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the carved validation split and of ExpW's and CK+'s folds (default 0)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="RAF-DB, AffectNet, ExpW, CK+ and --folder --faces: side of the written squares "
        "(default: 100 for RAF-DB, its aligned size; 112 for the others)",
    )
    parser.add_argument(
        "--affectnet-classes",
        type=int,
        choices=[7, 8],
        default=None,
        help="AffectNet protocol: 8 classes (default) or 7 (Contempt left out)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="ExpW, CK+: folds stratified by class that never divide a photo (ExpW) or a "
        "subject (CK+) (default 10)",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        help="ExpW, CK+: the fold that is the test set; the next one is val (default 0)",
    )
    parser.add_argument(
        "--last-frames",
        type=int,
        default=None,
        help="CK+: frames up to the peak of each labelled sequence (default 3)",
    )
    parser.add_argument(
        "--ckplus-neutral",
        action="store_true",
        default=None,
        help="CK+: also the first frame of each labelled sequence, as Neutral",
    )
    parser.add_argument(
        "--faces",
        choices=["yunet"],
        default=None,
        help="--folder of photos, RAF-DB (its Image/original/), AffectNet, ExpW, CK+: find each "
        "face with YuNet and frame it by the face pipeline predict.py uses (models/faces/), "
        "instead of the dataset's box; the manifest and every checkpoint trained on it record "
        "the pipeline (default: the dataset's own boxes or faces)",
    )
    parser.add_argument(
        "--align",
        action="store_true",
        help="with --faces: map each face's 5 landmarks onto a template by a similarity",
    )
    parser.add_argument(
        "--box-scale",
        type=float,
        default=None,
        help="with --faces: crop side over YuNet's box (default 1.15, predict.py's framing)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="RAF-DB, AffectNet, ExpW, CK+: processes that decode and write images (default: "
        "the usable cores, at most 8)",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="--folder and the benchmarks: skip unreadable or missing images and malformed "
        "label entries (counted in the manifest) instead of failing",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a dataset that this tool wrote earlier in --out (from another source, "
        "other settings or modified); a folder of other files is never replaced",
    )
    return parser


# --------------------------------------------------------------------------------------------
# Sources -> a fer2013.csv text stream or an image-folder root
# --------------------------------------------------------------------------------------------


def _file_kind(path: Path) -> str:
    """'zip', 'tar' (any compression) or 'csv', by content rather than by name."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    return "csv"


def _extract(path: Path, kind: str, dest: Path) -> None:
    dest.mkdir(parents=True)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                z.extractall(dest)
        else:
            with tarfile.open(path) as t:
                t.extractall(dest, filter="data")  # refuses absolute paths and links out
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DatasetError(f"cannot extract {path}: {e}") from None


def _has_split_folders(root: Path) -> bool:
    return any(d.is_dir() and d.name.lower() in SPLIT_SYNONYMS for d in root.iterdir())


def locate(path: Path, work: Path, depth: int = 0) -> tuple[str, Path]:
    """Find ('csv', fer2013.csv) or ('folder', root of split folders) in a file or folder,
    extracting archives (also archives inside archives, as Kaggle serves them) into `work`."""
    if path.is_file():
        kind = _file_kind(path)
        if kind == "csv":
            return "csv", path
        if depth > 3:
            raise DatasetError(f"{path}: archives nested too deep")
        dest = work / f"extracted-{depth}-{path.name}"
        _extract(path, kind, dest)
        return locate(dest, work, depth + 1)
    csvs = [p for p in importers.visible(path.rglob("fer2013.csv"), path) if p.is_file()] or [
        p for p in importers.visible(path.rglob("*.csv"), path) if p.is_file()
    ]  # a folder or a pipe named x.csv is no CSV
    if csvs:
        return "csv", csvs[0]
    everything = importers.visible(path.rglob("*"), path)
    for root in [path, *(p for p in everything if p.is_dir())]:
        if _has_split_folders(root):
            return "folder", root
    archives = [p for p in everything if p.is_file() and _file_kind(p) != "csv"]
    if archives:
        return locate(archives[0], work, depth + 1)
    raise DatasetError(f"found neither fer2013.csv nor train/test image folders in {path}")


def fetch_gdrive(id_or_url: str, work: Path) -> Path:
    import gdown  # in requirements.txt; imported here so the other sources do not need it

    out = work / "gdrive-download"
    kwargs = {"url": id_or_url} if "://" in id_or_url else {"id": id_or_url}
    try:
        path = gdown.download(output=str(out), quiet=False, **kwargs)
    except Exception as e:  # gdown raises many kinds; all mean "could not download"
        raise DatasetError(f"could not download {id_or_url} with gdown: {e}") from None
    if not path or not out.is_file() or out.stat().st_size == 0:
        raise DatasetError(f"could not download {id_or_url} with gdown (no file came back)")
    return out


def kaggle_credentials_present() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file()


def fetch_kaggle(work: Path) -> Path:
    # Check first: old kaggle versions authenticate (and may exit) on import.
    if not kaggle_credentials_present():
        raise DatasetError(KAGGLE_HELP)
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise DatasetError(
            "the kaggle package is not installed: pip install kaggle (or use --gdrive, --csv "
            "or --folder)"
        ) from None
    dest = work / "kaggle-download"
    dest.mkdir()
    try:
        api = KaggleApi()
        api.authenticate()
        api.competition_download_file(KAGGLE_COMPETITION, KAGGLE_FILE, path=str(dest), quiet=False)
    except Exception as e:  # network, 401/403 (rules not accepted), ...
        raise DatasetError(
            f"Kaggle download failed: {e}. Check your credentials and that you accepted the "
            f"rules at https://www.kaggle.com/c/{KAGGLE_COMPETITION}/rules"
        ) from None
    return dest


# --------------------------------------------------------------------------------------------
# fer2013.csv
# --------------------------------------------------------------------------------------------


def _pixels(field: str) -> np.ndarray | None:
    """A pixels field as integers, or None if one is not an integer. numpy's text parser read
    a 35,887-row CSV 2.6 times faster than converting split tokens (1.4 s against 3.7 s)."""
    with warnings.catch_warnings():
        # older numpy versions warn and stop at the first non-number instead of raising
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(field, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None


def read_fer_csv(path: Path) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Validated (48x48 uint8 images, emotion codes, splits), one per data row, in order.

    Any malformed row is a DatasetError naming it (row = 0-based data row = output file name;
    line = line in the file).
    """
    images, emotions, splits = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{path} is empty") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetError(f"{path} is not a readable CSV file: {e}") from None
        col = {h.lower(): i for i, h in enumerate(header)}
        missing = [c for c in ("emotion", "pixels", "usage") if c not in col]
        if missing:
            raise DatasetError(_header_error(path, header, missing))
        ie, ip, iu = col["emotion"], col["pixels"], col["usage"]
        row = -1
        try:
            for row, fields in enumerate(reader):
                where = f"{path}: row {row} (line {row + 2})"
                if len(fields) != len(header):
                    raise DatasetError(f"{where} has {len(fields)} fields, expected {len(header)}")
                try:
                    emotion = int(fields[ie])
                except ValueError:
                    emotion = -1
                if not 0 <= emotion < len(FER2013_CSV_CLASSES):
                    raise DatasetError(f"{where}: emotion {fields[ie]!r} is not an integer 0..6")
                usage = fields[iu].strip()
                if usage not in USAGE_TO_SPLIT:
                    raise DatasetError(
                        f"{where}: unknown Usage {usage!r} (expected Training, PublicTest or "
                        f"PrivateTest)"
                    )
                values = _pixels(fields[ip])
                if values is None or values.size != PIXELS:
                    raise DatasetError(
                        f"{where}: pixels must be {PIXELS} integers (48x48), got "
                        f"{len(fields[ip].split())} value(s)"
                        + ("" if values is not None else ", not all ints")
                    )
                if values.min() < 0 or values.max() > 255:
                    raise DatasetError(f"{where}: pixel values must be in 0..255")
                images.append(values.astype(np.uint8).reshape(48, 48))
                emotions.append(emotion)
                splits.append(USAGE_TO_SPLIT[usage])
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: row {row + 1} is not valid CSV: {e}") from None
    if not images:
        raise DatasetError(f"{path} has a header but no data rows")
    _check_usages(path, splits)
    return images, emotions, splits


def _header_error(path: Path, header: list[str], missing: list[str]) -> str:
    """The message for a first line that is not fer2013.csv's header: the line shown up to
    60 characters (a data row is 9 kB of pixel values)."""
    line = ",".join(header)
    shown = repr(line[:60]) + (f"... ({len(line):,} characters)" if len(line) > 60 else "")
    expected = "expected the Kaggle fer2013.csv, whose first line is emotion,pixels,Usage"
    if len(header) == 3 and header[0].isdigit() and _pixels(header[1]) is not None:
        return f"{path} has no header line: its first line {shown} is a data row; {expected}"
    return f"{path}: the header {shown} lacks column(s) {', '.join(missing)}; {expected}"


def _check_usages(path: Path, splits: list[str]) -> None:
    """Every Usage must occur: train.py needs train, val (PublicTest) and test (PrivateTest)."""
    found = Counter(splits)
    missing = [usage for usage, split in USAGE_TO_SPLIT.items() if not found[split]]
    if missing:
        rows = ", ".join(f"{found[s]:,} {u}" for u, s in USAGE_TO_SPLIT.items() if found[s])
        raise DatasetError(
            f"{path} has no {' and no '.join(missing)} rows (only {rows}): train.py needs all "
            "three splits, train (Training), val (PublicTest) and test (PrivateTest); give the "
            "whole fer2013.csv"
        )


def _save(arr: np.ndarray, path: Path, fmt: str) -> None:
    fault_point("dataset_image")  # the signal tests stop a conversion here
    if fmt == "png":
        Image.fromarray(arr).save(path, format="PNG")
    else:
        Image.fromarray(arr).save(path, format="JPEG", quality=75)  # PIL's default, as official


def build_from_csv(csv_path: Path, dest: Path, fmt: str) -> dict[str, dict[str, int]]:
    images, emotions, splits = read_fer_csv(csv_path)  # everything validated before writing
    expected: dict[str, dict[str, int]] = {}
    for i, (arr, emotion, split) in enumerate(zip(images, emotions, splits, strict=True)):
        name = FER2013_CSV_CLASSES[emotion]
        folder = dest / split / name
        if name not in expected.setdefault(split, {}):
            folder.mkdir(parents=True)
            expected[split][name] = 0
        _save(arr, folder / f"{i}.{fmt}", fmt)
        expected[split][name] += 1
    return expected


# What each --ferplus-mode keeps of the training split (val and test: always the majority rule).
FERPLUS_RULES = {
    "majority": "votes of 1 removed as outliers; kept when the top emotion has more than half of "
    "the remaining votes and is neither unknown nor not-a-face (Barsoum et al. 2016)",
    "probability": "train: votes of 1 removed; the top vote counts taken (ties together) while "
    "under 75 % of the votes and under 3 emotions; kept when they hold more than half of the "
    "votes in at most 3 emotions and the top one is an emotion (Microsoft's ferplus.py "
    "_process_data); val and test: the majority rule",
    "multi_target": "train: votes of 1 removed; every emotion with at least 30 % of the votes; "
    "kept when they hold more than half of the votes and the top one is an emotion (Microsoft's "
    "ferplus.py _process_data); val and test: the majority rule",
}
FERPLUS_RULES["crossentropy"] = FERPLUS_RULES["probability"]
FERPLUS_DISCARDED = "discarded by the mode's rule"  # a training row's reason, modes but majority


def ferplus_targets(
    votes: importers.FerPlusVotes, mode: str
) -> tuple[np.ndarray, list[str], dict[int, list[float]]]:
    """Each row's folder (a FERPLUS_CLASSES index, -1: dropped), the reason a row is dropped, and
    the training rows' 8-emotion distributions in `mode` (`importers.ferplus_distribution`).
    Val and test rows, and every row in majority mode, follow `importers.ferplus_majority`; a
    training image kept without a majority lives in the folder of its most-voted emotion (the
    first in FER+'s column order on a tie, as Microsoft's per-emotion count)."""
    labels, reasons = importers.ferplus_majority(votes.votes, votes.names)
    soft: dict[int, list[float]] = {}
    if mode == "majority":
        return labels, reasons, soft
    for i, (usage, name) in enumerate(zip(votes.usage, votes.names, strict=True)):
        if usage != "Training" or not name:
            continue
        dist = importers.ferplus_distribution(votes.votes[i].tolist(), mode)
        labels[i], reasons[i] = (-1, FERPLUS_DISCARDED) if dist is None else (
            int(np.argmax(dist)), "")  # fmt: skip
        if dist is not None:
            soft[i] = dist
    return labels, reasons, soft


def write_soft_labels(path: Path, rows: list[tuple[str, list[float]]], classes: list[str]) -> None:
    """soft_labels.csv: `path` (relative to the dataset root), then one probability per class in
    the manifest's class order (the folders' alphabetical order), written with repr precision."""
    order = [importers.FERPLUS_CLASSES.index(c) for c in classes]
    with open(path, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["path", *classes])
        for rel, dist in rows:
            out.writerow([rel, *(repr(float(dist[k])) for k in order)])


def build_ferplus(
    csv_path: Path, votes_path: Path, dest: Path, fmt: str, mode: str = "majority"
) -> tuple[dict, dict]:
    """FER+ from fer2013.csv's pixels and fer2013new.csv's votes: the images `ferplus_targets`
    keeps in `mode`, in <split>/<class>/<csv row>.png as FER2013's (four FER+ image names occur
    on two rows each: row numbers keep every row's own image), dest/votes.csv with every row's
    FER+ name, 10 votes, label or reason for dropping it, path, and (modes but majority)
    dest/soft_labels.csv with every training image's distribution. Returns (counts written, the
    manifest's `labels` entry)."""
    images, _, splits = read_fer_csv(csv_path)  # everything validated before writing
    votes = importers.read_ferplus(votes_path)
    split_to_usage = {v: k for k, v in USAGE_TO_SPLIT.items()}
    importers.check_ferplus_rows(votes, [split_to_usage[s] for s in splits], csv_path, votes_path)
    labels, reasons, soft = ferplus_targets(votes, mode)
    importers.check_ferplus_labels(labels, votes.usage, votes_path)  # a dataset train.py takes
    soft_rows = []
    expected: dict[str, dict[str, int]] = {}
    dropped = {split: Counter() for split in SPLITS}
    rows = [["fer2013_row", "usage", "image_name", "path", "label", "dropped",
             *importers.FERPLUS_VOTES]]  # fmt: skip
    for i, (arr, split) in enumerate(zip(images, splits, strict=True)):
        path = label = ""
        if labels[i] >= 0:
            label = importers.FERPLUS_CLASSES[labels[i]]
            if label not in expected.setdefault(split, {}):
                (dest / split / label).mkdir(parents=True)
                expected[split][label] = 0
            path = f"{split}/{label}/{i}.{fmt}"
            _save(arr, dest / path, fmt)
            expected[split][label] += 1
            if i in soft:
                soft_rows.append((path, soft[i]))
        else:
            dropped[split][reasons[i]] += 1
        rows.append([i, votes.usage[i], votes.names[i], path, label, reasons[i],
                     *votes.votes[i].tolist()])  # fmt: skip
    with open(dest / "votes.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    info = {
        "file": votes_path.name,
        "sha256": file_sha256(votes_path),
        "mode": mode,
        "rule": FERPLUS_RULES[mode],
        "dropped": {s: dict(sorted(c.items())) for s, c in dropped.items()},
        "votes": "votes.csv",
    }
    if soft_rows:
        classes = sorted({name for counts in expected.values() for name in counts})
        write_soft_labels(dest / SOFT_LABELS, soft_rows, classes)
        info["soft_labels"] = SOFT_LABELS
    return expected, info


# --------------------------------------------------------------------------------------------
# Image-folder copies
# --------------------------------------------------------------------------------------------


def scan_folder(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {canonical class: [image files]}} of an image-folder copy (any common naming)."""
    found: dict[str, dict[str, list[Path]]] = {}
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.lower() not in SPLIT_SYNONYMS:
            continue
        split = SPLIT_SYNONYMS[d.name.lower()]
        if split in found:
            raise DatasetError(f"{root} has two folders for split {split!r} (one is {d})")
        found[split] = {}
        for c in sorted(d.iterdir()):
            if not c.is_dir() or is_hidden(c.name):
                continue
            try:
                name = canonical_class_name(c.name)
            except ValueError as e:
                raise DatasetError(f"{c}: {e}") from None
            if name in found[split]:
                raise DatasetError(f"{c} duplicates class {name!r} in {d}")
            files = sorted(
                p
                for p in c.iterdir()  # no ._0.png, no folder or pipe named x.png
                if p.suffix.lower() in IMG_EXTENSIONS and not is_hidden(p.name) and p.is_file()
            )
            if not files:
                raise DatasetError(f"class folder {c} has no images")
            found[split][name] = files
    if "train" not in found or "test" not in found:
        raise DatasetError(
            f"{root} needs at least train/ and test/ folders (found {sorted(found) or 'none'})"
        )
    return found


def drop_unreadable(
    found: dict[str, dict[str, list[Path]]], skip_bad_images: bool
) -> tuple[dict[str, dict[str, list[Path]]], int]:
    """Check every image decodes (before any split is carved); skip and count, or fail."""
    kept: dict[str, dict[str, list[Path]]] = {}
    skipped = 0
    for split, classes in found.items():
        kept[split] = {}
        for name, files in classes.items():
            good = []
            for src in files:
                try:
                    decode_image(src)
                    good.append(src)
                except UnreadableImageError as e:
                    if not skip_bad_images:
                        raise UnreadableImageError(
                            f"{e}; fix or delete it, or pass --skip-bad-images"
                        ) from None
                    skipped += 1
            if not good:
                raise DatasetError(f"class folder {files[0].parent} has no readable images")
            kept[split][name] = good
    return kept, skipped


def build_from_folder(
    found: dict[str, dict[str, list[Path]]], dest: Path, fmt: str
) -> dict[str, dict[str, int]]:
    expected: dict[str, dict[str, int]] = {}
    for split, classes in found.items():
        for name, files in classes.items():
            folder = dest / split / name
            folder.mkdir(parents=True)
            for src in files:
                target = folder / f"{src.stem}.{fmt}"
                if target.exists():
                    raise DatasetError(f"{src}: another image in {src.parent} has the same name")
                if fmt == "jpg" and src.suffix.lower() in (".jpg", ".jpeg"):
                    shutil.copyfile(src, target)  # already JPEG: do not lose quality twice
                else:
                    _save(decode_image(src), target, fmt)  # 8-bit grayscale, any source mode
            expected.setdefault(split, {})[name] = len(files)
    return expected


def faces_from_folder(
    found: dict[str, dict[str, list[Path]]],
    dest: Path,
    fmt: str,
    faces: dict,
    no_face: list[str],
) -> dict[str, dict[str, int]]:
    """--folder --faces: of each photo, the highest-scoring face YuNet finds, framed by the face
    pipeline `faces` (importers.write_face); the photos without one go to `no_face`."""
    expected: dict[str, dict[str, int]] = {}
    for split, classes in found.items():
        for name, files in classes.items():
            folder = dest / split / name
            folder.mkdir(parents=True)
            written = 0
            for src in files:
                target = folder / f"{src.stem}.{fmt}"
                if target.exists():
                    raise DatasetError(f"{src}: another image in {src.parent} has the same name")
                fault_point("dataset_image")
                result = importers.write_face(src, None, target, fmt, faces)
                if result == importers.NO_FACE:
                    no_face.append(str(src))
                elif result:  # drop_unreadable read it before: changed since
                    raise UnreadableImageError(result)
                written += not result
            if not written:
                raise DatasetError(
                    f"class folder {files[0].parent}: YuNet found no face in any image"
                )
            expected.setdefault(split, {})[name] = written
    return expected


# --------------------------------------------------------------------------------------------
# Checks, manifest, atomic publication
# --------------------------------------------------------------------------------------------


def print_table(counts: dict[str, dict[str, int]]) -> None:
    names = [c for c in KNOWN_CLASSES if any(c in counts[s] for s in counts)]
    width = max(len(n) for n in names + ["total"]) + 1
    print("split " + "".join(f"{n:>{width}}" for n in names) + f"{'total':>{width}}")
    for split in SPLITS:
        if split in counts:
            row = [counts[split].get(n, 0) for n in names]
            print(f"{split:<6}" + "".join(f"{v:>{width}}" for v in row) + f"{sum(row):>{width}}")


def verify(
    dest: Path, expected: dict[str, dict[str, int]], dataset: str = "FER2013"
) -> dict[str, dict[str, int]]:
    """What is on disk must be exactly what was meant to be written."""
    on_disk = count_images(dest)
    if on_disk != expected:
        raise DatasetError(f"wrote {on_disk} images but expected {expected}; disk full?")
    sizes = {s: sum(on_disk.get(s, {}).values()) for s in SPLITS}
    if dataset == "FER2013" and sizes != FER2013_SPLIT_SIZES:
        got = " / ".join(f"{sizes[s]:,}" for s in SPLITS)
        std = " / ".join(f"{FER2013_SPLIT_SIZES[s]:,}" for s in SPLITS)
        print(
            f"warning: split sizes (train / val / test) {got} differ from the standard FER2013 "
            f"{std}",
            file=sys.stderr,
        )
    try:
        check_dataset(dest, tuple(s for s in SPLITS if s in on_disk))
    except DatasetError as e:
        print(f"warning: the loaders (datasets/) will refuse this dataset: {e}", file=sys.stderr)
    return on_disk


def dataset_name(args: argparse.Namespace) -> str:
    """FER2013, FERPlus (FER2013's images with --ferplus) or the benchmark a source flag names."""
    for flag, name in BENCHMARKS.items():
        if getattr(args, flag):
            return name
    return "FERPlus" if args.ferplus else "FER2013"


def _listing_key(path: Path) -> str:
    """A folder's identity for the idempotency check: its files' relative paths and sizes."""
    h = hashlib.sha256()
    for p in importers.visible(path.rglob("*"), path):
        if p.is_file():
            h.update(f"{p.relative_to(path)}\t{p.stat().st_size}\n".encode())
    return f"listing:{h.hexdigest()}"


def source_description(args: argparse.Namespace) -> dict:
    """The source and a `key` that identifies it for the idempotency check (with --ferplus, the
    vote file's too: its sha256, or its URL)."""
    if args.kaggle:
        source = {"type": "kaggle", "key": f"kaggle:{KAGGLE_COMPETITION}/{KAGGLE_FILE}"}
    elif args.gdrive:
        source = {"type": "gdrive", "key": f"gdrive:{args.gdrive}", "id_or_url": args.gdrive}
    elif args.csv:
        path = Path(args.csv)
        if path.is_dir():
            raise DatasetError(
                f"--csv {path} is a folder; pass the fer2013.csv file in it (or the archive that "
                "holds it), or --folder for a folder of train/ and test/ image folders"
            )
        if not path.is_file():
            raise DatasetError(f"--csv {path}: no such file")
        digest = file_sha256(path)
        source = {"type": "csv", "key": f"sha256:{digest}", "path": str(path.resolve())}
    else:
        flag = next(f for f in ("folder", *BENCHMARKS) if getattr(args, f))
        path = Path(getattr(args, flag))
        if path.is_file() and flag != "folder":  # an archive: its size and time, not a hash
            stat = path.stat()  # of 100 GB, which would take minutes
            key = f"file:{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
        elif path.is_dir():
            key = _listing_key(path)
        else:
            raise DatasetError(f"--{flag} {path}: no such folder")
        source = {"type": flag, "key": key, "path": str(path.resolve())}
    if args.ferplus:
        spec = args.ferplus
        if "://" not in spec:
            spec = str(importers.ferplus_file(spec))  # a local file: its content identifies it
            source["ferplus_path"] = str(Path(spec).resolve())
            spec = f"sha256:{file_sha256(Path(spec))}"
        source["ferplus"] = spec
        source["key"] += f"+ferplus:{spec}"
    return source


def face_pipeline(args: argparse.Namespace):
    """--faces: the face pipeline (models.faces.FacePipeline) that finds and frames the faces,
    writing --image-size squares; None without --faces."""
    if not args.faces:
        return None
    from models.faces import YUNET_BOX_SCALE, pipeline_for

    box_scale = YUNET_BOX_SCALE if args.box_scale is None else args.box_scale
    return pipeline_for(box_scale=box_scale, align=args.align, size=args.image_size)


def settings(args: argparse.Namespace) -> dict:
    """The options that shape the dataset (a second run with other ones rebuilds it)."""
    out = {
        "format": args.format,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "skip_bad_images": args.skip_bad_images,
    }
    dataset = dataset_name(args)
    for dest, (applies, _) in SOURCE_FLAGS.items():
        if dataset in applies and dest != "workers":
            out[dest] = getattr(args, dest)
    if args.ferplus_mode != "majority":  # majority: the settings of before the modes existed
        out["ferplus_mode"] = args.ferplus_mode
    if args.faces:  # without --faces: the settings of before it existed
        out["faces"] = face_pipeline(args).to_dict()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (the carved split's seed goes to numpy, which refuses negative
    ones); flags of other sources are refused; the defaults that depend on the source filled."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    parser.check(
        args,
        {
            "val_fraction": ("in (0, 1)", lambda f: 0 < f < 1),
            "seed": ("a non-negative integer", lambda n: n >= 0),
            "image_size": ("at least 8", lambda n: n >= 8),
            "folds": ("at least 3 (test, val and train folds)", lambda n: n >= 3),
            "fold": ("a non-negative integer", lambda n: n >= 0),
            "last_frames": ("at least 1", lambda n: n >= 1),
            "workers": ("at least 1", lambda n: n >= 1),
        },
    )
    dataset = dataset_name(args)
    if args.ferplus and not (args.csv or args.gdrive or args.kaggle):
        parser.error(
            "--ferplus labels fer2013.csv's rows: give it with --csv, --gdrive or --kaggle"
        )
    if args.ferplus_mode != "majority" and not args.ferplus:
        parser.error(f"--ferplus-mode {args.ferplus_mode} applies to FER+ only: add --ferplus")
    for dest, (applies, default) in SOURCE_FLAGS.items():
        if dest == "image_size" and args.faces and args.folder:
            continue  # a folder of photos gets --image-size squares too
        if getattr(args, dest) is not None and dataset not in applies:
            parser.error(f"{parser.flag(dest)} applies to {' and '.join(applies)} only")
        if getattr(args, dest) is None and dataset in applies:
            setattr(args, dest, default)
    check_face_flags(parser, args, dataset)
    if dataset in DEFAULT_IMAGE_SIZE:
        args.image_size = args.image_size or DEFAULT_IMAGE_SIZE[dataset]
        args.workers = args.workers or importers.default_workers()
    if dataset in ("ExpW", "CK+") and args.fold >= args.folds:
        parser.error(f"--fold {args.fold}: must be below --folds {args.folds}")
    args.out = args.out or DEFAULT_OUT[dataset]
    return args


def check_face_flags(parser: ArgumentParser, args: argparse.Namespace, dataset: str) -> None:
    """--faces applies to photos (--folder and the benchmarks), not to fer2013.csv's 48 x 48
    faces; --align and --box-scale need it. A --folder of photos gets --image-size squares
    (default FOLDER_FACE_SIZE)."""
    if not args.faces:
        for flag in ("align", "box_scale"):
            if getattr(args, flag) not in (None, False):
                parser.error(f"{parser.flag(flag)} frames the faces of --faces: add --faces yunet")
        return
    if dataset not in DEFAULT_IMAGE_SIZE and not args.folder:
        parser.error("--faces finds faces in photos: give it with --folder or a benchmark flag")
    if args.box_scale is not None and not 0.5 <= args.box_scale <= 4:
        parser.error(f"--box-scale must be from 0.5 to 4, got {args.box_scale}")
    if args.folder:
        args.image_size = args.image_size or FOLDER_FACE_SIZE


def already_there(out: Path, source: dict, args: argparse.Namespace) -> bool:
    """True when `out` holds this very dataset, intact (nothing to do); else checks that an
    existing `out` may be replaced (DatasetError with the reason if not)."""
    if not (out.exists() or out.is_symlink()):
        return False
    manifest = read_manifest(out) if out.is_dir() else None
    same = (
        manifest is not None
        and manifest.get("source", {}).get("key") == source["key"]
        and manifest.get("settings") == settings(args)
    )
    if same and count_images(out) == manifest.get("counts") and not args.force:
        if content_hash(out) == manifest.get("content_hash"):
            print(f"{out} is already there ({manifest['total']} images, same source)")
            return True
    check_replaceable(out)  # what this project did not write is never replaced
    if not args.force and any(out.iterdir()):
        raise DatasetError(
            f"{out} holds a dataset from another source or settings, or modified since; "
            f"pass --force to replace it or choose another --out"
        )
    return False


def build_fer2013(
    args: argparse.Namespace, source: dict, work: Path, dest: Path
) -> tuple[dict, dict]:
    """FER2013 (or FER+ with --ferplus) from its CSV or an image-folder copy into `dest`:
    (counts written, what the manifest records besides)."""
    if args.kaggle:
        raw = fetch_kaggle(work)
    elif args.gdrive:
        raw = fetch_gdrive(args.gdrive, work)
    else:
        raw = Path(args.csv or args.folder)
    kind, path = locate(raw, work)
    if kind == "csv":
        print(f"reading {path}")
        if raw.is_file() and raw != path:
            source["csv_sha256"] = file_sha256(path)
        if not args.ferplus:
            return build_from_csv(path, dest, args.format), {"val_split": None,
                                                             "skipped_bad_images": 0}  # fmt: skip
        votes = importers.ferplus_file(args.ferplus, work)
        mode = args.ferplus_mode
        print(f"labelling with the FER+ votes of {args.ferplus} ({mode} mode)")
        expected, labels = build_ferplus(path, votes, dest, args.format, mode)
        written = ["votes.csv"] + ([SOFT_LABELS] if "soft_labels" in labels else [])
        facts = {"labels": labels, "files": {f: file_sha256(dest / f) for f in written}}
        return expected, {**facts, "val_split": None, "skipped_bad_images": 0}
    if args.ferplus:
        raise DatasetError(f"--ferplus labels fer2013.csv's rows, but {raw} holds image folders")
    print(f"reading image folders under {path}")
    found, skipped = drop_unreadable(scan_folder(path), args.skip_bad_images)
    val_split = None
    if "val" not in found:
        found["train"], found["val"] = importers.carve_stratified(
            found["train"], args.val_fraction, args.seed
        )
        val_split = {
            "carved_from": "train",
            "fraction": args.val_fraction,
            "seed": args.seed,
            "stratified": True,
            "per_class": {k: len(v) for k, v in found["val"].items()},
        }
        print(
            f"no validation folder: carved {sum(val_split['per_class'].values())} "
            f"images ({args.val_fraction:.0%} of each class, seed {args.seed}) from train"
        )
    pipeline = face_pipeline(args)
    if pipeline is None:
        expected = build_from_folder(found, dest, args.format)
        return expected, {"val_split": val_split, "skipped_bad_images": skipped}
    no_face: list[str] = []
    expected = faces_from_folder(found, dest, args.format, pipeline.to_dict(), no_face)
    facts = face_facts(pipeline.to_dict(), no_face, dest)
    return expected, {"val_split": val_split, "skipped_bad_images": skipped, **facts}


def build_benchmark(args: argparse.Namespace, work: Path, dest: Path) -> tuple[dict, dict]:
    """RAF-DB, AffectNet, ExpW or CK+ (scripts/importers.py) into `dest`: (counts written, what
    the manifest records besides)."""
    flag = next(f for f in BENCHMARKS if getattr(args, f))
    root = Path(getattr(args, flag))
    if root.is_file():
        kind = _file_kind(root)
        if kind == "csv":
            raise DatasetError(f"--{flag} {root} is neither a folder nor a zip or tar archive")
        _extract(root, kind, work / "extracted")
        root = work / "extracted"
    print(f"reading {BENCHMARKS[flag]} from {root}")
    skip = args.skip_bad_images
    if flag == "rafdb":
        plan = importers.read_rafdb(root, skip, originals=bool(args.faces))
    elif flag == "affectnet":
        plan = importers.read_affectnet(root, args.affectnet_classes, skip)
    elif flag == "expw":
        plan = importers.read_expw(root, skip)
    else:
        plan = importers.read_ckplus(root, args.last_frames, args.ckplus_neutral, skip)
    conflicting = importers.drop_repeats(plan)
    if conflicting:
        print(f"left out {len(conflicting)} face(s) listed with different labels, boxes or "
              f"splits, e.g. {conflicting[0]} (counted in the manifest)")  # fmt: skip
    missing = importers.drop_missing(plan, skip)
    if not any(plan.splits.values()):
        raise DatasetError(f"{root}: no labelled face to import ({dict(plan.dropped)} dropped)")
    splits, rule = importers.split_plan(plan, args.val_fraction, args.seed, args.folds, args.fold)
    size, workers = args.image_size, args.workers
    pipeline, no_face = face_pipeline(args), []
    faces = pipeline.to_dict() if pipeline is not None else None
    expected, unreadable = importers.write_plan(
        splits, dest, args.format, size, workers, skip, plan.crop_scale, faces, no_face
    )
    skipped = missing + unreadable
    if skipped:
        print(f"skipped {len(skipped)} missing or unreadable image(s) (--skip-bad-images): "
              f"{skipped[0]}{', ...' if len(skipped) > 1 else ''}")  # fmt: skip
    labels = {**plan.info, "dropped": dict(sorted(plan.dropped.items()))}
    facts = {"split": rule, "labels": labels, "image_size": args.image_size}
    if faces is not None:
        facts.update(face_facts(faces, no_face, dest))
    return expected, {**facts, "skipped_bad_images": len(skipped), "skipped_images": skipped}


NO_FACE_LIST = "no_face.txt"


def face_facts(faces: dict, no_face: list[str], dest: Path) -> dict:
    """What the manifest records of --faces: the pipeline (which train.py copies into every
    checkpoint), and the photos where YuNet found no face (or none the dataset's box picks),
    listed in no_face.txt and summed up in one line."""
    (dest / NO_FACE_LIST).write_text("".join(f"{p}\n" for p in no_face))
    print(f"no face found in {len(no_face)} photo(s), left out (listed in {NO_FACE_LIST})")
    return {
        "faces": faces,
        "no_face": {"count": len(no_face), "list": NO_FACE_LIST},
        "files": {NO_FACE_LIST: file_sha256(dest / NO_FACE_LIST)},
    }


class Interrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C while a dataset is built; `done`: it came while the finished dataset
    was put in place, which was let finish."""

    def __init__(self, signum: int, done: bool = False):
        super().__init__(signum)
        self.signum, self.done = signum, done


class StopSignals:
    """SIGTERM and SIGINT raise Interrupted in the main thread, so that the `finally` blocks
    remove the temporary folder and the lock; inside `hold()` (the finished dataset being put in
    place) a signal waits until that is over. A signal that was ignored (SIGINT in a background
    job) stays ignored; the previous handlers come back on the way out."""

    def __init__(self):
        self.previous: dict = {}
        self.held, self.pending = False, 0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def handle(self, signum: int, frame) -> None:
        if self.held:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def hold(self):
        self.held = True
        try:
            yield
        finally:
            self.held = False
        if self.pending:
            raise Interrupted(self.pending, done=True)


def main(args: argparse.Namespace | list[str] | None = None) -> Path:
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    out = Path(args.out)
    face_pipeline(args)  # --faces: the detector's file is there, before any work
    source = source_description(args)
    # One conversion writes an --out at a time (train.py locks a run folder the same way).
    target = out.resolve()
    lock = RunLock(target.parent / f".{target.name}.lock", target)
    if not lock.acquire():
        raise DatasetError(
            f"--out {out} is being written by another download_dataset.py ({lock.holder()}); "
            "wait for it to finish, or choose another --out"
        )
    try:
        with StopSignals() as stop:
            if not already_there(out, source, args):
                build(args, source, out, stop)
    finally:
        lock.release()
    return out


def build(args: argparse.Namespace, source: dict, out: Path, stop: StopSignals) -> None:
    """The dataset built in a temporary folder beside `out`, checked, and moved into place."""
    target = out.resolve()
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        dest = work / "dataset"
        dest.mkdir()
        dataset = dataset_name(args)
        if dataset in DEFAULT_IMAGE_SIZE:
            expected, facts = build_benchmark(args, work, dest)
        else:
            expected, facts = build_fer2013(args, source, work, dest)
        counts = verify(dest, expected, dataset)
        print_table(counts)
        manifest = {
            "dataset": dataset,
            "source": source,
            "settings": settings(args),
            "format": args.format,
            "counts": counts,
            "total": sum(sum(c.values()) for c in counts.values()),
            "content_hash": content_hash(dest),
            **facts,
            "class_order": sorted({name for split in counts.values() for name in split}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tool": "scripts/download_dataset.py",
        }
        write_manifest(dest, manifest)
        with stop.hold():  # a signal now would leave neither the old dataset nor the new one
            publish_dataset(dest, out)
            print(f"wrote {manifest['total']} images to {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> Path:
    """main for the command line: a DatasetError (bad input, a failed download, a folder in the
    way) becomes a CLIError, which run_command prints as one line (exit status 1); so does a
    stop signal (exit status 128 + the signal). A failed one leaves none of the folders above
    --out that it made."""
    try:
        with made_folders_removed_if_empty(Path(args.out).resolve().parent):
            return main(args)
    except DatasetError as err:
        raise CLIError(str(err)) from None
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        if getattr(err, "done", False):
            what = f"the dataset was complete and is in {args.out}"
        else:
            what = f"nothing was written ({args.out} is as it was)"
        stopped = CLIError(f"interrupted by {signal.Signals(signum).name}; {what}")
        stopped.exit_status = 128 + signum
        raise stopped from None


if __name__ == "__main__":
    run_command("download_dataset.py", run, parse_args())
