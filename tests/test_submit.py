"""scripts/submit.py with submitit's local executor: the same job a SLURM cluster runs, as two
CPU processes (gloo) on this machine. A real SLURM cluster is not available here
(docs/CLUSTERS.md says what that leaves untested)."""

import json
import subprocess
import sys

import pytest
import submit
import torch

import train
import utils

# emonext_micro at 32 pixels on the 7 x 16 synthetic faces, batch 8 in each of 2 processes:
# 7 steps an epoch.
TRAIN = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
         "--batch-size", "8", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
         "--warmup-steps", "4", "--cycle-steps", "64", "--epochs", "2"]  # fmt: skip
LOCAL = ["--cluster", "local", "--tasks-per-node", "2", "--gpus-per-node", "0", "--wait"]
# ConvNeXt's recipe (issue 30) on both tasks, so that its random streams and its teacher are
# part of the exact-resume check below; the teacher is the `teacher` fixture's file.
RECIPE = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
          "--kd-temperature", "2"]  # fmt: skip


def submit_local(repo_root, argv: list, env: dict | None = None) -> subprocess.CompletedProcess:
    """scripts/submit.py as a user runs it; the job's processes inherit `env`."""
    return subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "submit.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard only
        env={**subprocess.os.environ, **(env or {})},
    )


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["model"], ckpt["ema"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A distillation teacher of the synthetic faces' classes (random weights suffice)."""
    import datasets
    import models

    torch.manual_seed(0)
    model = models.create_model("emonext_micro", num_classes=7, img_size=32)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": model.state_dict(), "model_name": model.model_name,
                "model_kwargs": model.model_kwargs, "classes": list(datasets.CLASSES),
                "data_config": model.data_config}, path)  # fmt: skip
    return RECIPE + ["--kd-model-name", path]


@pytest.fixture(scope="module")
def straight(repo_root, synthetic_root, tmp_path_factory, teacher):
    """An uninterrupted 2-task job of 2 epochs, with ConvNeXt's recipe and a teacher."""
    out = tmp_path_factory.mktemp("submit")
    argv = LOCAL + TRAIN + teacher + ["--dataset-path", synthetic_root, "--output-dir", out]
    done = submit_local(repo_root, argv + ["--run-name", "straight"])
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


def test_a_two_task_job_writes_one_run(straight):
    out, done = straight
    assert [p.name for p in out.iterdir()] == ["straight"]  # one run folder, not one per task
    run = out / "straight"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 2
    assert len(results["weights_checksum_per_rank"]) == 2
    epochs = [
        json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [0, 1]  # written once, by the first task
    assert len(torch.load(run / "last.pt", weights_only=True)["rng"]) == 2  # both ranks' state
    assert "done: test accuracy" in done.stdout and (run / "submitit").is_dir()
    logs = [p.read_bytes().decode() for p in (run / "submitit").glob("*_log.*")]  # with \r
    assert len(logs) == 4 and "epoch 1:" in "".join(logs)  # 2 tasks' stdout and stderr
    assert not any("\r" in log or "%|" in log for log in logs)  # no progress bar: plain lines


def test_a_preempted_job_requeues_and_ends_as_an_uninterrupted_one(
    straight, repo_root, synthetic_root, teacher
):
    """Both tasks get submitit's preemption signal (USR2) in the 2nd step of epoch 1, as SLURM
    signals every task of a job; the job requeues itself and resumes from last.pt. With the
    recipe's RandAugment, erasing, Mixup/CutMix and teacher: the same weights, bit for bit."""
    out, _ = straight
    argv = LOCAL + TRAIN + teacher + ["--dataset-path", synthetic_root, "--output-dir", out]
    done = submit_local(
        repo_root, argv + ["--run-name", "preempted"], {"EMONEXT_FAULT": "step:9:SIGUSR2"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run = out / "preempted"
    log = "".join(p.read_text() for p in sorted((run / "submitit").glob("*_0_log.*")))
    assert "requeued: the job resumes from" in log and "resumed from" in log
    assert "epoch 1:" in log.split("resumed from")[1]  # epoch 1 trained again, after the requeue
    epochs = [
        json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [0, 1]
    for a, b in zip(weights(out / "straight" / "last.pt"), weights(run / "last.pt"), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_two_tasks_draw_different_augmentations(straight):
    """Each rank of the job has streams of its own: the two tasks' loaders and Mixup, as
    train.py builds them from the run's arguments, augment the same faces differently."""
    import argparse

    out, _ = straight
    ckpt = torch.load(out / "straight" / "last.pt", weights_only=True)
    args = argparse.Namespace(**ckpt["args"])
    assert args.aa != "none" and args.reprob > 0 and args.kd_model_name  # the recipe ran
    assert ckpt["kd_teacher_sha256"]
    device, batches = torch.device("cpu"), []
    for rank in (0, 1):
        loader = train.build_loaders(args, ckpt["data_config"], device, rank, 2)["train"]
        loader.images[:] = loader.images[0]  # every face the same: only the draws differ
        loader.set_epoch(1)
        x, y = next(iter(loader))
        mixup = train.build_mixup(args, 7, rank)
        mixup.set_epoch(1)
        batches.append(mixup(x.contiguous(), torch.arange(len(y)) % 7))
    (x0, y0), (x1, y1) = batches
    assert not torch.equal(x0, x1) and not torch.equal(y0, y1)
    for x in (x0, x1):  # and within a rank, each image its own
        assert len({tuple(img.flatten()[:64].tolist()) for img in x}) == len(x)


def test_own_flags_are_taken_out_of_trains_command_line():
    argv = ["--cluster", "local", "--nodes=1", "--wait", "--epochs", "3", "--slurm", "qos=high",
            "--amp", "--job-dir", "j"]  # fmt: skip
    assert submit.split_argv(argv) == ["--epochs", "3", "--amp"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cluster", "local", "--nodes", "2"], "--nodes 2: the local executor runs on one"),
        (["--cluster", "local", "--slurm", "qos"], "--slurm qos: expected KEY=VALUE"),
        (["--cluster", "local", "--timeout", "0"], "--timeout 0: must be at least 1 minute"),
        (["--cluster", "local", "--lr", "-1"], "--lr -1.0: must be positive"),  # train.py's rule
        (["--cluster", "slurm", "--dataset-path", "."], "sbatch is not on PATH"),
    ],
)
def test_mistakes_are_one_line_before_anything_is_submitted(
    argv, message, tmp_path, monkeypatch, capsys
):
    """The command's entry point in-process, as its __main__ calls it; the next test runs one
    case as a real command."""
    monkeypatch.setenv("PATH", "")  # no sbatch, whatever this machine has
    with pytest.raises(SystemExit) as exit_info:
        utils.run_command("submit.py", submit.main, argv + ["--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code in (1, 2) and message in err, err
    assert len(err.strip().splitlines()) == 1 and ": error: " in err  # train.py names its own
    assert not (tmp_path / "out").exists()  # nothing submitted, nothing written


def test_a_config_file_is_read_once_at_submission(tmp_path, monkeypatch, capsys):
    """-c FILE through submit.py: its keys may be train.py's or submit.py's; the job gets its
    values as flags, so a requeue runs with them whatever becomes of the file."""
    config = tmp_path / "job.yaml"
    config.write_text(
        "cluster: local\ntasks_per_node: 2\ngpus_per_node: 0\nlr: 2.0e-3\nepochs: 3\n"
    )
    out = tmp_path / "out"
    argv = ["-c", str(config), "--epochs", "4", "--output-dir", str(out), "--run-name", "r"]
    args, train_argv = submit.parse_args(argv)
    assert (args.cluster, args.tasks_per_node, args.gpus_per_node) == ("local", 2, 0)
    assert str(config) not in train_argv and "-c" not in train_argv
    config.write_text("lr: 0.5\n")  # changed after submission
    job = train.parse_args(train_argv)
    assert (job.lr, job.epochs, job.run_name) == (2e-3, 4, "r")  # the command line's --epochs

    monkeypatch.setenv("PATH", "")  # no sbatch: nothing could be submitted anyway
    config.write_text("nodes: 0\n")
    with pytest.raises(SystemExit) as exit_info:
        utils.run_command("submit.py", submit.main, ["-c", str(config), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"submit.py: error: {config}: nodes: 0: must be a whole number")
    assert not out.exists()


def test_a_mistake_is_one_line_as_a_user_runs_the_command(repo_root, tmp_path):
    argv = ["--cluster", "slurm", "--dataset-path", ".", "--output-dir", tmp_path / "out"]
    done = submit_local(repo_root, argv, {"PATH": ""})  # PATH empty: no sbatch
    assert done.returncode == 1 and "sbatch is not on PATH" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gpus", [0, 2])
def test_one_task_per_gpu_of_the_machine_or_the_node(gpus, synthetic_root, tmp_path, monkeypatch):
    """CUDA's rule, simulated: --cluster local gives one task per visible GPU (one task on a CPU
    machine); SLURM's default node has 8 GPUs; each task then takes cuda:LOCAL_RANK (train.py)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    common = [
        "--dataset-path",
        str(synthetic_root),
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    args, train_argv = submit.parse_args(["--cluster", "local", *common])
    assert (args.gpus_per_node, args.tasks_per_node) == (gpus, max(gpus, 1))
    assert "--run-name" in train_argv and "--cluster" not in train_argv  # a requeue finds the run
    args, _ = submit.parse_args(["--cluster", "slurm", *common])
    assert (args.gpus_per_node, args.tasks_per_node) == (8, 8)
