"""ConvNeXt's image augmentations (--aa, --reprob/--remode/--recount) on both data paths: the
`fast` ops equal timm's PIL ops pixel for pixel, the `fast` draws follow timm's distributions
(chi-square / Kolmogorov-Smirnov on many draws, fixed seeds, significance ALPHA), the flags reach
training, its checkpoint and results.json, and a run with them resumes exactly."""

import contextlib
import json
import random

import numpy as np
import pytest
import torch
from conftest import assert_resume_is_exact
from PIL import Image
from scipy import stats

import datasets
import train
from datasets.auto_augment import LEVEL_FN, pil_op

# A test of a true hypothesis fails with probability ALPHA; the seeds are fixed, so the outcome
# is the same on every run (and was checked to pass): a failure means the distributions differ.
ALPHA = 1e-3
CONVNEXT_AA = "rand-m9-mstd0.5-inc1"

FAST = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
        "--batch-size", "16", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
        "--no-progress", "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip
RECIPE = ["--aa", CONVNEXT_AA, "--reprob", "0.25"]


@contextlib.contextmanager
def python_rngs(seed: int):
    """Python's and NumPy's global RNGs (timm's) seeded, and restored after."""
    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def face(h: int = 40, w: int = 36) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = (rng.random((h, w)) * 200 + 20).astype(np.uint8)
    img[:10] = 30  # a flat region: equalize's and autocontrast's histograms are not uniform
    return img


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def test_aa_strings_are_parsed_by_timm():
    assert datasets.parse_aa("none") is None
    spec = datasets.parse_aa(CONVNEXT_AA)
    assert (spec.magnitude, spec.magnitude_std, spec.num_layers, spec.prob) == (9, 0.5, 2, 0.5)
    assert "PosterizeIncreasing" in spec.ops and len(spec.ops) == 15
    trivial = datasets.parse_aa("trivial")
    assert (trivial.num_layers, trivial.prob, trivial.magnitude) == (1, 1.0, 10)
    assert trivial.magnitude_std == float("inf")
    assert datasets.parse_aa("rand-m7-n3-mmax12").magnitude_max == 12
    for bad in ("rand-x9", "augmix-m5", "rand-m9-tweights", "bogus"):
        with pytest.raises(ValueError, match="--aa"):
            datasets.parse_aa(bad)


def test_bad_aa_is_one_line_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train.parse_args(FAST + ["--aa", "rand-q9", "--output-dir", str(tmp_path)])
    assert err.value.code == 2
    assert "--aa rand-q9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(FAST + ["--reprob", "1.5", "--output-dir", str(tmp_path)])


# --------------------------------------------------------------------------------------------
# Each op, pixel for pixel against timm's PIL op
# --------------------------------------------------------------------------------------------

OP_ARGS = {
    "AutoContrast": None, "Equalize": None, "Invert": None, "Rotate": 17.3, "ShearX": -0.21,
    "ShearY": 0.13, "TranslateXRel": 0.31, "TranslateYRel": -0.2, "Posterize": 2,
    "PosterizeIncreasing": 0, "Solarize": 100, "SolarizeAdd": 77, "Color": 1.6,
    "Contrast": 1.7, "Brightness": 0.6, "Sharpness": 1.9, "ContrastIncreasing": 0.3,
}  # fmt: skip
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.mark.parametrize("name", sorted(OP_ARGS))
def test_each_fast_op_equals_timms_pil_op(name):
    img = face()
    arg = OP_ARGS[name]
    args = () if arg is None else (arg,)
    ref = np.asarray(pil_op(name)(Image.fromarray(img, "L"), *args, fillcolor=117,
                                      resample=Image.BILINEAR)).astype(np.float32)  # fmt: skip
    x = torch.from_numpy(img).float()[None, None]
    value = torch.tensor([0.0 if arg is None else float(arg)], dtype=torch.float64)
    out = datasets.apply_op(name, x, value, 117.0)[0, 0].numpy()
    diff = np.abs(out - ref)
    if name in GEOMETRIC:  # float32 sampling vs PIL's double: a level at a rounding boundary
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    else:
        assert diff.max() == 0


def test_pil_path_runs_timms_transforms_at_convnexts_places(synthetic_root):
    cfg = datasets.DataConfig(image_size=32)
    aug = {"aa": CONVNEXT_AA, "reprob": 0.25}
    loader = datasets.build_loader(synthetic_root, "train", mode="train", pipeline="pil",
                                   data_config=cfg, augment=aug)  # fmt: skip
    names = [type(t).__name__ for t in loader.dataset.transform.transforms]
    assert names.index("RandAugment") == names.index("RandomCrop") + 1
    assert names[-1] == "RandomErasing"


# --------------------------------------------------------------------------------------------
# The draws: fast's against timm's, many of them
# --------------------------------------------------------------------------------------------


def timm_draws(aa: str, n_images: int, seed: int) -> tuple[list, int]:
    """(op name, argument) of every op timm's RandAugment applies to n_images, and the slots."""
    ra = datasets.timm_rand_augment(aa)
    applied = []
    for op in ra.ops:
        op.aug_fn = lambda img, *a, _name=op.name, **k: applied.append((_name, *a)) or img
    img = Image.new("L", (2, 2))
    with python_rngs(seed):
        for _ in range(n_images):
            ra(img)
    return applied, n_images * ra.num_layers


def fast_draws(aa: str, n_images: int, seed: int) -> tuple[list, int]:
    spec = datasets.parse_aa(aa)
    p = datasets.rand_augment_params(spec, n_images, torch.Generator().manual_seed(seed))
    op, apply, arg = p["op"].flatten(), p["apply"].flatten(), p["arg"].flatten()
    pairs = zip(op[apply].tolist(), arg[apply].tolist(), strict=True)
    applied = [(spec.ops[j], a) if LEVEL_FN[spec.ops[j]] else (spec.ops[j],) for j, a in pairs]
    return applied, op.numel()


@pytest.mark.parametrize("aa", [CONVNEXT_AA, "trivial", "rand-m7-n3-p0.7-mstd1-mmax12"])
def test_rand_augment_draws_follow_timms_distribution(aa):
    n = 4000
    ours, slots = fast_draws(aa, n, seed=0)
    theirs, slots_t = timm_draws(aa, n, seed=0)
    names = datasets.parse_aa(aa).ops
    # which op, or none (not applied): a 2 x (ops + 1) contingency table
    table = [[sum(d[0] == k for d in draws) for k in names] for draws in (ours, theirs)]
    table[0].append(slots - len(ours))
    table[1].append(slots_t - len(theirs))
    table = np.array(table)[:, np.array(table).sum(0) > 0]  # trivial: always applied
    assert stats.chi2_contingency(table).pvalue > ALPHA
    for k in names:  # each op's argument (its magnitude, sign included)
        a = [d[1] for d in ours if d[0] == k and len(d) > 1]
        b = [d[1] for d in theirs if d[0] == k and len(d) > 1]
        if not b:
            assert not a, k  # ops without argument
            continue
        assert stats.ks_2samp(a, b).pvalue > ALPHA, k
    # the means too, as a check with power against a small shift in the magnitudes
    rot_a = np.abs([d[1] for d in ours if d[0] == "Rotate"])
    rot_b = np.abs([d[1] for d in theirs if d[0] == "Rotate"])
    assert stats.ttest_ind(rot_a, rot_b).pvalue > ALPHA


def timm_boxes(prob: float, n: int, size: int, seed: int) -> tuple[np.ndarray, int]:
    """(height, width) of every box timm's RandomErasing cuts (const mode, one box)."""
    erase = datasets.timm_random_erasing(prob, "const", 1)
    boxes = []
    with python_rngs(seed), torch.random.fork_rng(devices=[]):
        for _ in range(n):
            x = erase(torch.ones(3, size, size))
            rows = torch.nonzero((x[0] == 0).any(1))[:, 0]
            cols = torch.nonzero((x[0] == 0).any(0))[:, 0]
            if len(rows):
                boxes.append((len(rows), len(cols), int(rows[0]), int(cols[0])))
    return np.array(boxes), n


def test_random_erasing_draws_follow_timms_distribution():
    n, size = 4000, 32
    theirs, _ = timm_boxes(0.25, n, size, seed=0)
    p = datasets.erase_params(n, size, size, 0.25, 1, torch.Generator().manual_seed(0))
    ours = p["box"][p["valid"]].numpy()[:, [2, 3, 0, 1]]  # (h, w, top, left)
    erased = [[len(ours), n - len(ours)], [len(theirs), n - len(theirs)]]
    assert stats.chi2_contingency(erased).pvalue > ALPHA  # how often an image is erased
    for name, f in {
        "area": lambda b: b[:, 0] * b[:, 1],
        "aspect": lambda b: b[:, 0] / b[:, 1],
        "top": lambda b: b[:, 2] / (size - b[:, 0] + 1),
        "left": lambda b: b[:, 3] / (size - b[:, 1] + 1),
    }.items():
        assert stats.ks_2samp(f(ours), f(theirs)).pvalue > ALPHA, name


def test_erasing_modes_and_counts():
    x = torch.zeros(64, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    p = datasets.erase_params(64, 16, 16, 1.0, 3, g)
    assert p["valid"][:, 0].all() and not p["valid"].all()  # 1 to 3 boxes, at least one
    pix = datasets.random_erase(x, p, "pixel", 1)
    assert (pix[:, 0] != pix[:, 1]).any()  # noise per channel: the repeated gray face too
    per_box = datasets.random_erase(x, datasets.erase_params(64, 16, 16, 1.0, 1, g), "rand", 2)
    assert all(len(plane.unique()) == 2 for plane in per_box.flatten(0, 1))  # a colour per box
    assert torch.equal(x, torch.zeros_like(x))  # the input untouched
    const = datasets.random_erase(x + 1, p, "const", 3)
    assert const.min() == 0 and torch.equal(const[:, 0], const[:, 2])


# --------------------------------------------------------------------------------------------
# The loaders and training
# --------------------------------------------------------------------------------------------


def batches(root, pipeline: str, augment, epoch: int = 0) -> list[torch.Tensor]:
    loader = datasets.build_loader(root, "train", mode="train", pipeline=pipeline,
                                   batch_size=32, data_config=datasets.DataConfig(image_size=32),
                                   augment=augment, seed=3)  # fmt: skip
    loader.set_epoch(epoch)
    return [x for x, _ in loader]


@pytest.mark.parametrize("pipeline", ["fast", "pil"])
def test_recipe_is_seeded_per_epoch_and_off_by_default(synthetic_root, pipeline):
    off = {"aa": "none", "reprob": 0.0}
    plain = batches(synthetic_root, pipeline, None)
    assert all(map(torch.equal, plain, batches(synthetic_root, pipeline, off)))
    recipe = {"aa": CONVNEXT_AA, "reprob": 0.5}
    a = batches(synthetic_root, pipeline, recipe, epoch=1)
    assert all(map(torch.equal, a, batches(synthetic_root, pipeline, recipe, epoch=1)))
    assert not all(map(torch.equal, a, batches(synthetic_root, pipeline, recipe, epoch=2)))
    assert not all(map(torch.equal, a, batches(synthetic_root, pipeline, None, epoch=1)))


def test_fast_rand_augment_keeps_uint8_steps_and_range(synthetic_root):
    x = batches(synthetic_root, "fast", {"aa": "trivial"})[0]
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)


def run(argv: list[str]) -> dict:
    return train.main(train.parse_args(argv))


def test_recipe_is_recorded_and_resumes_exactly(synthetic_root, tmp_path):
    common = FAST + RECIPE + ["--dataset-path", str(synthetic_root), "--output-dir", str(tmp_path)]
    assert_resume_is_exact(run, common, tmp_path)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    recorded = {"aa": CONVNEXT_AA, "reprob": 0.25, "remode": "pixel", "recount": 1}
    assert results["augmentation"] == recorded
    ckpt = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert {k: ckpt["args"][k] for k in recorded} == recorded
    with pytest.raises(SystemExit):  # the recipe is the run's own
        train.parse_args(["--resume", str(tmp_path / "split" / "last.pt"), "--aa", "none"])
