"""scripts/submit.py with submitit's local executor: the same job a SLURM cluster runs, as two
CPU processes (gloo) on this machine; tests/test_slurm.py submits to a real one-node cluster."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import submit
import torch
from conftest import REPO_ROOT, assert_same_weights, kill_tree

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
        # One thread per process, as torchrun sets it: the jobs' weights equal torchrun's, and
        # 2 processes x 2 threads would overcommit a 2-core machine.
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def task0_log(run) -> str:
    """The first task's stdout and stderr, every attempt of the job."""
    return "".join(p.read_text() for p in sorted((run / "submitit").glob("*_0_log.*")))


def logged_epochs(run) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


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


@pytest.mark.cluster  # the cluster CI stage (docs/CLUSTERS.md)
def test_a_two_task_job_writes_one_run(straight):
    out, done = straight
    assert [p.name for p in out.iterdir()] == ["straight"]  # one run folder, not one per task
    run = out / "straight"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 2
    assert len(results["weights_checksum_per_rank"]) == 2
    assert logged_epochs(run) == [0, 1]  # written once, by the first task
    assert len(torch.load(run / "last.pt", weights_only=True)["rng"]) == 2  # both ranks' state
    assert "done: test accuracy" in done.stdout and (run / "submitit").is_dir()
    logs = [p.read_bytes().decode() for p in (run / "submitit").glob("*_log.*")]  # with \r
    assert len(logs) == 4 and "epoch 1:" in "".join(logs)  # 2 tasks' stdout and stderr
    assert not any("\r" in log or "%|" in log for log in logs)  # no progress bar: plain lines


@pytest.mark.cluster  # the cluster CI stage (docs/CLUSTERS.md)
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
    log = task0_log(run)
    assert "requeued: the job resumes from" in log and "resumed from" in log
    assert "epoch 1:" in log.split("resumed from")[1]  # epoch 1 trained again, after the requeue
    assert logged_epochs(run) == [0, 1]
    assert_same_weights(out / "straight" / "last.pt", run / "last.pt")


@pytest.mark.cluster  # the cluster CI stage (docs/CLUSTERS.md)
def test_a_signal_to_one_task_stops_both_and_the_job_requeues(
    straight, repo_root, synthetic_root, teacher
):
    """USR2 to task 1 only (SLURM's signal reaching one node first, or only one): both tasks stop
    after the same step, task 0 requeues the job although it got no signal itself, and the job
    ends with the weights of an uninterrupted one."""
    out, _ = straight
    argv = LOCAL + TRAIN + teacher + ["--dataset-path", synthetic_root, "--output-dir", out]
    done = submit_local(
        repo_root, argv + ["--run-name", "one"], {"EMONEXT_FAULT": "step:9:SIGUSR2@1"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run = out / "one"
    log = task0_log(run)
    assert "requeued: the job resumes from" in log and "resumed from" in log
    assert "interrupted: the job requeues itself and resumes from" in log
    assert "torchrun" not in log  # no command to run: the job goes on by itself
    assert logged_epochs(run) == [0, 1]
    assert_same_weights(out / "straight" / "last.pt", run / "last.pt")


def torchrun(repo_root, argv: list, env: dict | None = None) -> tuple[int, str]:
    """train.py in 2 processes under torchrun (gloo): (its exit status, stdout + stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "train.py", *map(str, argv)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(command, cwd=repo_root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)  # a hang guard only
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # torchrun and its workers
        raise
    return proc.returncode, out


@pytest.mark.cluster  # the cluster CI stage (docs/CLUSTERS.md)
def test_ranks_signalled_a_step_apart_stop_together_under_torchrun(
    straight, repo_root, synthetic_root, teacher
):
    """SIGTERM to rank 1 in epoch 1's 2nd step and to rank 0 a step later (on main, rank 1 left
    while rank 0 was in the next step's collective): both stop after the same step, rank 0 says
    how to go on, and that command continues to the weights of an uninterrupted 2-process run
    (the submitit job's: the same processes, the same flags)."""
    out, _ = straight
    argv = (
        TRAIN + teacher + ["--dataset-path", synthetic_root, "--output-dir", out, "--no-progress"]
    )
    code, log = torchrun(
        repo_root,
        argv + ["--run-name", "apart"],
        {"EMONEXT_FAULT": "step:9:SIGTERM@1,step:10:SIGTERM@0"},
    )
    last = out / "apart" / "last.pt"
    assert f"interrupted: {last} holds epoch 0" in log, log[-3000:]
    assert "Connection closed" not in log and "Traceback" not in log.split("interrupted:")[0]
    assert torch.load(last, weights_only=True)["epoch"] == 0
    code, log = torchrun(repo_root, ["--resume", last])
    assert code == 0, log[-3000:]
    assert_same_weights(out / "straight" / "last.pt", last)


@pytest.mark.cluster  # the cluster CI stage (docs/CLUSTERS.md)
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


def test_the_command_that_goes_on_repeats_every_cluster_flag(tmp_path):
    """What a job's train.py prints after a stop that is not requeued (INT): submit.py with the
    job's cluster flags, every one written out (tests/test_slurm.py runs it for real)."""
    argv = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--slurm", "qos=high",
            "--slurm", "account=vision", "--timeout", "60", "--demo", "--output-dir",
            str(tmp_path), "--run-name", "r"]  # fmt: skip
    args, _ = submit.parse_args(argv)
    args.mem_gb = 160  # as main resolves it for SLURM
    command = shlex.split(submit.resume_with(args))
    assert command[1] == str(REPO_ROOT / "scripts" / "submit.py")
    again = submit.cluster_parser().parse_args(command[2:])
    assert vars(again) == {**vars(submit.cluster_parser().parse_args(argv[:12])),
                           "gpus_per_node": 4, "tasks_per_node": 4, "mem_gb": 160,
                           "job_dir": str(tmp_path / "r" / "submitit")}  # fmt: skip


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


def fake_commands(folder, **scripts: str) -> str:
    """A PATH of one folder holding shell scripts named after the keys (sbatch, sinfo): a
    cluster's answers without a cluster."""
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return str(folder)


def submit_error(argv: list, capsys) -> str:
    """submit.py's one line on stderr, exit status 1 or 2, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        utils.run_command("submit.py", submit.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (1, 2) and len(err.strip().splitlines()) == 1, out + err
    assert "Traceback" not in err and err.startswith("submit.py: error: ")
    return err.strip().removeprefix("submit.py: error: ")


SBATCH_REFUSALS = {  # what SLURM 22.05's sbatch says on stderr, exit status 1
    "partition": "sbatch: error: invalid partition specified: nosuch\\nsbatch: error: Batch job "
    "submission failed: Invalid partition name specified",
    "gpus": "sbatch: error: Batch job submission failed: Invalid generic resource (gres) "
    "specification",
    "memory": "sbatch: error: Memory specification can not be satisfied\\nsbatch: error: Batch "
    "job submission failed: Requested node configuration is not available",
}


@pytest.mark.parametrize("case", SBATCH_REFUSALS)
def test_sbatchs_refusal_is_one_line_with_its_reason(case, tmp_path, monkeypatch, capsys):
    """Without sinfo (no check before submitting), sbatch's own reason, in one line; the job
    folder's files that this submission wrote are gone."""
    bin_dir = fake_commands(
        tmp_path / "bin", sbatch=f"printf '{SBATCH_REFUSALS[case]}\\n' >&2; exit 1", srun="exit 0"
    )
    monkeypatch.setenv("PATH", bin_dir)
    job_dir = tmp_path / "jobs"
    argv = ["--dataset-path", ".", "--output-dir", tmp_path / "out", "--job-dir", job_dir]
    err = submit_error(argv, capsys)
    reason = SBATCH_REFUSALS[case].replace("\\n", "; ").replace("sbatch: error: ", "")
    assert err == f"sbatch refused the job: {reason}"
    assert not job_dir.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus-per-node", "0"], "--cpus-per-task 10 x 1 tasks per node: the nodes of the "
         "default partition have at most 2 CPUs"),
        (["--gpus-per-node", "0", "--cpus-per-task", "1"], "--mem-gb 40: the nodes of the "
         "default partition have at most 1967 MB of memory"),
        (["--cpus-per-task", "1", "--mem-gb", "1"], "--gpus-per-node 8: the nodes of the "
         "default partition have at most 0 GPUs"),
        (["--partition", "nosuch"], "--partition nosuch: no such partition"),
        (["--partition", "gpu", "--cpus-per-task", "4", "--mem-gb", "30", "--nodes", "2"],
         "--nodes 2: 1 node(s) of partition gpu can hold"),
    ],
)  # fmt: skip
def test_a_request_no_node_can_hold_is_refused_before_sbatch(
    argv, message, tmp_path, monkeypatch, capsys
):
    """A job that SLURM accepts and leaves pending forever (the defaults on a small node): one
    line from sinfo's figures, and sbatch is not called."""
    sinfo = "\\n".join(["n1|debug*|2|1967|(null)", "g1|gpu|64|257000|gpu:a100:8(S:0-1)",
                        "g2|gpu|64|16000|gpu:8"])  # fmt: skip
    bin_dir = fake_commands(
        tmp_path / "bin", sinfo=f"printf '{sinfo}\\n'", sbatch=f"touch {tmp_path}/called; exit 1"
    )
    monkeypatch.setenv("PATH", bin_dir)
    err = submit_error(argv + ["--dataset-path", ".", "--output-dir", tmp_path / "out"], capsys)
    assert err.startswith(message), err
    assert not (tmp_path / "called").exists() and not (tmp_path / "out").exists()


def test_a_job_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["--cluster", "local", "--dataset-path", ".", "--output-dir", tmp_path / "out",
            "--job-dir", tmp_path / "file" / "jobs"]  # fmt: skip
    err = submit_error(argv, capsys)
    assert err.startswith(f"--job-dir {tmp_path / 'file' / 'jobs'}: {tmp_path / 'file'} is a file")


@pytest.mark.cluster  # a submitit job (20 s): the cluster CI stage
def test_a_failed_job_says_its_own_error(repo_root, synthetic_root, tmp_path):
    """--wait: the task's error line (from its log), not the path that ends submitit's message."""
    argv = ["--cluster", "local", "--gpus-per-node", "0", "--wait", *TRAIN,
            "--dataset-path", synthetic_root, "--output-dir", tmp_path]  # fmt: skip
    done = submit_local(repo_root, argv, {"EMONEXT_FAULT": "setup:1:NOSUCH"})  # raises in the job
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "(AttributeError: module 'signal' has no attribute 'NOSUCH'); its logs are in" in (
        done.stderr
    )
