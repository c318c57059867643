"""Audit a dataset folder: duplicates, leaks between splits, label conflicts, blank images.

    python scripts/audit_dataset.py FER2013                        # a summary
    python scripts/audit_dataset.py FER2013 --json report.json     # every group with its paths
    python scripts/audit_dataset.py FER2013 --dedupe FER2013-clean # a cleaned copy

Finds, within and across train/val/test: exact duplicates (identical decoded pixels),
near-duplicates (the same picture shifted by a pixel, brightened, darkened or re-encoded as JPEG;
see datasets.py, "Duplicates"), the same picture under two labels, and blank or constant images.
Images that are copies of each other form a group; a group is "exact" when all its images have
identical pixels, "near" otherwise. The validation and test images that also occur in train are
counted as train.py counts them at start-up. `--dedupe OUT` writes a copy without the blank
images, without every image of a group whose labels disagree, and with one image of every other
group: the evaluation copy (test, then val) where there is one, so the test set stays whole and
training loses its leaked copies. OUT/manifest.json lists each removed file and why.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets  # noqa: E402
from datasets import SPLITS, DatasetError  # noqa: E402
from utils import ArgumentParser, write_text_atomic  # noqa: E402

KEEP_FIRST = ("test", "val", "train")  # which copy of a duplicate group --dedupe keeps


def _groups(pairs: tuple[np.ndarray, np.ndarray, np.ndarray], n: int) -> list[list[int]]:
    """Connected components (of two or more images) of the duplicate pairs: union-find."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = {}
    for x in sorted(set(pairs[0].tolist()) | set(pairs[1].tolist())):
        members.setdefault(find(x), []).append(x)
    return sorted(members.values())


def load_splits(root: Path, splits: tuple[str, ...]) -> dict[str, datasets.SplitData]:
    """Every image of `splits`, decoded (or read from the cache train.py fills)."""
    try:
        return {s: datasets.load_split(root, s) for s in splits}
    except datasets.UnreadableImageError as err:
        # load_split advises train.py's --skip-bad-images; the audit compares every image with
        # every other, so it has no such flag: the image must go or be replaced.
        reason = str(err).removesuffix(f"; {datasets.SKIP_BAD_IMAGES_HINT}")
        raise DatasetError(f"{reason}; replace or delete it, then audit again") from None


def audit(root: str | os.PathLike, similarity: float = datasets.NEAR_DUPLICATE_SIMILARITY) -> dict:
    """The report: settings, summary counts, every duplicate group and every blank image."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; pass the folder with train/")
    present = tuple(s for s in SPLITS if (root / s).is_dir())
    if not present:
        raise DatasetError(f"no train/, val/ or test/ folder in {root}; pass a dataset folder")
    classes = datasets.check_dataset(root, present)
    data = load_splits(root, present)
    sizes = {s: tuple(d.images.shape[1:]) for s, d in data.items()}
    if len(set(sizes.values())) > 1:
        raise DatasetError(f"the splits of {root} have different image sizes {sizes}")
    images = np.concatenate([d.images.numpy() for d in data.values()])
    split_of = [s for s, d in data.items() for _ in range(len(d.targets))]
    label_of = [classes[t] for d in data.values() for t in d.targets.tolist()]
    path_of = [os.path.relpath(p, root) for d in data.values() for p in d.paths]
    hashes = datasets.hash_images(images)
    pairs = datasets.duplicate_pairs(images, hashes, similarity=similarity)
    score = {(a, b): s for a, b, s in zip(*(x.tolist() for x in pairs), strict=True)}

    groups = []
    for members in _groups(pairs, len(images)):
        members.sort(key=lambda m: (SPLITS.index(split_of[m]), path_of[m]))
        splits = sorted({split_of[m] for m in members}, key=SPLITS.index)
        labels = sorted({label_of[m] for m in members})
        edges = [v for (a, b), v in score.items() if a in members and b in members]
        groups.append(
            {
                "id": len(groups),
                "kind": "exact" if len({hashes.pixels[m] for m in members}) == 1 else "near",
                "splits": splits,
                "cross_split": len(splits) > 1,
                "labels": labels,
                "label_conflict": len(labels) > 1,
                "min_similarity": round(min(edges), 4),
                "images": [
                    {"path": path_of[m], "split": split_of[m], "label": label_of[m]}
                    for m in members
                ],
            }
        )
    blank = [
        {
            "path": path_of[m],
            "split": split_of[m],
            "label": label_of[m],
            "std": float(hashes.std[m]),
        }
        for m in np.nonzero(hashes.blank)[0].tolist()
    ]
    overlap = {}
    if "train" in data:
        others = {s: d for s, d in data.items() if s != "train"}
        overlap, _ = datasets.split_overlap(data["train"], others)

    def count(kind: str | None = None, key: str | None = None) -> tuple[int, int]:
        chosen = [g for g in groups if (kind is None or g["kind"] == kind) and (not key or g[key])]
        return len(chosen), sum(len(g["images"]) for g in chosen)

    summary = {
        "images": len(images),
        "exact_groups": count("exact")[0],
        "exact_images": count("exact")[1],
        "near_groups": count("near")[0],
        "near_images": count("near")[1],
        "cross_split_groups": count(key="cross_split")[0],
        "label_conflict_groups": count(key="label_conflict")[0],
        "blank_images": len(blank),
        "in_train": overlap,
    }
    return {
        "dataset": str(root.resolve()),
        "splits": {s: len(d.targets) for s, d in data.items()},
        "settings": {
            "near_similarity": similarity,
            "fingerprint_similarity": datasets.FINGERPRINT_SIMILARITY,
            "max_shift": datasets.MAX_SHIFT,
            "blank_std": datasets.BLANK_STD,
        },
        "summary": summary,
        "groups": groups,
        "blank": blank,
    }


def removals(report: dict) -> list[dict]:
    """What --dedupe leaves out, and why: one entry per removed file."""
    removed = []
    for group in report["groups"]:
        images = group["images"]
        if group["label_conflict"]:
            for image in images:
                removed.append(
                    {
                        "path": image["path"],
                        "group": group["id"],
                        "reason": "label conflict: the same picture is labelled "
                        + " and ".join(group["labels"]),
                    }
                )
            continue
        keep = min(images, key=lambda im: (KEEP_FIRST.index(im["split"]), im["path"]))
        for image in images:
            if image is not keep:
                reason = f"{group['kind']} duplicate of {keep['path']}"
                removed.append({"path": image["path"], "group": group["id"], "reason": reason})
    for image in report["blank"]:
        reason = f"blank image (pixel standard deviation {image['std']:.2f})"
        removed.append({"path": image["path"], "group": None, "reason": reason})
    return removed


def write_dedupe(root: str | os.PathLike, report: dict, out: str | os.PathLike) -> dict:
    """A copy of `root` without `removals(report)`, published atomically; returns its manifest."""
    root, out = Path(root), Path(out)
    removed = removals(report)
    gone = {r["path"] for r in removed}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        kept = 0
        for split in report["splits"]:
            for path in sorted((root / split).rglob("*")):
                rel = os.path.relpath(path, root)
                if path.suffix.lower() not in datasets.IMG_EXTENSIONS or rel in gone:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / rel)
                kept += 1
        manifest = {
            "dataset": (datasets.read_manifest(root) or {}).get("dataset", root.name),
            "source": {
                "type": "dedupe",
                "from": str(root.resolve()),
                "source_manifest": datasets.read_manifest(root),
                "settings": report["settings"],
            },
            "removed": removed,
            "counts": datasets.count_images(tmp),
            "total": kept,
            "content_hash": datasets.content_hash(tmp),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        datasets.write_manifest(tmp, manifest)
        datasets.publish_dataset(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def format_summary(report: dict, name: str, seconds: float, show: int) -> str:
    s = report["summary"]
    per_split = ", ".join(f"{k} {v:,}" for k, v in report["splits"].items())
    lines = [
        f"{name}: {s['images']:,} images ({per_split}), audited in {seconds:.1f} s",
        f"exact duplicates: {s['exact_groups']} groups, {s['exact_images']} images; "
        f"near-duplicates: {s['near_groups']} groups, {s['near_images']} images",
        f"groups across splits: {s['cross_split_groups']}; same picture under different labels: "
        f"{s['label_conflict_groups']} groups; blank or constant images: {s['blank_images']}",
    ]
    for split, c in s["in_train"].items():
        lines.append(
            f"{split} images also in train: {c['exact'] + c['near']} of {c['images']} "
            f"({c['exact']} identical, {c['near']} near copies, {c['other_label']} under "
            "another label)"
        )
    for group in report["groups"][:show]:
        paths = " ".join(im["path"] for im in group["images"])
        lines.append(
            f"  group {group['id']}: {group['kind']}, {'+'.join(group['splits'])}, "
            f"{'/'.join(group['labels'])}: {paths}"
        )
    for image in report["blank"][: max(0, show - len(report["groups"]))]:
        lines.append(f"  blank: {image['path']} (std {image['std']:.2f})")
    hidden = len(report["groups"]) + len(report["blank"]) - show
    if hidden > 0:
        lines.append(f"  ... and {hidden} more (--json lists them all)")
    return "\n".join(lines)


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="audit_dataset.py",
        description="Find duplicates, train/val/test leaks, label conflicts and blank images.",
    )
    parser.add_argument("dataset", help="dataset folder with train/ val/ test/ class folders")
    parser.add_argument("--json", default=None, help="write the full report (every group) here")
    parser.add_argument(
        "--dedupe", default=None, help="write a cleaned copy of the dataset to this new folder"
    )
    parser.add_argument(
        "--near-threshold",
        type=float,
        default=datasets.NEAR_DUPLICATE_SIMILARITY,
        help="verified similarity (0-1) from which two images are near-duplicates "
        f"(default {datasets.NEAR_DUPLICATE_SIMILARITY}; lower finds more, and more look-alikes)",
    )
    parser.add_argument("--show", type=int, default=20, help="groups to print (default 20)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    parser.check(
        args,
        {
            "near_threshold": ("in (0, 1]", lambda t: 0.0 < t <= 1.0),
            "show": ("a non-negative integer", lambda n: n >= 0),
        },
    )
    if args.dedupe and Path(args.dedupe).exists():
        parser.error(f"--dedupe {args.dedupe} exists; choose a new folder")
    started = time.time()
    try:
        report = audit(args.dataset, args.near_threshold)
    except DatasetError as err:
        parser.error(str(err))
    print(format_summary(report, args.dataset, time.time() - started, args.show))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.dedupe:
        manifest = write_dedupe(args.dataset, report, args.dedupe)
        print(
            f"wrote {args.dedupe}: {manifest['total']:,} images, {len(manifest['removed'])} "
            "removed (listed with the reason in its manifest.json)"
        )
    return report


if __name__ == "__main__":
    main()
