import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from make_synthetic import main, parse_args, run

import datasets
from datasets import EXPRESSIONS, draw_face, make_synthetic
from utils import run_command

ROOT = Path(__file__).resolve().parent.parent


def test_layout_counts_manifest(synthetic_root):
    assert datasets.check_dataset(synthetic_root) == datasets.CLASSES
    counts = datasets.count_images(synthetic_root)
    assert counts["train"] == {c: 16 for c in datasets.CLASSES}
    assert counts["val"] == counts["test"] == {c: 4 for c in datasets.CLASSES}
    manifest = datasets.read_manifest(synthetic_root)
    assert manifest["counts"] == counts and manifest["total"] == 7 * 24
    assert manifest["content_hash"] == datasets.content_hash(synthetic_root)
    split = datasets.load_split(synthetic_root, "train", cache=False)
    assert split.images.shape == (7 * 16, 48, 48) and split.images.dtype == torch.uint8


def test_deterministic_by_seed(tmp_path):
    splits = {"train": 3, "val": 1, "test": 1}
    a = make_synthetic(tmp_path / "a", seed=1, splits=splits)
    b = make_synthetic(tmp_path / "b", seed=1, splits=splits)
    c = make_synthetic(tmp_path / "c", seed=2, splits=splits)
    hash_a = datasets.content_hash(a)
    assert hash_a == datasets.content_hash(b) != datasets.content_hash(c)


def test_idempotent_and_no_clobber(tmp_path, capsys):
    out = tmp_path / "s"
    splits = {"train": 2, "val": 1, "test": 1}
    make_synthetic(out, seed=0, splits=splits)
    before = (out / "manifest.json").stat().st_mtime_ns
    make_synthetic(out, seed=0, splits=splits, quiet=False)
    assert "already there" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(datasets.DatasetError, match="--force"):
        make_synthetic(out, seed=1, splits=splits)
    make_synthetic(out, seed=1, splits=splits, force=True)
    assert datasets.read_manifest(out)["source"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folders left
    mine = tmp_path / "mine"  # not a dataset of this project: never replaced, even with force
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(datasets.DatasetError, match="never replaced"):
        make_synthetic(mine, seed=0, splits=splits, force=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_faces_vary_and_expressions_differ():
    rng = np.random.default_rng(0)
    faces = {name: np.stack([draw_face(rng, name) for _ in range(30)]) for name in EXPRESSIONS}
    for stack in faces.values():
        assert stack.dtype == np.uint8 and stack.shape == (30, 48, 48)
        assert stack.std(axis=0).mean() > 10  # pose, lighting and noise vary

    # Expressions are drawn differently: the class-mean faces differ clearly (learnability
    # itself was checked with a small CNN, see docs/DATA.md).
    means = np.stack([f.astype(np.float32).mean(0) for f in faces.values()])
    gaps = np.abs(means[:, None] - means[None]).mean((2, 3))
    assert (gaps + np.eye(len(means)) * 100).min() > 1.0


def test_main_in_process_and_subprocess(tmp_path):
    main(
        [
            "--out",
            str(tmp_path / "a"),
            "--per-class",
            "2",
            "--val-per-class",
            "1",
            "--test-per-class",
            "1",
            "--seed",
            "3",
        ]
    )
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_synthetic.py"),
            "--out",
            str(tmp_path / "b"),
            "--per-class",
            "2",
            "--val-per-class",
            "1",
            "--test-per-class",
            "1",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert datasets.content_hash(tmp_path / "a") == datasets.content_hash(tmp_path / "b")


def test_old_import_still_works():
    import make_synthetic as script

    assert script.make_synthetic is make_synthetic


def one_line_error(err: str, prog: str = "make_synthetic.py") -> str:
    """The message of a one-line command error (no usage block, no traceback)."""
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert "usage:" not in err and "Traceback" not in err
    return err.removeprefix(f"{prog}: error: ").strip()


@pytest.mark.parametrize("flag", ["--per-class", "--val-per-class", "--test-per-class"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_images_per_class_must_be_positive(tmp_path, capsys, flag, value):
    """A split without images cannot be loaded: no "wrote 840 images" for such a dataset."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "s"), flag, value])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert one_line_error(err) == f"{flag} {value}: must be a positive integer"
    assert "wrote" not in out and not (tmp_path / "s").exists()


def test_make_synthetic_refuses_empty_splits(tmp_path):
    with pytest.raises(ValueError, match="at least 1 image per class"):
        make_synthetic(tmp_path / "a", per_class=0)
    with pytest.raises(ValueError, match="at least 1 image per class"):
        make_synthetic(tmp_path / "b", splits={"train": 2, "val": 0, "test": 1})
    assert list(tmp_path.iterdir()) == []


def test_command_line_errors_are_one_line(tmp_path, capsys):
    """A parser error exits with 2, a folder in the way with 1; one line each. The command's own
    entry point in-process (`run_command(..., run, parse_args(argv))`, as its __main__ calls it),
    and the first case once more as a real command."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cases = [
        (["--out", str(tmp_path / "s"), "--per-class", "0"], 2, "--per-class 0: must be"),
        (["--out", str(tmp_path / "s"), "--per-class", "many"], 2, "invalid int value: 'many'"),
        (["--out", str(tmp_path / "s"), "--seed", "-1"], 2, "--seed -1: must be a non-negative"),
        (["--per-class", "2"], 2, "the following arguments are required: --out"),
        (["--out", str(mine), "--per-class", "1"], 1, "never replaced"),
    ]
    for argv, status, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_command("make_synthetic.py", run, parse_args(argv))
        out, err = capsys.readouterr()
        assert exit_info.value.code == status, (argv, err)
        assert message in one_line_error(err), argv
        assert out == ""
    script = str(ROOT / "scripts" / "make_synthetic.py")
    r = subprocess.run([sys.executable, script, *cases[0][0]], capture_output=True, text=True)
    assert r.returncode == 2 and cases[0][2] in one_line_error(r.stderr) and r.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_the_dataset_folder_has_the_mode_every_new_folder_gets(tmp_path):
    """0755 under the usual umask 022, as download_dataset.py's datasets (it was 0700, the mode
    of the private temporary folder it was built in, so other users of a machine could not read
    it); so too when a dataset is replaced."""
    splits = {"train": 1, "val": 1, "test": 1}
    modes = []
    old = os.umask(0o022)
    try:
        (tmp_path / "reference").mkdir()
        modes.append((tmp_path / "reference").stat().st_mode & 0o777)
        out = make_synthetic(tmp_path / "a", seed=0, splits=splits)
        modes += [out.stat().st_mode & 0o777, (out / "train").stat().st_mode & 0o777]
        make_synthetic(out, seed=1, splits=splits, force=True)
        modes.append(out.stat().st_mode & 0o777)
    finally:
        os.umask(old)
    assert modes == [0o755] * 4
