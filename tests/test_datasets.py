import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

import datasets
from datasets import CLASSES, DataConfig, DatasetError, build_loader, load_split

TOL = 1.5 / 255  # PIL rounds its resized image to uint8; fast stays in float


@pytest.fixture
def copy_root(synthetic_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns(".cache"))
    return root


def first_batch(loader):
    return next(iter(loader))


def test_class_names():
    assert CLASSES == sorted(CLASSES)
    for name, want in [
        ("anger", "Angry"),
        ("ANGRY", "Angry"),
        ("Angry", "Angry"),
        ("happiness", "Happy"),
        ("surprised", "Surprise"),
        ("sadness", "Sad"),
        ("fearful", "Fear"),
        ("disgusted", "Disgust"),
        ("neutral", "Neutral"),
        ("contempt", "Contempt"),
        ("Contemptuous", "Contempt"),
    ]:
        assert datasets.canonical_class_name(name) == want
    assert datasets.KNOWN_CLASSES == sorted(CLASSES + ["Contempt"])
    with pytest.raises(ValueError, match="pain.*Contempt"):
        datasets.canonical_class_name("pain")


def test_imagefolder_order(synthetic_root):
    assert torchvision.datasets.ImageFolder(synthetic_root / "train").classes == CLASSES
    assert datasets.check_dataset(synthetic_root) == CLASSES


def test_data_config():
    cfg = DataConfig()
    assert (cfg.image_size, cfg.resize, cfg.in_chans, cfg.mean) == (224, 236, 3, None)
    assert DataConfig(image_size=64).resize == round(64 * 236 / 224)
    cfg = DataConfig(image_size=96, in_chans=1, mean=(0.5,), std=(0.25,))
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_load_split_and_cache(synthetic_root, monkeypatch):
    split = load_split(synthetic_root, "val")
    assert split.images.shape == (28, 48, 48) and split.images.dtype == torch.uint8
    assert split.targets.tolist() == sorted(split.targets.tolist())
    assert split.classes == CLASSES and len(split.paths) == 28 and split.skipped == 0
    assert any((synthetic_root / ".cache").glob("val-*.pt"))
    # The second load comes from the cache: no image is decoded.
    monkeypatch.setattr(datasets.folders, "decode_image", lambda p: 1 / 0)
    again = load_split(synthetic_root, "val")
    assert torch.equal(again.images, split.images) and again.paths == split.paths


def test_listing_takes_image_files_only(copy_root):
    """The listing (os.scandir, no stat per file) keeps what Path.is_file() kept: image files and
    links to them, not folders named like images, broken links or other files."""
    happy = copy_root / "val" / "Happy"
    originals = sorted(p.name for p in happy.iterdir())
    (happy / "folder.png").mkdir()
    (happy / "notes.txt").write_text("not an image")
    (happy / "UPPER.PNG").write_bytes((happy / originals[0]).read_bytes())
    (happy / "link.png").symlink_to(happy / originals[1])
    (happy / "broken.png").symlink_to(happy / "nowhere.png")
    split = load_split(copy_root, "val", cache=False)
    listed = [Path(p).name for p in split.paths if Path(p).parent.name == "Happy"]
    assert listed == sorted(originals + ["UPPER.PNG", "link.png"])
    empty = copy_root / "test" / "Sad"  # a class folder with nothing but a folder named .png
    for f in empty.iterdir():
        f.unlink()
    (empty / "image.png").mkdir()
    with pytest.raises(DatasetError, match="Sad.*no images"):
        datasets.check_dataset(copy_root)


# The start of an AppleDouble file (macOS's resource fork and attributes, `._NAME` beside NAME on
# any drive or in any zip that is not APFS/HFS+): no image, whatever its name says.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


def test_hidden_and_appledouble_files_are_not_images_of_the_dataset(copy_root):
    """`._0.png` files (they used to stop every loader with "cannot read image") and hidden
    files such as `.hidden.png` (they used to be trained on) are skipped by every listing."""
    manifest_hash = datasets.content_hash(copy_root)
    happy = copy_root / "val" / "Happy"
    for image in sorted(happy.iterdir()):
        (happy / f"._{image.name}").write_bytes(APPLEDOUBLE)
    shutil.copy(happy / sorted(p.name for p in happy.glob("[!.]*"))[0], happy / ".hidden.png")
    (copy_root / "val" / ".Trashes").mkdir()  # a hidden folder is no class either
    (copy_root / "val" / "__MACOSX").mkdir()
    split = load_split(copy_root, "val", cache=False)
    assert len(split.paths) == 28 and not [p for p in split.paths if "/." in p]
    assert datasets.count_images(copy_root)["val"]["Happy"] == 4
    assert datasets.content_hash(copy_root) == manifest_hash
    only_hidden = copy_root / "test" / "Sad"
    for image in only_hidden.iterdir():
        image.rename(only_hidden / f".{image.name}")
    with pytest.raises(DatasetError, match="Sad has no images"):
        datasets.check_dataset(copy_root)


def test_the_cache_can_stay_out_of_the_dataset_folder(copy_root, tmp_path, monkeypatch):
    """cache_in_dataset=False (the audit's, for read-only or shared dataset folders): read
    root/.cache, write only the user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = load_split(copy_root, "val", cache_in_dataset=False)
    assert not (copy_root / ".cache").exists()
    assert len(list((tmp_path / "xdg" / "emonext").glob("*/val-*.pt"))) == 1
    load_split(copy_root, "test")  # train.py's: into the dataset folder
    monkeypatch.setattr(datasets.folders, "decode_image", lambda p: 1 / 0)  # both read, not decoded
    assert torch.equal(load_split(copy_root, "val", cache_in_dataset=False).images, first.images)
    load_split(copy_root, "test", cache_in_dataset=False)
    assert len(list((tmp_path / "xdg" / "emonext").glob("*/*.pt"))) == 1


def test_cache_falls_back_to_the_user_cache(copy_root, tmp_path, monkeypatch):
    """Where root/.cache cannot be made (here a file is in its way; a read-only dataset folder
    alike), the decoded split is cached under $XDG_CACHE_HOME/emonext/ and read from there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (copy_root / ".cache").write_text("not a folder")
    first = load_split(copy_root, "val")
    assert len(list((tmp_path / "xdg" / "emonext").glob("*/val-*.pt"))) == 1
    monkeypatch.setattr(datasets.folders, "decode_image", lambda p: 1 / 0)  # read, not decoded
    assert torch.equal(load_split(copy_root, "val").images, first.images)


def test_broken_cache_is_rebuilt(copy_root):
    first = load_split(copy_root, "test")
    for f in (copy_root / ".cache").glob("test-*.pt"):
        f.write_bytes(b"garbage")
    assert torch.equal(load_split(copy_root, "test").images, first.images)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda r: shutil.rmtree(r / "val"), "val"),
        (lambda r: shutil.rmtree(r / "test" / "Fear"), "Fear"),
        (lambda r: [p.unlink() for p in (r / "train" / "Sad").iterdir()], "Sad.*no images"),
        (lambda r: (r / "val" / "Happy").rename(r / "val" / "pain"), "pain"),
        (lambda r: shutil.copytree(r / "train" / "Happy", r / "train" / "happiness"), "Happy"),
    ],
    ids=["missing-split", "class-in-some-splits", "empty-class", "unknown-class", "duplicate"],
)
def test_layout_errors(copy_root, damage, match):
    damage(copy_root)
    with pytest.raises(DatasetError, match=match):
        datasets.check_dataset(copy_root)


def test_synonym_folders_load(copy_root):
    for split in datasets.SPLITS:
        (copy_root / split / "Happy").rename(copy_root / split / "happiness")
    assert load_split(copy_root, "train", cache=False).classes == CLASSES


def test_eight_classes_with_contempt_load_in_alphabetical_order(copy_root):
    """FER+, AffectNet and CK+ have Contempt: it sorts second, as ImageFolder sorts it."""
    for split in datasets.SPLITS:
        (copy_root / split / "Neutral").rename(copy_root / split / "contempt")
        shutil.copytree(copy_root / split / "Sad", copy_root / split / "Neutral")
    want = ["Angry", "Contempt", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
    assert datasets.check_dataset(copy_root) == want
    split = load_split(copy_root, "val", cache=False)
    assert split.classes == want and split.targets.bincount().tolist() == [4] * 8
    assert [Path(p).parent.name for p in split.paths[4:8]] == ["contempt"] * 4


def test_bad_image(copy_root):
    bad = copy_root / "train" / "Angry" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png.*--skip-bad-images"):
        load_split(copy_root, "train")
    split = load_split(copy_root, "train", skip_bad_images=True)
    assert split.skipped == 1 and len(split.paths) == 7 * 16
    loader = build_loader(
        copy_root,
        "train",
        mode="train",
        skip_bad_images=True,
        data_config=DataConfig(image_size=32),
        batch_size=200,
    )
    assert loader.dataset_size == 7 * 16


def test_mixed_sizes(copy_root):
    Image.new("L", (40, 40)).save(copy_root / "val" / "Angry" / "odd.png")
    with pytest.raises(DatasetError, match="odd.png.*40x40"):
        load_split(copy_root, "val")


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="download_dataset.py"):
        load_split(tmp_path / "nope", "train")


# -- every image mode Pillow opens, against references computed here from the raw values --


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2, the grayscale of PIL and torchvision, in floating point."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def on_white(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return gray * (alpha / 255) + 255 * (1 - alpha / 255)


def stretch(v: np.ndarray) -> np.ndarray:
    return (v - v.min()) * 255 / (v.max() - v.min())


def write_every_mode(folder: Path) -> dict[str, tuple[Path, np.ndarray, float]]:
    """{case: (file, expected 8-bit grayscale as floats, tolerance)}, 48 x 48 each.

    Tolerance 0.5: the decoder must round the exact value; 1: Pillow's own integer luma (or
    CMYK -> RGB) rounds once more.
    """
    rng = np.random.default_rng(0)
    u8 = lambda *shape: rng.integers(0, 256, (48, 48, *shape), dtype=np.uint8)  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}

    def add(name, image, expected, tol, suffix=".png", **save):
        path = folder / f"{name}{suffix}"
        image.save(path, **save)
        cases[name] = (path, np.asarray(expected, dtype=np.float64), tol)

    bits = rng.random((48, 48)) < 0.5
    add("1", Image.fromarray(bits), bits * 255.0, 0.5)
    gray = u8()
    add("L", Image.fromarray(gray), gray, 0.5)
    gray, alpha = u8(), u8()
    alpha[0] = 0  # fully transparent, over bright pixels: must look white, not as they are
    add("LA", Image.fromarray(np.dstack([gray, alpha]), "LA"), on_white(gray, alpha), 0.5)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (48, 48))
    p_image = Image.fromarray(index.astype(np.uint8), "P")
    p_image.putpalette(palette.tobytes())
    add("P", p_image, luma(palette[index].astype(float)), 1)
    keyed = np.where(index == 7, 255.0, luma(palette[index].astype(float)))
    add("P-transparent", p_image, keyed, 1, transparency=7)
    rgb = u8(3)
    add("RGB", Image.fromarray(rgb), luma(rgb.astype(float)), 1)
    rgba = u8(4)
    rgba[:8, :, 3] = 0
    expected = on_white(luma(rgba[..., :3].astype(float)), rgba[..., 3].astype(float))
    add("RGBA", Image.fromarray(rgba, "RGBA"), expected, 1)
    cmyk = u8(4).astype(float)
    as_rgb = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    add("CMYK", Image.fromarray(cmyk.astype(np.uint8), "CMYK"), luma(as_rgb), 1, ".tiff")
    deep = rng.integers(0, 65536, (48, 48)).astype(np.uint16)
    deep[0, :2] = 0, 65535
    scaled = deep.astype(np.float64) * 255 / 65535
    add("I;16", Image.fromarray(deep), scaled, 0.5)  # a 16-bit PNG
    big_endian = Image.frombytes("I;16B", (48, 48), deep.astype(">u2").tobytes())
    add("I;16B", big_endian, scaled, 0.5, ".tiff")
    pgm = folder / "I.pgm"  # Pillow opens 16-bit PGM as mode I
    pgm.write_bytes(b"P5 48 48 65535\n" + deep.astype(">u2").tobytes())
    cases["I"] = (pgm, scaled, 0.5)
    wide = rng.integers(-70000, 200000, (48, 48)).astype(np.int32)
    add("I-32bit", Image.fromarray(wide, "I"), stretch(wide.astype(float)), 0.5, ".tiff")
    unit = rng.random((48, 48)).astype(np.float32)
    add("F", Image.fromarray(unit, "F"), unit * 255.0, 0.5, ".tiff")
    add("F-0-255", Image.fromarray(unit * 255, "F"), unit * 255.0, 0.5, ".tiff")
    signed = (unit * 10 - 3).astype(np.float32)
    add("F-other", Image.fromarray(signed, "F"), stretch(signed.astype(float)), 0.5, ".tiff")
    return cases


def test_every_image_mode_decodes_as_a_person_sees_it(tmp_path):
    root = tmp_path / "modes"
    cases = write_every_mode(root / "val" / "Angry")
    # Both pipelines: the fast one's decoded tensor and the pil one's batches.
    split = load_split(root, "val", cache=False)
    cfg = DataConfig(image_size=48, resize_size=48, in_chans=1)
    (x, _), = build_loader(root, "val", mode="val", pipeline="pil", data_config=cfg,
                           batch_size=len(cases), cache=False)  # fmt: skip
    for i, path in enumerate(split.paths):
        name = Path(path).stem
        _, expected, tol = cases[name]
        assert np.abs(split.images[i].numpy() - expected).max() <= tol + 1e-9, name
        assert np.abs(x[i, 0].numpy() * 255 - expected).max() <= tol + 1e-4, name
    # The decoder itself, on every mode, in grayscale and in colour (predict.py's).
    for name, (path, expected, tol) in cases.items():
        opened = Image.open(path).mode
        assert opened == name.split("-")[0] or name.startswith(("P-", "I-", "F-")), opened
        got = datasets.decode_image(path).astype(np.float64)
        assert got.shape == (48, 48) and np.abs(got - expected).max() <= tol + 1e-9, name
        rgb = datasets.decode_image(path, "RGB").astype(np.float64)
        assert rgb.shape == (48, 48, 3) and np.abs(luma(rgb) - expected).max() <= 1.5, name


def test_exif_orientation_is_applied(tmp_path):
    raw = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write portraits
    Image.fromarray(raw).save(tmp_path / "portrait.png", exif=exif)
    assert np.array_equal(datasets.decode_image(tmp_path / "portrait.png"), np.rot90(raw, -1))


def test_decompression_bomb_is_a_bad_image(copy_root, bomb_png):
    bomb = copy_root / "train" / "Sad" / "huge.png"
    shutil.copy(bomb_png, bomb)
    with pytest.raises(DatasetError) as err:
        load_split(copy_root, "train")
    message = str(err.value)
    assert "\n" not in message and str(bomb) in message and "--skip-bad-images" in message
    split = load_split(copy_root, "train", skip_bad_images=True)
    assert split.skipped == 1 and split.skipped_paths == [str(bomb)]
    cached = load_split(copy_root, "train", skip_bad_images=True)  # from the cache
    assert cached.skipped_paths == [str(bomb)] and torch.equal(cached.images, split.images)


@pytest.mark.parametrize("image_size", [224, 64])
@pytest.mark.parametrize(
    "mode, augment",
    [
        ("val", None),
        ("test", None),
        ("train", {"rotation": 0, "hflip": 0.0, "vflip": 0.0, "crop": (0, 0)}),
        ("train", {"rotation": 0, "hflip": 1.0, "vflip": 0.0, "crop": (3, 1)}),
        ("train", {"rotation": 0, "hflip": 1.0, "vflip": 1.0, "crop": "center"}),
        ("train", {"rotation": (90, 90), "hflip": 0.0, "vflip": 1.0, "crop": "center"}),
    ],
)
def test_fast_equals_pil(synthetic_root, mode, augment, image_size):
    cfg = DataConfig(image_size=image_size)
    kw = dict(mode=mode, batch_size=6, data_config=cfg, shuffle=False, augment=augment)
    xp, yp = first_batch(build_loader(synthetic_root, "val", pipeline="pil", **kw))
    xf, yf = first_batch(build_loader(synthetic_root, "val", pipeline="fast", **kw))
    assert xf.shape == xp.shape and xf.dtype == xp.dtype == torch.float32
    assert torch.equal(yp, yf)
    if mode == "train" and augment["rotation"] == (90, 90) and image_size % 2:
        return  # an odd-sized rotation centre falls between pixels: nearest != bilinear
    assert (xf - xp).abs().max() <= TOL


def test_rotation_direction(synthetic_root):
    cfg = DataConfig(image_size=96)
    err = {}
    for angle in (15, -15):
        aug = {"rotation": (15, 15), "hflip": 0.0, "vflip": 0.0, "crop": "center"}
        kw = dict(mode="train", batch_size=8, data_config=cfg, shuffle=False)
        xp, _ = first_batch(build_loader(synthetic_root, "val", pipeline="pil", augment=aug, **kw))
        aug["rotation"] = (angle, angle)
        xf, _ = first_batch(build_loader(synthetic_root, "val", pipeline="fast", augment=aug, **kw))
        err[angle] = (xf - xp).abs().mean().item()
    # Nearest (PIL) vs bilinear (fast) rotation differ a little; the wrong direction a lot.
    assert err[15] < 4 / 255 and err[-15] > 4 * err[15]


def test_official_transforms():
    tr = datasets.pil_transform("train", DataConfig()).transforms
    kinds = [type(t) for t in tr]
    assert kinds[:6] == [
        T.RandomHorizontalFlip,
        T.RandomVerticalFlip,
        T.Grayscale,
        T.Resize,
        T.RandomRotation,
        T.RandomCrop,
    ]
    assert tr[0].p == tr[1].p == 0.5 and tr[3].size == 236 and tr[5].size == (224, 224)
    assert tr[4].degrees == [-20.0, 20.0] and tr[4].interpolation == T.InterpolationMode.NEAREST
    assert tr[4].fill == 0
    val = [type(t) for t in datasets.pil_transform("val", DataConfig()).transforms]
    assert val[:3] == [T.Grayscale, T.Resize, T.CenterCrop]
    test = datasets.pil_transform("test", DataConfig()).transforms
    assert isinstance(test[2], T.TenCrop) and test[2].size == (224, 224)


def test_fast_random_parameters_have_official_ranges(synthetic_root):
    loader = build_loader(synthetic_root, "train", mode="train")
    p = loader.random_params(20000, torch.Generator().manual_seed(0))
    for k in ("hflip", "vflip"):
        assert abs(p[k].float().mean() - 0.5) < 0.02
    assert -20 <= p["angle"].min() < -19.9 and 19.9 < p["angle"].max() <= 20
    assert abs(p["angle"].mean()) < 0.5
    for k in ("top", "left"):
        assert sorted(p[k].unique().tolist()) == list(range(13))  # 236 - 224 + 1 offsets


def test_output_shapes_ranges_and_normalisation(synthetic_root):
    cfg = DataConfig(image_size=32)
    for pipeline in ("fast", "pil"):
        kw = dict(pipeline=pipeline, batch_size=5, data_config=cfg)
        x, y = first_batch(build_loader(synthetic_root, "train", mode="train", **kw))
        assert x.shape == (5, 3, 32, 32) and y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1
        x, _ = first_batch(build_loader(synthetic_root, "test", mode="test", **kw))
        assert x.shape == (5, 10, 3, 32, 32)
    norm = DataConfig(image_size=32, in_chans=1, mean=(0.5,), std=(0.25,))
    kw = dict(mode="val", batch_size=4, data_config=norm, shuffle=False)
    xf, _ = first_batch(build_loader(synthetic_root, "val", pipeline="fast", **kw))
    xp, _ = first_batch(build_loader(synthetic_root, "val", pipeline="pil", **kw))
    assert xf.shape == (4, 1, 32, 32) and (xf - xp).abs().max() < 4 * TOL
    assert datasets.denormalize(xf, norm).min() >= -1e-6
    plain = build_loader(synthetic_root, "val", mode="val", data_config=cfg, contiguous=True)
    assert first_batch(plain)[0].is_contiguous()


def test_len_and_drop_last(synthetic_root):
    ld = build_loader(
        synthetic_root, "train", mode="train", batch_size=10, data_config=DataConfig(image_size=16)
    )
    assert (ld.dataset_size, ld.num_samples, len(ld)) == (112, 112, 12)
    assert sum(len(y) for _, y in ld) == 112
    ld = build_loader(
        synthetic_root,
        "train",
        mode="train",
        batch_size=10,
        drop_last=True,
        data_config=DataConfig(image_size=16),
    )
    assert len(ld) == 11 and [len(y) for _, y in ld] == [10] * 11


@pytest.mark.parametrize("pipeline", ["fast", "pil"])
def test_determinism_and_resume(synthetic_root, pipeline):
    kw = dict(
        mode="train",
        pipeline=pipeline,
        batch_size=16,
        seed=7,
        data_config=DataConfig(image_size=24),
    )

    def epoch(loader, e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]

    a = build_loader(synthetic_root, "train", **kw)
    runs = [epoch(a, e) for e in range(3)]
    torch.manual_seed(123)  # global RNG state must not matter ...
    state = torch.get_rng_state()
    b = build_loader(synthetic_root, "train", **kw)
    resumed = epoch(b, 2)
    assert torch.equal(torch.get_rng_state(), state)  # ... and must not be touched
    for (x1, y1), (x2, y2) in zip(runs[2], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(runs[0][0][1], runs[1][0][1])  # epochs differ
    other = build_loader(synthetic_root, "train", **{**kw, "seed": 8})
    assert not torch.equal(epoch(other, 2)[0][0], runs[2][0][0])


def test_pil_workers_do_not_change_results(synthetic_root):
    kw = dict(mode="train", pipeline="pil", batch_size=16, data_config=DataConfig(image_size=24))
    x0, y0 = first_batch(build_loader(synthetic_root, "train", num_workers=0, **kw))
    x1, y1 = first_batch(build_loader(synthetic_root, "train", num_workers=1, **kw))
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_sharding(synthetic_root, world_size):
    cfg = DataConfig(image_size=16)
    train = [
        build_loader(
            synthetic_root,
            "train",
            mode="train",
            data_config=cfg,
            rank=r,
            world_size=world_size,
            batch_size=8,
        )
        for r in range(world_size)
    ]
    idx = [ld.indices() for ld in train]
    assert len({len(i) for i in idx}) == 1 and len(idx[0]) == train[0].num_samples
    assert set(torch.cat(idx).tolist()) == set(range(112))  # padded, all covered
    for split in ("val", "test"):
        ev = [
            build_loader(
                synthetic_root,
                split,
                mode=split,
                data_config=cfg,
                rank=r,
                world_size=world_size,
                batch_size=5,
            )
            for r in range(world_size)
        ]
        got = torch.cat([ld.indices() for ld in ev]).tolist()
        assert sorted(got) == list(range(28))  # each image exactly once
        assert sum(ld.num_samples for ld in ev) == 28
        assert sum(len(y) for ld in ev for _, y in ld) == 28


def test_epoch_plan_equals_batch_by_batch_drawing(synthetic_root):
    """The fast loader draws a whole epoch's warps up front: the same numbers, the same pixels
    as drawing and warping batch by batch (the plain implementation)."""
    loader = datasets.build_loader(synthetic_root, "train", mode="train", batch_size=24, seed=7)
    loader.set_epoch(3)
    got = list(loader)
    g = loader._aug_generator()
    size = loader.data_config.image_size
    batches = list(loader._batches())
    assert len(got) == len(batches) == len(loader) and len(batches[-1]) < 24  # a partial batch
    for (x, y), idx in zip(got, batches, strict=True):
        theta, outside = loader._random_theta(len(idx), g)
        expected = datasets.fast_warp(loader.images[idx], theta, size, mask_outside=outside)
        assert torch.equal(x, loader._to_model_channels(expected)) and torch.equal(
            y, loader.targets[idx]
        )
