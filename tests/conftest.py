"""Shared test fixtures: the repository root, the official golden outputs, synthetic faces,
a decompression bomb."""

import os
import signal
import struct
import sys
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# EMONEXT_GOLDEN_DIR: where shared/ is not beside the clone (e.g. a copy on a GPU machine)
GOLDEN_DIR = Path(os.environ.get("EMONEXT_GOLDEN_DIR") or REPO_ROOT.parent / "shared" / "golden")
# Figures the GPU suite measures (epoch times, peak memory), printed at the end of the run.
CUDA_FIGURES: list[str] = []
for p in (REPO_ROOT, REPO_ROOT / "scripts"):  # the scripts are imported by their tests
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def pytest_configure(config) -> None:
    """Under pytest-xdist (`-n 2`, as .ci/run and the README run the suite) each worker keeps to
    one core: one intra-op thread, inherited by every command a test starts. Two workers with two
    threads each would share two cores, and PyTorch's threads spin while they wait for a core:
    tiny models then train several times slower than on one thread."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """For -n 2: the tests marked slow first (in their order), so that they run while the short
    ones fill the other worker, instead of one of them finishing the run alone. The cluster
    stage's tests (SLURM daemons, network namespaces, multi-process jobs) run one at a time, in
    a run of their own, never in a worker beside other tests."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        alone = pytest.mark.skip(
            reason="the cluster stage runs alone: python -m pytest -q -m "
            "'slurm or twohost or cluster' tests"
        )
        for item in items:
            if any(item.get_closest_marker(m) for m in ("slurm", "twohost", "cluster")):
                item.add_marker(alone)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Outputs of the official code; beside the clone in CI (where their absence is a failure)."""
    return shared_path(GOLDEN_DIR, "golden outputs of the official code")


def shared_path(path: Path, what: str) -> Path:
    """A file or folder of ../shared: a failure in CI, which runs with shared/ beside the clone,
    and a skip elsewhere."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with shared/ beside the clone")
        pytest.skip(f"{what} not found at {path}")
    return path


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal, for a test that sends
    it. A suite started as a background job (`nohup ... &`) inherits SIGINT ignored, and Python
    then leaves it ignored; the handler found is restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def sigint_default() -> None:
    """subprocess's preexec_fn for a child that a test sends SIGINT: the default disposition, so
    the child's Python turns it into KeyboardInterrupt even when this suite ignores SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic dataset in the FER2013 layout: 7 classes x (train 16, val 4, test 4), 48x48.

    Session-scoped and shared: treat it as read-only (copy it to modify; the loaders' cache
    under <root>/.cache is fine).
    """
    from datasets import make_synthetic

    out = tmp_path_factory.mktemp("data") / "synthetic"
    return make_synthetic(out, seed=0, splits={"train": 16, "val": 4, "test": 4})


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster on this machine (tests/slurm_cluster.py), stopped at the end;
    skipped with the reason where it cannot run, and a failure instead with EMONEXT_CI=1."""
    from slurm_cluster import Cluster, Unavailable

    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as err:
        cluster.stop()
        if os.environ.get("EMONEXT_CI"):
            pytest.fail(f"the SLURM cluster cannot run here: {err}")
        pytest.skip(f"the SLURM cluster cannot run here: {err}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def bomb_png(tmp_path_factory) -> Path:
    """A valid 20000 x 20000 (400-megapixel) 1-bit black PNG of 48 kB: 400 MB once decoded.

    Written chunk by chunk, so no image library's own limits are involved in making it.
    """
    side = 20000
    rows = (b"\0" * (1 + side // 8)) * side  # filter byte 0, then 8 pixels per byte

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png)
    return path


def kill_tree(proc) -> None:
    """SIGKILL a started process and every process under it: a hang guard's way out. torchrun
    starts each worker in a session of its own, so killing torchrun's process group would leave
    the workers running."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile
            continue
    tree, frontier = [proc.pid], [proc.pid]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    """Two checkpoints' model and EMA weights are equal, bit for bit, tensor by tensor."""
    import torch

    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def assert_resume_is_exact(run, common: list[str], out_dir: Path) -> None:
    """train.py (through `run(argv)`): 2 epochs in one go end with the same model and EMA weights,
    bit for bit, as 1 epoch + --resume + 1 (run folders out_dir/straight and out_dir/split)."""
    run(common + ["--epochs", "2", "--run-name", "straight"])
    run(common + ["--epochs", "1", "--run-name", "split"])
    run(common + ["--epochs", "2", "--resume", str(out_dir / "split" / "last.pt")])
    assert_same_weights(out_dir / "straight" / "last.pt", out_dir / "split" / "last.pt")


def pytest_report_header(config) -> list[str]:
    import torch

    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
        gpu += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        gpu = "none (tests marked cuda are skipped)"
    return [f"torch {torch.__version__}; GPU: {gpu}"]


def pytest_terminal_summary(terminalreporter) -> None:
    if CUDA_FIGURES:
        terminalreporter.section("measured on the GPU")
        for line in CUDA_FIGURES:
            terminalreporter.write_line(line)


def error_line(capsys, argv: list, parse=None) -> str:
    """The one line that parsing `argv` (train.py's parser unless `parse`) prints, after checking
    exit status 2 and nothing else: no traceback, no advice to load with weights_only=False."""
    if parse is None:
        import train

        parse = train.parse_args
    with pytest.raises(SystemExit) as exited:
        parse([str(a) for a in argv])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "weights_only=False" not in err
    return err.strip()
