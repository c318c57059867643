"""scripts/audit_dataset.py and train.py's start-up check on a dataset with planted duplicates."""

import io
import json
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import train
from scripts import audit_dataset

# (kind, source in train, copy, how): every planted group; the synthetic faces themselves stand in
# front of random backdrops, so no two of them are near-duplicates, not even mirrored
# (tests/test_synthetic.py, test_near_duplicates_survive_...).
PLANTED = [
    ("exact", "train/Angry", "test/Angry/planted_exact.png", "copy"),
    ("near", "train/Fear", "val/Fear/planted_shift.png", "shift"),
    ("near", "train/Neutral", "test/Neutral/planted_bright.png", "brighten"),
    ("near", "train/Sad", "test/Sad/planted_jpeg.jpg", "jpeg"),
    ("exact", "train/Happy", "train/Surprise/planted_conflict.png", "copy"),  # label conflict
    ("mirrored", "train/Disgust", "test/Disgust/planted_mirror.png", "mirror"),
    ("mirrored", "train/Angry", "val/Angry/planted_mirror_shift.png", "mirror shift"),
    ("mirrored", "train/Fear", "train/Fear/planted_mirror_jpeg.jpg", "mirror jpeg"),
    ("exact", "train/Neutral", "test/Sad/planted_conflict.png", "copy"),  # conflict into test
]
BLANK = "val/Neutral/planted_blank.png"
TEST_CONFLICT = "test/Sad/planted_conflict.png"


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """The audit caches what it decodes in the user cache folder: the test's own, never the
    real ~/.cache (subprocesses inherit it too)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def change(pixels: np.ndarray, how: str) -> Image.Image:
    """A copy of `pixels` changed as `how` says: words of copy, mirror (left to right), shift
    (one pixel to the right), brighten, jpeg (quality 75)."""
    if "mirror" in how:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    if "shift" in how:  # one pixel to the right, the left column repeated
        pixels = np.concatenate([pixels[:, :1], pixels[:, :-1]], axis=1)
    if "brighten" in how:
        pixels = np.clip(pixels.astype(int) + 30, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if "jpeg" in how:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75)
        image = Image.open(buffer)
    return image


@pytest.fixture(scope="module")
def planted(synthetic_root, tmp_path_factory):
    """A copy of the synthetic faces with PLANTED copies and one blank image; the groups as
    {frozenset(paths): kind}."""
    root = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns(".cache"))
    groups = {}
    for k, (kind, folder, copy, how) in enumerate(PLANTED):
        source = sorted((root / folder).iterdir())[k]
        with Image.open(source) as im:
            change(np.asarray(im.convert("L")), how).save(root / copy)
        groups[frozenset([str(source.relative_to(root)), copy])] = kind
    Image.new("L", (48, 48), 128).save(root / BLANK)
    return root, groups


def test_audit_finds_exactly_the_planted_groups(planted, tmp_path, capsys):
    root, expected = planted
    report_path = tmp_path / "report.json"
    audit_dataset.main([str(root), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    found = {frozenset(im["path"] for im in g["images"]): g["kind"] for g in report["groups"]}
    assert found == expected  # the 3 mirrored copies among them, and nothing else
    mirrored = {im["path"] for g in report["groups"] for im in g["images"] if im["mirrored"]}
    assert mirrored == {copy for kind, _, copy, _ in PLANTED if kind == "mirrored"}
    conflicts = [g for g in report["groups"] if g["label_conflict"]]
    assert [g["labels"] for g in conflicts] == [["Happy", "Surprise"], ["Neutral", "Sad"]]
    assert sum(g["cross_split"] for g in report["groups"]) == 7
    assert [(b["path"], b["std"]) for b in report["blank"]] == [(BLANK, 0.0)]
    assert report["summary"]["in_train"] == {
        "val": {"images": 31, "exact": 0, "near": 2, "other_label": 0},
        "test": {"images": 33, "exact": 2, "near": 3, "other_label": 1},
    }
    assert report["summary"]["label_conflict_groups_in_test"] == 1
    out = capsys.readouterr().out
    assert (
        "exact duplicates: 3 groups, 6 images; near-duplicates: 3 groups, 6 images; mirrored "
        "copies: 3 groups, 6 images" in out
    )
    assert "same picture under different labels: 2 groups (1 reaching into test)" in out
    assert "test images also in train: 5 of 33 (2 identical, 3 near copies" in out
    assert "test/Disgust/planted_mirror.png (mirrored)" in out


def test_dedupe_writes_a_clean_copy_and_keeps_the_test_split_whole(planted, tmp_path, capsys):
    root, groups = planted
    clean = tmp_path / "clean"
    audit_dataset.main([str(root), "--dedupe", str(clean)])
    manifest = datasets.read_manifest(clean)
    reasons = {r["path"]: r["reason"] for r in manifest["removed"]}
    # the evaluation copy stays and the training copy goes; both copies of a conflict in train
    # go; of a conflict reaching into test, the train copy goes and the test image stays
    conflict = next(g for g in groups if "train/Surprise/planted_conflict.png" in g)
    within_train = next(g for g in groups if "train/Fear/planted_mirror_jpeg.jpg" in g)
    leaked = {next(p for p in g if p.startswith("train/")) for g in groups}
    leaked -= {"train/Surprise/planted_conflict.png"} | within_train
    assert set(reasons) == leaked | conflict | {"train/Fear/planted_mirror_jpeg.jpg", BLANK}
    assert reasons["train/Surprise/planted_conflict.png"].startswith("label conflict")
    assert reasons["train/Fear/planted_mirror_jpeg.jpg"].startswith("mirrored duplicate of ")
    assert reasons[BLANK].startswith("blank image")
    (kept,) = manifest["kept_in_test"]
    assert (kept["path"], kept["reason"]) == (
        TEST_CONFLICT,
        "label conflict: the same picture is labelled Neutral and Sad",
    )
    train_copy = [r for r in manifest["removed"] if r["group"] == kept["group"]]
    assert [r["path"].split("/")[:2] for r in train_copy] == [["train", "Neutral"]]
    assert manifest["test_images_removed"] == 0
    assert manifest["counts"]["test"] == datasets.count_images(root)["test"]  # whole
    assert (clean / TEST_CONFLICT).is_file() and (clean / "test/Sad/planted_jpeg.jpg").is_file()
    out = capsys.readouterr().out
    assert (
        "the test split is kept whole: 1 test image(s) the audit flags stay, 1 in label "
        "conflicts (their copies in train and val removed); `kept_in_test` in its manifest.json "
        "lists them, --clean-test removes them" in out
    )
    assert manifest["total"] == sum(map(sum, (c.values() for c in manifest["counts"].values())))
    assert manifest["source"]["from"] == str(root.resolve())
    again = audit_dataset.audit(clean)
    assert again["groups"] == [] and again["blank"] == []
    assert not list(tmp_path.glob(".clean*"))  # no temporary folder left

    # --clean-test: the user's choice, said as much
    audit_dataset.main([str(root), "--dedupe", str(tmp_path / "cleaner"), "--clean-test"])
    manifest = datasets.read_manifest(tmp_path / "cleaner")
    assert TEST_CONFLICT in {r["path"] for r in manifest["removed"]}
    assert manifest["kept_in_test"] == [] and manifest["test_images_removed"] == 1
    assert "1 of them from test (--clean-test)" in capsys.readouterr().out


def one_line_error(err: str) -> str:
    """The message of a one-line command error (no usage block, no traceback)."""
    assert err.count("\n") == 1 and err.startswith("audit_dataset.py: error: "), err
    assert "usage:" not in err and "Traceback" not in err
    return err.removeprefix("audit_dataset.py: error: ").strip()


def test_audit_errors_are_one_line(tmp_path, planted, capsys):
    root = str(planted[0])
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([root, "--dedupe", str(tmp_path)], f"--dedupe {tmp_path} exists; choose a new folder"),
        ([root, "--near-threshold", "0"], "--near-threshold 0.0: must be in (0, 1]"),
        ([root, "--near-threshold", "1.5"], "--near-threshold 1.5: must be in (0, 1]"),
        ([root, "--show", "-1"], "--show -1: must be a non-negative integer"),
        ([root, "--show", "all"], "argument --show: invalid int value: 'all'"),
        ([root, "--skip-bad-images"], "unrecognized arguments: --skip-bad-images"),
        ([], "the following arguments are required: dataset"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            audit_dataset.main(argv)
        assert exit_info.value.code == 2, argv
        assert message in one_line_error(capsys.readouterr().err), argv


def test_unreadable_image_advice_is_the_audits_own(planted, tmp_path, capsys):
    """load_split advises --skip-bad-images, which train.py has and the audit has not."""
    root = tmp_path / "data"
    shutil.copytree(planted[0], root, ignore=shutil.ignore_patterns(".cache"))
    (root / "val" / "Sad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        audit_dataset.main([str(root)])
    assert exit_info.value.code == 2
    message = one_line_error(capsys.readouterr().err)
    assert message.startswith(f"cannot read image {root / 'val' / 'Sad' / 'broken.png'} (")
    assert message.endswith("; replace or delete it, then audit again")
    assert "--skip-bad-images" not in message


def test_train_reports_leaks_at_start_and_in_results(planted, tmp_path, capsys, repo_root):
    root, _ = planted
    argv = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
            "--batch-size", "32", "--device", "cpu", "--wandb", "disabled", "--no-progress",
            "--epochs", "1", "--dataset-path", str(root), "--output-dir", str(tmp_path),
            "--run-name", "r"]  # fmt: skip
    results = train.main(train.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "also occur in train" in line]
    assert warnings == [
        "warning: 2 of 31 val and 5 of 33 test images also occur in train (identical or near "
        "copies, 1 under another label); list them with: python scripts/audit_dataset.py "
        f"{shlex.quote(str(root))}"
    ]
    assert results["split_overlap"]["test"] == {
        "images": 33,
        "exact": 2,
        "near": 3,
        "other_label": 1,
    }
    low, high = results["test_accuracy_ci95"]
    assert low <= results["test_accuracy"] <= high
    assert (
        json.loads((tmp_path / "r" / "results.json").read_text())["split_overlap"]["val"]["near"]
        == 2
    )
    # the printed command works as printed
    command = shlex.split(warnings[0].split("list them with: ")[1])
    run = subprocess.run(
        [sys.executable, *command[1:]], cwd=repo_root, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "test images also in train: 5 of 33" in run.stdout


def test_near_duplicates_survive_shifts_brightness_contrast_jpeg_and_mirroring(synthetic_root):
    faces = datasets.load_split(synthetic_root, "train").images.numpy()  # 112 different faces
    hashes = datasets.hash_images(faces)
    # no two faces alike, not even mirrored, though the faces are nearly symmetric: the search
    # with mirrored copies reports no pair the search without them did not
    for mirrored in (False, True):
        assert len(datasets.duplicate_pairs(faces, hashes, mirrored=mirrored).i) == 0
    for how in ("shift", "brighten", "jpeg", "mirror", "mirror shift", "mirror jpeg"):
        copies = np.stack([np.asarray(change(face, how)) for face in faces])
        pairs = datasets.duplicate_pairs(copies, datasets.hash_images(copies), faces, hashes)
        assert (pairs.i == pairs.j).all() and len(pairs.i) == len(faces), how  # only its own
        assert (pairs.mirrored == ("mirror" in how)).all(), how
        unmirrored = datasets.duplicate_pairs(
            copies, datasets.hash_images(copies), faces, hashes, mirrored=False
        )
        assert len(unmirrored.i) == (0 if "mirror" in how else len(faces)), how
    darker = np.clip(faces.astype(int) * 0.8 - 10, 0, 255).astype(np.uint8)  # contrast too
    down = np.concatenate([faces[:, :1], faces[:, :-1]], axis=1)  # 1 pixel down, not right
    for copies in (darker, down):
        assert (
            datasets.verified_similarity(copies, faces) >= datasets.NEAR_DUPLICATE_SIMILARITY
        ).all()


def test_split_overlap_counts_copies_under_another_label(synthetic_root):
    train = datasets.load_split(synthetic_root, "train")
    val = datasets.load_split(synthetic_root, "val")
    images, targets = val.images.clone(), val.targets.clone()
    images[0], targets[0] = train.images[5], (train.targets[5] + 1) % 7  # relabelled copy
    images[1] = torch.tensor(np.array(change(train.images[9].numpy(), "jpeg")))
    leaky = datasets.SplitData(images, targets, val.classes, val.paths, 0)
    counts, warning = datasets.split_overlap(train, {"val": leaky, "test": val})
    assert counts["val"] == {"images": 28, "exact": 1, "near": 1, "other_label": 1}
    assert counts["test"] == {"images": 28, "exact": 0, "near": 0, "other_label": 0}
    assert warning.startswith("warning: 2 of 28 val images also occur in train")
    assert "1 under another label" in warning


def test_split_overlap_is_cached_by_pixels_and_labels(synthetic_root, tmp_path, monkeypatch):
    """train.py checks at every start and resume: the second check of the same data reads the
    counts beside the decoded splits; other pixels or labels, or a broken file, search again."""
    train = datasets.load_split(synthetic_root, "train")
    val = datasets.load_split(synthetic_root, "val")
    images, targets = val.images.clone(), val.targets.clone()
    images[0] = train.images[5]
    leaky = datasets.SplitData(images, targets, val.classes, val.paths, 0)
    searches = []
    search = datasets.overlap_counts
    monkeypatch.setattr(
        datasets.duplicates, "overlap_counts", lambda *a: searches.append(1) or search(*a)
    )
    root = tmp_path / "ds"
    root.mkdir()

    first = datasets.split_overlap(train, {"val": leaky, "test": val}, root)
    assert first[0]["val"]["exact"] == 1 and first[1].startswith("warning: 1 of 28 val")
    assert len(list((root / ".cache").glob("overlap-*.pt"))) == 1 and len(searches) == 1
    assert datasets.split_overlap(train, {"val": leaky, "test": val}, root) == first
    assert len(searches) == 1  # read, not searched

    other_targets = targets.clone()
    other_targets[0] = (train.targets[5] + 1) % 7  # the same pixels under another label
    relabelled = datasets.SplitData(images, other_targets, val.classes, val.paths, 0)
    counts, _ = datasets.split_overlap(train, {"val": relabelled, "test": val}, root)
    assert counts["val"]["other_label"] == 1 and len(searches) == 2
    for broken in (b"garbage", [1, 2], {"val": {"images": "28"}, "test": {}}):
        for f in (root / ".cache").glob("overlap-*.pt"):
            f.write_bytes(broken) if isinstance(broken, bytes) else torch.save(broken, f)
        assert datasets.split_overlap(train, {"val": leaky, "test": val}, root) == first
    assert len(searches) == 5

    # Without a dataset folder nothing is written, anywhere.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    counts, _ = datasets.split_overlap(train, {"val": leaky, "test": val}, tmp_path / "no")
    assert counts == first[0]
    assert not (tmp_path / "no").exists() and not (tmp_path / "xdg").exists()
    assert len(searches) == 6


def test_the_audit_writes_nothing_into_the_dataset_and_skips_hidden_files(
    planted, tmp_path, monkeypatch, capsys
):
    """The dataset folder may be read-only or shared: the audit reads train.py's cache there,
    but caches what it decodes in the user cache folder. AppleDouble files (`._0.png`, macOS's
    metadata beside every file on a shared drive) and hidden files are no images of the dataset:
    neither an unreadable image nor a duplicate."""
    root = tmp_path / "data"
    shutil.copytree(planted[0], root, ignore=shutil.ignore_patterns(".cache"))
    angry = root / "train" / "Angry"
    (angry / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(100))  # AppleDouble magic
    shutil.copy(next(angry.glob("[0-9]*.png")), angry / ".hidden.png")  # would be a duplicate
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def listing() -> dict:
        return {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    before = listing()
    report = audit_dataset.audit(root)
    assert listing() == before
    assert report["splits"] == {"train": 114, "val": 31, "test": 33}  # no hidden file
    assert len(report["groups"]) == len(planted[1])  # the same groups, no more
    cached = list((tmp_path / "xdg" / "emonext").glob("*/*-*.pt"))
    assert sorted(p.name.split("-")[0] for p in cached) == ["test", "train", "val"]
    monkeypatch.setattr(datasets.folders, "decode_image", lambda *a: 1 / 0)  # now read, not decoded
    assert audit_dataset.audit(root)["summary"] == report["summary"]
    assert listing() == before


def test_outputs_are_checked_before_the_audit(planted, tmp_path, monkeypatch, capsys):
    """--json and --dedupe that cannot be written: one line, exit status 2, nothing audited."""
    monkeypatch.setattr(audit_dataset, "audit", lambda *a: 1 / 0)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file")
    root = str(planted[0])
    cases = [
        (["--json", str(a_file / "r.json")], f"--json {a_file / 'r.json'}: {a_file} is a file"),
        (["--json", str(tmp_path)], f"--json {tmp_path} is a folder; give the path of a file"),
        (["--dedupe", str(a_file / "clean")], f"--dedupe {a_file / 'clean'}: {a_file} is a file"),
        (["--clean-test"], "--clean-test applies to the copy --dedupe writes; give --dedupe OUT"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            audit_dataset.main([root, *argv])
        assert exit_info.value.code == 2, argv
        assert one_line_error(capsys.readouterr().err).startswith(message), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
