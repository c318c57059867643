"""Device, AMP and distributed set-up on simulated GPU machines, on the CPU.

`torch.cuda` is monkeypatched to describe a machine (how many GPUs, bf16 or fp16 only) and to
enforce what the real one enforces: `torch.cuda.set_device` takes only an indexed device or an
integer (a bare "cuda" raises ValueError, which is how `train.py --amp` crashed on its first GPU)
and only an index the machine has. torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) is set
by hand and `init_process_group` records its backend instead of connecting.
"""

import datetime
import errno
import os
import runpy
import signal
import sys

import pytest
import torch
from torch.cuda._utils import _get_device_index

import engine
import train
import utils


class FakeCuda:
    """What train.py asked of the simulated machine."""

    def __init__(self, count: int, bf16: bool):
        self.count, self.bf16 = count, bf16
        self.current: int | None = None
        self.backends: list[str] = []
        self.timeouts: list = []

    def init_process_group(self, backend: str, timeout=None) -> None:
        self.backends.append(backend)
        self.timeouts.append(timeout)

    def set_device(self, device) -> None:
        self.current = self.index(device)

    def index(self, device) -> int:
        index = _get_device_index(device)  # the real rule: raises for a device without index
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def max_memory_allocated(self, device=None) -> int:
        index = self.index(device if device is not None else (self.current or 0))
        return (index + 1) * 2**30  # 1 GiB on GPU 0, 2 GiB on GPU 1, ...


@pytest.fixture
def machine(monkeypatch):
    """machine(gpus, bf16=True, rank=None, world=None): simulate it; returns the FakeCuda."""

    def make(gpus: int, bf16: bool = True, rank: int | None = None, world: int | None = None):
        fake = FakeCuda(gpus, bf16)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", fake.set_device)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Simulated GPU")
        monkeypatch.setattr(train.dist, "init_process_group", fake.init_process_group)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        if world is not None:
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("LOCAL_RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
        return fake

    return make


def setup(argv: list[str]):
    args = train.get_args_parser().parse_args(argv)
    rank, world, device = train.setup_devices(args)
    dtype, scaler = engine.amp_settings(args.amp, device, args.official_quirks)
    return rank, world, device, dtype, scaler


@pytest.mark.parametrize("flag", [[], ["--device", "cuda"], ["--device", "cuda:0"]])
def test_one_gpu_uses_cuda_0(machine, flag):
    fake = machine(1)
    rank, world, device, dtype, scaler = setup(flag + ["--amp"])
    assert (rank, world, device) == (0, 1, torch.device("cuda", 0))
    assert fake.current == 0 and fake.backends == []
    assert dtype == torch.bfloat16 and scaler is None  # bf16 needs no GradScaler


def test_second_gpu_by_index(machine):
    fake = machine(2)
    assert setup(["--device", "cuda:1"])[2] == torch.device("cuda", 1) and fake.current == 1


def test_fp16_only_gpu_gets_a_grad_scaler(machine):
    machine(1, bf16=False)
    _, _, device, dtype, scaler = setup(["--amp"])
    assert device == torch.device("cuda", 0) and dtype == torch.float16
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def test_official_quirks_use_fp16_and_a_scaler_even_with_bf16(machine):
    machine(1, bf16=True)
    _, _, _, dtype, scaler = setup(["--amp", "--official-quirks"])
    assert dtype == torch.float16 and scaler is not None and scaler.is_enabled()


def test_no_amp_no_autocast(machine):
    machine(1)
    assert setup([])[3:] == (None, None)


@pytest.mark.parametrize("rank", [0, 1])
def test_two_gpus_under_torchrun(machine, rank):
    fake = machine(2, rank=rank, world=2)
    for flag in ([], ["--device", "cuda"]):
        r, world, device, dtype, _ = setup(flag + ["--amp"])
        assert (r, world, device) == (rank, 2, torch.device("cuda", rank))
        assert fake.current == rank and dtype == torch.bfloat16
    assert fake.backends == ["nccl", "nccl"]


def test_torchrun_on_cpus_uses_gloo(machine):
    fake = machine(0, rank=1, world=2)
    assert setup([])[:3] == (1, 2, torch.device("cpu"))
    assert fake.backends == ["gloo"] and fake.current is None


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        setup(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device" in err and "Traceback" not in err
    return err


def test_device_errors_are_one_line(machine, capsys):
    machine(0)
    assert "no CUDA GPU" in one_line_error(capsys, ["--device", "cuda"])
    assert "no CUDA GPU" in one_line_error(capsys, ["--device", "cuda:0"])
    machine(1)
    assert "1 GPU(s)" in one_line_error(capsys, ["--device", "cuda:3"])
    assert "expected cpu, cuda or cuda:N" in one_line_error(capsys, ["--device", "gpu"])
    machine(2, rank=0, world=2)
    assert "LOCAL_RANK" in one_line_error(capsys, ["--device", "cuda:1"])
    machine(1, rank=1, world=2)  # torchrun started 2 processes on a 1-GPU machine
    assert "LOCAL_RANK 1" in one_line_error(capsys, [])


def test_cpu_machine_defaults(machine):
    machine(0)
    assert setup(["--amp"])[2:] == (torch.device("cpu"), torch.bfloat16, None)


def test_channels_last_is_the_gpu_default_only():
    parser = train.get_args_parser()
    assert parser.parse_args([]).channels_last is None  # decided by the device in main()
    assert parser.parse_args(["--no-channels-last"]).channels_last is False
    assert parser.parse_args(["--channels-last"]).channels_last is True


@pytest.mark.parametrize(
    "script, argv",
    [
        ("evaluate.py", ["--checkpoint", "missing.pt"]),
        ("predict.py", ["face.png", "--checkpoint", "missing.pt"]),
        ("scripts/export.py", ["--checkpoint", "missing.pt", "--format", "onnx", "--output", "x"]),
        ("scripts/benchmark.py", ["data"]),
        ("scripts/benchmark.py", ["train"]),
    ],
)
def test_every_command_refuses_a_missing_gpu_in_one_line(
    script, argv, repo_root, machine, monkeypatch, capsys
):
    machine(0)
    monkeypatch.setattr(sys, "argv", [script, *argv, "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(repo_root / script), run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "--device cuda: no CUDA GPU" in err, err


def test_checkpoints_keep_this_processs_cuda_rng_state(machine, monkeypatch):
    machine(2)
    saved = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved[device.index])
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device: restored.update({device.index: state})
    )
    state = utils.rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], saved[1])
    utils.set_rng_state(state, torch.device("cuda", 1))
    assert list(restored) == [1] and torch.equal(restored[1], saved[1])
    # on a CPU, or from a checkpoint of the old layout (a list for every GPU), nothing to restore
    restored.clear()
    utils.set_rng_state(state, torch.device("cpu"))
    utils.set_rng_state({**state, "cuda": [saved[0], saved[1]]}, torch.device("cuda", 0))
    assert restored == {} and "cuda" not in utils.rng_state(torch.device("cpu"))


def test_dist_timeout_is_the_process_groups(machine):
    """--dist-timeout: how long a collective waits for a process that stopped answering."""
    fake = machine(0, rank=0, world=2)
    setup(["--dist-timeout", "90"])
    setup([])
    assert fake.timeouts == [datetime.timedelta(seconds=90), None]  # None: torch's own


def test_torchrun_with_one_process_takes_the_nccl_path(machine):
    fake = machine(1, rank=0, world=1)
    assert setup(["--amp"])[:3] == (0, 1, torch.device("cuda", 0))
    assert fake.backends == ["nccl"] and fake.current == 0


class GpuVote:
    """A GPU and NCCL as utils.StopVote meets them, simulated: a reduction queued on the stream
    lands (the other rank's signal included) only once the host synchronises with an event
    recorded after it, so a host that read the flag earlier would read this rank's own value."""

    def __init__(self):
        self.journal: list[str] = []
        self.queued: list[tuple[torch.Tensor, int]] = []  # (flag, the other rank's signal)
        self.other_rank_signal = 0

    def all_reduce(self, flag, op=None, async_op=False):
        assert op == torch.distributed.ReduceOp.MAX and async_op
        self.journal.append("all_reduce")
        self.queued.append((flag, self.other_rank_signal))
        return self  # the work: its wait() makes the stream wait, not the host

    def wait(self):
        self.journal.append("stream waits")

    def Event(self):  # noqa: N802 (torch.cuda.Event)
        return self

    def record(self):
        self.journal.append("record")

    def synchronize(self):
        self.journal.append("host waits")
        for flag, other in self.queued:  # the stream's work so far is done
            flag.fill_(max(int(flag), other))
        self.queued.clear()


def test_the_stop_vote_on_a_gpu_never_waits_for_the_step_it_queued(monkeypatch):
    """StopVote's CUDA branch: after a step the host queues the reduction and its copy behind an
    event and goes on (no wait); a step later it waits for that event, then reads the agreed
    signal. The other rank's USR2 stops this one one step after it came."""
    gpu, full = GpuVote(), torch.full
    monkeypatch.setattr(utils, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", gpu.all_reduce)
    monkeypatch.setattr(torch.cuda, "Event", gpu.Event)
    # the flag lives on the CPU here (no GPU): its copy to the host is the tensor itself
    monkeypatch.setattr(torch, "full", lambda *a, device=None, **k: full(*a, **k))
    interrupted = type("Interrupted", (), {"signum": 0})()
    vote = utils.StopVote(interrupted, torch.device("cuda", 0))
    assert not vote.after_step()
    assert gpu.journal == ["all_reduce", "stream waits", "record"]  # the host did not wait
    gpu.other_rank_signal = int(signal.SIGUSR2)  # the other rank's signal, during step 2
    assert not vote.after_step()  # step 1's vote: nobody was signalled
    assert gpu.journal[3:] == ["host waits", "all_reduce", "stream waits", "record"]
    assert vote.after_step() and vote.signum == signal.SIGUSR2  # step 2's vote, read after 3
    assert gpu.journal[7] == "host waits"


@pytest.mark.parametrize("rank", [0, 1])
def test_peak_memory_is_read_on_each_ranks_own_gpu(machine, rank):
    """results.json's peak_gpu_memory_gb: under torchrun each rank reads its own GPU."""
    machine(2, rank=rank, world=2)
    device = setup(["--amp"])[2]
    assert utils.peak_memory_gb(device) == rank + 1
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        utils.peak_memory_gb(torch.device("cuda", 2))  # the machine has two
    machine(0)
    assert utils.peak_memory_gb(torch.device("cpu")) is None  # nothing asked of CUDA


def test_a_full_disk_in_any_command_is_one_line(tmp_path, capsys):
    """utils.run_command, which every command's __main__ runs: the file, the reason, the room."""

    def main(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "eval.json.tmp"))

    with pytest.raises(SystemExit) as exited:
        utils.run_command("evaluate.py", main, None)
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evaluate.py: error: writing {tmp_path / 'eval.json.tmp'} failed: No ")
    assert err.endswith("MB free on its disk") and len(err.splitlines()) == 1
