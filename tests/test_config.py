"""-c/--config FILE: flag values in YAML (timm's train.py), the recipes of configs/, the run
folder's config.yaml, and -c with --resume."""

import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, error_line

import train

# emonext_micro at 32 pixels on the 7 x 16 synthetic faces: 7 steps an epoch.
SMALL = {"model": "emonext_micro", "input_size": 32, "pretrained": "none", "batch_size": 16,
         "val_batch_size": 64, "device": "cpu", "wandb": "disabled", "no_progress": True,
         "warmup_steps": 4, "cycle_steps": 64, "epochs": 1}  # fmt: skip
# Where and how a run goes: the command line's business, not a recipe's (configs/paper.yaml).
RUN_FLAGS = {"config", "output_dir", "run_name", "checkpoint", "resume", "device", "compile",
             "channels_last", "grad_checkpointing", "no_progress", "wandb", "demo", "num_workers",
             "skip_bad_images", "val_batch_size", "deterministic", "max_nonfinite_steps",
             "model", "model_size", "keep_checkpoints", "dist_timeout"}  # fmt: skip


def write_yaml(path: Path, values: dict | str) -> Path:
    path.write_text(values if isinstance(values, str) else yaml.safe_dump(values))
    return path


def without_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "config"}


# --------------------------------------------------------------------------- reading a file


def test_the_file_gives_defaults_and_the_command_line_overrides_them(tmp_path):
    config = write_yaml(tmp_path / "recipe.yaml", """
        batch_size: 32
        lr: 1e-4          # YAML 1.1 reads this as text; it is a number to --lr, as typed
        amp: true
        no_se: false
        channels_last: false
        input_size: null
        run_name: -r      # a value that starts with "-" stays a value
        data_pipeline: pil
    """.replace("\n        ", "\n"))  # fmt: skip
    args = train.parse_args(["-c", config, "--lr", "2e-3", "--output-dir", tmp_path])
    assert (args.batch_size, args.lr, args.amp, args.no_se) == (32, 2e-3, True, False)
    assert args.channels_last is False and args.input_size is None and args.run_name == "-r"
    assert args.data_pipeline == "pil" and args.config == str(config)
    assert train.parse_args(["--config", config]).lr == 1e-4  # the long flag, the file's value
    # the file's values count as given: --demo keeps them, as it keeps typed flags
    demo = train.parse_args(["-c", write_yaml(tmp_path / "d.yaml", {"epochs": 3}), "--demo"])
    assert demo.epochs == 3 and demo.model == "emonext_micro" and demo.input_size == 48


def test_the_papers_recipe_is_the_defaults(repo_root):
    paper = repo_root / "configs" / "paper.yaml"
    assert without_config(train.parse_args(["-c", paper])) == without_config(train.parse_args([]))
    # and it is the whole recipe: a new flag of the recipe must be written into the file
    keys = set(yaml.safe_load(paper.read_text()))
    dests = {a.dest for a in train.get_args_parser()._actions if a.option_strings} - {"help"}
    missing = sorted(dests - keys - RUN_FLAGS)
    assert not missing, f"configs/paper.yaml lacks {missing}: add them with their defaults"


RECIPES = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml"))


def test_configs_has_the_papers_convnexts_and_every_benchmarks_recipe():
    assert {"paper", "convnext_finetune", "ferplus", "rafdb", "affectnet7", "affectnet8", "expw",
            "ckplus"} <= set(RECIPES)  # fmt: skip


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_of_configs_is_read(name, repo_root, tmp_path):
    path = repo_root / "configs" / f"{name}.yaml"
    args = train.parse_args(["-c", path, "--output-dir", tmp_path])
    recipe = yaml.safe_load(path.read_text())
    if "dataset_path" in recipe:  # made absolute when a run starts (train.absolute_paths)
        recipe["dataset_path"] = os.path.abspath(recipe["dataset_path"])
    assert all(getattr(args, k) == v for k, v in recipe.items()), name
    assert "model" not in recipe and "model_size" not in recipe  # --model-size stays free
    if name != "paper":  # the paper's table: ImageNet-22k weights, mixed precision
        assert args.in_22k and args.amp


@pytest.mark.parametrize(
    "text, expected",
    [
        ("batchsize: 32\n", "unknown key 'batchsize' (did you mean batch_size"),
        ("batch_size: two\n", "batch_size: 'two': must be a whole number (at least 1)"),
        ("batch_size: 0\n", "batch_size: 0: must be a whole number (at least 1)"),
        ("epochs: 3.5\n", "epochs: 3.5: must be a whole number (at least 1)"),
        ("lr: .nan\n", "lr: nan: must be a number (positive)"),
        ("lr: null\n", "lr: null: must be a number (positive)"),
        ("lr: [0.1, 0.2]\n", "lr: [0.1, 0.2]: must be a number (positive)"),
        ("hflip: 1.5\n", "hflip: 1.5: must be a number (a probability in [0, 1])"),
        ("data_pipeline: slow\n", "data_pipeline: 'slow': must be one of fast, pil"),
        ("model_size: huge\n", "model_size: 'huge': must be one of "),
        ("amp: 1\n", "amp: 1: must be true or false"),
        ("run_name: yes\n", "run_name: true: must be text (put text in quotes"),
        ("config: other.yaml\n", "config: a config file cannot name another"),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_the_file_and_the_key(
    text, expected, tmp_path, capsys
):
    config = write_yaml(tmp_path / "recipe.yaml", text)
    out = tmp_path / "out"
    line = error_line(capsys, ["-c", config, "--output-dir", out])
    assert line.startswith(f"train.py: error: {config}: ") and expected in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- batch_size\n", "holds a list; give a mapping of flag names to values"),
        ("lr: [0.1\n", "not valid YAML at line 2, column 1"),
        ("batch_size: 8\n\tlr: 1\n", "not valid YAML at line 2"),
        # YAML that would build a Python object (and run code): safe_load refuses it
        ("lr: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML at line 1"),
    ],
)
def test_a_file_that_is_not_a_mapping_of_values_is_one_line(
    text, expected, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "recipe.yaml", text)
    line = error_line(capsys, ["-c", config])
    assert line.startswith(f"train.py: error: -c {config}: ") and expected in line, line
    assert not (tmp_path / "pwned").exists()


def test_a_missing_file_or_two_files_is_one_line(tmp_path, capsys):
    line = error_line(capsys, ["-c", tmp_path / "missing.yaml"])
    missing = tmp_path / "missing.yaml"
    assert line == f"train.py: error: -c {missing}: No such file or directory; give a YAML file " \
        "of flag values"  # fmt: skip
    config = write_yaml(tmp_path / "a.yaml", {"lr": 0.1})
    assert "given 2 times: give one file" in error_line(capsys, ["-c", config, "-c", config])


def test_a_value_meets_the_flags_own_checks_and_the_line_names_the_file(tmp_path, capsys):
    """A value is data: a path or a name in a file gets exactly the command line's checks."""
    for values, expected in [
        ({"checkpoint": "missing.pt"}, "--checkpoint missing.pt: no such file"),
        ({"run_name": "../elsewhere"}, "--run-name '../elsewhere': must be a single folder"),
        ({"model": "timm:no_such_model"}, "--model timm:no_such_model: timm has no such model"),
        ({"warmup_steps": 2000}, "--warmup-steps 2000: must be less than --cycle-steps 1024"),
    ]:
        config = write_yaml(tmp_path / "recipe.yaml", values)
        line = error_line(capsys, ["-c", config, "--output-dir", tmp_path / "out"])
        assert f"train.py: error: {expected}" in line and line.endswith(f"(set by {config})")
    # the command line's own value is not the file's: the line does not blame the file
    config = write_yaml(tmp_path / "recipe.yaml", {"warmup_steps": 10})
    line = error_line(capsys, ["-c", config, "--warmup-steps", "2000"])
    assert "--warmup-steps 2000" in line and "set by" not in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a run with -c


@pytest.fixture(scope="module")
def config_run(synthetic_root, tmp_path_factory):
    """One epoch trained from a config file."""
    out = tmp_path_factory.mktemp("runs")
    config = write_yaml(out / "recipe.yaml", {**SMALL, "dataset_path": str(synthetic_root)})
    train.main(train.parse_args(["-c", config, "--output-dir", out, "--run-name", "r", "--lr",
                                 "2e-3"]))  # fmt: skip
    return out / "r", config


def test_the_run_folder_keeps_every_argument_in_config_yaml(config_run, tmp_path):
    run_dir, config = config_run
    recorded = torch.load(run_dir / "last.pt", weights_only=True)["args"]
    assert recorded["config"] == str(config) and recorded["lr"] == 2e-3
    effective = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert effective == {k: v for k, v in recorded.items() if k not in ("config", "resume")}
    assert not list(run_dir.glob("*.tmp"))
    # it trains the same run again: the same arguments but the folder's name
    again = train.parse_args(["-c", run_dir / "config.yaml", "--run-name", "r2"])
    assert {**without_config(again), "run_name": "r"} == {
        k: v for k, v in recorded.items() if k != "config"
    }


def test_with_resume_the_files_values_follow_the_resume_rules(config_run, tmp_path, capsys):
    """-c FILE --resume: the file's values count as typed flags: the run's own must be equal
    (the file the run started from resumes it), those that may change on resume change."""
    run_dir, config = config_run
    last = run_dir / "last.pt"
    args = train.parse_args(["-c", config, "--resume", last, "--lr", "2e-3"])
    assert args.resume == str(last) and args.lr == 2e-3 and args.config == str(config)
    longer = write_yaml(tmp_path / "longer.yaml", {"epochs": 5, "patience": 3})
    args = train.parse_args(["-c", longer, "--resume", last])
    assert (args.epochs, args.patience, args.lr) == (5, 3, 2e-3)
    assert args.config == str(config)  # the run's record of where its values came from
    changed = write_yaml(tmp_path / "changed.yaml", {"batch_size": 8})
    line = error_line(capsys, ["-c", changed, "--resume", last])
    assert line.startswith(f"train.py: error: --batch-size 8: the run {last} has --batch-size 16")
    assert line.endswith(f"(set by {changed})")
    # and the run's own config.yaml resumes it
    assert train.parse_args(["-c", run_dir / "config.yaml", "--resume", last]).lr == 2e-3
