"""A one-node SLURM cluster on this machine for the tests marked `slurm` (tests/test_slurm.py).

Debian's munge, slurmctld and slurmd (slurm-wlm 22.05), started in the foreground from a config
written into a temporary folder: this machine is the one node, with its CPUs and most of its
memory, and every daemon is stopped by the PID it was started with. Needs root (slurmd runs jobs
as any user) and the packages (.ci/run installs them). Requeues wait for a job's credential to
expire, so it expires after 30 s (`cred_expire`) and the scheduler runs every 10 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scancel", "scontrol")


class Unavailable(RuntimeError):
    """This machine cannot run the cluster: the reason, for a skip (or a failure in CI)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_memory_mb() -> int:
    """RealMemory: 90 % of MemTotal (slurmd drains a node that has less than it is said to)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 9 // 10
    raise Unavailable("no MemTotal in /proc/meminfo")


def config(folder: Path, node: str) -> str:
    return f"""\
ClusterName=emonext
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket,cred_expire=30
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=10
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={node_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """The running cluster: `env` (SLURM_CONF) for the commands, `stop` to end it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> Cluster:
        if os.geteuid() != 0:
            raise Unavailable("SLURM's slurmd must run as root")
        missing = [c for c in DAEMONS + CLIENTS if shutil.which(c) is None]
        if missing:
            raise Unavailable(
                f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd "
                "slurm-client munge)"
            )
        self.folder.chmod(0o755)  # munged: its socket's folder must be searchable by all
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        node = socket.gethostname().split(".")[0]
        self.conf.write_text(config(self.folder, node))
        f = self.folder
        self.spawn(["munged", "--foreground", "--force", f"--socket={f}/munge.socket",
                    f"--key-file={key}", f"--log-file={f}/munged.log",
                    f"--pid-file={f}/munged.pid", f"--seed-file={f}/munged.seed"])  # fmt: skip
        self.wait_for(lambda: (f / "munge.socket").exists(), "munged's socket")
        self.spawn(["slurmctld", "-D", "-f", str(self.conf)])
        self.spawn(["slurmd", "-D", "-f", str(self.conf)])
        self.wait_for(lambda: self.sinfo_state() == "idle", f"node {node} idle in sinfo")
        return self

    def spawn(self, command: list[str]) -> None:
        log = open(self.folder / f"{command[0]}.out", "w")
        # A session of its own: the suite's Ctrl-C or terminal never reaches the daemons.
        self.daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env, start_new_session=True))  # fmt: skip
        log.close()

    def sinfo_state(self) -> str:
        done = self.run(["sinfo", "-h", "-o", "%T"], check=False)
        return done.stdout.strip()

    def wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        logs = "; ".join(
            f"{p.name}: {p.read_text().strip().splitlines()[-1:]}"
            for p in sorted(self.folder.glob("*.out"))
        )
        raise Unavailable(f"no {what} after {timeout:.0f} s ({logs})")

    def run(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check,
                              timeout=60)  # fmt: skip

    def job_state(self, job_id: str) -> dict:
        """scontrol's fields of a job (JobState, Restarts, ...), {} once SLURM forgot it."""
        done = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        fields = [f.split("=", 1) for f in done.stdout.split() if "=" in f]
        return dict(fields) if done.returncode == 0 else {}

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons started here, by their PIDs."""
        if self.daemons and all(p.poll() is None for p in self.daemons):
            self.run(["scancel", "--full", "--user", "root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not self.run(["squeue", "-h"], check=False).stdout.strip():
                    break
                time.sleep(1)
        for proc in reversed(self.daemons):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.daemons = []
