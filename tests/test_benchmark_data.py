import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark import get_args_parser, main, parse_args

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"pil_images_per_s", "fast_images_per_s", "ratio", "batch_size", "device", "recipe"}


def test_parser_has_data_subcommand():
    args = get_args_parser().parse_args(["data"])
    assert (args.batch_size, args.device, args.num_workers, args.image_size) == (64, None, 0, 224)
    with pytest.raises(SystemExit):
        get_args_parser().parse_args([])  # a subcommand is required


def test_train_model_flags(capsys):
    """train's model: --model NAME or --model-size SIZE (emonext_SIZE), emonext_tiny without."""
    assert parse_args(["train"]).model == "emonext_tiny"
    assert parse_args(["train", "--model-size", "small"]).model == "emonext_small"
    assert parse_args(["train", "--model", "emonext_micro"]).model == "emonext_micro"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["train", "--model", "emonext_micro", "--model-size", "tiny"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "benchmark.py: error: --model emonext_micro and --model-size tiny name different models; "
        "give one\n"
    )


def test_data_json_in_process(synthetic_root, capsys):
    argv = [
        "data",
        "--dataset-path",
        str(synthetic_root),
        "--batch-size",
        "8",
        "--batches",
        "3",
        "--image-size",
        "64",
        "--json",
    ]
    result = main(argv)
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and json.loads(line[0]) == result and set(result) == KEYS
    assert result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["ratio"] == pytest.approx(
        result["fast_images_per_s"] / result["pil_images_per_s"], rel=0.02, abs=0.011
    )
    # No speed assertion: timings on a shared CI machine are noise; docs/DATA.md has numbers.


def test_data_convnext_recipe_on_both_pipelines(synthetic_root, capsys, monkeypatch):
    """--recipe convnext: both training loaders get ConvNeXt's RandAugment and erasing, and
    both pipelines' batches ConvNeXt's Mixup 0.8 and CutMix 1.0."""
    import datasets

    built, mixed = [], []
    build = datasets.build_loader
    monkeypatch.setattr(datasets, "build_loader", lambda *a, **k: built.append(k) or build(*a, **k))
    call = datasets.BatchMixup.__call__
    spy = lambda self, x, y: mixed.append(self.mixup) or call(self, x, y)  # noqa: E731
    monkeypatch.setattr(datasets.BatchMixup, "__call__", spy)
    argv = ["data", "--dataset-path", str(synthetic_root), "--batch-size", "8", "--batches", "2",
            "--image-size", "32", "--recipe", "convnext", "--json"]  # fmt: skip
    assert main(argv)["recipe"] == "convnext"
    assert [k["pipeline"] for k in built] == ["pil", "fast"]
    assert all(k["augment"] == datasets.CONVNEXT_AUGMENT for k in built)
    assert len({id(m) for m in mixed}) == 2 and len(mixed) == 2 * (2 + 2)  # warm-up + timed
    assert all((m.mixup_alpha, m.cutmix_alpha) == (0.8, 1.0) for m in mixed)


def test_data_subprocess_human_output(synthetic_root):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "data",
            "--dataset-path",
            str(synthetic_root),
            "--split",
            "val",
            "--batch-size",
            "8",
            "--batches",
            "2",
            "--image-size",
            "32",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "pil" in r.stdout and "fast" in r.stdout and "ratio fast/pil" in r.stdout


def test_data_refuses_a_one_class_dataset(synthetic_root, tmp_path):
    """A folder of one class was benchmarked as if it were a dataset; it is refused in
    datasets.check_dataset's line, as train.py and evaluate.py refuse it."""
    import shutil

    from utils import CLIError

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "val" / "Happy", data / "val" / "Happy")
    with pytest.raises(CLIError) as error:
        main(["data", "--dataset-path", str(data), "--split", "val", "--batches", "1"])
    assert str(error.value) == (
        f"{data} has 1 class folder (Happy) per split; a classifier needs at least 2"
    )
    assert not (data / ".cache").exists()  # refused before anything was decoded
