"""train.py and evaluate.py under mistakes and faults: bad arguments, resume, interruption, kills.

docs/RELIABILITY.md ("Training, resume and arguments") lists each case with the project's answer.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import error_line, sigint_default

import datasets
import engine
import evaluate
import train
from models import load_model

# emonext_micro at 32 pixels on the 7 x 16 synthetic faces: 7 steps an epoch.
SMALL = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
         "--batch-size", "16", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
         "--no-progress", "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip


def run(argv: list) -> dict:
    return train.main(train.parse_args([str(a) for a in argv]))


def read_metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # timings differ between runs
        r.pop("seconds"), r.pop("images_per_s")
    return records


def same_weights(a: Path, b: Path) -> bool:
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    return all(torch.equal(v, b[part][k]) for part in ("model", "ema") for k, v in a[part].items())


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "two"], "--batch-size"),
        (["--val-batch-size", "0"], "--val-batch-size"),
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
        (["--cycle-steps", "0"], "--cycle-steps"),
        (["--warmup-steps", "64"], "--warmup-steps"),  # the whole cycle (64 in SMALL)
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--min-lr", "-1e-5"], "--min-lr"),
        (["--min-lr", "0.1"], "--min-lr"),  # above --lr
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-5"], "--epochs"),
        (["--hflip", "1.5"], "--hflip"),
        (["--vflip", "-0.1"], "--vflip"),
        (["--rotation", "-10"], "--rotation"),
        (["--label-smoothing", "2"], "--label-smoothing"),
        (["--ema-beta", "1.1"], "--ema-beta"),
        (["--ema-update-every", "0"], "--ema-update-every"),
        (["--drop-path", "1"], "--drop-path"),
        (["--weight-decay", "-0.01"], "--weight-decay"),
        (["--clip-grad", "-1"], "--clip-grad"),
        (["--sa-weight", "-1"], "--sa-weight"),
        (["--patience", "0"], "--patience"),
        (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps"),
        (["--num-workers", "-1"], "--num-workers"),
        (["--input-size", "8"], "--input-size"),
        (["--input-size", "31"], "--input-size"),  # ConvNeXt downsamples by 32
        (["--model", "does_not_exist"], "--model"),
        (["--model", "timm:does_not_exist"], "--model"),
        (["--model", "resemotenet", "--no-stn"], "--no-stn"),
        (["--checkpoint", "missing.pt"], "--checkpoint"),
        (["--run-name", "x" * 300], "--run-name"),  # longer than a file name may be
        (["--run-name", "../x"], "--run-name"),  # would write outside --output-dir
        (["--run-name", "/tmp/x"], "--run-name"),
        (["--run-name", ".."], "--run-name"),
        (["--output-dir", "/etc/passwd/runs"], "--output-dir"),  # a file on the way
    ],
)
def test_bad_argument_is_one_line_and_leaves_nothing(extra, flag, tmp_path, capsys):
    out = tmp_path / "out"
    line = error_line(capsys, SMALL + ["--dataset-path", tmp_path, "--output-dir", out, *extra])
    assert line.startswith(f"train.py: error: {flag}") or f"argument {flag}" in line, line
    assert "network" not in line and "download" not in line
    assert not out.exists()


def test_unknown_timm_model_suggests_names(capsys):
    line = error_line(capsys, SMALL + ["--model", "timm:convnext_tinyy"])
    assert "timm has no such model" in line and "timm:convnext_tiny" in line


def test_evaluate_bad_arguments(tmp_path, capsys):
    argv = ["--checkpoint", tmp_path / "last.pt", "--output", tmp_path / "out"]
    line = error_line(capsys, argv + ["--batch-size", "0"], evaluate.parse_args)
    assert line == "evaluate.py: error: --batch-size 0: must be at least 1"
    assert "--num-workers" in error_line(
        capsys, argv + ["--num-workers", "-2"], evaluate.parse_args
    )
    assert not (tmp_path / "out").exists()


def test_bad_resume_files(tmp_path, capsys):
    missing = tmp_path / "missing" / "last.pt"
    assert "no such file" in error_line(capsys, ["--resume", missing])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 64)
    assert "not a readable checkpoint" in error_line(capsys, ["--resume", garbage])
    weights_only = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, weights_only)
    line = error_line(capsys, ["--resume", weights_only])
    assert "no optimiser state" in line and f"--checkpoint {weights_only}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pt", "weights.pt"]


def test_demo_keeps_the_flags_given():
    assert train.parse_args(["--demo"]).model == "emonext_micro"
    args = train.parse_args(["--demo", "--model-size", "femto", "--epochs", "300", "--lr", "1e-3"])
    assert args.model == "emonext_femto" and args.input_size == 48 and args.batch_size == 128
    assert args.epochs == 300 and args.lr == 1e-3  # given, though they are the defaults


def test_help_shows_defaults_and_points_to_the_projects_docs(repo_root):
    import reproduce

    text = " ".join(train.get_args_parser().format_help().split())
    for shown in (
        "maximum number of epochs (default: 300)",
        "batch size per process (default: 64)",
        "(scripts/download_dataset.py) (default: FER2013)",
        "--lr LR peak learning rate",
    ):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
    text_eval = " ".join(evaluate.get_args_parser().format_help().split())
    assert "which folder to score (default: test)" in text_eval
    assert "images per batch (default: 64)" in text_eval
    for name, help_text in (
        ("train.py", text),
        ("reproduce.py", reproduce.get_args_parser().format_help()),
        *((p.name, p.read_text()) for p in [repo_root / "README.md", *repo_root.glob("docs/*.md")]),
    ):
        assert "REFERENCE" not in help_text, name  # a clone has no REFERENCE.md
        for doc in re.findall(r"docs/[A-Z]+\.md", help_text):
            assert (repo_root / doc).is_file(), (name, doc)
    recipe = (repo_root / "docs" / "RECIPE.md").read_text()
    assert "1e-3" in recipe and "--official-quirks" in recipe and "TenCrop" in recipe


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def two_epochs(synthetic_root, tmp_path_factory):
    """A run of 1 epoch resumed to 2 with nothing but --resume and --epochs; and a copy of its
    epoch-0 last.pt."""
    out = tmp_path_factory.mktemp("runs")
    run(SMALL + ["--epochs", "1", "--dataset-path", synthetic_root, "--output-dir", out,
                 "--run-name", "r"])  # fmt: skip
    epoch0 = shutil.copy(out / "r" / "last.pt", out / "epoch0.pt")
    results = run(["--resume", out / "r" / "last.pt", "--epochs", "2"])
    assert results["epochs_run"] == 2 and results["model"] == "emonext_micro"
    return out / "r", Path(epoch0)


def test_resume_restores_the_runs_arguments(two_epochs):
    run_dir, _ = two_epochs
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 14
    assert ckpt["args"]["input_size"] == 32 and ckpt["args"]["batch_size"] == 16
    assert ckpt["args"]["model"] == "emonext_micro" and ckpt["args"]["run_name"] == "r"
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]
    # flags that may change on resume come from the command line; equal values are fine
    args = train.parse_args(["--resume", str(run_dir / "last.pt"), "--epochs", "5", "--patience",
                             "2", "--batch-size", "16", "--model-size", "micro",
                             "--val-batch-size", "8", "--num-workers", "1",
                             "--wandb", "offline"])  # fmt: skip
    assert (args.epochs, args.patience, args.val_batch_size, args.wandb) == (5, 2, 8, "offline")
    assert args.lr == 1e-3 and args.cycle_steps == 64 and args.model == "emonext_micro"


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--batch-size", "8"], "--batch-size 8"),
        (["--model-size", "tiny"], "--model-size tiny"),  # another size's last.pt
        (["--model", "emonext_atto"], "--model emonext_atto"),
        (["--lr", "0.01"], "--lr 0.01"),
        (["--amp"], "--amp"),
        (["--seed", "1"], "--seed 1"),
        (["--no-stn"], "--no-stn"),
        (["--output-dir", "elsewhere"], "--output-dir elsewhere"),
        (["--epochs", "1"], "--epochs 1"),  # fewer than it has trained
    ],
)
def test_resume_refuses_a_changed_run(extra, flag, two_epochs, capsys):
    run_dir, _ = two_epochs
    line = error_line(capsys, ["--resume", run_dir / "last.pt", *extra])
    assert line.startswith(f"train.py: error: {flag}:"), line


def test_resume_refuses_a_checkpoint_behind_last(two_epochs, tmp_path, capsys):
    run_dir = Path(shutil.copytree(two_epochs[0], tmp_path / "r"))
    shutil.copy(two_epochs[1], run_dir / "best.pt")  # best at epoch 0, last at epoch 1
    metrics = (run_dir / "metrics.jsonl").read_text()
    line = error_line(capsys, ["--resume", run_dir / "best.pt"])
    assert "holds epoch 0, but the run went on to epoch 1" in line
    command = shlex.split(re.search(r"continue it with `([^`]+)`", line).group(1))
    assert Path(command[1]).resolve() == Path(train.__file__).resolve()
    assert shutil.which(command[0]) and command[2:] == ["--resume", str(run_dir / "last.pt")]
    assert run(command[2:])["epochs_run"] == 2  # the command given works: the run is done
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # no epoch written twice


def test_resume_refuses_another_number_of_processes(two_epochs, tmp_path):
    run_dir = Path(shutil.copytree(two_epochs[0], tmp_path / "r"))
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    ckpt["rng"] = ckpt["rng"] * 2  # as if trained by 2 processes
    torch.save(ckpt, run_dir / "last.pt")
    with pytest.raises(SystemExit) as exited:
        run(["--resume", run_dir / "last.pt"])
    assert "trained by 2 process(es), not 1" in str(exited.value)
    assert "torchrun --nproc_per_node=2" in str(exited.value)


def test_resume_with_the_data_moved(two_epochs, synthetic_root, tmp_path):
    run_dir = Path(shutil.copytree(two_epochs[0], tmp_path / "r"))
    moved = Path(shutil.copytree(synthetic_root, tmp_path / "moved"))
    results = run(["--resume", run_dir / "last.pt", "--dataset-path", moved])
    assert results["epochs_run"] == 2
    next((moved / "train" / "Sad").iterdir()).unlink()  # other data: 111 train images
    with pytest.raises(SystemExit) as exited:
        run(["--resume", run_dir / "last.pt", "--dataset-path", moved])
    assert f"the dataset at {moved} is not the run's" in str(exited.value)


def test_early_stopped_run_stays_stopped(two_epochs, tmp_path, capsys):
    run_dir = Path(shutil.copytree(two_epochs[0], tmp_path / "r"))
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    ckpt["bad_epochs"] = ckpt["args"]["patience"]  # as if it had stopped early after epoch 1
    torch.save(ckpt, run_dir / "last.pt")
    results = run(["--resume", run_dir / "last.pt", "--epochs", "4"])
    assert results["stop_reason"] == "early_stopping" and results["epochs_run"] == 2
    assert len(read_metrics(run_dir)) == 2
    # a run folder that holds a run is not started again
    capsys.readouterr()
    out = run_dir.parent
    line = error_line(capsys, SMALL + ["--output-dir", out, "--run-name", "r"])
    assert f"continue it with `{train.resume_command(run_dir / 'last.pt')}`" in line


def test_interrupt_messages_are_true(synthetic_root, tmp_path, monkeypatch, capsys, ctrl_c):
    argv = SMALL + ["--epochs", "1", "--dataset-path", synthetic_root, "--output-dir", tmp_path,
                    "--run-name", "r"]  # fmt: skip
    monkeypatch.setenv("EMONEXT_FAULT", "step:2:SIGINT")  # Ctrl-C in the 2nd step of epoch 0
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert exited.value.code == 128 + signal.SIGINT
    out = capsys.readouterr().out
    assert "no checkpoint was saved" in out and "Run the same command again" in out
    assert "last.pt" not in out and not (tmp_path / "r").exists()

    # again, as after a kill between epoch 0's metrics line and its last.pt (the command still
    # starts the run), and with Ctrl-C in the first batch of the test (the 2nd evaluation batch)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    monkeypatch.setenv("EMONEXT_FAULT", "predict:2:SIGINT")
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert exited.value.code == 128 + signal.SIGINT
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [7]
    out = capsys.readouterr().out
    assert f"{tmp_path / 'r' / 'last.pt'} holds epoch 0, the last one" in out
    command = shlex.split(re.search(r"`([^`]+)` tests it again", out).group(1))
    monkeypatch.delenv("EMONEXT_FAULT")
    assert run(command[2:])["epochs_run"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the one found, restored


@pytest.mark.parametrize("where", ["train_one_epoch", "evaluate"])
def test_an_error_inside_training_restores_the_signal_handlers(
    where, synthetic_root, tmp_path, monkeypatch
):
    """main installs its SIGINT/SIGTERM handlers for the loop; an exception raised inside it (a
    bug, an out-of-memory error) must hand the caller its own handlers back, else an in-process
    caller (a test, a notebook) silently swallows its next Ctrl-C."""

    def mine(signum, frame):  # the caller's own handlers
        raise AssertionError("not called")

    seen = {}

    def broken(*args, **kwargs):
        seen.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
        raise RuntimeError("a bug inside training")

    monkeypatch.setattr(engine, where, broken)
    previous = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        argv = SMALL + ["--epochs", "1", "--dataset-path", synthetic_root, "--output-dir",
                        tmp_path]  # fmt: skip
        with pytest.raises(RuntimeError, match="a bug inside training"):
            run(argv)
        assert seen and all(handler is not mine for handler in seen.values())  # the trainer's
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_same_weights(
    synthetic_root, tmp_path, repo_root, monkeypatch, capsys
):
    """Ctrl-C, then SIGKILL during a step, during validation and while last.pt is written; each
    time the printed command resumes from last.pt, and the end equals an uninterrupted run."""
    argv = ["--demo", "--model-size", "micro", "--input-size", "32", "--batch-size", "16",
            "--epochs", "2", "--dataset-path", str(synthetic_root), "--no-progress",
            "--output-dir", "out"]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a user's own folder: train.py's path and the run's are relative
    run(argv + ["--run-name", "straight"])
    monkeypatch.setenv("EMONEXT_FAULT", "step:10:SIGINT")  # Ctrl-C in epoch 1
    with pytest.raises(SystemExit) as exited:
        run(argv + ["--run-name", "r"])
    assert exited.value.code == 128 + signal.SIGINT
    monkeypatch.delenv("EMONEXT_FAULT")
    last = Path.cwd() / "out" / "r" / "last.pt"  # the command works from any folder
    out = capsys.readouterr().out
    assert f"{last} holds epoch 0" in out
    command = shlex.split(re.search(r"continue with `([^`]+)`", out).group(1))
    script = str(repo_root / "train.py")
    assert shutil.which(command[0]) and command[1:] == [script, "--resume", str(last)]

    def printed_command(fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **({"EMONEXT_FAULT": fault} if fault else {})}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    for fault in ("step:3:SIGKILL", "predict:1:SIGKILL", "save:last.pt:1:SIGKILL"):
        killed = printed_command(fault)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert torch.load(last, weights_only=True)["epoch"] == 0, fault
    assert len(read_metrics(last.parent)) == 2  # killed after epoch 1's line, before its last.pt

    finished = printed_command()
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "dropped 1 line(s) of epochs that last.pt does not hold" in finished.stdout
    straight = Path("out", "straight")
    assert same_weights(straight / "last.pt", last)
    assert read_metrics(straight) == read_metrics(last.parent)
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, last.parent))
    assert a["test_accuracy"] == b["test_accuracy"] and a["per_class"] == b["per_class"]
    assert not list(last.parent.glob("*.tmp"))


# --------------------------------------------------------------------------- results


def test_results_name_their_weights_and_the_skipped_images(synthetic_root, tmp_path, capsys):
    data = Path(shutil.copytree(synthetic_root, tmp_path / "data", ignore=lambda *a: [".cache"]))
    bad = [sorted((data / split / cls).iterdir())[0] for split, cls in
           (("train", "Angry"), ("test", "Happy"))]  # fmt: skip
    for path in bad:
        path.write_bytes(b"not an image")
    results = run(SMALL + ["--epochs", "1", "--dataset-path", data, "--output-dir", tmp_path,
                           "--run-name", "r", "--skip-bad-images"])  # fmt: skip
    out = capsys.readouterr().out
    assert f"skipped 1 unreadable train images: {bad[0]}" in out
    assert f"skipped 1 unreadable test images: {bad[1]}" in out
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["skipped_images_count"] == 2
    assert saved["skipped_images"] == {"train": [str(bad[0])], "val": [], "test": [str(bad[1])]}
    # the same from the decoded-split cache
    assert datasets.load_split(data, "test", skip_bad_images=True).skipped_paths == [str(bad[1])]

    # each test figure is what evaluating the weights it names gives
    assert "test_accuracy_best" not in saved and set(saved["test_weights"]) == {
        "test_accuracy", "test_accuracy_best_online", "test_accuracy_best_ema"}  # fmt: skip
    for key, checkpoint, weights in (
        ("test_accuracy", "last.pt", "ema"),
        ("test_accuracy_best_online", "best.pt", "model"),
        ("test_accuracy_best_ema", "best.pt", "ema"),
    ):
        model, _ = load_model(tmp_path / "r" / checkpoint, weights=weights)
        loader = datasets.build_loader(data, "test", mode="test", batch_size=6,
                                       data_config=datasets.DataConfig.from_dict(
                                           model.data_config), skip_bad_images=True)  # fmt: skip
        metrics = engine.evaluate(model, loader, "cpu", loader.classes, bootstrap=1000)
        assert saved[key] == metrics["accuracy"]
        assert saved[f"{key}_ci95"] == metrics["accuracy_ci95"]  # every reported figure's interval
    assert results["test_accuracy"] == saved["test_accuracy"]
    assert all("f1_ci95" in m for m in saved["per_class"].values())


# ----------------------------------------------------------------- outputs, before the work


def test_an_unwritable_output_dir_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A read-only mount or a folder of another user (os.access says so; the tests run as root,
    whom chmod does not stop)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != tmp_path)
    line = error_line(capsys, SMALL + ["--dataset-path", tmp_path, "--output-dir", tmp_path / "o"])
    assert f"--output-dir {tmp_path / 'o'}: {tmp_path} is not writable" in line


def test_no_room_for_a_checkpoint_is_refused_before_the_data(synthetic_root, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 2**20))
    monkeypatch.setattr(datasets, "build_loader", lambda *a, **k: pytest.fail("data decoded"))
    with pytest.raises(SystemExit) as exited:
        run(SMALL + ["--dataset-path", synthetic_root, "--output-dir", tmp_path / "o"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 MB free on its disk" in err and "--output-dir" in err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_a_run_folder_belongs_to_one_process(synthetic_root, tmp_path, capsys):
    argv = SMALL + ["--epochs", "1", "--dataset-path", synthetic_root, "--output-dir", tmp_path,
                    "--run-name", "r"]  # fmt: skip
    lock = tmp_path / ".r.lock"
    lock.write_text(f"{socket.gethostname()}:{os.getpid()}\n")  # a live trainer holds it
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert f"{tmp_path / 'r'} is being written by another process" in str(exited.value.code)
    assert f":{os.getpid()}" in str(exited.value.code) and not (tmp_path / "r").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()}:{dead.pid}\n")  # a killed trainer's: taken over
    assert run(argv)["epochs_run"] == 1 and not lock.exists()  # released at the end


def test_default_run_names_never_collide(synthetic_root, tmp_path, monkeypatch):
    """Two runs started in the same second (the default name's resolution)."""
    monkeypatch.setattr(train.time, "strftime", lambda fmt: "20260101-000000")
    argv = SMALL + ["--epochs", "1", "--dataset-path", synthetic_root, "--output-dir", tmp_path]
    run(argv)
    run(argv)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["emonext_micro_20260101-000000", "emonext_micro_20260101-000000-2"]


def test_a_full_disk_is_one_line_and_the_run_resumes(synthetic_root, tmp_path, monkeypatch):
    """torch.save on a full disk raises "[enforce fail at inline_container.cc] unexpected pos";
    here the second checkpoint (epoch 1) meets it."""
    calls, real_save = [], torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda p: real_usage(p) if len(calls) < 2 else real_usage(p)._replace(free=0),
    )
    run_dir = tmp_path / "r"
    argv = SMALL + ["--epochs", "2", "--dataset-path", synthetic_root, "--output-dir", tmp_path,
                    "--run-name", "r"]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        run(argv)
    message = str(exited.value.code)
    assert message.startswith(f"error: writing {run_dir}") and "No space left on device" in message
    assert "0 MB free on its disk" in message and len(message.splitlines()) == 1
    assert f"{run_dir / 'last.pt'} still holds epoch 0" in message
    assert not list(run_dir.glob("*.tmp*")) and not (tmp_path / ".r.lock").exists()
    monkeypatch.undo()
    command = shlex.split(re.search(r"continue with `([^`]+)`", message).group(1))
    assert command[1:] == [
        str(Path(train.__file__).resolve()),
        "--resume",
        str(run_dir / "last.pt"),
    ]
    assert run(command[2:])["epochs_run"] == 2


def test_two_signals_in_a_row_still_say_how_to_go_on(synthetic_root, tmp_path, monkeypatch, capsys):
    """A second SIGTERM 0.3 s after the first stops at once, mid-step: the same one-line answer."""

    def two_sigterms(name):
        if name == "step" and two_sigterms.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        two_sigterms.calls += 1

    two_sigterms.calls = 0
    monkeypatch.setattr(engine, "fault_point", two_sigterms)
    argv = SMALL + ["--epochs", "1", "--dataset-path", synthetic_root, "--output-dir", tmp_path]
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert exited.value.code == 128 + signal.SIGTERM
    assert "before any epoch finished: no checkpoint was saved" in capsys.readouterr().out


def test_ctrl_c_while_setting_up_is_one_line(synthetic_root, tmp_path, repo_root):
    argv = SMALL + ["--dataset-path", synthetic_root, "--output-dir", tmp_path]
    done = subprocess.run(
        [sys.executable, str(repo_root / "train.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EMONEXT_FAULT": "setup:1:SIGINT"},
        preexec_fn=sigint_default,  # as a terminal's Ctrl-C reaches it, also under nohup
    )
    assert done.returncode == 128 + signal.SIGINT
    assert done.stderr.strip() == "train.py: interrupted while setting up; nothing was trained"
    assert list(tmp_path.iterdir()) == []  # not even the run folder's lock


def test_resume_commands_name_the_interpreter_that_ran(monkeypatch):
    """A venv's python started by its path is not the `python` on PATH: it is named in full."""
    monkeypatch.setattr(sys, "executable", "/opt/venv/bin/python")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/python")
    assert train.resume_command("r/last.pt").startswith("/opt/venv/bin/python ")
    monkeypatch.setattr(shutil, "which", lambda name: "/opt/venv/bin/python")
    assert train.resume_command("r/last.pt").startswith("python ")


def test_wandb_without_home_prints_one_line(tmp_path, repo_root):
    script = ("import utils, pathlib; run = utils.init_wandb('auto', pathlib.Path(r'%s'), None, "
              "{}); run.finish()") % (tmp_path / "run")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "WANDB_API_KEY")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=repo_root, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).strip() == "wandb: logging offline (not logged in)"
