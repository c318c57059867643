"""Get FER2013 from any common source into FER2013/{train,val,test}/<Class>/<index>.png.

    python scripts/download_dataset.py --csv fer2013.csv            # or the Kaggle fer2013.tar.gz
    python scripts/download_dataset.py --gdrive FILE_ID_OR_URL      # a Drive copy (csv/tar/zip)
    python scripts/download_dataset.py --kaggle                     # needs Kaggle API credentials
    python scripts/download_dataset.py --folder path/to/images      # an extracted image-folder copy

PublicTest becomes val and PrivateTest test, as in the official script; class folders carry the
official names (Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise) and files the CSV row index.
Images are PNG (lossless) unless --format jpg (the official script's layout). The dataset is
built in a temporary folder next to --out and renamed into place at the end, so an interrupted or
failed run leaves nothing behind; a manifest.json records the source, counts and a content hash,
and a second run with the same source finds it and does nothing. --force replaces a dataset that
this tool wrote (its manifest.json is there), and only once the new one is complete; a folder
holding anything else is never replaced. Images of an image-folder copy go through
datasets.decode_image: 16-bit, colour and transparent images become the 8-bit grayscale a person
sees.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import (  # noqa: E402
    CLASSES,
    FER2013_CSV_CLASSES,
    FER2013_SPLIT_SIZES,
    IMG_EXTENSIONS,
    SPLITS,
    DatasetError,
    UnreadableImageError,
    canonical_class_name,
    check_dataset,
    check_replaceable,
    content_hash,
    count_images,
    decode_image,
    publish_dataset,
    read_manifest,
    write_manifest,
)
from utils import ArgumentParser, CLIError, run_command  # noqa: E402

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


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="download_dataset.py",
        description="Download or convert FER2013 into FER2013/{train,val,test}/<Class>/.",
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
    parser.add_argument("--out", default="FER2013", help="output folder (default: FER2013)")
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
        help="--folder without val: fraction of each train class moved to val (default 0.1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the carved validation split (default 0)"
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="--folder: skip unreadable images (counted in the manifest) instead of failing",
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    csvs = sorted(path.rglob("fer2013.csv")) or sorted(path.rglob("*.csv"))
    if csvs:
        return "csv", csvs[0]
    for root in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        if _has_split_folders(root):
            return "folder", root
    archives = sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p) != "csv")
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
            raise DatasetError(
                f"{path}: header {header} lacks column(s) {missing}; expected the Kaggle "
                f"fer2013.csv with columns emotion,pixels,Usage"
            )
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
                tokens = fields[ip].split()
                try:
                    values = np.array(tokens, dtype=np.int64)
                except ValueError:
                    values = None
                if values is None or values.size != PIXELS:
                    raise DatasetError(
                        f"{where}: pixels must be {PIXELS} integers (48x48), got "
                        f"{len(tokens)} value(s)" + ("" if values is not None else ", not all ints")
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
    return images, emotions, splits


def _save(arr: np.ndarray, path: Path, fmt: str) -> None:
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
            if not c.is_dir() or c.name.startswith("."):
                continue
            try:
                name = canonical_class_name(c.name)
            except ValueError as e:
                raise DatasetError(f"{c}: {e}") from None
            if name in found[split]:
                raise DatasetError(f"{c} duplicates class {name!r} in {d}")
            files = sorted(p for p in c.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise DatasetError(f"class folder {c} has no images")
            found[split][name] = files
    if "train" not in found or "test" not in found:
        raise DatasetError(
            f"{root} needs at least train/ and test/ folders (found {sorted(found) or 'none'})"
        )
    return found


def carve_val(
    train: dict[str, list[Path]], fraction: float, seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Stratified split of train: round(fraction * n) images of each class (at least 1)."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction must be in (0, 1), got {fraction}")
    new_train, val = {}, {}
    for class_id, name in enumerate(CLASSES):
        if name not in train:
            continue
        files = train[name]
        rng = np.random.default_rng([seed, class_id])
        order = rng.permutation(len(files))
        k = min(max(1, round(fraction * len(files))), len(files) - 1)
        chosen = set(order[:k].tolist())
        val[name] = [f for i, f in enumerate(files) if i in chosen]
        new_train[name] = [f for i, f in enumerate(files) if i not in chosen]
    return new_train, val


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


# --------------------------------------------------------------------------------------------
# Checks, manifest, atomic publication
# --------------------------------------------------------------------------------------------


def print_table(counts: dict[str, dict[str, int]]) -> None:
    names = [c for c in CLASSES if any(c in counts[s] for s in counts)]
    width = max(len(n) for n in names + ["total"]) + 1
    print("split " + "".join(f"{n:>{width}}" for n in names) + f"{'total':>{width}}")
    for split in SPLITS:
        if split in counts:
            row = [counts[split].get(n, 0) for n in names]
            print(f"{split:<6}" + "".join(f"{v:>{width}}" for v in row) + f"{sum(row):>{width}}")


def verify(dest: Path, expected: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """What is on disk must be exactly what was meant to be written."""
    on_disk = count_images(dest)
    if on_disk != expected:
        raise DatasetError(f"wrote {on_disk} images but expected {expected}; disk full?")
    sizes = {s: sum(on_disk.get(s, {}).values()) for s in SPLITS}
    if sizes != FER2013_SPLIT_SIZES:
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
        print(f"warning: datasets.py will refuse this dataset: {e}", file=sys.stderr)
    return on_disk


def source_description(args: argparse.Namespace) -> dict:
    """The source and a `key` that identifies it for the idempotency check."""
    if args.kaggle:
        return {"type": "kaggle", "key": f"kaggle:{KAGGLE_COMPETITION}/{KAGGLE_FILE}"}
    if args.gdrive:
        return {"type": "gdrive", "key": f"gdrive:{args.gdrive}", "id_or_url": args.gdrive}
    if args.csv:
        path = Path(args.csv)
        if not path.is_file():
            raise DatasetError(f"--csv {path}: no such file")
        digest = sha256_file(path)
        return {"type": "csv", "key": f"sha256:{digest}", "path": str(path.resolve())}
    path = Path(args.folder)
    if not path.is_dir():
        raise DatasetError(f"--folder {path}: no such folder")
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path)}\t{p.stat().st_size}\n".encode())
    return {"type": "folder", "key": f"listing:{h.hexdigest()}", "path": str(path.resolve())}


def settings(args: argparse.Namespace) -> dict:
    return {
        "format": args.format,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "skip_bad_images": args.skip_bad_images,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (the carved split's seed goes to numpy, which refuses negative
    ones)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    parser.check(
        args,
        {
            "val_fraction": ("in (0, 1)", lambda f: 0 < f < 1),
            "seed": ("a non-negative integer", lambda n: n >= 0),
        },
    )
    return args


def main(args: argparse.Namespace | list[str] | None = None) -> Path:
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    out = Path(args.out)
    source = source_description(args)
    if out.exists() or out.is_symlink():
        manifest = read_manifest(out) if out.is_dir() else None
        same = (
            manifest is not None
            and manifest.get("source", {}).get("key") == source["key"]
            and manifest.get("settings") == settings(args)
        )
        if same and count_images(out) == manifest.get("counts") and not args.force:
            if content_hash(out) == manifest.get("content_hash"):
                print(f"{out} is already there ({manifest['total']} images, same source)")
                return out
        check_replaceable(out)  # what this project did not write is never replaced
        if not args.force and any(out.iterdir()):
            raise DatasetError(
                f"{out} holds a dataset from another source or settings, or modified since; "
                f"pass --force to replace it or choose another --out"
            )

    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        dest = work / "dataset"
        dest.mkdir()
        if args.kaggle:
            raw = fetch_kaggle(work)
        elif args.gdrive:
            raw = fetch_gdrive(args.gdrive, work)
        elif args.csv:
            raw = Path(args.csv)
        else:
            raw = Path(args.folder)
        kind, path = locate(raw, work)
        if kind == "csv":
            print(f"reading {path}")
            if raw.is_file() and raw != path:
                source["csv_sha256"] = sha256_file(path)
            expected = build_from_csv(path, dest, args.format)
            skipped, val_split = 0, None
        else:
            print(f"reading image folders under {path}")
            found, skipped = drop_unreadable(scan_folder(path), args.skip_bad_images)
            val_split = None
            if "val" not in found:
                found["train"], found["val"] = carve_val(
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
            expected = build_from_folder(found, dest, args.format)
        counts = verify(dest, expected)
        print_table(counts)
        manifest = {
            "dataset": "FER2013",
            "source": source,
            "settings": settings(args),
            "format": args.format,
            "counts": counts,
            "total": sum(sum(c.values()) for c in counts.values()),
            "content_hash": content_hash(dest),
            "val_split": val_split,
            "skipped_bad_images": skipped,
            "class_order": CLASSES,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tool": "scripts/download_dataset.py",
        }
        write_manifest(dest, manifest)
        publish_dataset(dest, out)
        print(f"wrote {manifest['total']} images to {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> Path:
    """main for the command line: a DatasetError (bad input, a failed download, a folder in the
    way) becomes a CLIError, which run_command prints as one line (exit status 1)."""
    try:
        return main(args)
    except DatasetError as err:
        raise CLIError(str(err)) from None


if __name__ == "__main__":
    run_command("download_dataset.py", run, parse_args())
