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
# front of random backdrops, so no two of them are near-duplicates (tests/test_synthetic.py).
PLANTED = [
    ("exact", "train/Angry", "test/Angry/planted_exact.png", "copy"),
    ("near", "train/Fear", "val/Fear/planted_shift.png", "shift"),
    ("near", "train/Neutral", "test/Neutral/planted_bright.png", "brighten"),
    ("near", "train/Sad", "test/Sad/planted_jpeg.jpg", "jpeg"),
    ("exact", "train/Happy", "train/Surprise/planted_conflict.png", "copy"),  # label conflict
]
BLANK = "val/Neutral/planted_blank.png"


def change(pixels: np.ndarray, how: str) -> Image.Image:
    if how == "shift":  # one pixel to the right, the left column repeated
        pixels = np.concatenate([pixels[:, :1], pixels[:, :-1]], axis=1)
    if how == "brighten":
        pixels = np.clip(pixels.astype(int) + 30, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if how == "jpeg":
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
    assert found == expected
    conflicts = [g for g in report["groups"] if g["label_conflict"]]
    assert [g["labels"] for g in conflicts] == [["Happy", "Surprise"]]
    assert sum(g["cross_split"] for g in report["groups"]) == 4
    assert [(b["path"], b["std"]) for b in report["blank"]] == [(BLANK, 0.0)]
    assert report["summary"]["in_train"] == {
        "val": {"images": 30, "exact": 0, "near": 1, "other_label": 0},
        "test": {"images": 31, "exact": 1, "near": 2, "other_label": 0},
    }
    out = capsys.readouterr().out
    assert "exact duplicates: 2 groups, 4 images; near-duplicates: 3 groups, 6 images" in out
    assert "test images also in train: 3 of 31 (1 identical, 2 near copies" in out


def test_dedupe_writes_a_clean_copy(planted, tmp_path):
    root, _ = planted
    clean = tmp_path / "clean"
    audit_dataset.main([str(root), "--dedupe", str(clean)])
    manifest = datasets.read_manifest(clean)
    reasons = {r["path"]: r["reason"] for r in manifest["removed"]}
    # the evaluation copy stays and the training copy goes; both copies of a conflict go
    conflict = next(g for g in planted[1] if "train/Surprise/planted_conflict.png" in g)
    leaked = {next(p for p in g if p.startswith("train/")) for g in planted[1] if g != conflict}
    assert set(reasons) == leaked | conflict | {BLANK}
    assert reasons["train/Surprise/planted_conflict.png"].startswith("label conflict")
    assert reasons[BLANK].startswith("blank image")
    assert (clean / "test/Sad/planted_jpeg.jpg").is_file()
    assert manifest["total"] == sum(map(sum, (c.values() for c in manifest["counts"].values())))
    assert manifest["source"]["from"] == str(root.resolve())
    again = audit_dataset.audit(clean)
    assert again["groups"] == [] and again["blank"] == []
    assert not list(tmp_path.glob(".clean*"))  # no temporary folder left


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
        "warning: 1 of 30 val and 3 of 31 test images also occur in train (identical or near "
        f"copies); list them with: python scripts/audit_dataset.py {shlex.quote(str(root))}"
    ]
    assert results["split_overlap"]["test"] == {
        "images": 31,
        "exact": 1,
        "near": 2,
        "other_label": 0,
    }
    low, high = results["test_accuracy_ci95"]
    assert low <= results["test_accuracy"] <= high
    assert (
        json.loads((tmp_path / "r" / "results.json").read_text())["split_overlap"]["val"]["near"]
        == 1
    )
    # the printed command works as printed
    command = shlex.split(warnings[0].split("list them with: ")[1])
    run = subprocess.run(
        [sys.executable, *command[1:]], cwd=repo_root, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "test images also in train: 3 of 31" in run.stdout


def test_near_duplicates_survive_shifts_brightness_contrast_and_jpeg(synthetic_root):
    faces = datasets.load_split(synthetic_root, "train").images.numpy()  # 112 different faces
    hashes = datasets.hash_images(faces)
    assert len(datasets.duplicate_pairs(faces, hashes)[0]) == 0  # no two faces alike
    for how in ("shift", "brighten", "jpeg"):
        copies = np.stack([np.asarray(change(face, how)) for face in faces])
        i, j, similarity = datasets.duplicate_pairs(
            copies, datasets.hash_images(copies), faces, hashes
        )
        assert (i == j).all() and len(i) == len(faces), how  # every copy finds its original only
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
    monkeypatch.setattr(datasets, "overlap_counts", lambda *a: searches.append(1) or search(*a))
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
