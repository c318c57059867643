"""The one face pipeline (models/faces/): download_dataset.py --faces and predict.py frame faces
with the same function, and its settings travel from the manifest into every checkpoint, export
and hub folder. Photos are faces of scikit-image's LFW subset (bundled, nothing downloaded) on
a grey background, which YuNet finds."""

import contextlib
import hashlib
import io
import json

import cv2
import download_dataset
import numpy as np
import onnx
import pytest
import torch
from inference_utils import command_error, make_project_checkpoint
from PIL import Image
from skimage import data

import datasets
import models
import predict
import train
from models import faces as face_module
from models.faces import FacePipeline, YuNetDetector, face_crops, pick_face, pipeline_for
from utils import CLIError

LFW = (data.lfw_subset()[:40] * 255).round().astype(np.uint8)
# The LFW faces YuNet finds once they are upscaled to 96 pixels on a 160-pixel grey square
# (it misses number 9, and number 4 once saved as JPEG).
FOUND = [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]


def tile(i: int, side: int = 96, canvas: int = 160) -> np.ndarray:
    """LFW face `i` upscaled to `side` pixels in the middle of a grey `canvas` square (uint8)."""
    image = np.full((canvas, canvas), 128, np.uint8)
    o = (canvas - side) // 2
    image[o : o + side, o : o + side] = cv2.resize(
        LFW[i], (side, side), interpolation=cv2.INTER_CUBIC
    )
    return image


def save(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """--folder of photos: train/{Happy,Sad} 3 faces each and a blank photo, test 1 each."""
    root = tmp_path_factory.mktemp("photos")
    faces = iter(FOUND)
    for split, n in (("train", 3), ("test", 1)):
        for name in ("Happy", "Sad"):
            for _ in range(n):
                k = next(faces)
                save(root / split / name / f"p{k}.png", tile(k))
    save(root / "train" / "Happy" / "blank.png", np.full((160, 160), 128, np.uint8))
    return root


@pytest.fixture(scope="module")
def faces_dataset(photos, tmp_path_factory):
    """(dataset folder, what the command printed) of --folder photos --faces yunet --align."""
    out = tmp_path_factory.mktemp("built") / "Faces"
    printed = io.StringIO()
    argv = ["--folder", photos, "--faces", "yunet", "--align", "--image-size", 48, "--out", out]
    with contextlib.redirect_stdout(printed):
        download_dataset.main([str(a) for a in argv])
    return out, printed.getvalue()


def test_a_folder_of_photos_becomes_aligned_faces(faces_dataset, photos):
    out, printed = faces_dataset
    manifest = datasets.read_manifest(out)
    yunet = face_module.YUNET_MODEL.read_bytes()
    assert manifest["faces"] == {
        "detector": "yunet",
        "detector_sha256": hashlib.sha256(yunet).hexdigest(),
        "min_score": 0.7,
        "min_face": 30,
        "detect_size": 640,
        "box_scale": 1.15,
        "align": True,
        "size": 48,
    }
    assert manifest["settings"]["faces"] == manifest["faces"]
    assert manifest["no_face"] == {"count": 1, "list": "no_face.txt"}
    assert (out / "no_face.txt").read_text() == f"{photos / 'train' / 'Happy' / 'blank.png'}\n"
    assert "no face found in 1 photo(s), left out (listed in no_face.txt)" in printed
    assert manifest["total"] == 8  # 9 photos, one without a face
    for path in out.rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (48, 48)
    # A second run finds it intact (no_face.txt is the tool's own file); --force replaces it.
    with contextlib.redirect_stdout(io.StringIO()) as again:
        download_dataset.main(["--folder", str(photos), "--faces", "yunet", "--align",
                               "--image-size", "48", "--out", str(out)])  # fmt: skip
    assert "already there" in again.getvalue()


def with_faces(checkpoint, faces: dict):
    """`checkpoint` as train.py writes it from a dataset of download_dataset.py --faces."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["faces"] = faces
    torch.save(ckpt, checkpoint)
    return checkpoint


def test_predict_frames_faces_as_the_importer_did(faces_dataset, photos, tmp_path, capsys):
    """The same photo through download_dataset.py --faces and through predict.py --save-crops
    (with a checkpoint that records the dataset's pipeline) gives byte-identical crops; a flag
    that overrides the recorded pipeline says so in one line."""
    out, _ = faces_dataset
    faces = datasets.read_manifest(out)["faces"]
    checkpoint = with_faces(make_project_checkpoint(tmp_path / "faces.pt"), faces)
    stems = ["p0", "p3", "p7"]  # train, train and test photos
    inputs = [next(photos.rglob(f"{s}.png")) for s in stems]
    capsys.readouterr()
    predict.main(predict.parse_args([*map(str, inputs), "--checkpoint", str(checkpoint),
                                     "--save-crops", str(tmp_path / "crops")]))  # fmt: skip
    assert "overrides" not in capsys.readouterr().err
    for stem in stems:
        (written,) = out.rglob(f"{stem}.png")
        saved = tmp_path / "crops" / f"{stem}_png_face0.png"
        assert saved.read_bytes() == written.read_bytes()

    predict.main(predict.parse_args([str(inputs[0]), "--checkpoint", str(checkpoint), "--no-align",
                                     "--save-crops", str(tmp_path / "plain")]))  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err == ["predict.py: --no-align overrides the checkpoint's face pipeline (align True)"]
    plain = np.asarray(Image.open(tmp_path / "plain" / "p0_png_face0.png"))
    assert plain.shape == (48, 48) and not np.array_equal(
        plain, np.asarray(Image.open(next(out.rglob("p0.png"))))
    )
    # A checkpoint without a pipeline: predict.py's own framing, in colour at full resolution.
    bare = make_project_checkpoint(tmp_path / "bare.pt")
    predict.main(predict.parse_args([str(inputs[0]), "--checkpoint", str(bare), "--save-crops",
                                     str(tmp_path / "bare")]))  # fmt: skip
    with Image.open(tmp_path / "bare" / "p0_png_face0.png") as image:
        assert image.mode == "RGB" and image.size[0] > 48


def test_the_datasets_box_picks_the_face(tmp_path):
    """ExpW photos of two faces: each label.lst box gets the face it overlaps; a box over no
    face is a photo without a face, listed."""
    root, lines = tmp_path / "expw", []
    for photo in range(6):
        left, right = FOUND[2 * photo], FOUND[2 * photo + 1]
        save(root / "image" / "origin" / f"p{photo}.png", np.hstack([tile(left), tile(right)]))
        x = 32 if photo % 2 == 0 else 192  # the left or the right face (96 px at 32 or 192)
        lines.append(f"p{photo}.png 0 32 {x} {x + 96} 128 0.9 {3 + 3 * (photo % 2)}")
    lines.append("p0.png 1 0 0 20 20 0.9 3")  # a corner of the background
    (root / "label").mkdir()
    (root / "label" / "label.lst").write_text("\n".join(lines) + "\n")
    out = download_dataset.main(["--expw", str(root), "--faces", "yunet", "--folds", "3",
                                 "--image-size", "64", "--workers", "1",
                                 "--out", str(tmp_path / "ExpW")])  # fmt: skip
    pipeline = FacePipeline(**datasets.read_manifest(out)["faces"])
    detector = YuNetDetector.of(pipeline)
    for photo in range(6):
        rgb = predict.read_image(str(root / "image" / "origin" / f"p{photo}.png"))
        crops = face_crops(rgb, pipeline, detector)
        assert len(crops) == 2
        x = 32 if photo % 2 == 0 else 192
        chosen = pick_face(crops, (x, 32, 96, 96))
        (written,) = out.rglob(f"p{photo}_0.png")
        assert np.array_equal(np.asarray(Image.open(written)), chosen.crop)
        other = next(c for c in crops if c is not chosen)
        assert not np.array_equal(other.crop, chosen.crop)
    assert (out / "no_face.txt").read_text() == f"{root / 'image' / 'origin' / 'p0.png'}\n"


def test_affectnet_box_picks_the_face(tmp_path):
    """AffectNet's CSV release with --faces: each row's face box picks one of a photo's two
    faces, which is written as the pipeline frames it."""
    root = tmp_path / "an"
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
              "facial_landmarks", "expression", "valence", "arousal"]  # fmt: skip
    faces, expected = iter(FOUND), {}
    (root / "Manually_Annotated_file_lists").mkdir(parents=True)
    for name, per_code in (("training", 2), ("validation", 1)):
        rows = [header]
        for code in (1, 2):  # Happy, Sad
            for i in range(per_code):
                rel = f"{code}/{name}_{code}_{i}.png"
                save(root / "Manually_Annotated_Images" / rel,
                     np.hstack([tile(next(faces)), tile(next(faces))]))  # fmt: skip
                x = 32 if i % 2 == 0 else 192
                rows.append([rel, x, 32, 96, 96, "", code, 0.1, -0.2])
                expected[f"{code}_{name}_{code}_{i}"] = (
                    root / "Manually_Annotated_Images" / rel,
                    x,
                )
        lines = "".join(",".join(map(str, row)) + "\n" for row in rows)
        (root / "Manually_Annotated_file_lists" / f"{name}.csv").write_text(lines)
    out = download_dataset.main(["--affectnet", str(root), "--faces", "yunet", "--workers", "1",
                                 "--image-size", "64", "--out", str(tmp_path / "A")])  # fmt: skip
    pipeline = FacePipeline(**datasets.read_manifest(out)["faces"])
    detector = YuNetDetector.of(pipeline)
    for stem, (photo, x) in expected.items():
        crops = face_crops(predict.read_image(str(photo)), pipeline, detector)
        (written,) = out.rglob(f"{stem}.png")
        assert np.array_equal(
            np.asarray(Image.open(written)), pick_face(crops, (x, 32, 96, 96)).crop
        )


def test_rafdb_original_photos(tmp_path):
    """--rafdb --faces reads Image/original/ (not the aligned faces), each photo's face picked
    by Annotation/boundingbox/ where the file is there."""
    root = tmp_path / "raf" / "basic"
    lines, faces = [], iter(FOUND)
    for split, n in (("train", 2), ("test", 1)):
        for code in range(1, 8):
            for i in range(n):
                stem = f"{split}_{code * 10 + i:05d}"
                save(root / "Image" / "original" / f"{stem}.jpg", tile(next(faces)))
                if i == 0:
                    box = root / "Annotation" / "boundingbox" / f"{stem}_boundingbox.txt"
                    box.parent.mkdir(parents=True, exist_ok=True)
                    box.write_text("32.0 32.0 128.0 128.0\n")
                lines.append(f"{stem}.jpg {code}")
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    out = download_dataset.main(["--rafdb", str(root), "--faces", "yunet", "--workers", "1",
                                 "--out", str(tmp_path / "RAF-DB")])  # fmt: skip
    manifest = datasets.read_manifest(out)
    assert manifest["labels"]["images"] == "Image/original (faces found by YuNet)"
    assert manifest["faces"]["size"] == 100 and manifest["total"] == 21
    assert manifest["no_face"]["count"] == 0


def test_checkpoints_exports_and_hub_folders_record_it(tmp_path):
    """train.py copies the manifest's pipeline into its checkpoints; the ONNX export's metadata
    and the hub folder's config.json carry it, and predict.py reads it from each. (A small CNN on
    7 x 4 synthetic faces: the pipeline's way through does not depend on the model.)"""
    data_dir = datasets.make_synthetic(tmp_path / "data", seed=0, splits={"train": 2, "val": 1,
                                                                          "test": 1})  # fmt: skip
    manifest = datasets.read_manifest(data_dir) or {}
    faces = pipeline_for(align=True, size=48).to_dict()
    datasets.write_manifest(data_dir, {**manifest, "faces": faces})
    argv = ["--model", "simple_cnn", "--pretrained", "none", "--batch-size", "64", "--device",
            "cpu", "--wandb", "disabled", "--no-progress", "--epochs", "1", "--dataset-path",
            str(data_dir), "--output-dir", str(tmp_path), "--run-name", "r"]  # fmt: skip
    train.main(train.parse_args(argv))
    checkpoint = tmp_path / "r" / "last.pt"
    assert torch.load(checkpoint, weights_only=True)["faces"] == faces
    assert models.load_trained_model(str(checkpoint))[3]["faces"] == faces

    from scripts import export as export_script

    onnx_path, hub_dir = tmp_path / "m.onnx", tmp_path / "hub"
    for fmt, output in (("onnx", onnx_path), ("hub", hub_dir)):
        args = ["--checkpoint", checkpoint, "--format", fmt, "--output", output]
        export_script.main(export_script.parse_args([str(a) for a in args]))
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["faces"]) == faces
    assert json.loads((hub_dir / "config.json").read_text())["faces"] == faces
    for source in (onnx_path, hub_dir):
        assert predict.load_classifier(str(source)).faces == faces

    # A manifest whose pipeline is wrong stops the run in one line.
    datasets.write_manifest(data_dir, {**manifest, "faces": {**faces, "box_scale": "wide"}})
    with pytest.raises(CLIError) as err:
        train.main(train.parse_args([*argv[:-1], "bad"]))
    assert "manifest.json: faces.box_scale is 'wide' (a str)" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"detector": "mtcnn"}, "faces.detector is 'mtcnn' (a str); accepted: \"yunet\""),
        ({"detector_sha256": "abc"}, "faces.detector_sha256 is 'abc' (a str); accepted: 64"),
        ({"min_score": 1.5}, "faces.min_score is 1.5 (a float); accepted: a number from 0 to 1"),
        ({"box_scale": float("nan")}, "faces.box_scale is nan (a float)"),
        ({"align": 1}, "faces.align is 1 (a int); accepted: true or false"),
        ({"size": 4}, "faces.size is 4 (a int); accepted: null or an integer from 8"),
        ({"crop": "x"}, "unknown key faces.crop"),
    ],
)
def test_a_wrong_pipeline_is_one_line(change, message, tmp_path, capsys, repo_root):
    good = pipeline_for(size=48).to_dict()
    assert FacePipeline.from_dict(good, "x").to_dict() == good
    with pytest.raises(models.WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FacePipeline.from_dict({**good, **change}, "x")
    if "crop" in change:  # and the same from a checkpoint, through predict.py
        checkpoint = with_faces(make_project_checkpoint(tmp_path / "c.pt"), {**good, **change})
        status, err = command_error(
            capsys,
            repo_root / "predict.py",
            [repo_root / "tests/data/astronaut.png", "--checkpoint", checkpoint],  # fmt: skip
        )
        assert status == 1 and err.count("\n") == 1 and "unknown key faces.crop" in err


def test_detector_file_missing_or_another(monkeypatch, tmp_path):
    other = pipeline_for(size=48)
    other = FacePipeline(**{**other.to_dict(), "detector_sha256": "0" * 64})
    with pytest.raises(CLIError, match=r"is not the one the faces were framed with .*restore"):
        YuNetDetector.of(other)
    monkeypatch.setitem(face_module.DETECTORS, "yunet", tmp_path / "gone.onnx")
    with pytest.raises(CLIError, match=r"face detector's model .*gone\.onnx is missing"):
        download_dataset.main(["--folder", str(tmp_path), "--faces", "yunet",
                               "--out", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--folder", "x", "--align"], "--align frames the faces of --faces: add --faces yunet"),
        (["--csv", "x.csv", "--faces", "yunet"], "--faces finds faces in photos"),
        (["--folder", "x", "--faces", "yunet", "--box-scale", "9"], "--box-scale must be from"),
    ],
)
def test_face_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        download_dataset.parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and message in err, err
