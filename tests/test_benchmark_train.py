"""scripts/benchmark.py train: the harness runs on CPU, and our speed-ups keep the numbers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from benchmark import main as benchmark_main

import engine
from losses import EmoNeXtLoss
from models import create_model
from utils import CLIError


@pytest.mark.slow
def test_train_harness_runs_train_py_and_reports_its_epochs(
    capsys, synthetic_root, tmp_path, monkeypatch
):
    """Every setup is `python train.py ARGV` in a process of its own, as a user starts it, and
    the figures are its own metrics.jsonl and results.json. The data is decoded and checked for
    leaks once, before the first setup: the setups read the caches, whatever their order."""
    import benchmark

    import train

    root = tmp_path / "data"  # never decoded yet
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns(".cache"))
    commands, cache_after_preparation = [], {}
    real_run, real_prepare = subprocess.run, benchmark.prepare_data

    def run(command, **kwargs):
        commands.append(list(command))
        return real_run(command, **kwargs)

    def cache_files():
        return {p.name: p.stat().st_mtime_ns for p in (root / ".cache").iterdir()}

    def prepare(data_root):
        seconds = real_prepare(data_root)
        cache_after_preparation.update(cache_files())
        return seconds

    monkeypatch.setattr(benchmark.subprocess, "run", run)
    monkeypatch.setattr(benchmark, "prepare_data", prepare)
    runs_dir = tmp_path / "runs"
    argv = ["train", "--model", "emonext_micro", "--input-size", "32", "--batch-size", "16",
            "--epochs", "2", "--device", "cpu", "--dataset-path", str(root),
            "--setups", "official,ours", "--project-epochs", "2", "--runs-dir", str(runs_dir),
            "--json"]  # fmt: skip
    result = benchmark_main(argv)
    printed = json.loads(capsys.readouterr().out.strip())  # one line: train.py's log is on stderr
    assert printed["device"] == "cpu" and printed == json.loads(json.dumps(result))
    setups = printed["setups"]
    # One fresh process per setup, running the command it reports.
    assert [c[:2] for c in commands] == [[sys.executable, str(benchmark.TRAIN_PY)]] * 2
    for command, kind in zip(commands, ["official", "ours"], strict=True):
        assert setups[kind]["command"] == "python train.py " + " ".join(command[2:])
    assert "--official-quirks" in setups["official"]["command"]
    assert "--val-batch-size 1" in setups["official"]["command"]
    # Prepared once: no setup decoded a split or searched for leaks again.
    assert any(name.startswith("overlap-") for name in cache_after_preparation)
    assert cache_files() == cache_after_preparation and printed["data_preparation_seconds"] > 0
    for kind, v in setups.items():
        epochs = [json.loads(line) for line in (runs_dir / kind / "metrics.jsonl").open()]
        results = json.loads((runs_dir / kind / "results.json").read_text())
        assert v["epochs"] == len(epochs) == 2
        assert v["first_epoch_seconds"] == epochs[0]["seconds"]
        assert v["epoch_seconds"] == epochs[1]["seconds"]
        assert v["train_images_per_s"] == epochs[1]["images_per_s"]
        assert v["run_seconds"] > v["first_epoch_seconds"] + v["epoch_seconds"]
        outside = v["run_seconds"] - epochs[0]["seconds"] - epochs[1]["seconds"]
        assert v["outside_epochs_seconds"] == pytest.approx(outside) and outside > 0
        assert printed[f"{kind}_epoch_seconds"] == round(epochs[1]["seconds"], 2)
        assert v["test_accuracy"] == results["test_accuracy"] and v["peak_memory_gb"] is None
        # train.py's own split of its wall time; the rest is Python's start and the imports
        parts = results["process_seconds"]
        assert parts["epochs"] == pytest.approx(epochs[0]["seconds"] + epochs[1]["seconds"])
        assert min(parts.values()) > 0 and sum(parts.values()) < v["run_seconds"]
        assert v["setup_seconds"] == parts["setup"] and v["test_seconds"] == parts["test"]
        assert v["after_first_epoch_seconds"] == parts["after_first_epoch"]
        assert v["between_epochs_seconds"] == pytest.approx(parts["between_epochs"])
        # projected to the 2 epochs that ran, the projection is the run itself
        assert benchmark.projected_run_seconds(v, 2) == pytest.approx(v["run_seconds"])
    with pytest.raises(CLIError, match="already holds .*official; give another folder"):
        benchmark_main(argv)  # the kept runs are not overwritten, and nothing is prepared first
    assert len(commands) == 2 and cache_files() == cache_after_preparation
    ours = setups["ours"]
    assert printed["ours_projected_2_epochs_over_steady_seconds"] == pytest.approx(
        ours["run_seconds"] - 2 * ours["epoch_seconds"], abs=0.06
    )
    assert printed["ours_vs_official"] == round(
        setups["official"]["epoch_seconds"] / setups["ours"]["epoch_seconds"], 2
    )
    assert printed["first_epoch_ratio"] > 0 and setups["ours"]["flops_per_image"] > 0
    # the timm setup is timm's ConvNeXt of the same size through the same train.py
    args = benchmark.parse_args(["train", "--model-size", "tiny", "--amp"])
    timm_argv = benchmark.setup_argv("timm", args, "FER2013", "out")
    assert timm_argv[timm_argv.index("--model") + 1] == "timm:convnext_tiny"
    assert "--amp" in timm_argv and "--official-quirks" not in timm_argv
    assert train.get_args_parser().parse_args(timm_argv).model == "timm:convnext_tiny"


def test_projection_counts_one_time_costs_once():
    """What the first epoch and the time after it cost once (new shapes, matplotlib's import)
    is not multiplied by the epochs; the steady epoch and the time after it are."""
    import benchmark

    # 3 epochs as train.py writes them: 20 s, then 16 s twice; 0.6 s after the first, 0.1 s
    # after each later one; 5 s of set-up, 10 s of test.
    epochs = [{"seconds": s, "images_per_s": 1.0} for s in (20.0, 16.0, 16.0)]
    parts = {"setup": 5.0, "epochs": 52.0, "after_first_epoch": 0.6, "between_epochs": 0.2}
    parts["test"] = 10.0
    figures = benchmark.run_figures(epochs, parts, wall=sum(parts.values()))
    assert figures["between_epochs_seconds"] == pytest.approx(0.1)
    assert benchmark.projected_run_seconds(figures, 3) == pytest.approx(sum(parts.values()))
    fifty = 5.0 + 20.0 + 0.6 + 49 * (16.0 + 0.1) + 10.0
    assert benchmark.projected_run_seconds(figures, 50) == pytest.approx(fifty)


def test_our_step_settings_equal_the_official_ones_in_fp32():
    """channels-last, fused AdamW and unscaled clipping change no number in fp32."""
    torch.manual_seed(0)
    batches = [(torch.rand(8, 3, 32, 32), torch.randint(0, 7, (8,))) for _ in range(4)]
    weights, logits = [], []
    probe = torch.rand(4, 3, 32, 32)
    for ours in (False, True):
        torch.manual_seed(1)
        model = create_model("emonext_micro", img_size=32)
        if ours:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(
            model.parameters(), lr=1e-3, fused=ours, foreach=False if not ours else None
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        torch.manual_seed(2)  # the same stochastic-depth draws
        engine.train_one_epoch(model, EmoNeXtLoss(), batches, opt, sched, torch.device("cpu"),
                               clip_scaled=not ours, channels_last=ours)  # fmt: skip
        weights.append(model.state_dict())
        with torch.no_grad():
            logits.append(model.eval()(probe))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    for k, v in weights[0].items():
        if k in ("localization.0.bias", "localization.4.bias", "localization.1.running_mean",
                 "localization.5.running_mean"):  # fmt: skip
            # Biases right before BatchNorm get a gradient of zero plus rounding noise, which
            # Adam normalises to full-size steps of random sign: no setting reproduces those,
            # nor the running means that follow them (BatchNorm cancels both out: see logits).
            continue
        # The localisation net's gradients start near zero (fc_loc's last layer starts at 0),
        # so Adam turns their rounding into differences of up to 3e-5 after 4 steps (as much
        # from channels-last alone, or fused AdamW alone); a wrong setting moves weights by
        # about a step, 1e-3.
        atol = 1e-4 if k.startswith("localization.") else 1e-5
        torch.testing.assert_close(weights[1][k], v, atol=atol, rtol=1e-4, msg=k)
