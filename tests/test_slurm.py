"""scripts/submit.py on a real one-node SLURM cluster started by the tests (tests/slurm_cluster.py):
sbatch, srun, scancel and submitit's requeue for real. Marked `slurm`: CI runs them as their own
stage (.ci/run; its time in docs/CLUSTERS.md). Skipped where SLURM cannot run, failed in CI."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, assert_same_weights

pytestmark = pytest.mark.slurm

# emonext_micro at 32 pixels on the 7 x 16 synthetic faces: 7 steps an epoch in 2 tasks.
TRAIN = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
         "--batch-size", "8", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
         "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip
# What this node has: a CPU per task, 2 GB, no GPU, 10 minutes.
JOB = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--mem-gb", "2", "--timeout", "10"]


def submit(cluster, argv: list, env: dict | None = None, **popen) -> subprocess.Popen:
    """scripts/submit.py as a user on the cluster's login node runs it."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "submit.py")
    return subprocess.Popen(
        [sys.executable, script, *map(str, argv)],
        env={**cluster.env, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finished(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)  # a hang guard only
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, err


def job_id(proc: subprocess.Popen) -> str:
    """From submit.py's first line: `submitted job N (...)`."""
    line = proc.stdout.readline()
    assert line.startswith("submitted job "), line + proc.stderr.read()
    return line.split()[2]


def wait_until(ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.5)


def epochs(run) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["epoch"] for line in lines]


def test_a_one_task_job_finishes(slurm_cluster, synthetic_root, tmp_path):
    argv = [*JOB, "--wait", *TRAIN, "--epochs", "1", "--dataset-path", synthetic_root,
            "--output-dir", tmp_path, "--run-name", "one"]  # fmt: skip
    out, _ = finished(submit(slurm_cluster, argv))
    assert "done: test accuracy" in out
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["world_size"] == 1 and results["epochs_run"] == 1


@pytest.fixture(scope="module")
def straight(slurm_cluster, synthetic_root, tmp_path_factory):
    """An uninterrupted 2-task job of 3 epochs."""
    out = tmp_path_factory.mktemp("slurm_runs")
    argv = [*JOB, "--tasks-per-node", "2", "--wait", *TRAIN, "--epochs", "3", "--dataset-path",
            synthetic_root, "--output-dir", out, "--run-name", "straight"]  # fmt: skip
    finished(submit(slurm_cluster, argv))
    return out


def test_a_two_task_job_finishes_with_world_size_2(straight):
    results = json.loads((straight / "straight" / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 3
    assert len(set(results["weights_checksum_per_rank"])) == 1
    assert epochs(straight / "straight") == [0, 1, 2]


def test_usr2_requeues_and_ends_with_the_uninterrupted_jobs_weights(
    slurm_cluster, straight, synthetic_root
):
    """`scancel --signal=USR2` (what SLURM sends before the time limit and on preemption) in the
    job's 2nd epoch: both tasks stop, the job requeues itself, resumes from last.pt, and ends
    with the same weights, bit for bit, as the uninterrupted job."""
    argv = [*JOB, "--tasks-per-node", "2", "--wait", *TRAIN, "--epochs", "3", "--dataset-path",
            synthetic_root, "--output-dir", straight, "--run-name", "usr2"]  # fmt: skip
    proc = submit(slurm_cluster, argv)
    job = job_id(proc)
    run = straight / "usr2"
    wait_until(lambda: 0 in epochs(run), "epoch 0 in metrics.jsonl")  # epoch 1 trains now
    slurm_cluster.run(["scancel", "--signal=USR2", job])
    finished(proc)
    assert int(slurm_cluster.job_state(job)["Restarts"]) >= 1
    log = "".join(p.read_text() for p in sorted((run / "submitit").glob(f"{job}_0_log.*")))
    assert "interrupted: the job requeues itself" in log and "resumed from" in log
    assert epochs(run) == [0, 1, 2]
    assert_same_weights(straight / "straight" / "last.pt", run / "last.pt")


def test_an_int_stop_prints_the_submit_command_that_finishes_the_run(
    slurm_cluster, straight, synthetic_root
):
    """`scancel --signal=INT` in the job's 2nd epoch, a stop that does not requeue: both tasks
    stop after the same step and task 0's log names submit.py's command (not torchrun's) that
    goes on. That command, run as printed, ends the run with the uninterrupted job's weights."""
    argv = [*JOB, "--tasks-per-node", "2", *TRAIN, "--epochs", "3", "--dataset-path",
            synthetic_root, "--output-dir", straight, "--run-name", "int"]  # fmt: skip
    proc = submit(slurm_cluster, argv)
    job = job_id(proc)
    finished(proc)  # submitted, not waited for
    run = straight / "int"
    wait_until(lambda: 0 in epochs(run), "epoch 0 in metrics.jsonl")
    slurm_cluster.run(["scancel", "--signal=INT", job])
    wait_until(lambda: slurm_cluster.job_state(job).get("JobState") == "FAILED", "FAILED")
    log = "".join(p.read_text() for p in sorted((run / "submitit").glob(f"{job}_0_log.*")))
    (line,) = [line for line in log.splitlines() if line.startswith("interrupted: ")]
    assert f"{run / 'last.pt'} holds epoch 0, the last finished one; continue with `" in line
    command = shlex.split(line.split("`")[1])
    assert command[1] == str(REPO_ROOT / "scripts" / "submit.py"), line
    assert command[-2:] == ["--resume", str(run / "last.pt")], line
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    again = subprocess.Popen(command, env=env, cwd="/", text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    resumed = job_id(again)
    finished(again)
    wait_until(lambda: slurm_cluster.job_state(resumed).get("JobState") == "COMPLETED",
               "COMPLETED")  # fmt: skip
    assert epochs(run) == [0, 1, 2]
    assert_same_weights(straight / "straight" / "last.pt", run / "last.pt")


def test_plain_scancel_does_not_requeue(slurm_cluster, synthetic_root, tmp_path):
    argv = [*JOB, *TRAIN, "--epochs", "50", "--dataset-path", synthetic_root,
            "--output-dir", tmp_path, "--run-name", "cancelled"]  # fmt: skip
    proc = submit(slurm_cluster, argv)
    job = job_id(proc)
    finished(proc)  # submitted, not waited for
    wait_until(lambda: epochs(tmp_path / "cancelled"), "a first epoch")
    slurm_cluster.run(["scancel", job])
    wait_until(lambda: slurm_cluster.job_state(job).get("JobState") == "CANCELLED", "CANCELLED")
    time.sleep(2)  # a requeue by the job itself would come within its kill wait of 5 s
    state = slurm_cluster.job_state(job)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", state


def test_wait_reports_a_job_that_ended_without_a_result(slurm_cluster, synthetic_root, tmp_path):
    """--wait on a cluster without accounting (this one has none, as many small clusters): a job
    cancelled mid-run writes no result and sacct cannot say it ended, so submitit alone waited
    for ever. submit.py asks scontrol and ends in one line with the job's state."""
    argv = [*JOB, "--wait", *TRAIN, "--epochs", "50", "--dataset-path", synthetic_root,
            "--output-dir", tmp_path, "--run-name", "gone"]  # fmt: skip
    proc = submit(slurm_cluster, argv)
    job = job_id(proc)
    wait_until(lambda: epochs(tmp_path / "gone"), "a first epoch")
    slurm_cluster.run(["scancel", job])
    _, err = proc.communicate(timeout=180)  # 30 s of grace for the result file: a hang fails here
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"submit.py: error: job {job} ended CANCELLED without a result ("), err
    assert f"its logs are in {tmp_path / 'gone' / 'submitit'}" in err


def submit_error(argv: list, cluster, monkeypatch, capsys, path: str | None = None) -> str:
    """submit.py in this process (no second interpreter to start), against the cluster: the
    exit status 1 and the one line it printed."""
    import submit

    import utils

    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    if path is not None:
        monkeypatch.setenv("PATH", path)
    with pytest.raises(SystemExit) as exit_info:
        utils.run_command("submit.py", submit.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1 and out == "" and len(err.splitlines()) == 1, out + err
    return err


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--gpus-per-node", "0", "--partition", "nosuch"], "invalid partition specified: nosuch; "
         "Batch job submission failed: Invalid partition name specified"),
        (["--gpus-per-node", "8"], "Invalid generic resource (gres) specification"),
        (["--gpus-per-node", "0", "--cpus-per-task", "1", "--mem-gb", "TWICE"], "Memory "
         "specification can not be satisfied; Batch job submission failed: Requested node "
         "configuration is not available"),
    ],
)  # fmt: skip
def test_sbatchs_refusals_are_one_line(argv, reason, slurm_cluster, tmp_path, monkeypatch, capsys):
    """sbatch's own reasons, with sinfo hidden (submit.py checks a request against sinfo's
    figures first where it answers: the next test)."""
    from slurm_cluster import node_memory_mb

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):
        (bin_dir / name).symlink_to(shutil.which(name))
    twice = str(2 * node_memory_mb() // 1024 + 1)  # GB
    argv = [twice if a == "TWICE" else a for a in argv]
    out = tmp_path / "out"
    argv += ["--dataset-path", ".", "--output-dir", out]
    err = submit_error(argv, slurm_cluster, monkeypatch, capsys, path=str(bin_dir))
    assert err == f"submit.py: error: sbatch refused the job: {reason}\n"
    assert not out.exists()


def test_a_request_the_node_cannot_hold_is_one_line(slurm_cluster, tmp_path, monkeypatch, capsys):
    """More CPUs than the node has (the default 10 on a small one): sbatch accepts the job and
    leaves it pending forever; sinfo's figures refuse it first."""
    out, cpus = tmp_path / "out", os.cpu_count()
    argv = ["--gpus-per-node", "0", "--cpus-per-task", cpus + 1, "--dataset-path", ".",
            "--output-dir", out]  # fmt: skip
    err = submit_error(argv, slurm_cluster, monkeypatch, capsys)
    assert err == (
        f"submit.py: error: --cpus-per-task {cpus + 1} x 1 tasks per node: the nodes of the "
        f"default partition have at most {cpus} CPUs; ask for less (or another --partition)\n"
    )
    assert not out.exists()
