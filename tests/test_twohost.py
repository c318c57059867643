"""Two hosts on one machine: two network namespaces joined by a veth pair, one torchrun node in
each (c10d rendezvous on the first's address, gloo over the veth). Marked `twohost`: CI runs it
in the cluster stage (.ci/run). Needs root and iproute2; skipped where it cannot make the
namespaces, failed instead in CI (EMONEXT_CI=1)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.twohost

# emonext_micro at 32 pixels on the 7 x 16 synthetic faces: 7 steps an epoch in 2 processes.
TRAIN = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
         "--batch-size", "8", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
         "--warmup-steps", "4", "--cycle-steps", "64", "--epochs", "2"]  # fmt: skip


def unavailable(reason: str):
    if os.environ.get("EMONEXT_CI"):
        pytest.fail(f"two network namespaces cannot be made here: {reason}")
    pytest.skip(f"two network namespaces cannot be made here: {reason}")


@pytest.fixture
def two_hosts():
    """[(namespace, interface, address)] of the two hosts; both namespaces (and with them the
    veth pair) deleted on every way out."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        unavailable("needs root and iproute2's ip")
    tag = os.getpid() % 100000
    hosts = [(f"emonext{tag}{i}", f"emx{tag}v{i}", f"10.77.0.{i + 1}") for i in range(2)]
    made = []
    try:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            made.append(ns)
        (ns0, if0, _), (ns1, if1, _) = hosts
        commands = [["ip", "link", "add", if0, "type", "veth", "peer", "name", if1]]
        for ns, iface, addr in hosts:
            commands += [["ip", "link", "set", iface, "netns", ns],
                         ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", iface],
                         ["ip", "-n", ns, "link", "set", iface, "up"],
                         ["ip", "-n", ns, "link", "set", "lo", "up"]]  # fmt: skip
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        unavailable(f"{' '.join(err.cmd)}: {(err.stderr or '').strip()}")
    try:
        yield hosts
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def run_all(commands: list[list[str]], cwd, env: dict) -> list[tuple[int, str]]:
    """Start every command (a session each, so that a hang is killed with all its workers),
    then wait for each: [(exit status, stdout + stderr)]."""
    procs = [subprocess.Popen(c, cwd=cwd, env=env, start_new_session=True, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for c in commands]  # fmt: skip
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=600)  # a hang guard only
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return results


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["model"], ckpt["ema"]


def test_two_hosts_train_as_two_processes_on_one(two_hosts, repo_root, synthetic_root, tmp_path):
    """The multi-node rendezvous and the collectives across a network: the same weights, bit for
    bit, as 2 processes on one host."""
    argv = [*TRAIN, "--dataset-path", str(synthetic_root), "--output-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    ((code, out),) = run_all(
        [[*torchrun, "--standalone", "--nproc_per_node=2", "train.py", *argv,
          "--run-name", "one_host"]], repo_root, env)  # fmt: skip
    assert code == 0, out[-3000:]
    first = two_hosts[0][2]
    nodes = [["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={iface}", *torchrun,
              "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"{first}:29400", "--rdzv-id", "emonext", "--local-addr", addr,
              # the first node holds the rendezvous: its address is not this machine's name's
              "--rdzv-conf", f"is_host={int(addr == first)},join_timeout=60",
              "train.py", *argv, "--run-name", "two_hosts"]
             for ns, iface, addr in two_hosts]  # fmt: skip
    for code, out in run_all(nodes, repo_root, env):
        assert code == 0, out[-3000:]
    one, two = tmp_path / "one_host" / "last.pt", tmp_path / "two_hosts" / "last.pt"
    for a, b in zip(weights(one), weights(two), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
