"""Face detection with YuNet (models/faces/) on public-domain photos: who is found, who is not.

scikit-image's bundled images (no download): the astronaut (Eileen Collins, NASA), `camera()` (a
photographer; Haar's cascade finds no face in it), `coffee()` (a cup, no face) and a collage of
faces from `lfw_subset()` (Labeled Faces in the Wild, 25 x 25, upscaled).
"""

import math

import cv2
import numpy as np
import pytest
from inference_utils import ASTRONAUT
from skimage import data

import predict
from utils import CLIError


@pytest.fixture(scope="module")
def yunet():
    return predict.YuNetDetector()


def lfw_collage(indices: list[int], side: int = 96, margin: int = 48, cols: int = 3) -> np.ndarray:
    """LFW faces upscaled to `side` pixels on a grey background, in a grid (RGB uint8)."""
    faces = (data.lfw_subset()[: max(indices) + 1] * 255).round().astype(np.uint8)
    rows = math.ceil(len(indices) / cols)
    image = np.full(
        (rows * (side + margin) + margin, cols * (side + margin) + margin), 128, np.uint8
    )
    for k, i in enumerate(indices):
        y, x = margin + (k // cols) * (side + margin), margin + (k % cols) * (side + margin)
        image[y : y + side, x : x + side] = cv2.resize(faces[i], (side, side), cv2.INTER_CUBIC)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)


def test_one_face_in_the_astronaut_and_the_camera_photo(yunet):
    astronaut = predict.read_image(str(ASTRONAUT))
    (face,) = yunet(astronaut)
    x, y, w, h = face.box
    assert 120 < x + w / 2 < 200 and 60 < y + h / 2 < 120 and face.score > 0.9
    camera = cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2RGB)
    (face,) = yunet(camera)
    x, y, w, h = face.box
    assert 200 < x + w / 2 < 260 and 120 < y + h / 2 < 180  # the photographer's face
    assert face.landmarks.shape == (5, 2)
    (left, right) = face.landmarks[:2]
    assert x < left[0] < right[0] < x + w  # eyes inside the box, the right eye on the image's left


def test_every_face_of_a_collage_and_none_in_coffee(yunet):
    indices = [0, 1, 2, 3, 5, 6]
    collage = lfw_collage(indices)
    faces = yunet(collage)
    assert len(faces) == len(indices)
    for k, face in enumerate(sorted(faces, key=lambda f: (round(f.box[1] / 100), f.box[0]))):
        x, y, w, h = face.box
        cx, cy = 48 + (k % 3) * 144 + 48, 48 + (k // 3) * 144 + 48  # each tile's centre
        assert abs(x + w / 2 - cx) < 20 and abs(y + h / 2 - cy) < 20
    assert yunet(data.coffee()) == []


def test_large_frames_are_detected_downscaled_and_mapped_back(yunet):
    astronaut = predict.read_image(str(ASTRONAUT))
    (small,) = yunet(astronaut)
    big = cv2.resize(astronaut, None, fx=5, fy=5, interpolation=cv2.INTER_CUBIC)  # 1920 x 1920
    (large,) = yunet(big)
    assert yunet.input_size == (640, 640)  # detected at --detect-size
    np.testing.assert_allclose(np.array(large.box) / 5, small.box, atol=4)
    np.testing.assert_allclose(large.landmarks / 5, small.landmarks, atol=4)


def test_align_levels_the_eyes(yunet):
    """Turned by 20 degrees, the astronaut's face is measured turned by about 20 (from a close-up:
    YuNet's own landmarks of this 70-pixel face say 1.4) and comes out level (within 5) once
    aligned."""
    astronaut = predict.read_image(str(ASTRONAUT))
    (face,) = yunet(astronaut)
    upright = yunet.roll(astronaut, face)
    centre = (face.box[0] + face.box[2] / 2, face.box[1] + face.box[3] / 2)
    turn = cv2.getRotationMatrix2D(centre, 20, 1.0)
    rotated = cv2.warpAffine(astronaut, turn, (384, 384), borderMode=cv2.BORDER_REPLICATE)
    (tilted,) = yunet(rotated)
    assert abs(predict.eye_angle(tilted.landmarks) - predict.eye_angle(face.landmarks)) < 3
    angle = yunet.roll(rotated, tilted)
    assert angle - upright == pytest.approx(-20, abs=5)
    ((crop, box, corrected),) = predict.crop_faces(rotated, [tilted], 1.15, align=yunet)
    assert corrected == angle and crop.shape[0] == crop.shape[1] == round(
        1.15 * max(tilted.box[2:])
    )
    (again,) = yunet(crop)
    assert abs(yunet.roll(crop, again)) < 5  # from about 17 degrees before


def test_haar_only_where_opencv_has_it(monkeypatch, yunet):
    if hasattr(cv2, "CascadeClassifier"):  # OpenCV 4: Haar finds no face in camera()
        assert predict.HaarDetector()(cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2RGB)) == []
        monkeypatch.delattr(cv2, "CascadeClassifier")  # as OpenCV 5
    with pytest.raises(CLIError, match=r"no Haar cascades.*--detector yunet") as err:
        predict.HaarDetector()
    assert "\n" not in str(err.value)
    assert len(yunet(predict.read_image(str(ASTRONAUT)))) == 1  # YuNet needs no cascade


def test_opencv_without_yunet_is_one_line(monkeypatch):
    monkeypatch.setattr(cv2, "__version__", "4.5.3")
    with pytest.raises(CLIError, match=r"OpenCV 4\.5\.3 cannot run YuNet.*--no-detect"):
        predict.YuNetDetector()


def test_requirements_no_longer_cap_opencv(repo_root):
    lines = (repo_root / "requirements.txt").read_text().splitlines()
    (opencv,) = [ln for ln in lines if ln.startswith("opencv")]
    assert "<" not in opencv and ">=4.8" in opencv
