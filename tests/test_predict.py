"""predict.py on a real photograph, a video made from it, a blank frame and bad inputs."""

import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from inference_utils import (
    ASTRONAUT,
    CLASSES,
    command_error,
    make_official_checkpoint,
    make_project_checkpoint,
)

import predict
from utils import CLIError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_project_checkpoint(tmp_path_factory.mktemp("predict") / "checkpoint.pt")


def run(argv: list[str]) -> list[dict]:
    return predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def check_face(record: dict) -> None:
    assert record["box"] is not None and len(record["box"]) == 4
    assert list(record["probabilities"]) == CLASSES
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-5
    assert record["label"] == max(record["probabilities"], key=record["probabilities"].get)


def test_command_finds_the_astronauts_face(checkpoint, tmp_path, repo_root):
    result = subprocess.run(
        [sys.executable, "predict.py", str(ASTRONAUT), "--checkpoint", str(checkpoint)]
        + ["--json", "--output", str(tmp_path)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 1
    check_face(records[0])
    assert records[0]["source"] == str(ASTRONAUT) and records[0]["frame"] == 0
    annotated = cv2.imread(str(tmp_path / "astronaut_png_pred.png"))
    assert annotated is not None and annotated.shape[:2] == (384, 384)


def test_official_checkpoint_in_process(golden_dir, tmp_path):
    official = make_official_checkpoint(golden_dir, tmp_path / "official.pt")
    records = run([ASTRONAUT, "--checkpoint", official, "--model-size", "micro"])
    assert len(records) == 1
    check_face(records[0])
    x, y, w, h = records[0]["box"]
    assert 100 < x + w / 2 < 220 and 40 < y + h / 2 < 140  # Eileen Collins' face, top centre


def write_clip(path, fourcc: str, frames: int, step: int):
    """A 5-fps video of the astronaut photo, moved `step` pixels right each frame."""
    frame = cv2.imread(str(ASTRONAUT))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5, frame.shape[1::-1])
    for shift in range(frames):
        writer.write(np.roll(frame, step * shift, axis=1))
    writer.release()
    return path


def test_video_gives_one_record_per_frame(checkpoint, tmp_path):
    path = write_clip(tmp_path / "clip.mp4", "mp4v", frames=5, step=2)
    out = tmp_path / "out"
    records = run([path, "--checkpoint", checkpoint, "--output", out, "--smooth", "3"])
    assert [r["frame"] for r in records] == list(range(5))
    for r in records:
        check_face(r)
    capture = cv2.VideoCapture(str(out / "clip_mp4_pred.mp4"))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 5


def test_frame_without_face_is_reported(checkpoint, tmp_path, capsys):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 128, np.uint8))
    records = run([blank, "--checkpoint", checkpoint, "--json"])
    assert records == [
        {
            "source": str(blank),
            "frame": 0,
            "box": None,
            "label": None,
            "probabilities": None,
            "note": "no face found",
        }
    ]
    assert json.loads(capsys.readouterr().out) == records[0]


def test_no_detect_and_folders(checkpoint, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(3):
        cv2.imwrite(str(faces / f"{i}.png"), np.full((48, 48), 40 * i, np.uint8))
    (faces / "notes.txt").write_text("not an image")
    records = run([faces, "--checkpoint", checkpoint, "--no-detect", "--batch-size", "2"])
    assert [r["source"] for r in records] == [str(faces / f"{i}.png") for i in range(3)]
    assert all(r["box"] == [0, 0, 48, 48] for r in records)
    for r in records:
        check_face(r)


def test_a_failed_run_leaves_no_output_folder(checkpoint, bomb_png, tmp_path):
    out = tmp_path / "out" / "annotated"
    bomb, video = tmp_path / "huge.png", tmp_path / "clip.mp4"
    bomb.write_bytes(bomb_png.read_bytes())  # 400 megapixels: refused, not decoded
    video.write_bytes(b"not a video")
    for bad, match in [(bomb, "huge.png .*too large"), (video, "cannot open the video")]:
        with pytest.raises(CLIError, match=match) as err:
            run([bad, ASTRONAUT, "--checkpoint", checkpoint, "--output", out, "--no-detect"])
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
        assert not (tmp_path / "out").exists()


def test_16_bit_images_are_read_scaled_not_white(tmp_path):
    deep = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)  # a 16-bit grayscale PNG
    rgb = predict.read_image(str(tmp_path / "deep.png")).astype(np.float64)
    expected = deep.astype(np.float64) * 255 / 65535
    assert rgb.shape == (48, 48, 3) and np.abs(rgb - expected[..., None]).max() <= 0.5


def test_smoother_averages_per_face():
    smoother = predict.Smoother(2)

    def frame(p_left, p_right, shift=0):
        return [
            {"box": [10 + shift, 10, 20, 20], "probabilities": {"A": p_left, "B": 1 - p_left}},
            {"box": [100 + shift, 10, 20, 20], "probabilities": {"A": p_right, "B": 1 - p_right}},
        ]

    smoother(frame(1.0, 0.0))
    left, right = smoother(frame(0.0, 0.0, shift=3))
    assert left["probabilities"]["A"] == pytest.approx(0.5) and right["probabilities"]["A"] == 0
    left, _ = smoother(frame(0.0, 0.0, shift=6))  # the window holds 2 frames
    assert left["probabilities"]["A"] == 0 and left["label"] == "B"


def test_widen_box_is_square_and_clamped():
    assert predict.widen_box((10, 10, 20, 20), 1.5, 100, 100) == (5, 5, 30, 30)
    assert predict.widen_box((0, 0, 20, 20), 2.0, 25, 25) == (0, 0, 25, 25)
    assert predict.widen_box((40, 30, 20, 40), 1.0, 100, 100) == (30, 30, 40, 40)  # YuNet's boxes


def test_bad_inputs_are_clear_errors(checkpoint, tmp_path, repo_root, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(CLIError, match="neither an image nor a video"):
        run([text, "--checkpoint", checkpoint])
    with pytest.raises(CLIError, match="does not exist"):
        run([tmp_path / "missing.png", "--checkpoint", checkpoint])
    with pytest.raises(CLIError, match="not a readable PyTorch checkpoint"):
        run([ASTRONAUT, "--checkpoint", text])
    with pytest.raises(CLIError, match="not a readable ONNX"):
        (tmp_path / "bad.onnx").write_text("nope")
        run([ASTRONAUT, "--checkpoint", tmp_path / "bad.onnx"])
    # The command itself (its __main__ block, in this process: no second interpreter start).
    status, message = command_error(
        capsys, repo_root / "predict.py", [text, "--checkpoint", checkpoint]
    )
    assert status == 1 and message.count("\n") == 1
    assert message.startswith("predict.py: error: ") and "neither an image nor a video" in message
    # A bad flag value or contradicting flags: one line, exit status 2, before any work.
    for argv, expected in [
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--box-scale", "x"], "argument --box-scale: invalid float value: 'x'"),
        (["--model-size", "huge"], "argument --model-size: invalid choice: 'huge'"),
        (["--model", "emonext_tiny", "--model-size", "micro"], "name different models"),
    ]:
        argv = [ASTRONAUT, "--checkpoint", checkpoint, *argv]
        status, message = command_error(capsys, repo_root / "predict.py", argv)
        assert status == 2 and message.count("\n") == 1, message
        assert message.startswith("predict.py: error: ") and expected in message, message


def test_help_and_parsing_load_neither_scikit_learn_nor_matplotlib(repo_root):
    """predict.py imports neither engine.py nor evaluate.py, and so neither scikit-learn nor
    matplotlib: --help and a mistyped flag answer without their second of imports."""
    code = (
        "import runpy, sys\n"
        "import predict\n"
        "args = predict.parse_args(['face.png', '--checkpoint', 'c.pt', '--device', 'cpu'])\n"
        "assert args.device == 'cpu' and args.weights == 'auto' and args.model is None\n"
        "sys.argv = ['predict.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('predict.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = {'sklearn', 'matplotlib', 'engine', 'evaluate'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--checkpoint CHECKPOINT" in result.stdout and "--device DEVICE" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]"


def test_video_runs_on_onnx_runtime_with_pytorchs_answers(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """The default path for videos (ONNX Runtime, exported in memory) agrees with PyTorch, and
    each video reports its frames per second, backend and detector."""
    path = write_clip(tmp_path / "clip.avi", "MJPG", frames=3, step=3)
    default = run([path, "--checkpoint", checkpoint])
    err = capsys.readouterr().err
    assert "ONNX Runtime (exported in" in err
    assert re.search(
        r"clip\.avi: 3 frames in [\d.]+ s, [\d.]+ fps \(onnxruntime, yunet, 32 frames", err
    )
    torch_run = run([path, "--checkpoint", checkpoint, "--backend", "torch"])
    assert "(torch, yunet" in capsys.readouterr().err
    assert [r["box"] for r in default] == [r["box"] for r in torch_run]
    for a, b in zip(default, torch_run, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    # A few images stay on PyTorch (the export would cost more than it saves), many do not.
    run([ASTRONAUT, "--checkpoint", checkpoint])
    assert "ONNX Runtime" not in capsys.readouterr().err
    monkeypatch.setattr(predict, "IMAGES_FOR_ONNX", 2)
    run([ASTRONAUT, ASTRONAUT, "--checkpoint", checkpoint])
    assert "ONNX Runtime (exported in" in capsys.readouterr().err


def test_records_carry_the_detector_and_align_turns_the_crop(checkpoint):
    (plain,) = run([ASTRONAUT, "--checkpoint", checkpoint])
    (aligned,) = run([ASTRONAUT, "--checkpoint", checkpoint, "--align"])
    assert plain["score"] > 0.9 and len(plain["landmarks"]) == 5 and "angle" not in plain
    assert aligned["box"] == plain["box"] and abs(aligned["angle"]) < 10
    assert aligned["probabilities"] != plain["probabilities"]


def test_face_flags_are_checked(capsys, repo_root, checkpoint):
    for argv, expected in [
        (["--align", "--detector", "haar"], "--align needs the eye landmarks"),
        (["--align", "--no-detect"], "--align needs the eye landmarks"),
        (["--min-score", "2"], "--min-score 2.0: must be between 0 and 1"),
        (["--detect-size", "8"], "--detect-size 8: must be 0 or at least 32"),
        (["--backend", "tensorrt"], "argument --backend: invalid choice"),
    ]:
        argv = [ASTRONAUT, "--checkpoint", checkpoint, *argv]
        status, message = command_error(capsys, repo_root / "predict.py", argv)
        assert status == 2 and message.count("\n") == 1, message
        assert expected in message, message
    # Haar where OpenCV still has it (without: a one-line error, tests/test_faces.py).
    if hasattr(cv2, "CascadeClassifier"):
        (record,) = run([ASTRONAUT, "--checkpoint", checkpoint, "--detector", "haar"])
        assert record["score"] is None and record["landmarks"] is None


def test_every_input_gets_its_own_annotated_file(checkpoint, tmp_path):
    """`d1/face.webp` and `d2/face.webp`, `x.jpg` and `x.webp`, or one file given twice used to
    leave one `*_pred.png` (the last overwrote the others); each now has its own, named by a rule
    a user can predict (docs/INFERENCE.md)."""
    inputs = []
    for i, rel in enumerate(["d1/face.webp", "d2/face.webp", "x.jpg", "x.webp", "X.png"]):
        path = tmp_path / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((48, 48, 3), 30 * i, np.uint8))
        inputs.append(path)
    inputs.append(inputs[0])  # the same file twice
    out = tmp_path / "out"
    run([*inputs, "--checkpoint", checkpoint, "--no-detect", "--output", out])
    names = ["face_webp", "d2_face_webp", "x_jpg", "x_webp", "X_png", "d1_face_webp"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_pred.png" for n in names)
    for i, name in enumerate(names[:5]):  # each file shows its own input (grey level 30 * i)
        annotated = cv2.imread(str(out / f"{name}_pred.png"))
        assert abs(int(np.median(annotated)) - 30 * i) <= 1, name
    same = [(str(inputs[0]), "image")] * 3 + [(str(tmp_path / "face.WEBP"), "image")]
    assert predict.output_names(same) == [
        "face_webp_pred.png",
        "d1_face_webp_pred.png",
        "d1_face_webp_2_pred.png",
        f"{tmp_path.name}_face_WEBP_pred.png",  # face_WEBP_pred.png on macOS is the first's
    ]
    assert predict.output_names([("a/x.mp4", "video"), ("b/x.avi", "video")]) == [
        "x_mp4_pred.mp4",
        "x_avi_pred.mp4",
    ]


def test_folders_skip_hidden_and_appledouble_files(checkpoint, tmp_path):
    """macOS's `._0.png` (AppleDouble, not an image) used to stop the run with "cannot read
    image"; a hidden `.hidden.png` was classified. A folder listing skips both, as the dataset
    loaders do (datasets.is_hidden); a folder of only such files holds no images."""
    faces = tmp_path / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "0.png"), np.full((48, 48), 90, np.uint8))
    (faces / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble header
    cv2.imwrite(str(faces / ".hidden.png"), np.full((48, 48), 10, np.uint8))
    records = run([faces, "--checkpoint", checkpoint, "--no-detect"])
    assert [r["source"] for r in records] == [str(faces / "0.png")]
    (faces / "0.png").unlink()
    with pytest.raises(CLIError, match="holds no images"):
        run([faces, "--checkpoint", checkpoint, "--no-detect"])


def test_folders_skip_pipes_and_folders_named_like_images(checkpoint, tmp_path):
    """A FIFO named `x.png` in a folder hung predict.py (reading it waits for a writer); a
    sub-folder named `dir.png` stopped it with "cannot read image". Only regular files are
    images; the listing is checked first, so that the old code fails here instead of hanging."""
    faces = tmp_path / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "0.png"), np.full((48, 48), 90, np.uint8))
    os.mkfifo(faces / "pipe.png")
    (faces / "dir.png").mkdir()
    assert predict.expand_inputs([str(faces)]) == [(str(faces / "0.png"), "image")]
    records = run([faces, "--checkpoint", checkpoint, "--no-detect"])
    assert [r["source"] for r in records] == [str(faces / "0.png")]


def test_output_is_checked_before_any_work(tmp_path, capsys, repo_root):
    """An --output that cannot be a folder is one line and exit status 2 before the model is
    loaded (the checkpoint here does not even exist); it used to fail after the first image."""
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    missing = tmp_path / "never-read.pt"
    for output in [blocker, blocker / "annotated"]:
        argv = [ASTRONAUT, "--checkpoint", missing, "--output", output]
        status, message = command_error(capsys, repo_root / "predict.py", argv)
        assert status == 2 and message.count("\n") == 1, message
        assert message.startswith(f"predict.py: error: --output {output}: "), message
        assert "is a file, not a folder" in message, message
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_the_default_backend_follows_the_device_and_the_number_of_frames():
    """On a GPU the model stays on PyTorch there (CUDA's rule, no GPU needed to check it); on the
    CPU a video, the webcam or IMAGES_FOR_ONNX images go to ONNX Runtime, fewer images do not."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    video, images = [("c.mp4", "video")], [(f"{i}.png", "image") for i in range(50)]
    assert predict.choose_backend("auto", "m.pt", video, None, cpu) == "auto"
    assert predict.choose_backend("auto", "m.pt", images, None, cpu) == "auto"
    assert predict.choose_backend("auto", "m.pt", images[:49], None, cpu) == "torch"
    assert predict.choose_backend("auto", "m.pt", [], 0, cpu) == "auto"  # the webcam
    assert predict.choose_backend("auto", "m.pt", video, 0, gpu) == "torch"
    assert predict.choose_backend("onnxruntime", "m.pt", [], None, gpu) == "onnxruntime"
    with pytest.raises(CLIError, match="is an ONNX file"):
        predict.choose_backend("torch", "m.onnx", video, None, cpu)
