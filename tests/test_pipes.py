"""Pipes, hang-ups, paths and resources (docs/RELIABILITY.md, "Pipes, hang-ups, paths and
resources"): a closed stdout, SIGHUP, a resume from another folder, file names too long for the
file system, folders left by failed starts, one class, too many workers, out of memory.

Subprocesses only where a pipe or another working directory needs one; the rest is train.main
in this process on the tiny synthetic faces.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inference_utils import make_project_checkpoint

import datasets
import engine
import evaluate
import train
import utils

# emonext_micro at 32 pixels, batches of 16.
SMALL = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
         "--batch-size", "16", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
         "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip


@pytest.fixture(scope="module")
def few_faces(tmp_path_factory) -> Path:
    """7 classes x (train 2, val 1, test 1): one step an epoch, for the tests that train."""
    return datasets.make_synthetic(tmp_path_factory.mktemp("few") / "faces", seed=0,
                                   splits={"train": 2, "val": 1, "test": 1})  # fmt: skip


def run(argv: list) -> dict:
    return train.main(train.parse_args([str(a) for a in argv]))


def error_line(capsys, argv: list) -> str:
    """The one line that parsing train.py's `argv` prints (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        train.parse_args([str(a) for a in argv])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    return err.strip()


def exit_line(argv: list) -> str:
    """The one-line message that train.main ends with (SystemExit with a text)."""
    with pytest.raises(SystemExit) as exited:
        run(argv)
    message = str(exited.value.code)
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    return message


def with_stdout_closed(command: list, **kwargs) -> subprocess.CompletedProcess:
    """`command` writing to a pipe whose reader is gone (as `command | head -0`), unbuffered
    (`python -u`, as a log that should show each line at once): its first line meets EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, *map(str, command)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,  # a hang guard only
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            **kwargs,
        )
    finally:
        os.close(write)


# --------------------------------------------------------------------------- a closed stdout


def test_a_closed_stdout_never_stops_training(few_faces, tmp_path, repo_root):
    argv = SMALL + ["--epochs", "1", "--dataset-path", few_faces, "--output-dir", tmp_path,
                    "--run-name", "r"]  # fmt: skip
    done = with_stdout_closed([repo_root / "train.py", *argv])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    assert json.loads((tmp_path / "r" / "results.json").read_text())["epochs_run"] == 1
    assert not (tmp_path / ".r.lock").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_project_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.mark.parametrize("command", ["predict.py", "evaluate.py", "download_dataset.py"])
def test_a_closed_stdout_never_stops_the_other_commands(
    command, checkpoint, synthetic_root, few_faces, tmp_path, repo_root
):
    """Each finishes its work: every annotated image, eval.json, the converted dataset (which
    download_dataset.py used to throw away after converting it)."""
    faces = sorted((synthetic_root / "test" / "Happy").iterdir())[:3]
    argv, made = {
        "predict.py": ([repo_root / "predict.py", *faces, "--checkpoint", checkpoint, "--no-detect",
                        "--backend", "torch", "--device", "cpu", "--batch-size", "1", "--output",
                        tmp_path / "annotated"], [f"{f.stem}_png_pred.png" for f in faces]),
        "evaluate.py": ([repo_root / "evaluate.py", "--checkpoint", checkpoint, "--dataset-path",
                         few_faces, "--device", "cpu", "--bootstrap", "10", "--output",
                         tmp_path], ["eval.json", "confusion_matrix_test.png"]),
        "download_dataset.py": ([repo_root / "scripts" / "download_dataset.py", "--folder",
                                 few_faces, "--out", tmp_path / "converted"],
                                ["converted/manifest.json"]),
    }[command]  # fmt: skip
    done = with_stdout_closed(argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    folder = tmp_path / "annotated" if command == "predict.py" else tmp_path
    for name in made:
        assert (folder / name).is_file(), name


# --------------------------------------------------------------------------- SIGHUP, other folders


def test_a_hang_up_stops_as_sigterm_does_and_the_resume_command_works_anywhere(
    few_faces, tmp_path, repo_root, monkeypatch, capsys
):
    """SIGHUP (a closed terminal or SSH session) in epoch 1 of a run started with relative paths
    and no terminal: the step finishes, one line says where last.pt stands and how to go on, the
    lock is released, no progress bar was drawn; the printed command, run from another folder,
    finishes the run. A run that recorded a relative --dataset-path says to give it."""

    def not_the_callers(signum, frame):  # SIGHUP must not reach the caller's handler
        raise AssertionError("SIGHUP reached the caller's handler")

    previous = signal.signal(signal.SIGHUP, not_the_callers)
    try:
        started = tmp_path / "started_here"
        started.mkdir()
        (started / "data").symlink_to(few_faces)
        monkeypatch.chdir(started)
        monkeypatch.setenv("EMONEXT_FAULT", "step:2:SIGHUP")  # the step of epoch 1
        argv = SMALL + ["--epochs", "2", "--dataset-path", "data", "--output-dir", "out",
                        "--run-name", "r"]  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            run(argv)
        assert signal.getsignal(signal.SIGHUP) is not_the_callers  # given back
    finally:
        signal.signal(signal.SIGHUP, previous)
    monkeypatch.delenv("EMONEXT_FAULT")
    assert exited.value.code == 128 + signal.SIGHUP
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "%|" not in out + err  # no progress bar: no terminal
    last = started / "out" / "r" / "last.pt"
    assert f"interrupted: {last} holds epoch 0, the last finished one; continue with `" in out
    assert not (started / "out" / ".r.lock").exists()
    command = shlex.split(re.search(r"continue with `([^`]+)`", out).group(1))
    assert command[1:] == [str(repo_root / "train.py"), "--resume", str(last)]
    # a requeued SLURM job repeats the run's relative flags: the same folders, so accepted
    again = train.parse_args(["--resume", str(last), "--output-dir", "out", "--run-name", "r"])
    assert again.output_dir == str(started / "out")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    old = tmp_path / "old_run"  # as a run written before paths were recorded absolute
    shutil.copytree(last.parent, old)
    ckpt = torch.load(old / "last.pt", weights_only=True)
    assert ckpt["args"]["dataset_path"] == str(started / "data")  # recorded absolute
    ckpt["args"]["dataset_path"] = "data"
    torch.save(ckpt, old / "last.pt")
    line = exit_line(["--resume", old / "last.pt"])
    assert "no dataset at data, the run's data, relative to the folder it started in" in line
    assert "--dataset-path" in line

    done = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((last.parent / "results.json").read_text())["epochs_run"] == 2


def test_no_download_bar_without_a_terminal(monkeypatch):
    """torch.hub's download bar (pretrained weights) is drawn only for a person watching."""
    from models import weights

    asked = {}

    def load_state_dict_from_url(url, **kwargs):
        asked.update(kwargs)
        return {}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load_state_dict_from_url)
    weights._download("http://127.0.0.1:9/convnext_tiny_1k_224_ema.pth")
    assert asked["progress"] is False  # pytest captures stdout and stderr: no terminal


# --------------------------------------------------------------------------- names and folders


def test_file_names_too_long_for_the_file_system_are_one_line(tmp_path, capsys):
    """A 250-byte --run-name fits one name, but its lock `.NAME.lock` does not (NAME_MAX 255);
    a 4,072-byte --output-dir leaves no room under PATH_MAX (4,096) for the run's files."""
    argv = SMALL + ["--dataset-path", tmp_path]
    line = error_line(capsys, argv + ["--output-dir", tmp_path / "o", "--run-name", "x" * 250])
    assert line.startswith("train.py: error: --run-name: the run folder's lock file would be")
    assert "(256 bytes)" in line and "give a shorter --run-name" in line
    deep = str(tmp_path)
    while len(deep) < 4072 - 201:  # names of 200 bytes, then one that makes 4,072
        deep += "/" + "d" * 200
    deep += "/" + "d" * (4072 - len(deep) - 1)
    assert len(deep.encode()) == 4072
    line = error_line(capsys, argv + ["--output-dir", deep, "--run-name", "r"])
    assert line.startswith("train.py: error: --output-dir: a file of the run would be")
    assert "give a shorter --output-dir" in line
    assert list(tmp_path.iterdir()) == []


def test_a_failed_start_leaves_no_folder_it_made(checkpoint, synthetic_root, tmp_path, capsys):
    """train.py --output-dir, evaluate.py --output, download_dataset.py --out's parents: made by
    a command that then fails, removed; made by the user beforehand, kept."""
    missing = tmp_path / "no_data"
    exit_line(SMALL + ["--dataset-path", missing, "--output-dir", tmp_path / "new" / "runs"])
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    exit_line(SMALL + ["--dataset-path", missing, "--output-dir", tmp_path / "mine"])
    assert (tmp_path / "mine").is_dir()

    args = evaluate.parse_args([
        "--checkpoint", str(checkpoint), "--dataset-path", str(synthetic_root), "--device", "cpu",
        "--bootstrap", "0", "--output", str(tmp_path / "eval" / "deep"),
        "--compare", str(tmp_path / "missing.pt")])  # fmt: skip
    with pytest.raises(utils.CLIError, match="missing.pt"):
        evaluate.main(args)
    assert not (tmp_path / "eval").exists()

    import download_dataset

    bad_csv = tmp_path / "fer2013.csv"
    bad_csv.write_text("not,a,fer2013,csv\n")
    args = download_dataset.parse_args(["--csv", str(bad_csv), "--out",
                                        str(tmp_path / "data" / "sets" / "FER2013")])  # fmt: skip
    with pytest.raises(utils.CLIError):
        download_dataset.run(args)
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- resources


def test_a_one_class_dataset_is_refused(synthetic_root, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        shutil.copytree(synthetic_root / split / "Happy", data / split / "Happy")
    line = exit_line(SMALL + ["--dataset-path", data, "--output-dir", tmp_path / "out"])
    assert (
        line == f"error: {data} has 1 class folder (Happy) per split; a classifier needs at least 2"
    )
    assert not (tmp_path / "out").exists()


def test_more_workers_than_cpus_are_capped_in_one_line(synthetic_root, tmp_path, monkeypatch,
                                                       capsys):  # fmt: skip
    """DataLoader warns for each loader it makes with more workers than the CPUs this process may
    use (os.sched_getaffinity, as it counts them); the run uses that many, saying so once."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    seen = []

    def build_loader(*args, **kwargs):
        seen.append(kwargs["num_workers"])
        raise KeyError("stop here")

    monkeypatch.setattr(datasets, "build_loader", build_loader)
    argv = SMALL + ["--dataset-path", synthetic_root, "--output-dir", tmp_path,
                    "--data-pipeline", "pil", "--num-workers", cpus + 62]  # fmt: skip
    with pytest.raises(KeyError, match="stop here"):
        run(argv)
    assert seen == [cpus]
    lines = [line for line in capsys.readouterr().out.splitlines() if "--num-workers" in line]
    assert lines == [f"--num-workers {cpus + 62}: this process may use {cpus} CPUs; using {cpus}"]


CUDA_OOM = torch.cuda.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 12.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
)
CPU_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    "error, said",
    [
        (CUDA_OOM, "out of memory on the GPU, asking for 12.00 GiB more"),
        (CPU_OOM, "out of memory on the CPU (host memory), asking for 256.00 GiB more"),
        (MemoryError(), "out of memory on the CPU (host memory)"),
    ],
)
def test_out_of_memory_is_one_line_with_what_to_lower(error, said, synthetic_root, tmp_path,
                                                      monkeypatch):  # fmt: skip
    """Raised by the first training step (simulated: no machine here has a GPU to fill)."""

    def step(*args, **kwargs):
        raise error

    monkeypatch.setattr(engine, "train_one_epoch", step)
    line = exit_line(SMALL + ["--dataset-path", synthetic_root, "--output-dir", tmp_path,
                              "--run-name", "r"])  # fmt: skip
    assert line == (
        f"error: {said} (--batch-size 16, --val-batch-size 64, --input-size 32); lower "
        "--batch-size (--gradient-accumulation-steps keeps the batch the optimiser sees) or "
        "--input-size, or add --grad-checkpointing"
    )
    assert list(tmp_path.iterdir()) == []  # no run folder, the lock released


def test_out_of_memory_while_testing_gives_a_command_that_goes_on(few_faces, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    real = engine.predict

    def predict(model, loader, *args, **kwargs):  # validation fits; the TenCrop test does not
        if loader.mode == "test":
            raise CUDA_OOM
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(engine, "predict", predict)  # called by engine.evaluate
    line = exit_line(SMALL + ["--epochs", "1", "--no-progress", "--dataset-path", few_faces,
                              "--output-dir", tmp_path, "--run-name", "r"])  # fmt: skip
    last = tmp_path / "r" / "last.pt"
    assert line.startswith("error: out of memory on the GPU, asking for 12.00 GiB more")
    assert f"{last} holds epoch 0: continue with `" in line
    command = shlex.split(re.search(r"continue with `([^`]+)`", line).group(1))
    assert command[2:] == ["--resume", str(last), "--val-batch-size", "16"]
    assert train.parse_args(command[2:]).val_batch_size == 16  # the command is a valid resume


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_out_of_memory_on_a_real_gpu_is_one_line(synthetic_root, tmp_path):
    """EmoNeXt-Tiny at 4096 pixels, all 112 training faces in one batch: its first block alone
    would need about 180 GB."""
    argv = ["--model", "emonext_tiny", "--pretrained", "none", "--input-size", "4096",
            "--batch-size", "112", "--device", "cuda", "--wandb", "disabled", "--no-progress",
            "--epochs", "1", "--dataset-path", synthetic_root,
            "--output-dir", tmp_path]  # fmt: skip
    try:
        line = exit_line(argv)
    finally:
        torch.cuda.empty_cache()
    assert line.startswith("error: out of memory on the GPU") and "lower --batch-size" in line
    assert list(tmp_path.iterdir()) == []
