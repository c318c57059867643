import csv
import functools
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from download_dataset import main
from PIL import Image

import datasets
from datasets import FER2013_CSV_CLASSES, DatasetError

ROOT = Path(__file__).resolve().parent.parent
USAGES = ["Training", "PublicTest", "PrivateTest"]


def write_csv(path: Path, rows_per_class_split: int = 2, mutate=None) -> list[list[str]]:
    """A small fer2013.csv: every class in every split; returns the data rows."""
    rng = np.random.default_rng(0)
    rows = []
    for usage in USAGES:
        for emotion in range(7):
            for _ in range(rows_per_class_split):
                pixels = " ".join(map(str, rng.integers(0, 256, 48 * 48)))
                rows.append([str(emotion), pixels, usage])
    header = ["emotion", "pixels", "Usage"]
    if mutate:
        header, rows = mutate(header, rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return rows


def assert_nothing_left(parent: Path, keep: set[str]):
    assert {p.name for p in parent.iterdir()} == keep


def interrupt_at_the_tenth_image(monkeypatch):
    """Ctrl-C while download_dataset writes its 10th image; returns the real writer."""
    import download_dataset

    real_save, calls = download_dataset._save, []

    def save_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        real_save(*args)

    monkeypatch.setattr(download_dataset, "_save", save_then_interrupt)
    return real_save


def test_csv_end_to_end(tmp_path, capsys):
    rows = write_csv(tmp_path / "fer2013.csv")
    out = tmp_path / "FER2013"
    main(["--csv", str(tmp_path / "fer2013.csv"), "--out", str(out)])
    printed = capsys.readouterr()
    assert "Surprise" in printed.out and "differ from the standard" in printed.err
    assert datasets.check_dataset(out) == datasets.CLASSES
    split_of = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
    for i, (emotion, pixels, usage) in enumerate(rows):  # one lossless PNG per row, named by it
        path = out / split_of[usage] / FER2013_CSV_CLASSES[int(emotion)] / f"{i}.png"
        want = np.array(pixels.split(), dtype=np.uint8).reshape(48, 48)
        assert np.array_equal(np.asarray(Image.open(path)), want)
    manifest = datasets.read_manifest(out)
    assert manifest["total"] == len(rows) and manifest["format"] == "png"
    assert manifest["counts"]["val"]["Sad"] == 2
    assert manifest["content_hash"] == datasets.content_hash(out)
    assert_nothing_left(tmp_path, {"fer2013.csv", "FER2013"})

    # Idempotent: same source -> nothing rewritten.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    main(["--csv", str(tmp_path / "fer2013.csv"), "--out", str(out)])
    assert "already there" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime

    # A different source does not clobber without --force.
    write_csv(tmp_path / "other.csv", rows_per_class_split=1)
    with pytest.raises(DatasetError, match="--force"):
        main(["--csv", str(tmp_path / "other.csv"), "--out", str(out)])
    assert datasets.read_manifest(out)["total"] == len(rows)
    main(["--csv", str(tmp_path / "other.csv"), "--out", str(out), "--force", "--format", "jpg"])
    assert datasets.read_manifest(out)["total"] == 21
    assert len(list(out.rglob("*.jpg"))) == 21 and not list(out.rglob("*.png"))
    assert_nothing_left(tmp_path, {"fer2013.csv", "other.csv", "FER2013"})


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_force_replaces_only_a_dataset_this_tool_wrote(tmp_path, monkeypatch):
    import download_dataset

    write_csv(tmp_path / "a.csv")
    write_csv(tmp_path / "b.csv", rows_per_class_split=1)
    mine = tmp_path / "mine"  # a user's folder: never touched, --force or not
    (mine / "photos").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    Image.new("L", (48, 48)).save(mine / "photos" / "me.png")
    before = listing(mine)
    for extra in ([], ["--force"]):
        with pytest.raises(DatasetError) as err:
            main(["--csv", str(tmp_path / "a.csv"), "--out", str(mine), *extra])
        message = str(err.value)
        assert "\n" not in message and "manifest.json" in message and "not even with" in message
        assert listing(mine) == before
    monkeypatch.chdir(mine)
    with pytest.raises(DatasetError, match="current folder"):
        main(["--csv", str(tmp_path / "a.csv"), "--out", ".", "--force"])
    assert listing(mine) == before
    assert_nothing_left(tmp_path, {"a.csv", "b.csv", "mine"})  # no hidden ..old-* folders

    out = tmp_path / "FER2013"
    main(["--csv", str(tmp_path / "a.csv"), "--out", str(out)])
    datasets.load_split(out, "val")  # the loaders' cache in out/.cache is the project's own
    for extra in (out / "notes.txt", out / "train" / "Angry" / "mine.png"):
        Image.new("L", (48, 48)).save(extra) if extra.suffix == ".png" else extra.write_text("x")
        with pytest.raises(DatasetError, match=f"does not list .*{extra.name}"):
            main(["--csv", str(tmp_path / "b.csv"), "--out", str(out), "--force"])
        extra.unlink()

    # The old dataset goes only once the new one is complete: interrupted, it is intact.
    real_save = interrupt_at_the_tenth_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(["--csv", str(tmp_path / "b.csv"), "--out", str(out), "--force"])
    manifest = datasets.read_manifest(out)
    assert manifest["total"] == 42 and datasets.content_hash(out) == manifest["content_hash"]
    assert_nothing_left(tmp_path, {"a.csv", "b.csv", "mine", "FER2013"})
    monkeypatch.setattr(download_dataset, "_save", real_save)
    main(["--csv", str(tmp_path / "b.csv"), "--out", str(out), "--force"])
    assert datasets.read_manifest(out)["total"] == 21
    assert_nothing_left(tmp_path, {"a.csv", "b.csv", "mine", "FER2013"})


def make_targz(tmp_path: Path) -> Path:
    (tmp_path / "fer2013").mkdir()
    write_csv(tmp_path / "fer2013" / "fer2013.csv")
    archive = tmp_path / "fer2013.tar.gz"
    with tarfile.open(archive, "w:gz") as t:  # the Kaggle file's layout
        t.add(tmp_path / "fer2013", arcname="fer2013")
    return archive


def test_targz(tmp_path):
    archive = make_targz(tmp_path)
    main(["--csv", str(archive), "--out", str(tmp_path / "out")])
    assert datasets.read_manifest(tmp_path / "out")["total"] == 42


def test_gdrive_from_local_http_server(tmp_path):
    archive = make_targz(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        out = tmp_path / "out"
        main(["--gdrive", url, "--out", str(out)])
        manifest = datasets.read_manifest(out)
        assert manifest["total"] == 42 and manifest["source"]["type"] == "gdrive"
        with pytest.raises(DatasetError, match="could not download"):
            main(["--gdrive", url + ".missing", "--out", str(tmp_path / "out2")])
        assert not (tmp_path / "out2").exists()
    finally:
        server.shutdown()
        server.server_close()


def make_folder_copy(root: Path, per_class: int = 10):
    """The common train/test-only copy: lowercase and synonym class names, JPEG files."""
    rng = np.random.default_rng(0)
    names = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    names[3] = "happiness"
    for split in ("train", "test"):
        for name in names:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class if split == "train" else 3):
                arr = rng.integers(0, 256, (48, 48)).astype(np.uint8)
                Image.fromarray(arr).save(d / f"im{i}.jpg")


def test_folder_carves_stratified_val(tmp_path):
    make_folder_copy(tmp_path / "src")
    out = tmp_path / "out"
    main(["--folder", str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0.2"])
    counts = datasets.count_images(out)
    assert counts["val"] == {c: 2 for c in datasets.CLASSES}
    assert counts["train"] == {c: 8 for c in datasets.CLASSES}
    assert counts["test"] == {c: 3 for c in datasets.CLASSES}
    manifest = datasets.read_manifest(out)
    assert manifest["val_split"]["seed"] == 0 and manifest["val_split"]["fraction"] == 0.2
    # Deterministic by seed.
    main(
        [
            "--folder",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "again"),
            "--val-fraction",
            "0.2",
        ]
    )
    assert datasets.content_hash(out) == datasets.content_hash(tmp_path / "again")
    assert datasets.load_split(out, "val").classes == datasets.CLASSES


def test_folder_skips_appledouble_and_hidden_files(tmp_path):
    """A copy that went through a Mac: `._im0.jpg` beside every image (a shared drive), a
    `.hidden.jpg`, and the `__MACOSX/` folder of an unzipped archive, which sorts before the
    real folder. They used to stop the conversion ("cannot read image") or be converted; the
    dataset is now the one the clean copy gives."""
    from test_datasets import APPLEDOUBLE

    make_folder_copy(tmp_path / "clean" / "fer", per_class=4)
    mac = tmp_path / "unzipped"
    shutil.copytree(tmp_path / "clean", mac)
    for image in sorted((mac / "fer").rglob("*.jpg")):
        (image.parent / f"._{image.name}").write_bytes(APPLEDOUBLE)
        shadow = mac / "__MACOSX" / image.relative_to(mac).parent / f"._{image.name}"
        shadow.parent.mkdir(parents=True, exist_ok=True)
        shadow.write_bytes(APPLEDOUBLE)
    Image.new("L", (48, 48), 7).save(mac / "fer" / "train" / "sad" / ".hidden.jpg")
    main(["--folder", str(tmp_path / "clean"), "--out", str(tmp_path / "a")])
    main(["--folder", str(mac), "--out", str(tmp_path / "b")])
    a, b = datasets.read_manifest(tmp_path / "a"), datasets.read_manifest(tmp_path / "b")
    assert b["counts"] == a["counts"] and b["total"] == 7 * (4 + 3)
    assert b["content_hash"] == a["content_hash"] and b["skipped_bad_images"] == 0


def test_a_benchmark_copied_through_a_mac_converts_as_the_original(tmp_path):
    """CK+ with `._` files beside every frame and label file (a `._..._emotion.txt` used to be
    read as a label, a `._...png` as the first frame) and an unzipped archive's `__MACOSX/`."""
    from test_datasets import APPLEDOUBLE
    from test_importers import make_ckplus

    make_ckplus(tmp_path / "ck")
    mac = tmp_path / "mac"
    shutil.copytree(tmp_path / "ck", mac)
    for path in sorted(p for p in mac.rglob("*") if p.is_file()):
        (path.parent / f"._{path.name}").write_bytes(APPLEDOUBLE)
        shadow = mac / "__MACOSX" / path.relative_to(mac).parent / f"._{path.name}"
        shadow.parent.mkdir(parents=True, exist_ok=True)
        shadow.write_bytes(APPLEDOUBLE)
    common = ["--image-size", "16", "--ckplus-neutral", "--workers", "1"]
    a = main(["--ckplus", str(tmp_path / "ck"), "--out", str(tmp_path / "a"), *common])
    b = main(["--ckplus", str(mac), "--out", str(tmp_path / "b"), *common])
    assert datasets.read_manifest(b)["counts"] == datasets.read_manifest(a)["counts"]
    assert datasets.content_hash(b) == datasets.content_hash(a)


def test_a_csv_that_train_py_would_refuse_is_refused_before_writing(tmp_path):
    """Only Training rows used to convert (exit 0) into a dataset train.py refuses; a CSV
    without its header line used to be named with its whole first row, 9 kB of pixels."""
    write_csv(
        tmp_path / "train_only.csv", mutate=lambda h, r: (h, [x for x in r if x[2] == USAGES[0]])
    )
    write_csv(
        tmp_path / "no_test.csv", mutate=lambda h, r: (h, [x for x in r if x[2] != USAGES[2]])
    )
    write_csv(tmp_path / "headless.csv", mutate=lambda h, r: (r[0], r[1:]))
    first_line = (tmp_path / "headless.csv").read_text().splitlines()[0]
    cases = {
        "train_only.csv": "has no PublicTest and no PrivateTest rows (only 14 Training): "
        "train.py needs all three splits",
        "no_test.csv": "has no PrivateTest rows (only 14 Training, 14 PublicTest)",
        "headless.csv": f"has no header line: its first line {first_line[:60]!r}... "
        f"({len(first_line):,} characters) is a data row; expected the Kaggle "
        "fer2013.csv, whose first line is emotion,pixels,Usage",
    }
    for name, message in cases.items():
        with pytest.raises(DatasetError) as err:
            main(["--csv", str(tmp_path / name), "--out", str(tmp_path / "out")])
        text = str(err.value).removeprefix(f"{tmp_path / name} ")
        assert text.startswith(message) and len(text) < 250 and "\n" not in text
    assert_nothing_left(tmp_path, set(cases))


def test_folder_images_of_every_mode_become_the_grayscale_a_person_sees(tmp_path):
    from test_datasets import write_every_mode

    make_folder_copy(tmp_path / "src", per_class=2)
    cases = write_every_mode(tmp_path / "src" / "test" / "sad")
    main(["--folder", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    for name, (_, expected, tol) in cases.items():
        written = np.asarray(Image.open(tmp_path / "out" / "test" / "Sad" / f"{name}.png"))
        assert written.dtype == np.uint8 and np.abs(written - expected).max() <= tol + 1e-9, name


def test_folder_bad_image(tmp_path):
    make_folder_copy(tmp_path / "src", per_class=4)
    (tmp_path / "src" / "train" / "sad" / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="bad.jpg"):
        main(["--folder", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert_nothing_left(tmp_path, {"src"})
    main(["--folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--skip-bad-images"])
    assert datasets.read_manifest(tmp_path / "out")["skipped_bad_images"] == 1


def _set(row, col, value):
    row[col] = value
    return row


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h, r: (["emotion", "pixel", "Usage"], r), "lacks column"),
        (
            lambda h, r: (h, r[:5] + [_set(r[5], 1, r[5][1].rsplit(" ", 1)[0])] + r[6:]),
            "row 5 .*2304 integers",
        ),
        (lambda h, r: (h, r[:3] + [_set(r[3], 1, "256 " * 2304)] + r[4:]), "row 3 .*0..255"),
        (lambda h, r: (h, r[:3] + [_set(r[3], 1, "x " * 2304)] + r[4:]), "row 3 .*integers"),
        (lambda h, r: (h, r[:7] + [_set(r[7], 2, "Validation")] + r[8:]), "row 7 .*Usage"),
        (lambda h, r: (h, r[:1] + [_set(r[1], 0, "9")] + r[2:]), "row 1 .*emotion"),
    ],
    ids=["columns", "short-row", "out-of-range", "not-int", "usage", "emotion"],
)
def test_malformed_csv(tmp_path, mutate, match):
    write_csv(tmp_path / "fer2013.csv", mutate=mutate)
    with pytest.raises(DatasetError, match=match):
        main(["--csv", str(tmp_path / "fer2013.csv"), "--out", str(tmp_path / "out")])
    assert_nothing_left(tmp_path, {"fer2013.csv"})


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    write_csv(tmp_path / "fer2013.csv")
    interrupt_at_the_tenth_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(["--csv", str(tmp_path / "fer2013.csv"), "--out", str(tmp_path / "out")])
    assert_nothing_left(tmp_path, {"fer2013.csv"})


def test_kaggle_without_credentials(tmp_path, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DatasetError, match="kaggle.json"):
        main(["--kaggle", "--out", str(tmp_path / "out")])
    assert_nothing_left(tmp_path, set())


@pytest.mark.slow
def test_subprocess_cli(tmp_path):
    write_csv(tmp_path / "fer2013.csv")
    script = str(ROOT / "scripts" / "download_dataset.py")
    r = subprocess.run(
        [
            sys.executable,
            script,
            "--csv",
            str(tmp_path / "fer2013.csv"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert datasets.read_manifest(tmp_path / "out")["total"] == 42
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, script, "--kaggle", "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 1 and one_line_error(r.stderr).startswith("no Kaggle API credentials")
    assert not (tmp_path / "k").exists()
    r = subprocess.run(  # a parser error: exit status 2, one line too
        [sys.executable, script, "--csv", "a.csv", "--kaggle"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "not allowed with argument" in one_line_error(r.stderr)


def one_line_error(err: str) -> str:
    """The message of a one-line command error (no usage block, no traceback)."""
    assert err.count("\n") == 1 and err.startswith("download_dataset.py: error: "), err
    assert "usage:" not in err and "Traceback" not in err
    return err.removeprefix("download_dataset.py: error: ").strip()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [],
            "one of the arguments --kaggle --gdrive --csv --folder --rafdb --affectnet --expw "
            "--ckplus is required",
        ),
        (["--csv", "x.csv", "--format", "gif"], "argument --format: invalid choice: 'gif'"),
        (["--folder", "src", "--val-fraction", "1.5"], "--val-fraction 1.5: must be in (0, 1)"),
        (["--folder", "src", "--val-fraction", "0"], "--val-fraction 0.0: must be in (0, 1)"),
        (["--folder", "src", "--seed", "-2"], "--seed -2: must be a non-negative integer"),
    ],
    ids=["no-source", "format", "fraction-above", "fraction-zero", "seed"],
)
def test_parser_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert one_line_error(capsys.readouterr().err).startswith(message)  # argparse adds to some
    assert_nothing_left(tmp_path, set())


def test_csv_given_a_folder_says_so(tmp_path):
    """`--csv FOLDER` used to say "no such file"."""
    (tmp_path / "fer").mkdir()
    write_csv(tmp_path / "fer" / "fer2013.csv")
    with pytest.raises(DatasetError) as err:
        main(["--csv", str(tmp_path / "fer"), "--out", str(tmp_path / "out")])
    assert str(err.value) == (
        f"--csv {tmp_path / 'fer'} is a folder; pass the fer2013.csv file in it (or the archive "
        "that holds it), or --folder for a folder of train/ and test/ image folders"
    )
    assert_nothing_left(tmp_path, {"fer"})


def test_one_conversion_at_a_time_writes_an_out(tmp_path):
    """A second conversion into the same --out used to replace the first one's dataset
    silently; --out is locked (`.OUT.lock` beside it) as train.py locks a run folder."""
    from utils import RunLock

    write_csv(tmp_path / "fer2013.csv")
    other = RunLock(tmp_path / ".out.lock", tmp_path / "out")  # a live conversion: this process
    assert other.acquire()
    with pytest.raises(DatasetError) as err:
        main(["--csv", str(tmp_path / "fer2013.csv"), "--out", str(tmp_path / "out")])
    holder = other.holder()
    assert str(err.value) == (
        f"--out {tmp_path / 'out'} is being written by another download_dataset.py ({holder}); "
        "wait for it to finish, or choose another --out"
    )
    assert_nothing_left(tmp_path, {"fer2013.csv", ".out.lock"})
    other.release()
    main(["--csv", str(tmp_path / "fer2013.csv"), "--out", str(tmp_path / "out")])
    assert_nothing_left(tmp_path, {"fer2013.csv", "out"})  # the lock goes with the run


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_is_one_line_and_leaves_nothing(tmp_path, sig):
    """SIGTERM used to leave the hidden `.out.tmp-*` folder; Ctrl-C was a 26-line traceback.
    The signal comes at the 10th image written (utils.fault_point); SIGINT is restored to its
    default in the child, as a background job (the suite in CI) starts with it ignored."""
    write_csv(tmp_path / "fer2013.csv")
    script = str(ROOT / "scripts" / "download_dataset.py")
    r = subprocess.run(
        [
            sys.executable,
            script,
            "--csv",
            str(tmp_path / "fer2013.csv"),
            "--out",
            str(tmp_path / "out"),
        ],
        env={**os.environ, "EMONEXT_FAULT": f"dataset_image:10:{sig}"},
        capture_output=True,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert r.returncode == 128 + getattr(signal, sig), r.stderr
    assert one_line_error(r.stderr) == (
        f"interrupted by {sig}; nothing was written ({tmp_path / 'out'} is as it was)"
    )
    assert_nothing_left(tmp_path, {"fer2013.csv"})


def test_folder_skips_pipes_and_folders_named_like_images(tmp_path):
    """A FIFO named `x.png` in a --folder copy hung the conversion (reading it waits for a
    writer); a folder named `dir.png` was taken for an image. Only regular files are images."""
    import download_dataset

    make_folder_copy(tmp_path / "src", per_class=2)
    os.mkfifo(tmp_path / "src" / "train" / "sad" / "pipe.png")
    (tmp_path / "src" / "test" / "sad" / "dir.png").mkdir()
    listed = download_dataset.scan_folder(tmp_path / "src")
    names = {p.name for classes in listed.values() for files in classes.values() for p in files}
    assert "pipe.png" not in names and "dir.png" not in names  # before anything reads them
    out = main(["--folder", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    manifest = datasets.read_manifest(out)
    assert manifest["total"] == 7 * (2 + 3) and manifest["skipped_bad_images"] == 0
