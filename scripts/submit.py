"""Launch train.py on SLURM with submitit, one task per GPU, requeued on preemption and timeout.

    python scripts/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --timeout 2880 \\
        --model-size base --amp --in_22k --output-dir /shared/emonext
    python scripts/submit.py --cluster local --tasks-per-node 2 --wait --demo --epochs 3

Every train.py flag is accepted and passed on, -c FILE too (its keys may also be this script's
flags; it is read once, at submission, and the job gets its values as flags); the run folder
gets a fixed name at submission (--run-name, default MODEL_DATE-TIME), so that a requeued job
finds it. Each task runs
train.py's main with torch.distributed's environment from submitit (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; NCCL on GPUs, gloo on CPUs). When SLURM signals a
preemption or an approaching time limit (submitit's USR2, `--signal-delay` seconds before the
limit), every task finishes its step and stops; the first task then hands the signal to submitit,
which requeues the same job with the same number of tasks, and every (re)start resumes exactly
from the run's last.pt (docs/CLUSTERS.md). The way ConvNeXt's run_with_submitit.py wraps main.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
import utils  # noqa: E402


def get_args_parser() -> utils.ArgumentParser:
    """train.py's flags and submit.py's own (`cluster_parser`)."""
    return utils.ArgumentParser(
        prog="submit.py",
        description=__doc__,
        parents=[train.get_args_parser(add_help=False), cluster_parser()],
    )


def cluster_parser() -> utils.ArgumentParser:
    """submit.py's own flags: everything else on the command line is train.py's."""
    parser = utils.ArgumentParser(add_help=False)
    g = parser.add_argument_group("cluster (submitit)")
    g.add_argument(
        "--cluster",
        choices=["slurm", "local"],
        default="slurm",
        help="slurm: sbatch through submitit; local: submitit's local executor, the same job "
        "as processes on this machine (to try it; gloo on CPUs)",
    )
    g.add_argument("--nodes", type=int, default=1, help="nodes (local: 1)")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node, 0 for CPUs only (default: 8 on SLURM; local: this machine's)",
    )
    g.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="processes per node (default: one per GPU, 1 without GPUs)",
    )
    g.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (SLURM)")
    g.add_argument("--mem-gb", type=int, default=None, help="memory per node (default 40 per GPU)")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    g.add_argument("--timeout", type=int, default=2880, help="time limit of a job, minutes")
    g.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which SLURM signals the job (USR2): time to "
        "finish a step and write nothing new, since last.pt is already on disk",
    )
    g.add_argument(
        "--max-timeouts",
        type=int,
        default=30,
        help="requeues after reaching the time limit (preemptions are not counted)",
    )
    g.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sbatch parameter, e.g. --slurm account=vision --slurm qos=high "
        "(repeatable; default: none)",
    )
    g.add_argument(
        "--job-dir",
        default=None,
        help="submitit's folder: job pickles and logs, on a filesystem every node sees "
        "(default: OUTPUT_DIR/RUN_NAME/submitit)",
    )
    g.add_argument("--wait", action="store_true", help="wait for the job and print its results")
    return parser


CLUSTER_RULES = {
    "nodes": ("at least 1", lambda v: v >= 1),
    "gpus_per_node": ("at least 0", lambda v: v >= 0),
    "tasks_per_node": ("at least 1", lambda v: v >= 1),
    "cpus_per_task": ("at least 1", lambda v: v >= 1),
    "mem_gb": ("at least 1", lambda v: v >= 1),
    "timeout": ("at least 1 minute", lambda v: v >= 1),
    "signal_delay": ("at least 0", lambda v: v >= 0),
    "max_timeouts": ("at least 0", lambda v: v >= 0),
}


def split_argv(argv: list[str]) -> list[str]:
    """The part of `argv` that is train.py's: what submit.py's own flags leave, in order."""
    return cluster_parser().parse_known_args(argv)[1]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(the cluster flags, train.py's command line with a fixed --run-name), both checked:
    train.py's flags exactly as train.py checks them, before anything is submitted."""
    parser = get_args_parser()
    # -c FILE (train.py's flags and these): written out as flags now, so that the job (each
    # requeue included) runs with the values of submission, whatever becomes of the file.
    argv = parser.expand_config(argv, {**train.ARG_RULES, **CLUSTER_RULES})
    args = parser.parse_checked(argv, CLUSTER_RULES)
    if args.cluster == "local" and args.nodes != 1:
        parser.error(f"--nodes {args.nodes}: the local executor runs on one machine; give 1")
    for item in args.slurm:
        if "=" not in item:
            parser.error(f"--slurm {item}: expected KEY=VALUE, e.g. --slurm account=vision")
    if args.gpus_per_node is None:
        args.gpus_per_node = 8 if args.cluster == "slurm" else torch.cuda.device_count()
    if args.tasks_per_node is None:
        args.tasks_per_node = max(args.gpus_per_node, 1)
    train_argv = split_argv(argv)
    train_args = train.parse_args(train_argv)  # train.py's own checks, one line each
    if train_args.resume:
        run_dir = Path(train_args.resume).parent
    else:  # a fixed name: a requeued job must find its run
        if train_args.run_name is None:
            name = f"{train_args.model.replace(':', '_')}_{time.strftime('%Y%m%d-%H%M%S')}"
            train_argv += ["--run-name", name]
            train_args.run_name = name
        run_dir = Path(train_args.output_dir) / train_args.run_name
    args.job_dir = args.job_dir or str(run_dir / "submitit")
    args.run_dir = str(run_dir)
    return args, train_argv


class Trainer:
    """The job: train.py's main in each task. Every start, the first one and each requeue,
    resumes from the run's last.pt when there is one, so a job stopped anywhere goes on exactly
    from the last finished epoch. submitit calls `checkpoint` on preemption or timeout and
    requeues what it returns: the same job."""

    def __init__(self, train_argv: list[str], run_dir: str, resume_with: str):
        self.train_argv, self.run_dir = train_argv, run_dir
        self.resume_with = resume_with  # train.py prints it after a stop that is not requeued
        self.repo_root = str(Path(__file__).resolve().parents[1])  # where the job finds train.py

    def __call__(self) -> dict | None:
        sys.path.insert(0, self.repo_root)
        import submitit

        import train

        # One task per GPU, each seeing every GPU of its node: train.py takes cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        os.environ[train.RESUME_WITH_ENV] = self.resume_with
        argv = list(self.train_argv)
        last = Path(self.run_dir) / "last.pt"
        if last.is_file() and "--resume" not in argv:
            argv += ["--resume", str(last)]
        preempted = submitit.JobEnvironment._usr_sig()
        # Preemption and the time limit arrive as submitit's signal (USR2): train.py stops
        # after its step, as it does on SIGTERM outside a job. SIGTERM stays with submitit, which
        # ignores it (SLURM sends it with preemptions, before its own signal).
        try:
            args = train.parse_args(argv)
            return train.main(args, (signal.SIGINT, preempted), requeue_signal=preempted)
        except SystemExit as stop:
            handler = signal.getsignal(preempted)  # submitit's, restored by train.main
            if stop.code == 128 + preempted and callable(handler):
                handler(preempted, None)  # task 0: checkpoint, requeue and exit; others: return
            raise

    def checkpoint(self) -> object:
        import submitit

        print(f"requeued: the job resumes from {Path(self.run_dir) / 'last.pt'}", flush=True)
        again = type(self)(self.train_argv, self.run_dir, self.resume_with)
        return submitit.helpers.DelayedSubmission(again)


def resume_with(args: argparse.Namespace) -> str:
    """The submit.py command, without train.py's `--resume LAST`, that submits a job going on
    with this one's run: the same cluster flags, every one written out (defaults resolved), so
    that it works from any folder whatever the defaults become."""
    flags = ["--cluster", args.cluster, "--nodes", args.nodes,
             "--gpus-per-node", args.gpus_per_node, "--tasks-per-node", args.tasks_per_node,
             "--cpus-per-task", args.cpus_per_task, "--timeout", args.timeout,
             "--signal-delay", args.signal_delay, "--max-timeouts", args.max_timeouts,
             "--job-dir", os.path.abspath(args.job_dir)]  # fmt: skip
    if args.mem_gb is not None:
        flags += ["--mem-gb", args.mem_gb]
    if args.partition is not None:
        flags += ["--partition", args.partition]
    for item in args.slurm:
        flags += ["--slurm", item]
    script = str(Path(__file__).resolve())
    return shlex.join([train.python_command(), script, *map(str, flags)])


def make_executor(args: argparse.Namespace):
    """submitit's executor for --cluster, with the job's resources."""
    import submitit

    executor = submitit.AutoExecutor(
        folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=args.max_timeouts
    )
    executor.update_parameters(
        name="emonext",
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        gpus_per_node=args.gpus_per_node,
        timeout_min=args.timeout,
        slurm_signal_delay_s=args.signal_delay,
        slurm_additional_parameters=dict(item.split("=", 1) for item in args.slurm),
    )
    if args.cluster == "slurm":
        executor.update_parameters(
            cpus_per_task=args.cpus_per_task,
            mem_gb=args.mem_gb,
            slurm_partition=args.partition,
        )
    return executor


def sinfo_nodes(partition: str | None) -> list[dict] | None:
    """The nodes of `partition` (the cluster's default when None) as sinfo lists them: name,
    CPUs, memory in MB and GPUs; None where sinfo is missing or does not answer."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G"], capture_output=True,
                             text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = []
    for line in out.splitlines():
        name, part, cpus, mem, gres = line.strip().split("|")
        if part.rstrip("*") == partition or (partition is None and part.endswith("*")):
            gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
            cpus, mem = int(cpus.rstrip("+")), int(mem.rstrip("+"))
            nodes.append({"name": name, "cpus": cpus, "mem_mb": mem, "gpus": gpus})
    return nodes


def check_request(args: argparse.Namespace) -> None:
    """Where sinfo answers: enough nodes of the partition can hold a task's CPUs, the memory and
    the GPUs asked, else one line before submitting (SLURM would keep the job pending forever)."""
    nodes = sinfo_nodes(args.partition)
    if nodes is None:
        return
    where = f"partition {args.partition}" if args.partition else "the default partition"
    if not nodes:
        raise utils.CLIError(
            f"--partition {args.partition}: no such partition (sinfo); give one that `sinfo` lists"
            if args.partition
            else "sinfo lists no default partition; give --partition"
        )
    cpus = args.cpus_per_task * args.tasks_per_node
    asked = [
        ("--gpus-per-node", args.gpus_per_node, "gpus", args.gpus_per_node, "GPUs"),
        ("--cpus-per-task", args.cpus_per_task, "cpus", cpus, "CPUs"),
        ("--mem-gb", args.mem_gb, "mem_mb", args.mem_gb * 1024, "MB of memory"),
    ]
    for flag, value, key, need, unit in asked:
        most = max(node[key] for node in nodes)
        if need > most:
            per = f" x {args.tasks_per_node} tasks per node" if key == "cpus" else ""
            raise utils.CLIError(
                f"{flag} {value}{per}: the nodes of {where} have at most {most} {unit}; ask for "
                "less (or another --partition)"
            )
    fit = [n for n in nodes if n["cpus"] >= cpus and n["mem_mb"] >= args.mem_gb * 1024
           and n["gpus"] >= args.gpus_per_node]  # fmt: skip
    if len(fit) < args.nodes:
        raise utils.CLIError(
            f"--nodes {args.nodes}: {len(fit)} node(s) of {where} can hold what each node is "
            "asked for; ask for fewer nodes or less per node"
        )


def submit_job(executor, trainer: Trainer, job_dir: str):
    """executor.submit, with sbatch's refusal as one line (its own reason) and nothing left behind
    of what this submission wrote: its files in `job_dir`, and the folders it made."""
    from submitit.core.utils import FailedJobError

    folder = Path(job_dir)
    before = set(folder.iterdir()) if folder.is_dir() else set()
    with utils.made_folders_removed_if_empty(folder):
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr too
                return executor.submit(trainer)
        except FailedJobError as err:
            for path in set(folder.glob("*.pkl")) | set(folder.glob(".submission_file_*.sh")):
                if path not in before:
                    path.unlink()
            reasons = [
                line.strip().removeprefix("sbatch: error: ") for line in str(err).splitlines()
            ]
            reason = "; ".join(r for r in reasons if r) or "no reason given"
            raise utils.CLIError(f"sbatch refused the job: {reason}") from None


# scontrol's JobState of a job that will not run again.
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}  # fmt: skip
# How long a job that SLURM says ended may still take to show its result file (a shared
# filesystem's caching), and how often SLURM is asked.
RESULT_GRACE_S, POLL_S = 30, 2


def wait_for(job, cluster: str) -> str | None:
    """Wait for the job's results; None once they are there, else the state of a job that ended
    without them. On SLURM, scontrol is asked, not submitit's sacct: a cluster without accounting
    does not answer sacct (submitit then prints a warning a minute), and a job killed before it
    wrote its result (scancel, out of memory, a lost node) was waited for forever. A job that
    scontrol says ended, or no longer knows (MinJobAge), is reported RESULT_GRACE_S later."""
    if cluster != "slurm":
        job.wait()
        return None
    ended_at = None
    while not results_written(job):
        state = slurm_state(job.job_id)
        if state in ENDED_STATES or state == "unknown to SLURM":
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > RESULT_GRACE_S:
                return state
        else:  # running, pending, requeued, or scontrol not answering now
            ended_at = None
        time.sleep(POLL_S)
    return None


def results_written(job) -> bool:
    """Every task's result file is there (a result or the task's error)."""
    folder = Path(job.paths.folder)
    with contextlib.suppress(OSError):  # as submitit does: a shared filesystem's view refreshed
        folder.chmod(folder.stat().st_mode)
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def slurm_state(job_id: str) -> str | None:
    """scontrol's JobState of a job; "unknown to SLURM" once it forgot it; None when scontrol
    does not answer (the controller restarting)."""
    try:
        done = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return "unknown to SLURM" if "Invalid job id" in done.stderr else None
    match = re.search(r"\bJobState=(\S+)", done.stdout)
    return match.group(1) if match else None


def error_line(job_dir: str, job_id: str) -> str | None:
    """The job's own error: the last line that a task wrote to its stderr log and that is neither
    submitit's nor a traceback's frame (task 0 first)."""
    logs = sorted(Path(job_dir).glob(f"{job_id}_*_log.err"), key=lambda p: p.name.split("_")[1])
    for log in logs:
        try:
            lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            line = re.sub(r"^\[rank\d+\]: ?", "", line)  # torch.distributed's prefix
            if line.strip() and not line.startswith(
                (" ", "\t", "submitit ", "srun: ", "Traceback ")
            ):
                return line.strip()
    return None


def main(argv: list[str] | None = None):
    """Submit; with --wait, wait and return the results of task 0 (train.main's dict)."""
    args, train_argv = parse_args(argv)
    utils.check_output_dir(args.job_dir, "--job-dir")
    if args.cluster == "slurm":
        if shutil.which("sbatch") is None:
            raise utils.CLIError(
                "sbatch is not on PATH: submit from a SLURM login node, or pass --cluster local "
                "to run the job on this machine"
            )
        args.mem_gb = args.mem_gb or 40 * max(args.gpus_per_node, 1)
        check_request(args)
    executor = make_executor(args)
    # The job unpickles Trainer by value: it need not import this script, only train.py.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = Trainer(train_argv, args.run_dir, resume_with(args))
    job = submit_job(executor, trainer, args.job_dir)
    tasks = args.nodes * args.tasks_per_node
    print(f"submitted job {job.job_id} ({tasks} task(s)): run folder {args.run_dir}, logs in "
          f"{args.job_dir}")  # fmt: skip
    if not args.wait:
        return None
    ended = wait_for(job, args.cluster)
    if ended is not None:
        reason = error_line(args.job_dir, job.job_id) or "no error in its logs"
        raise utils.CLIError(
            f"job {job.job_id} ended {ended} without a result ({reason}); its logs are in "
            f"{args.job_dir}"
        )
    try:
        results = job.results()[0]
    except Exception as err:  # submitit's message ends with its log's tail or the logs' paths
        reason = error_line(args.job_dir, job.job_id)
        if reason is None:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise utils.CLIError(
            f"job {job.job_id} failed ({reason}); its logs are in {args.job_dir}"
        ) from None
    print(f"job {job.job_id} done: test accuracy {results['test_accuracy']:.2f} %")
    return results


if __name__ == "__main__":
    utils.run_command("submit.py", main, None)
