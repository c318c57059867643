"""Dataset manifests: the content hash, image counts, and publishing a finished dataset folder
in place of an old one (only one this project wrote: `check_replaceable`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from .folders import (
    IMG_EXTENSIONS,
    LABEL_TARGETS,
    SOFT_LABELS,
    SPLITS,
    DatasetError,
    _image_files,
    is_hidden,
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


def label_mode(root: str | os.PathLike) -> str:
    """The FER+ training mode a dataset asks for (`LABEL_TARGETS`): "majority" (the folders'
    labels) without root/soft_labels.csv; with it, the manifest's `labels.mode`, which must be
    one of the others. A manifest naming such a mode without the file is a DatasetError too."""
    root = Path(root)
    labels = (read_manifest(root) or {}).get("labels")
    mode = labels.get("mode") if isinstance(labels, dict) else None
    soft_modes = [m for m in LABEL_TARGETS if m != "majority"]
    if not (root / SOFT_LABELS).is_file():
        if mode in soft_modes:
            raise DatasetError(
                f"{root}/manifest.json says FER+ mode {mode}, but {root / SOFT_LABELS} is "
                f"missing; rebuild the dataset with scripts/download_dataset.py --ferplus-mode "
                f"{mode}"
            )
        return "majority"
    if mode not in soft_modes:
        raise DatasetError(
            f"{root / SOFT_LABELS} is there, but {root}/manifest.json's labels.mode is "
            f"{mode!r}, not one of {', '.join(soft_modes)}; set it, or remove the file to train "
            f"on the folders' labels"
        )
    return mode
