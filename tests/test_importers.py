"""download_dataset.py --rafdb, --affectnet, --expw, --ckplus on small copies of each dataset,
laid out and labelled as their owners document them (scripts/importers.py, docs/DATA.md)."""

import csv
import re
import shutil
from pathlib import Path

import download_dataset
import numpy as np
import pytest
from download_dataset import main
from PIL import Image
from test_download import assert_nothing_left, one_line_error

import datasets
from datasets import DatasetError
from utils import CLIError

EIGHT = ["Angry", "Contempt", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]


def face_photo(path: Path, size: tuple[int, int], box, level: int, colour: bool = True) -> None:
    """A dark photo of `size` (width, height) with a bright square face in `box` (left, top,
    right, bottom) whose grey level is `level`: a crop by the box comes out at `level`."""
    array = np.full((size[1], size[0], 3), 20, np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = level
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array if colour else array[..., 0])
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


def written(out: Path) -> dict[str, dict[str, list[str]]]:
    """{split: {class: sorted file stems}} of a converted dataset."""
    return {
        split: {
            c.name: sorted(p.stem for p in c.iterdir()) for c in sorted((out / split).iterdir())
        }
        for split in datasets.SPLITS
    }


# ------------------------------------------------------------------------------------ RAF-DB


def make_rafdb(root: Path) -> dict[str, str]:
    """RAF-DB basic: EmoLabel/list_patition_label.txt ('train_00001.jpg 5', labels 1-7) and
    Image/aligned/train_00001_aligned.jpg (100 x 100 colour). Returns {name: class}."""
    names = {1: "Surprise", 2: "Fear", 3: "Disgust", 4: "Happy", 5: "Sad", 6: "Angry", 7: "Neutral"}
    lines, truth, n = [], {}, {"train": 0, "test": 0}
    for split, per_class in (("train", 5), ("test", 2)):
        for code in range(1, 8):
            for _ in range(per_class):
                n[split] += 1
                stem = f"{split}_{n[split]:05d}"
                lines.append(f"{stem}.jpg {code}")
                truth[stem] = names[code]
                aligned = root / "basic" / "Image" / "aligned" / f"{stem}_aligned.jpg"
                face_photo(aligned, (100, 100), (0, 0, 100, 100), 30 * code)
    (root / "basic" / "EmoLabel").mkdir(parents=True)
    (root / "basic" / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return truth


def test_rafdb(tmp_path, capsys):
    truth = make_rafdb(tmp_path / "raf")
    out = main(["--rafdb", str(tmp_path / "raf"), "--out", str(tmp_path / "RAF-DB")])
    assert main(["--rafdb", str(tmp_path / "raf"), "--out", str(out)]) == out
    assert "already there" in capsys.readouterr().out  # same source and settings: nothing to do
    got = written(out)
    for split, classes in got.items():
        for name, stems in classes.items():
            assert all(truth[s] == name for s in stems), (split, name)
            assert all(s.startswith("train_" if split != "test" else "test_") for s in stems)
    assert {c: len(s) for c, s in got["val"].items()} == dict.fromkeys(sorted(truth.values()), 1)
    assert all(len(s) == 4 for s in got["train"].values())  # 5 per class, 10 % (1) carved
    manifest = datasets.read_manifest(out)
    assert manifest["dataset"] == "RAF-DB" and manifest["image_size"] == 100
    assert manifest["split"]["val"] == "carved from train" and manifest["split"]["seed"] == 0
    image = np.asarray(Image.open(out / "test" / "Sad" / "test_00009.png"))
    assert image.shape == (100, 100) and abs(int(image.mean()) - 150) <= 2  # grayscale, as is


# ------------------------------------------------------------------------------------ AffectNet

AFFECTNET = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Angry", "Contempt"]


def make_affectnet_csv(root: Path) -> None:
    """The CSV release: Manually_Annotated_file_lists/{training,validation}.csv (validation.csv
    without a header, as some copies have it) and Manually_Annotated_Images/<dir>/<name>.jpg; a
    face box per row, codes 0-10 (8 None, 9 Uncertain, 10 No-Face)."""
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
              "facial_landmarks", "expression", "valence", "arousal"]  # fmt: skip
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    for name, per_code, with_header in (("training", 4, True), ("validation", 2, False)):
        rows = [header] if with_header else []
        for code in range(11):
            for i in range(per_code):
                rel = f"{code}{i}/{name}_{code}_{i}.jpg"
                box = (10 + i, 20, 10 + i + 40, 60)  # 40 x 40 face in a 90 x 70 photo
                face_photo(root / "Manually_Annotated_Images" / rel, (90, 70), box, 10 + 20 * code)
                rows.append([rel, box[0], box[1], 40, 40, "1;2;3", code, 0.1, -0.2])
        with open(lists / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)


def test_affectnet_csv_release_crops_by_the_face_box(tmp_path):
    make_affectnet_csv(tmp_path / "an")
    out = main(["--affectnet", str(tmp_path / "an"), "--out", str(tmp_path / "A8"),
                "--image-size", "32"])  # fmt: skip
    got = written(out)
    assert sorted(got["test"]) == EIGHT and all(len(s) == 2 for s in got["test"].values())
    for split, classes in got.items():
        for name, stems in classes.items():
            for stem in stems:
                code = AFFECTNET.index(name)
                assert stem.split("_")[-2] == str(code) and stem.startswith(f"{code}")
                image = np.asarray(Image.open(out / split / name / f"{stem}.png"))
                assert image.shape == (32, 32)  # the face only: its level, not the background's
                assert abs(int(np.median(image)) - (10 + 20 * code)) <= 3, (name, stem)
    manifest = datasets.read_manifest(out)
    assert manifest["labels"]["protocol"] == "8 classes"
    assert manifest["labels"]["dropped"] == {
        "expression 10 (No-Face)": 6, "expression 8 (None)": 6, "expression 9 (Uncertain)": 6
    }  # fmt: skip
    out7 = main(["--affectnet", str(tmp_path / "an"), "--out", str(tmp_path / "A7"),
                 "--affectnet-classes", "7"])  # fmt: skip
    manifest = datasets.read_manifest(out7)
    assert manifest["class_order"] == datasets.CLASSES and manifest["image_size"] == 112
    assert manifest["labels"]["dropped"]["expression 7 (Contempt; 7-class protocol)"] == 6


def make_affectnet_npy(root: Path) -> None:
    """The newer release: {train_set,val_set}/images/N.jpg (cropped faces) and
    annotations/N_exp.npy holding the code as a string (N_val, N_aro, N_lnd beside it)."""
    n = 0
    for folder, per_code in (("train_set", 3), ("val_set", 2)):
        for code in range(8):
            for _ in range(per_code):
                face_photo(root / folder / "images" / f"{n}.jpg", (64, 64), (0, 0, 64, 64), 99)
                (root / folder / "annotations").mkdir(exist_ok=True)
                value = np.array(str(code)) if n % 2 else np.array(code)  # both kinds load
                np.save(root / folder / "annotations" / f"{n}_exp.npy", value)
                np.save(root / folder / "annotations" / f"{n}_val.npy", np.array("0.25"))
                n += 1


def test_affectnet_image_and_annotation_release(tmp_path):
    make_affectnet_npy(tmp_path / "an")
    out = main(["--affectnet", str(tmp_path / "an"), "--out", str(tmp_path / "A")])
    counts = datasets.count_images(out)
    assert counts["test"] == dict.fromkeys(EIGHT, 2) and counts["val"] == dict.fromkeys(EIGHT, 1)
    assert counts["train"] == dict.fromkeys(EIGHT, 2)
    assert datasets.read_manifest(out)["labels"]["release"].startswith("images/annotations")
    stems = written(out)["train"]["Fear"] + written(out)["val"]["Fear"]  # code 4: 12, 13, 14
    assert sorted(stems) == ["12", "13", "14"]


# ------------------------------------------------------------------------------------ ExpW


def make_expw(root: Path) -> None:
    """ExpW: image/origin/<photo>.jpg, label/label.lst lines 'image_name face_id top left right
    bottom confidence expression' (0 angry ... 6 neutral); two faces on each photo."""
    lines = []
    for photo in range(42):
        code = photo % 7
        boxes = [(10, 5, 40, 35), (50, 40, 80, 70)]  # (left, top, right, bottom)
        array = np.full((90, 100), 20, np.uint8)
        for face_id, (left, top, right, bottom) in enumerate(boxes):
            array[top:bottom, left:right] = 30 + 30 * code
            lines.append(f"p{photo:03d}.jpg {face_id} {top} {left} {right} {bottom} 0.9 {code}")
        (root / "image" / "origin").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / "image" / "origin" / f"p{photo:03d}.jpg", quality=95)
    (root / "label").mkdir()
    (root / "label" / "label.lst").write_text("\n".join(lines) + "\n")


def test_expw_folds_never_divide_a_photo(tmp_path):
    make_expw(tmp_path / "expw")
    out = main(["--expw", str(tmp_path / "expw"), "--out", str(tmp_path / "ExpW"), "--folds", "3",
                "--image-size", "24", "--workers", "2"])  # fmt: skip
    got = written(out)
    photos = {s: {stem.rsplit("_", 1)[0] for c in got[s].values() for stem in c} for s in got}
    assert not (photos["train"] & photos["val"] or photos["train"] & photos["test"])
    assert not photos["val"] & photos["test"]
    assert sum(len(p) for p in photos.values()) == 42
    for classes in got.values():
        for name, stems in classes.items():
            assert all(int(s[1:4]) % 7 == datasets.FER2013_CSV_CLASSES.index(name) for s in stems)
            assert all(len([x for x in stems if x.startswith(s[:4])]) == 2 for s in stems)
    manifest = datasets.read_manifest(out)
    assert manifest["split"]["folds"] == 3 and manifest["split"]["test_fold"] == 0
    assert sum(manifest["split"]["photos"].values()) == 42
    image = np.asarray(Image.open(out / "test" / "Happy" / f"{got['test']['Happy'][0]}.png"))
    assert abs(int(np.median(image)) - 120) <= 3  # the face, cropped by its box
    # One process or two: the same files.
    again = main(["--expw", str(tmp_path / "expw"), "--out", str(tmp_path / "again"), "--folds",
                  "3", "--image-size", "24", "--workers", "1"])  # fmt: skip
    assert datasets.content_hash(again) == datasets.content_hash(out)
    # An unreadable photo, found by a worker process: one line naming it, nothing written.
    (tmp_path / "expw" / "image" / "origin" / "p005.jpg").write_bytes(b"not a jpeg")
    argv = ["--expw", str(tmp_path / "expw"), "--folds", "3", "--workers", "2"]
    with pytest.raises(DatasetError, match="p005.jpg.*--skip-bad-images"):
        main([*argv, "--out", str(tmp_path / "broken")])
    assert_nothing_left(tmp_path, {"expw", "ExpW", "again"})
    manifest = datasets.read_manifest(main([*argv, "--out", str(tmp_path / "skipped"),
                                            "--skip-bad-images"]))  # fmt: skip
    assert manifest["skipped_bad_images"] == 2 and manifest["total"] == 82  # its two faces


# ------------------------------------------------------------------------------------ CK+

CKPLUS = {1: "Angry", 2: "Contempt", 3: "Disgust", 4: "Fear", 5: "Happy", 6: "Sad", 7: "Surprise"}


def make_ckplus(root: Path) -> None:
    """CK+: cohn-kanade-images/S<sub>/<seq>/S<sub>_<seq>_<frame>.png (640 x 490), Emotion/
    S<sub>/<seq>/..._<last frame>_emotion.txt ('   3.0000000e+00'), Landmarks/ (68 'x y' lines)
    for the first subjects only; 14 subjects with one sequence of each code and one unlabelled
    sequence (no Emotion file)."""
    for subject in range(5, 19):
        for seq, code in enumerate([*CKPLUS, 0], 1):
            name = f"S{subject:03d}", f"{seq:03d}"
            frames = 4 + (subject + seq) % 3
            for frame in range(1, frames + 1):
                stem = f"{name[0]}_{name[1]}_{frame:08d}"
                level = 40 if frame == 1 else 100 + 20 * code
                face_photo(root / "cohn-kanade-images" / name[0] / name[1] / f"{stem}.png",
                           (64, 49), (20, 10, 44, 34), level, colour=False)  # fmt: skip
                if subject < 8:
                    marks = root / "Landmarks" / name[0] / name[1] / f"{stem}_landmarks.txt"
                    marks.parent.mkdir(parents=True, exist_ok=True)
                    points = [(22 + i % 20, 12 + i % 20) for i in range(68)]
                    marks.write_text("".join(f"   {x:.7e}   {y:.7e}\n" for x, y in points))
            if code:
                emotion = root / "Emotion" / name[0] / name[1] / f"{stem}_emotion.txt"
                emotion.parent.mkdir(parents=True)
                emotion.write_text(f"   {code:.7e}\n")


def test_ckplus_last_frames_and_subject_independent_folds(tmp_path):
    make_ckplus(tmp_path / "ck")
    out = main(["--ckplus", str(tmp_path / "ck"), "--out", str(tmp_path / "CK"), "--folds", "7",
                "--fold", "2", "--image-size", "16", "--ckplus-neutral"])  # fmt: skip
    got = written(out)
    subjects = {s: {x.split("_")[0] for c in got[s].values() for x in c} for s in got}
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"])
    assert not subjects["val"] & subjects["test"] and len(subjects["test"]) == 2
    manifest = datasets.read_manifest(out)
    assert manifest["split"]["subjects"] == {s: sorted(v) for s, v in subjects.items()}
    assert manifest["split"]["test_fold"] == 2 and manifest["split"]["val_fold"] == 3
    total = 0
    for classes in got.values():
        for name, stems in classes.items():
            for stem in stems:
                subject, seq, frame = stem.split("_")
                frames = 4 + (int(subject[1:]) + int(seq)) % 3
                if name == "Neutral":
                    assert int(frame) == 1
                else:
                    assert CKPLUS[int(seq)] == name and int(frame) > frames - 3  # the last 3
                total += 1
    assert total == 14 * 7 * 4  # three peak frames and the first of each labelled sequence
    assert manifest["labels"]["crop"].startswith(f"{3 * 7 * 4} of {total} frames by their")


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--rafdb", "is not RAF-DB basic: no EmoLabel/list_patition_label.txt"),
        ("--affectnet", "is not AffectNet: no train_set/annotations in it or below it; pass"),
        ("--expw", "is not ExpW: no label.lst"),
        ("--ckplus", "is not CK+: no cohn-kanade-images"),
    ],
)
def test_a_wrong_folder_is_one_line(tmp_path, flag, message):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"")
    argv = [flag, str(tmp_path / "photos"), "--out", str(tmp_path / "o")]
    with pytest.raises(CLIError, match=re.escape(message)) as err:  # what run_command prints
        download_dataset.run(download_dataset.parse_args(argv))
    assert "\n" not in str(err.value)
    assert_nothing_left(tmp_path, {"photos"})


def test_malformed_labels_and_missing_images(tmp_path):
    truth = make_rafdb(tmp_path / "raf")
    labels = tmp_path / "raf" / "basic" / "EmoLabel" / "list_patition_label.txt"
    text = labels.read_text()
    labels.write_text(text.replace("train_00003.jpg 1", "train_00003.jpg 9"))
    with pytest.raises(DatasetError, match="list_patition_label.txt: line 3: expected"):
        main(["--rafdb", str(tmp_path / "raf"), "--out", str(tmp_path / "o")])
    labels.write_text(text)
    (tmp_path / "raf" / "basic" / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    with pytest.raises(DatasetError, match="train_00002_aligned.jpg.*--skip-bad-images"):
        main(["--rafdb", str(tmp_path / "raf"), "--out", str(tmp_path / "o")])
    assert_nothing_left(tmp_path, {"raf"})
    out = main(["--rafdb", str(tmp_path / "raf"), "--out", str(tmp_path / "o"),
                "--skip-bad-images"])  # fmt: skip
    manifest = datasets.read_manifest(out)
    assert manifest["skipped_bad_images"] == 1 and manifest["total"] == len(truth) - 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rafdb", "x", "--folds", "5"], "--folds applies to ExpW and CK+ only"),
        (["--csv", "x.csv", "--image-size", "64"], "--image-size applies to RAF-DB and"),
        (["--expw", "x", "--affectnet-classes", "7"], "--affectnet-classes applies to AffectNet"),
        (["--ckplus", "x", "--fold", "10"], "--fold 10: must be below --folds 10"),
        (["--ckplus", "x", "--folds", "2"], "--folds 2: must be at least 3"),
    ],
)
def test_flags_of_another_source_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and one_line_error(capsys.readouterr().err).startswith(message)


# ------------------------------------------------------------------------------------ real copies
# Quirks of the copies users have (issue 31): each case used to stop the import, write a face
# into two classes, or crop it wrongly.

CONFLICTING = "face listed with different labels, boxes or splits (all its entries)"
REPEATED = "repeated entry (identical: its face imported once)"
MALFORMED = "malformed label entry (--skip-bad-images)"


def append_lines(path: Path, lines: list[str]) -> None:
    with open(path, "a", newline="") as f:
        f.write("".join(f"{line}\n" for line in lines))


def located(out: Path) -> dict[str, list[tuple[str, str]]]:
    """{file stem: [(split, class), ...]}: where each written face went."""
    where: dict[str, list[tuple[str, str]]] = {}
    for split, classes in written(out).items():
        for name, stems in classes.items():
            for stem in stems:
                where.setdefault(stem, []).append((split, name))
    return where


@pytest.mark.parametrize("label", ["0", "3"], ids=["identical", "conflicting"])
def test_affectnet_a_photo_on_two_rows(tmp_path, label):
    """The same photo on two identical rows used to stop the import ("two train images of ...
    would be named"): it is imported once. On two rows with different labels it went into both
    classes: it is left out, and counted."""
    make_affectnet_csv(tmp_path / "an")
    training = tmp_path / "an" / "Manually_Annotated_file_lists" / "training.csv"
    row = training.read_text().splitlines()[1].split(",")  # 00/training_0_0.jpg, code 0
    row[6] = label
    append_lines(training, [",".join(row)])
    out = main(["--affectnet", str(tmp_path / "an"), "--out", str(tmp_path / "A"),
                "--image-size", "16"])  # fmt: skip
    where = located(out).get("00_training_0_0", [])
    dropped = datasets.read_manifest(out)["labels"]["dropped"]
    if label == "0":
        assert len(where) == 1 and dropped[REPEATED] == 1
    else:
        assert where == [] and dropped[CONFLICTING] == 2


def test_affectnet_malformed_box_row_is_one_line_or_skipped(tmp_path):
    """A row whose face box is not four numbers (an empty face_height; NaN) used to stop the
    import with "line 3 is not 'subDirectory_filePath,...'", NaN passed as a box."""
    make_affectnet_csv(tmp_path / "an")
    training = tmp_path / "an" / "Manually_Annotated_file_lists" / "training.csv"
    rows = [row.split(",") for row in training.read_text().splitlines()]
    rows[3][4], rows[9][3] = "", "nan"
    training.write_text("\n".join(",".join(row) for row in rows) + "\n")
    argv = ["--affectnet", str(tmp_path / "an"), "--image-size", "16"]
    with pytest.raises(CLIError) as err:
        download_dataset.run(download_dataset.parse_args([*argv, "--out", str(tmp_path / "o")]))
    message = str(err.value)
    assert message.startswith(f"{training}: line 4: face box") and "\n" not in message
    assert message.endswith("pass --skip-bad-images to skip it")
    assert_nothing_left(tmp_path, {"an"})
    out = main([*argv, "--out", str(tmp_path / "o"), "--skip-bad-images"])
    manifest = datasets.read_manifest(out)
    assert manifest["labels"]["dropped"][MALFORMED] == 2
    assert manifest["total"] == 8 * (4 + 2) - 2


def test_affectnet_lists_named_manually(tmp_path):
    """Copies that name the lists Manually_training.csv / Manually_validation.csv (as public
    loaders of AffectNet do) were "not AffectNet"."""
    make_affectnet_csv(tmp_path / "an")
    lists = tmp_path / "an" / "Manually_Annotated_file_lists"
    for name in ("training", "validation"):
        (lists / f"{name}.csv").rename(tmp_path / "an" / f"Manually_{name}.csv")
    lists.rmdir()
    out = main(["--affectnet", str(tmp_path / "an"), "--out", str(tmp_path / "A"),
                "--image-size", "16"])  # fmt: skip
    assert datasets.read_manifest(out)["total"] == 8 * (4 + 2)


def test_affectnet_codes_written_as_floats(tmp_path):
    """An _exp.npy holding '0.0' (or the number 4.0) was refused as "not a code"."""
    make_affectnet_npy(tmp_path / "npy")
    for n, annotation in enumerate(sorted((tmp_path / "npy").rglob("*_exp.npy"))):
        code = _code_of(annotation)
        np.save(annotation, np.array(f"{code}.0") if n % 2 else np.array(float(code)))
    out = main(["--affectnet", str(tmp_path / "npy"), "--out", str(tmp_path / "B")])
    assert datasets.count_images(out)["test"] == dict.fromkeys(EIGHT, 2)


def _code_of(annotation: Path) -> int:
    return int(str(np.load(annotation).item()))


def test_ckplus_without_landmarks_crops_the_centred_square(tmp_path):
    """Without Landmarks/ the whole 64 x 49 frame (640 x 490 in CK+) was squeezed into a square:
    faces stretched 1.3 times. Now the centred square is taken: a square face stays square."""
    make_ckplus(tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "Landmarks")
    out = main(["--ckplus", str(tmp_path / "ck"), "--out", str(tmp_path / "CK"), "--folds", "3",
                "--image-size", "49", "--workers", "1"])  # fmt: skip
    for path in sorted(out.rglob("*.png"))[:20]:
        face = np.asarray(Image.open(path)) > 70  # the 24 x 24 face (level >= 120) on 20
        assert face.any(0).sum() == face.any(1).sum() == 24, path
    assert "the others to their centred square" in datasets.read_manifest(out)["labels"]["crop"]


def test_ckplus_emotion_labels_folder(tmp_path):
    """`Emotion_labels/` (the name of CK+'s label archive, which a popular preprocessing
    README keeps) was refused as "no Emotion"."""
    make_ckplus(tmp_path / "ck")
    argv = ["--folds", "3", "--image-size", "16", "--workers", "1"]
    a = main(["--ckplus", str(tmp_path / "ck"), "--out", str(tmp_path / "a"), *argv])
    (tmp_path / "ck" / "Emotion").rename(tmp_path / "ck" / "Emotion_labels")
    b = main(["--ckplus", str(tmp_path / "ck"), "--out", str(tmp_path / "b"), *argv])
    assert datasets.content_hash(b) == datasets.content_hash(a)


@pytest.mark.parametrize("label", ["1", "3"], ids=["identical", "conflicting"])
def test_expw_a_face_on_two_lines(tmp_path, label):
    """An exactly repeated line of label.lst used to stop the import: it is imported once. The
    same face listed with two labels went into both classes: it is left out, and counted."""
    make_expw(tmp_path / "expw")
    labels = tmp_path / "expw" / "label" / "label.lst"
    line = labels.read_text().splitlines()[3]  # p001.jpg face 1, code 1
    append_lines(labels, [line.rsplit(" ", 1)[0] + f" {label}"])
    out = main(["--expw", str(tmp_path / "expw"), "--out", str(tmp_path / "ExpW"), "--folds", "3",
                "--image-size", "16", "--workers", "1"])  # fmt: skip
    where = located(out)
    assert len(where["p001_0"]) == 1 and len(where.get("p001_1", [])) == (label == "1")
    dropped = datasets.read_manifest(out)["labels"]["dropped"]
    assert dropped == ({REPEATED: 1} if label == "1" else {CONFLICTING: 2})


def test_expw_box_with_bottom_above_top(tmp_path):
    """A box whose bottom is above its top was accepted and cropped (as the rows between)."""
    make_expw(tmp_path / "expw")
    labels = tmp_path / "expw" / "label" / "label.lst"
    lines = labels.read_text().splitlines()
    lines[5] = "p002.jpg 1 70 50 80 40 0.9 2"  # top 70, bottom 40
    labels.write_text("\n".join(lines) + "\n")
    argv = ["--expw", str(tmp_path / "expw"), "--folds", "3", "--image-size", "16"]
    with pytest.raises(DatasetError, match=r"label.lst: line 6: face box top 70 .* bottom 40 is "
                       r"empty.*pass --skip-bad-images"):  # fmt: skip
        main([*argv, "--out", str(tmp_path / "o")])
    assert_nothing_left(tmp_path, {"expw"})
    out = main([*argv, "--out", str(tmp_path / "o"), "--skip-bad-images", "--workers", "1"])
    assert "p002_1" not in located(out)
    assert datasets.read_manifest(out)["labels"]["dropped"] == {MALFORMED: 1}


def test_rafdb_names_that_carry_aligned(tmp_path):
    """A list naming the files themselves (`train_00001_aligned.jpg 5`) looked for
    `train_00001_aligned_aligned.jpg`: every image "missing"."""
    make_rafdb(tmp_path / "raf")
    a = main(["--rafdb", str(tmp_path / "raf"), "--out", str(tmp_path / "a"), "--image-size", "16"])
    labels = tmp_path / "raf" / "basic" / "EmoLabel" / "list_patition_label.txt"
    labels.write_text(re.sub(r"(_\d{5})\.jpg", r"\1_aligned.jpg", labels.read_text()))
    b = main(["--rafdb", str(tmp_path / "raf"), "--out", str(tmp_path / "b"), "--image-size", "16"])
    assert datasets.content_hash(b) == datasets.content_hash(a)


def test_rafdb_a_face_listed_twice(tmp_path):
    """A face listed with two labels went into both classes, which for RAF-DB could put one
    face in train and in val (val is carved from train): such a face is left out, counted."""
    make_rafdb(tmp_path / "raf")
    labels = tmp_path / "raf" / "basic" / "EmoLabel" / "list_patition_label.txt"
    # train_00006 is Fear (2), train_00001 Surprise (1): each listed again as Happy (4).
    append_lines(labels, ["train_00006.jpg 4", "train_00001.jpg 4"])
    out = main(["--rafdb", str(tmp_path / "raf"), "--out", str(tmp_path / "c")])
    where = located(out)
    assert "train_00006" not in where and "train_00001" not in where
    assert all(len(places) == 1 for places in where.values()) and len(where) == 49 - 2
    assert datasets.read_manifest(out)["labels"]["dropped"] == {CONFLICTING: 4}
