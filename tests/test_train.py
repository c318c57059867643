"""train.py: the official schedule, outputs, exact resume, interruption, DDP, non-finite losses."""

import copy
import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import assert_resume_is_exact, kill_tree
from PIL import Image
from torch import nn

import datasets
import engine
import models
import train
import utils
from losses import EmoNeXtLoss
from models import create_model, load_model

# A small run: emonext_micro at 32 pixels on 7 x 16 synthetic faces (add --epochs).
FAST = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
        "--batch-size", "16", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
        "--no-progress", "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_faces(synthetic_root):
    return synthetic_root


def run(argv: list[str]) -> dict:
    return train.main(train.parse_args(argv))


def read_metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:  # timings differ between runs
        r.pop("seconds"), r.pop("images_per_s")
    return records


def test_schedule_is_the_official_one(golden_dir):
    official = json.loads((golden_dir / "official_schedule_and_ema.json").read_text())
    official = official["schedule_lr_per_optimizer_step"]
    assert len(official) == 3000
    formula = [train.warm_restart_lr(s, 1e-3) for s in range(1, 3001)]
    assert max(abs(a - b) for a, b in zip(formula, official, strict=True)) < 1e-12
    # and what the optimiser really sees, step after step
    args = train.get_args_parser().parse_args([])
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = train.build_scheduler(opt, args)
    seen = []
    for _ in range(3000):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert max(abs(a - b) for a, b in zip(seen, official, strict=True)) < 1e-12
    assert official[0] == pytest.approx(1e-3 / 128) and official[1023] == 0.0


def test_run_writes_every_output(tiny_faces, tmp_path, monkeypatch):
    # Checkpoints are written in the background. The last one's write is held (for a second,
    # or until best.pt is read for the test): main must wait for it before reading best.pt.
    writers, order, best_read = [], [], threading.Event()
    real_save, real_read = torch.save, models.read_checkpoint

    def save(obj, f, *args, **kwargs):
        last_epoch = str(f).endswith(".pt.tmp") and obj["epoch"] == 1
        if str(f).endswith(".pt.tmp"):
            writers.append(threading.current_thread().name)
        if last_epoch:
            best_read.wait(timeout=1)
        real_save(obj, f, *args, **kwargs)
        if last_epoch:
            order.append("epoch 1 written")

    def read_checkpoint(path):
        order.append(f"{Path(path).name} read")
        best_read.set()
        return real_read(path)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(models, "read_checkpoint", read_checkpoint)
    results = run(
        FAST
        + [
            "--epochs",
            "2",
            "--dataset-path",
            str(tiny_faces),
            "--output-dir",
            str(tmp_path),
            "--run-name",
            "r",
        ]  # fmt: skip
    )
    assert order == ["epoch 1 written", "best.pt read"]
    assert writers and set(writers) <= {"write best.pt", "write last.pt"}, writers
    assert not [t for t in threading.enumerate() if t.name.startswith("write ")]
    run_dir = tmp_path / "r"
    for name in (
        "best.pt",
        "last.pt",
        "metrics.jsonl",
        "results.json",
        "confusion_matrix.png",
        "stn_epoch_000.png",
        "stn_epoch_001.png",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp*"))
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    for key in (
        "model",
        "ema",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step",
        "rng",
        "best_accuracy",
        "bad_epochs",
        "args",
        "classes",
        "versions",
        "model_name",
    ):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["step"] == 14  # 2 epochs of ceil(112 / 16) steps
    assert ckpt["classes"] == ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in (
        "test_accuracy",
        "test_accuracy_best_online",
        "test_accuracy_best_ema",
        "macro_f1",
        "per_class",
        "confusion_matrix",
        "classes",
        "best_val_accuracy",
        "epochs_run",
    ):
        assert key in on_disk, key
    assert on_disk["epochs_run"] == 2
    for key in ("test_accuracy_ci95", "macro_f1_ci95"):  # 95 % bootstrap intervals, percent
        low, high = on_disk[key]
        assert 0 <= low <= on_disk[key.removesuffix("_ci95")] <= high <= 100
    no_leak = {"images": 28, "exact": 0, "near": 0, "other_label": 0}
    assert on_disk["split_overlap"] == {"val": no_leak, "test": no_leak}
    assert sum(map(sum, on_disk["confusion_matrix"])) == 28  # every test image once
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[-1]["step"] == 14
    assert records[-1]["lr"] == pytest.approx(train.warm_restart_lr(15, 1e-3, 4, 64))
    # the final test uses the EMA weights: reload them and evaluate the same way
    model, used = load_model(run_dir / "last.pt")
    assert used["weights_used"] == "ema"


def test_resume_is_exact(tiny_faces, tmp_path):
    common = FAST + ["--dataset-path", str(tiny_faces), "--output-dir", str(tmp_path)]
    assert_resume_is_exact(run, common, tmp_path)
    assert read_metrics(tmp_path / "straight") == read_metrics(tmp_path / "split")
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "split" / "results.json").read_text())
    assert ra["test_accuracy"] == rb["test_accuracy"]
    assert ra["confusion_matrix"] == rb["confusion_matrix"]


@pytest.mark.slow
def test_sigterm_keeps_last_epoch_and_resumes(tiny_faces, tmp_path, repo_root):
    argv = FAST + ["--epochs", "50", "--dataset-path", str(tiny_faces),
                   "--output-dir", str(tmp_path), "--run-name", "preempted"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "train.py", *argv],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no epoch finished in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "--resume" in out
    last = tmp_path / "preempted" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    done = ckpt["epoch"]
    assert done >= 0 and len(read_metrics(tmp_path / "preempted")) == done + 1
    results = run(
        FAST + ["--epochs", str(done + 2), "--dataset-path", str(tiny_faces), "--resume", str(last)]
    )
    assert results["epochs_run"] == done + 2


def test_nonfinite_losses_skip_steps_then_stop():
    class NaNAfter(nn.Module):
        parts = {"ce": torch.tensor(0.0), "sa": torch.tensor(0.0)}

        def forward(self, logits, weights, y):
            return logits.sum() * float("nan")

    model = create_model("emonext_micro", img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    loader = [(torch.rand(4, 3, 32, 32), torch.arange(4))] * 6
    stats = engine.train_one_epoch(
        model, NaNAfter(), loader, opt, sched, torch.device("cpu"), max_nonfinite=3
    )
    assert stats["stopped"] == "nonfinite" and stats["nonfinite"] == 3 and stats["steps"] == 3
    for k, v in model.state_dict().items():  # no step was taken
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(v, before[k]), k


def test_gradient_accumulation_equals_a_big_batch():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 7, (16,))
    results = []
    for accumulation, batches in ((1, [(x, y)]), (2, [(x[:8], y[:8]), (x[8:], y[8:])])):
        torch.manual_seed(1)
        model = create_model("convnext_micro", img_size=32, drop_path_rate=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        stats = engine.train_one_epoch(
            model,
            EmoNeXtLoss(),
            batches,
            opt,
            sched,
            torch.device("cpu"),
            accumulation_steps=accumulation,
        )
        assert stats["steps"] == 1
        results.append(model.state_dict())
    for k, v in results[0].items():
        torch.testing.assert_close(v, results[1][k], atol=1e-6, rtol=1e-5)


def test_stn_pictures_show_one_labelled_face_of_each_class(tiny_faces, tmp_path, monkeypatch):
    seen, real = [], utils.save_stn_grid

    def spy(model, images, labels, path, title=""):
        seen.append((model, images.clone(), list(labels), path))
        real(model, images, labels, path, title)

    monkeypatch.setattr(utils, "save_stn_grid", spy)
    run(FAST + ["--epochs", "1", "--dataset-path", str(tiny_faces), "--output-dir",
                str(tmp_path), "--run-name", "stn"])  # fmt: skip
    ((model, images, labels, path),) = seen
    assert labels == datasets.CLASSES and path == tmp_path / "stn" / "stn_epoch_000.png"
    assert path.read_bytes()[:4] == b"\x89PNG"
    # The first face of each class folder, through the validation transform.
    transform = datasets.pil_transform("val", datasets.DataConfig.from_dict(model.data_config))
    for face, name in zip(images, datasets.CLASSES, strict=True):
        first = sorted((tiny_faces / "val" / name).glob("*.png"))[0]
        assert (face - transform(Image.open(first))).abs().max() < 1.5 / 255, name
    axes = utils.stn_figure(model, images, labels).axes
    assert len(axes) == 1 and axes[0].images[0].get_array().shape == (2 * 32, 7 * 32)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == datasets.CLASSES
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["input", "STN output"]


def test_clear_message_without_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run(FAST + ["--epochs", "1", "--dataset-path", str(tmp_path / "FER2013")])
    message = str(err.value)
    assert "scripts/download_dataset.py" in message and "--demo" in message


def test_help_documents_every_flag(repo_root):
    out = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--dataset-path",
        "--output-dir",
        "--epochs",
        "--batch-size",
        "--lr",
        "--amp",
        "--in_22k",
        "--gradient-accumulation-steps",
        "--num-workers",
        "--checkpoint",
        "--model-size",
        "--model",
        "--pretrained",
        "--sa-weight",
        "--label-smoothing",
        "--drop-path",
        "--warmup-steps",
        "--cycle-steps",
        "--min-lr",
        "--weight-decay",
        "--ema-beta",
        "--ema-update-every",
        "--patience",
        "--seed",
        "--data-pipeline",
        "--val-batch-size",
        "--no-stn",
        "--no-se",
        "--official-quirks",
        "--resume",
        "--wandb",
        "--device",
        "--compile",
        "--channels-last",
        "--run-name",
        "--demo",
    ):
        assert flag in out, flag
    parser = train.get_args_parser()
    assert all(a.help for a in parser._actions), "every flag has help text"
    assert parser.get_default("lr") == 1e-3 and parser.get_default("seed") == 2001


@pytest.mark.slow
def test_distributed_two_processes_agree(tiny_faces, tmp_path, repo_root):
    argv = FAST + ["--epochs", "2", "--dataset-path", str(tiny_faces),
                   "--output-dir", str(tmp_path), "--run-name", "ddp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "train.py", *argv]  # fmt: skip
    proc = subprocess.Popen(command, cwd=repo_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # torchrun and its workers
        raise
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    checksums = results["weights_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert sum(map(sum, results["confusion_matrix"])) == 28  # each test image exactly once
    # the reported validation accuracy equals a single-process evaluation of the same weights
    import datasets

    model, _ = load_model(tmp_path / "ddp" / "last.pt", weights="model")
    loader = datasets.build_loader(
        tiny_faces,
        "val",
        mode="val",
        batch_size=64,
        data_config=datasets.DataConfig.from_dict(model.data_config),
    )
    val = engine.evaluate(model, loader, "cpu", loader.classes)
    assert read_metrics(tmp_path / "ddp")[-1]["val_accuracy"] == pytest.approx(val["accuracy"])
    assert not math.isnan(results["test_accuracy"])


@pytest.mark.parametrize(
    "model, extra",
    [
        ("emonext_atto", ["--input-size", "32"]),
        ("convnext_atto", ["--input-size", "32"]),
        ("simple_cnn", []),
        ("timm:test_convnext", []),
        ("timm:test_vit", []),
    ],
)
def test_every_model_trains_one_epoch(model, extra, tiny_faces, tmp_path):
    """train.py with each kind of model it builds. ResEmoteNet (80 M parameters: a minute here for
    its optimizer steps and checkpoints) trains through the same code as simple_cnn; its own
    steps, loss and EMA are tests/test_baselines.py's."""
    argv = FAST + ["--model", model, "--epochs", "1", "--dataset-path", str(tiny_faces),
                   "--output-dir", str(tmp_path), "--run-name", "m", *extra]  # fmt: skip
    results = run(argv)
    assert results["epochs_run"] == 1 and results["model"] == model
    assert sum(map(sum, results["confusion_matrix"])) == 28
    rebuilt, ckpt = load_model(tmp_path / "m" / "last.pt")
    assert rebuilt.model_name == model
    assert rebuilt.data_config == ckpt["data_config"]


def test_ablation_flags_are_recorded_and_restored(tiny_faces, tmp_path):
    argv = FAST + ["--epochs", "1", "--dataset-path", str(tiny_faces), "--output-dir",
                   str(tmp_path), "--run-name", "ablation", "--no-stn", "--no-se",
                   "--sa-weight", "0"]  # fmt: skip
    run(argv)
    model, ckpt = load_model(tmp_path / "ablation" / "best.pt")  # no flags needed
    assert not model.has_stn and not model.has_se
    assert ckpt["args"]["sa_weight"] == 0
    full = create_model("emonext_micro", img_size=32)
    stn = sum(
        p.numel() for n, p in full.named_parameters() if n.startswith(("localization", "fc_loc"))
    )
    se = sum(p.numel() for n, p in full.named_parameters() if ".2.fc." in n)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in full.parameters()) - stn - se
    # at 32 pixels the localisation net ends at 10 x 4 x 4: ((32 - 6) // 2 - 4) // 2 = 4
    assert stn == 3 * 8 * 49 + 8 + 16 + 8 * 10 * 25 + 10 + 20 + 10 * 4 * 4 * 32 + 32 + 32 * 6 + 6


@pytest.mark.slow
def test_demo_reaches_its_accuracy(tmp_path, repo_root):
    """The README's main command, as a newcomer runs it (but writing into tmp_path). About a
    minute here; the timeout only guards against a hang, on however slow a machine."""
    data = tmp_path / "synthetic"
    command = [sys.executable, "train.py", "--demo", "--no-progress",
               "--dataset-path", str(data), "--output-dir", str(tmp_path)]  # fmt: skip
    started = time.time()
    proc = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("emonext_micro_")]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_accuracy"] >= 60.0, results["test_accuracy"]
    print(f"demo: {results['test_accuracy']:.2f} % in {time.time() - started:.0f} s")


def test_wandb_offline_logs_the_run_quietly(tiny_faces, tmp_path, monkeypatch, capfd):
    import wandb

    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.setattr(wandb, "login", lambda **kwargs: False)  # not logged in: offline
    argv = FAST + ["--epochs", "1", "--dataset-path", str(tiny_faces), "--output-dir",
                   str(tmp_path), "--run-name", "w", "--wandb", "auto"]  # fmt: skip
    run(argv)
    (offline,) = (tmp_path / "w" / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb")), "the offline run file holds the logged metrics"
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.lower().startswith("wandb")]
    assert lines == ["wandb: logging offline (not logged in)",
                     f"wandb: logged offline; upload with `wandb sync {offline}`"]  # fmt: skip


def test_best_pt_is_a_copy_that_outlives_the_next_last_pt(tmp_path):
    """best.pt is linked (or copied) from last.pt instead of written twice."""
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    utils.atomic_save({"epoch": 3}, last)
    utils.link_or_copy(last, best)
    utils.atomic_save({"epoch": 4}, last)  # the next epoch, not better
    assert torch.load(best, weights_only=True) == {"epoch": 3}
    assert torch.load(last, weights_only=True) == {"epoch": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_channels_last_run_tests_every_weights_in_channels_last(tiny_faces, tmp_path, monkeypatch):
    """--channels-last (CUDA's default): validation and the three tests (final EMA, best.pt's
    online and EMA weights) all run the model in channels-last, as it was trained: not best.pt's
    two in NCHW (other kernels: each test shape set up anew, about 0.7 s each on an H200)."""
    formats, real_evaluate = [], engine.evaluate

    def evaluate(model, *args, **kwargs):
        weight = model.downsample_layers[0][0].weight
        formats.append(weight.is_contiguous(memory_format=torch.channels_last))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    run(FAST + ["--channels-last", "--epochs", "1", "--dataset-path", str(tiny_faces),
                "--output-dir", str(tmp_path), "--run-name", "cl"])  # fmt: skip
    assert formats == [True] * 4  # validation, then the three tests


def nested_state() -> dict:
    """A checkpoint's shape: a state dict (channels-last), optimiser state, numbers."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    return {
        "model": conv.state_dict(),
        "optimizer": {
            "state": {0: {"exp_avg": torch.randn(8, 4, 3, 3), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "rng": [{"torch": torch.get_rng_state()}],
        "epoch": 3,
    }


def tensors_of(state: dict) -> list[torch.Tensor]:
    model, opt = state["model"], state["optimizer"]["state"][0]
    return [*model.values(), *opt.values(), state["rng"][0]["torch"]]


def test_checkpoint_writer_writes_the_state_at_save_time(tmp_path, monkeypatch):
    """The training loop changes weights and optimiser state in place right after save()
    returns; the file holds them as they were at save(). The writer's torch.save is held until
    the changes are made, so the write surely comes after them."""
    gate, real_save = threading.Event(), torch.save

    def held_save(*args, **kwargs):
        assert gate.wait(timeout=30), "save() did not return while the file was being written"
        real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", held_save)
    state = nested_state()
    expected = copy.deepcopy(state)
    writer = utils.CheckpointWriter()
    try:
        writer.save(state, tmp_path / "best.pt", link=tmp_path / "last.pt")
        (thread,) = [t for t in threading.enumerate() if t.name == "write best.pt"]
        assert not thread.daemon  # a failing run still finishes the file
        for t in tensors_of(state):
            t.add_(1)
        state["optimizer"]["param_groups"][0]["lr"] = 0.2
        state["model"]["extra"] = torch.zeros(1)
    finally:
        gate.set()
    writer.wait()
    assert not thread.is_alive()
    for name in ("best.pt", "last.pt"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
        assert isinstance(loaded["model"], OrderedDict)  # with its load_state_dict metadata
        assert loaded["model"]._metadata == expected["model"]._metadata
        assert loaded["model"]["weight"].stride() == expected["model"]["weight"].stride()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.parametrize("raised_by", ["wait", "save"])
def test_checkpoint_writer_raises_the_writers_error_in_the_main_thread(
    raised_by, tmp_path, monkeypatch, capsys
):
    """A full disk in the writer thread: the next wait() or save() raises it; last.pt stays the
    previous complete file and no half-written temporary file is left."""
    last = tmp_path / "last.pt"
    writer = utils.CheckpointWriter()
    writer.save({"epoch": 1}, last)
    writer.wait()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    writer.save({"epoch": 2}, last)
    with pytest.raises(OSError, match="No space left on device"):
        writer.wait() if raised_by == "wait" else writer.save({"epoch": 3}, last)
    writer.wait()  # raised once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(last, weights_only=True) == {"epoch": 1}

    # leaving a `with` block (as main does) waits; an error already on its way is not hidden
    with pytest.raises(RuntimeError, match="training failed") as raised:
        with utils.CheckpointWriter() as writer:
            writer.save({"epoch": 2}, last)
            raise RuntimeError("training failed")
    assert "training failed" in str(raised.value)
    assert "writing the checkpoint failed as well" in capsys.readouterr().err
    with pytest.raises(OSError, match="No space left on device"):
        with utils.CheckpointWriter() as writer:
            writer.save({"epoch": 2}, last)


def test_checkpoint_writer_serialises_cuda_copies_once_complete(tmp_path, monkeypatch):
    """CUDA's rules, without a GPU: save() enqueues the copies to host memory and records an
    event on the stream of their device, in the caller's thread; the writer thread waits on the
    event before torch.save reads the copies."""
    log = []

    def thread() -> str:
        return "main" if threading.current_thread() is threading.main_thread() else "writer"

    def enqueued_copy(t):  # host_copy's CUDA branch: a copy still running on cuda:0
        log.append(("copy", thread()))
        return t.clone(), torch.device("cuda", 0)

    class Event:
        def record(self, stream):
            log.append(("record", stream, thread()))

        def synchronize(self):
            log.append(("synchronize", thread()))

    real_save = torch.save
    monkeypatch.setattr(utils, "host_copy", enqueued_copy)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (log.append(("save", thread())),
                                                        real_save(*a, **k)))  # fmt: skip
    state = nested_state()
    writer = utils.CheckpointWriter()
    writer.save(state, tmp_path / "last.pt")
    writer.wait()
    copies = [("copy", "main")] * len(tensors_of(state))
    assert log == copies + [("record", "stream of cuda:0", "main"), ("synchronize", "writer"),
                            ("save", "writer")]  # fmt: skip
    torch.testing.assert_close(torch.load(tmp_path / "last.pt", weights_only=True), state)


def test_compile_compiles_nothing_after_the_first_epoch(tiny_faces, tmp_path, monkeypatch):
    """--compile compiles one graph, the full training batch's, in epoch 0: the partial last
    batch and validation run uncompiled (each would be another compilation, and before
    CompileTrainingBatches they were: 3 graphs), and later epochs and the test compile nothing.
    Dynamo's guards do not depend on the backend, so the cheap "eager" backend stands in for
    inductor."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    original = engine.train_one_epoch

    def counting(*args, **kwargs):
        graphs.append(counters["stats"]["unique_graphs"])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", counting)
    argv = FAST + ["--batch-size", "24", "--epochs", "3", "--compile", "--dataset-path",
                   str(tiny_faces), "--output-dir", str(tmp_path), "--run-name", "c"]  # fmt: skip
    run(argv)  # 112 training images: 4 batches of 24 and one of 16
    graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs == [0, 1, 1, 1], graphs  # epoch 0: one graph; epochs 1, 2 and the test: none
