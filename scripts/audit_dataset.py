"""Audit a dataset folder: duplicates, leaks between splits, label conflicts, blank images.

    python scripts/audit_dataset.py FER2013                        # a summary
    python scripts/audit_dataset.py FER2013 --json report.json     # every group with its paths
    python scripts/audit_dataset.py FER2013 --dedupe FER2013-clean # a cleaned copy

Finds, within and across train/val/test: exact duplicates (identical decoded pixels),
near-duplicates (the same picture shifted by a pixel, brightened, darkened or re-encoded as JPEG;
see datasets/duplicates.py), mirrored copies (the same, flipped left to right), the same
picture under two labels, and blank or constant images. Images that are copies of each other
form a group; a group is "exact" when all its images have identical pixels, "mirrored" when a
mirrored copy joins it, "near" otherwise. The validation and test images that also occur in train
are counted as train.py counts them at start-up.

`--dedupe OUT` writes a copy without the blank images, without the images of a group whose
labels disagree, and with one image of every other group: the evaluation copy (test, then val)
where there is one, so training loses its leaked copies. The test split is never shrunk: what
the audit flags in test (a test image in a label conflict, a second copy within test, a blank
test image) is kept, and the summary and OUT/manifest.json (`kept_in_test`) say so;
`--clean-test` removes those too. OUT/manifest.json lists each removed file and why.

The audit writes nothing into the dataset folder: it reads the decoded splits that train.py
cached there, and caches its own in the user cache folder ($XDG_CACHE_HOME/emonext/).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets  # noqa: E402
from datasets import SPLITS, DatasetError  # noqa: E402
from utils import (  # noqa: E402
    ArgumentParser,
    CLIError,
    check_output_dir,
    run_command,
    write_text_atomic,
)

KEEP_FIRST = ("test", "val", "train")  # which copy of a duplicate group --dedupe keeps


def _groups(pairs: datasets.DuplicatePairs, n: int) -> list[list[int]]:
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
    """Every image of `splits`, decoded, or read from the cache that train.py fills; a split
    decoded here is cached in the user cache folder, never in the dataset folder (which may be
    read-only or shared)."""
    try:
        return {s: datasets.load_split(root, s, cache_in_dataset=False) for s in splits}
    except datasets.UnreadableImageError as err:
        # load_split advises train.py's --skip-bad-images; the audit compares every image with
        # every other, so it has no such flag: the image must go or be replaced.
        reason = str(err).removesuffix(f"; {datasets.SKIP_BAD_IMAGES_HINT}")
        raise DatasetError(f"{reason}; replace or delete it, then audit again") from None


@dataclass
class Images:
    """What a report says of each image of the audited splits, by index."""

    split: list[str]
    label: list[str]
    path: list[str]  # relative to the dataset folder
    pixels: list[bytes]  # digests: equal ones are identical pictures


def _mirrored_members(members: list[int], edges: list[tuple]) -> dict[int, bool]:
    """Whether each member is mirrored relative to the group's first one: the parity of the
    mirrored matches on a path of matches from it (breadth first)."""
    neighbours: dict[int, list[tuple[int, bool]]] = {m: [] for m in members}
    for a, b, _, mirrored in edges:
        neighbours[a].append((b, mirrored))
        neighbours[b].append((a, mirrored))
    flipped, queue = {members[0]: False}, [members[0]]
    while queue:
        a = queue.pop()
        for b, mirrored in neighbours[a]:
            if b not in flipped:
                flipped[b] = flipped[a] != mirrored
                queue.append(b)
    return flipped


def describe_group(group_id: int, members: list[int], edges: list[tuple], images: Images) -> dict:
    """One group of the report; `edges` are its pairs (i, j, similarity, mirrored)."""
    members = sorted(members, key=lambda m: (SPLITS.index(images.split[m]), images.path[m]))
    splits = sorted({images.split[m] for m in members}, key=SPLITS.index)
    labels = sorted({images.label[m] for m in members})
    if len({images.pixels[m] for m in members}) == 1:
        kind = "exact"
    else:
        kind = "mirrored" if any(edge[3] for edge in edges) else "near"
    flipped = _mirrored_members(members, edges)
    return {
        "id": group_id,
        "kind": kind,
        "splits": splits,
        "cross_split": len(splits) > 1,
        "labels": labels,
        "label_conflict": len(labels) > 1,
        "min_similarity": round(min(edge[2] for edge in edges), 4),
        "images": [
            {
                "path": images.path[m],
                "split": images.split[m],
                "label": images.label[m],
                "mirrored": flipped[m],
            }
            for m in members
        ],
    }


def find_groups(pairs: datasets.DuplicatePairs, images: Images) -> list[dict]:
    """The duplicate groups of the pairs, described (`describe_group`)."""
    members_of = _groups(pairs, len(images.path))
    group_of = {m: g for g, members in enumerate(members_of) for m in members}
    edges: list[list[tuple]] = [[] for _ in members_of]
    for edge in zip(*(x.tolist() for x in pairs), strict=True):
        edges[group_of[edge[0]]].append(edge)
    return [
        describe_group(g, members, group_edges, images)
        for g, (members, group_edges) in enumerate(zip(members_of, edges, strict=True))
    ]


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
    pixels = np.concatenate([d.images.numpy() for d in data.values()])
    hashes = datasets.hash_images(pixels)
    images = Images(
        split=[s for s, d in data.items() for _ in range(len(d.targets))],
        label=[classes[t] for d in data.values() for t in d.targets.tolist()],
        path=[os.path.relpath(p, root) for d in data.values() for p in d.paths],
        pixels=hashes.pixels,
    )
    groups = find_groups(datasets.duplicate_pairs(pixels, hashes, similarity=similarity), images)
    blank = [
        {
            "path": images.path[m],
            "split": images.split[m],
            "label": images.label[m],
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
        "images": len(images.path),
        "exact_groups": count("exact")[0],
        "exact_images": count("exact")[1],
        "near_groups": count("near")[0],
        "near_images": count("near")[1],
        "mirrored_groups": count("mirrored")[0],
        "mirrored_images": count("mirrored")[1],
        "cross_split_groups": count(key="cross_split")[0],
        "label_conflict_groups": count(key="label_conflict")[0],
        "label_conflict_groups_in_test": sum(
            g["label_conflict"] and "test" in g["splits"] for g in groups
        ),
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
            "mirrored": True,
            "blank_std": datasets.BLANK_STD,
        },
        "summary": summary,
        "groups": groups,
        "blank": blank,
    }


def removals(report: dict, clean_test: bool = False) -> tuple[list[dict], list[dict]]:
    """What --dedupe leaves out, one entry per file with the reason; and the test images it
    keeps although the audit flags them (none with `clean_test`), with the same reasons: the
    test split is the benchmark, and a smaller one gives figures that compare with nothing."""
    removed: list[dict] = []
    kept_in_test: list[dict] = []

    def drop(image: dict, group: int | None, reason: str) -> None:
        entry = {"path": image["path"], "group": group, "reason": reason}
        (kept_in_test if image["split"] == "test" and not clean_test else removed).append(entry)

    for group in report["groups"]:
        images = group["images"]
        if group["label_conflict"]:  # which label is right is unknown
            reason = "label conflict: the same picture is labelled " + " and ".join(group["labels"])
            for image in images:
                drop(image, group["id"], reason)
            continue
        keep = min(images, key=lambda im: (KEEP_FIRST.index(im["split"]), im["path"]))
        for image in images:
            if image is not keep:
                drop(image, group["id"], f"{group['kind']} duplicate of {keep['path']}")
    for image in report["blank"]:
        drop(image, None, f"blank image (pixel standard deviation {image['std']:.2f})")
    return removed, kept_in_test


def _dataset_files(root: Path, splits: list[str]) -> list[Path]:
    """The image files of `splits` that the loaders read (no hidden or AppleDouble files)."""
    files = []
    for split in splits:
        for path in sorted((root / split).rglob("*")):
            parts = path.relative_to(root).parts
            if path.suffix.lower() in datasets.IMG_EXTENSIONS and path.is_file():
                if not any(datasets.is_hidden(part) for part in parts):
                    files.append(path)
    return files


def write_dedupe(
    root: str | os.PathLike, report: dict, out: str | os.PathLike, clean_test: bool = False
) -> dict:
    """A copy of `root` without `removals(report, clean_test)`, published atomically; returns
    its manifest (`removed`, `kept_in_test`, `test_images_removed`)."""
    root, out = Path(root), Path(out)
    removed, kept_in_test = removals(report, clean_test)
    gone = {r["path"] for r in removed}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp = work / "dataset"  # made in the private temporary folder: the usual folder mode
    try:
        kept = 0
        for path in _dataset_files(root, list(report["splits"])):
            rel = os.path.relpath(path, root)
            if rel in gone:
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
                "clean_test": clean_test,
            },
            "removed": removed,
            "kept_in_test": kept_in_test,
            "test_images_removed": sum(r["path"].startswith("test" + os.sep) for r in removed),
            "counts": datasets.count_images(tmp),
            "total": kept,
            "content_hash": datasets.content_hash(tmp),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        datasets.write_manifest(tmp, manifest)
        datasets.publish_dataset(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def describe_dedupe(out: str, manifest: dict) -> str:
    """What --dedupe did, and what it did to the test split, in a line or two."""
    line = (
        f"wrote {out}: {manifest['total']:,} images, {len(manifest['removed'])} removed (listed "
        "with the reason in its manifest.json)"
    )
    if manifest["source"]["clean_test"]:
        return line + f"; {manifest['test_images_removed']} of them from test (--clean-test)"
    kept = manifest["kept_in_test"]
    if not kept:
        return line + "; the test split is whole"
    conflicts = sum(k["reason"].startswith("label conflict") for k in kept)
    blank = sum(k["group"] is None for k in kept)
    what = [
        f"{n} {kind}"
        for n, kind in (
            (conflicts, "in label conflicts (their copies in train and val removed)"),
            (len(kept) - conflicts - blank, "copies of another test image"),
            (blank, "blank"),
        )
        if n
    ]
    return line + (
        f"\nthe test split is kept whole: {len(kept)} test image(s) the audit flags stay, "
        f"{', '.join(what)}; `kept_in_test` in its manifest.json lists them, --clean-test "
        "removes them"
    )


def format_summary(report: dict, name: str, seconds: float, show: int) -> str:
    s = report["summary"]
    per_split = ", ".join(f"{k} {v:,}" for k, v in report["splits"].items())
    lines = [
        f"{name}: {s['images']:,} images ({per_split}), audited in {seconds:.1f} s",
        f"exact duplicates: {s['exact_groups']} groups, {s['exact_images']} images; "
        f"near-duplicates: {s['near_groups']} groups, {s['near_images']} images; "
        f"mirrored copies: {s['mirrored_groups']} groups, {s['mirrored_images']} images",
        f"groups across splits: {s['cross_split_groups']}; same picture under different labels: "
        f"{s['label_conflict_groups']} groups ({s['label_conflict_groups_in_test']} reaching into "
        f"test); blank or constant images: {s['blank_images']}",
    ]
    for split, c in s["in_train"].items():
        lines.append(
            f"{split} images also in train: {c['exact'] + c['near']} of {c['images']} "
            f"({c['exact']} identical, {c['near']} near copies, {c['other_label']} under "
            "another label)"
        )
    for group in report["groups"][:show]:
        paths = " ".join(im["path"] + " (mirrored)" * im["mirrored"] for im in group["images"])
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
        "--clean-test",
        action="store_true",
        help="with --dedupe: also remove the test images the audit flags (label conflicts, "
        "copies within test, blank images); by default the test split is kept whole, so that "
        "figures on it compare with published ones",
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
    if args.clean_test and not args.dedupe:
        parser.error("--clean-test applies to the copy --dedupe writes; give --dedupe OUT")
    check_outputs(parser, args)
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
        manifest = write_dedupe(args.dataset, report, args.dedupe, args.clean_test)
        print(describe_dedupe(args.dedupe, manifest))
    return report


def check_outputs(parser: ArgumentParser, args) -> None:
    """--json and --dedupe, before the audit (minutes on a large dataset): a place that can be
    written, and not a folder where a file goes or an existing folder where a new one goes."""
    if args.json and Path(args.json).is_dir():
        parser.error(f"--json {args.json} is a folder; give the path of a file to write")
    if args.dedupe and Path(args.dedupe).exists():
        parser.error(f"--dedupe {args.dedupe} exists; choose a new folder")
    try:
        if args.json:  # check_output_dir checks the first folder that exists on the way up
            json_file = Path(args.json)
            check_output_dir(json_file.absolute().parent if json_file.exists() else json_file,
                             "--json")  # fmt: skip
        if args.dedupe:
            check_output_dir(args.dedupe, "--dedupe")
    except CLIError as err:
        parser.error(str(err))


if __name__ == "__main__":
    run_command("audit_dataset.py", main, None)  # main(None) parses sys.argv
