"""The GPU suite: every CUDA-only path run for real. Skipped, with the reason, without a GPU.

    python -m pytest -m cuda -v tests        # on a machine with an NVIDIA GPU, about 3-5 min

It prints the device and torch version first, each test's result, and at the end what it
measured (epoch times, peak memory per model size). docs/PERFORMANCE.md records its runs.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CUDA_FIGURES, assert_resume_is_exact, kill_tree
from inference_utils import ASTRONAUT, make_project_checkpoint

import datasets
import engine
import train
import utils
from losses import EmoNeXtLoss
from models import create_model, load_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason=f"no CUDA GPU visible to torch {torch.__version__}; run `python -m pytest -m cuda "
        "-v tests` on a GPU machine",
    ),
]

# EmoNeXt-Tiny at 224 on 7 x 16 synthetic faces: two steps an epoch, real shapes and kernels.
TINY = ["--model", "emonext_tiny", "--pretrained", "none", "--batch-size", "64",
        "--val-batch-size", "256", "--device", "cuda", "--wandb", "disabled",
        "--no-progress"]  # fmt: skip


def run(argv: list[str]) -> dict:
    return train.main(train.parse_args(argv))


@pytest.fixture(autouse=True)
def free_gpu_memory():
    yield
    torch.cuda.empty_cache()


CONFIGS = {
    "bf16": ["--amp"],
    "fp16-official-quirks": ["--amp", "--official-quirks"],
    "nchw-fp32": ["--no-channels-last"],
    # Whether the compiled path runs on CUDA (train, eval and TenCrop shapes), not its speed:
    # a small model, since compiling Tiny's shapes took over two minutes on an H200.
    "compile": ["--amp", "--compile", "--model", "emonext_micro", "--input-size", "64"],
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_train_end_to_end_then_checkpoints_load_on_the_cpu(config, synthetic_root, tmp_path):
    started = time.perf_counter()
    argv = TINY + CONFIGS[config] + ["--epochs", "1", "--dataset-path", str(synthetic_root),
                                     "--output-dir", str(tmp_path),
                                     "--run-name", config]  # fmt: skip
    results = run(argv)
    seconds = time.perf_counter() - started
    run_dir = tmp_path / config
    assert results["device"] == torch.cuda.get_device_name(0) and results["num_gpus"] == 1
    assert 0.0 <= results["test_accuracy"] <= 100.0
    assert sum(map(sum, results["confusion_matrix"])) == 28  # every test image, TenCrop
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert 0.1 < results["peak_gpu_memory_gb"] < total_gb  # this process's, this run's at least
    epoch = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["nonfinite_steps"] == 0 and epoch["val_accuracy"] >= 0
    ckpt = torch.load(run_dir / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["args"]["channels_last"] is (False if config == "nchw-fp32" else None)  # auto
    if config == "fp16-official-quirks":
        assert ckpt["scaler"]["scale"] > 0  # a GradScaler was made and saved
    else:
        assert ckpt["scaler"] == {}
    assert isinstance(ckpt["rng"][0]["cuda"], torch.Tensor)
    # The checkpoint loads on the CPU and computes what it computes on the GPU.
    model, _ = load_model(str(run_dir / "last.pt"))
    size = model.data_config["image_size"]
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_logits = model.eval()(x)
        gpu_logits = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=1e-3)
    CUDA_FIGURES.append(
        f"train.py {model.model_name} {config}: 1 short epoch + val + TenCrop test, "
        f"{seconds:.1f} s end to end (epoch {epoch['seconds']:.1f} s)"
    )


def test_exact_resume_on_the_gpu(synthetic_root, tmp_path):
    common = TINY + ["--amp", "--deterministic", "--dataset-path", str(synthetic_root),
                     "--output-dir", str(tmp_path)]  # fmt: skip
    assert_resume_is_exact(run, common, tmp_path)


def test_deferred_nonfinite_checks_on_the_gpu():
    """The GPU default: a NaN step skipped by fused AdamW's found_inf, no host sync per step,
    gives the weights and Adam state that the host-checked path gives. With deterministic cuDNN
    kernels, as --deterministic: with autotuned ones the two paths' weights differed on an H200
    (the STN's first convolution, first compared), which kernels that differ from run to run
    alone can do; the repeated host-checked run shows that these no longer do."""
    from test_engine import train_micro

    fused = torch.optim.AdamW([torch.zeros(1, device="cuda")], fused=True)
    assert engine.defers_checks("cuda:0", fused)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        host_weights, host_opt, host = train_micro(False, {1, 3}, device="cuda")
        again, _, _ = train_micro(False, {1, 3}, device="cuda")
        dev_weights, dev_opt, dev = train_micro(True, {1, 3}, device="cuda")
    for k, v in host_weights.items():  # else the comparison below could not tell anything
        assert torch.equal(v, again[k]), f"{k}: two host-checked GPU runs differ"
    assert host["nonfinite"] == dev["nonfinite"] == 2 and host["steps"] == dev["steps"] == 6
    for k, v in host_weights.items():
        assert torch.equal(v, dev_weights[k]), k
    for a, b in zip(host_opt["state"].values(), dev_opt["state"].values(), strict=True):
        assert a["step"] == b["step"] == 4


def test_the_stop_vote_on_the_gpu():
    """utils.StopVote's CUDA branch for real, in a one-process NCCL group: the signal, reduced on
    the GPU and copied to pinned host memory behind an event, is read a step after it came
    (tests/test_devices.py has its CPU twin, which checks that the host never waits at once)."""
    torch.cuda.set_device(0)
    dist = torch.distributed
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        interrupted = type("Interrupted", (), {"signum": 0})()
        vote = utils.StopVote(interrupted, torch.device("cuda", 0))
        assert not vote.after_step()
        _, host, event = vote._pending
        assert host.device.type == "cpu" and host.is_pinned() and event is not None
        interrupted.signum = int(signal.SIGUSR2)
        assert not vote.after_step()  # the vote of the step before the signal
        assert vote.after_step() and vote.signum == signal.SIGUSR2
        assert vote.now() and vote.signum == signal.SIGUSR2  # the blocking vote, on the GPU too
    finally:
        dist.destroy_process_group()


def test_checkpoint_writer_copies_cuda_tensors_before_they_change(tmp_path, monkeypatch):
    """utils.CheckpointWriter: save() queues the copies into pinned host memory behind a busy
    GPU (a 100M-cycle sleep kernel), the caller updates the tensors in place at once, and the
    file holds the values of save time: the writer waited for the copies, and they ran before
    the updates (one stream). The writer serialises pinned CPU tensors; they load as CPU ones."""
    torch.manual_seed(0)
    state = {
        "model": {f"w{i}": torch.randn(256, 1024, device="cuda") for i in range(4)},  # 4 MB
        "conv": torch.randn(64, 32, 3, 3, device="cuda").to(memory_format=torch.channels_last),
        "step": torch.tensor(7.0, device="cuda"),
    }
    tensors = [*state["model"].values(), state["conv"], state["step"]]
    expected = [t.cpu() for t in tensors]
    pinned, real_save = [], torch.save

    def save(obj, f, *args, **kwargs):
        saved = [*obj["model"].values(), obj["conv"], obj["step"]]
        pinned.extend((t.device.type, t.is_pinned()) for t in saved)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    writer = utils.CheckpointWriter()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # the copies wait behind this kernel
    writer.save(state, tmp_path / "last.pt")
    for _ in range(10):
        for t in tensors:
            t.add_(1)
    writer.wait()
    assert pinned == [("cpu", True)] * len(tensors)
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    saved = [*loaded["model"].values(), loaded["conv"], loaded["step"]]
    for got, want in zip(saved, expected, strict=True):
        assert got.device.type == "cpu" and not got.is_pinned()
        assert torch.equal(got, want) and got.stride() == want.stride()
    for t, want in zip(tensors, expected, strict=True):  # the updates did run, after the copy
        for _ in range(10):
            want = want + 1  # the same float32 additions on the CPU
        assert torch.equal(t.cpu(), want)


def torchrun(nproc: int, argv: list[str], repo_root) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "train.py", *argv]  # fmt: skip
    proc = subprocess.Popen(command, cwd=repo_root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # torchrun and its workers
        raise
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_nccl(nproc, synthetic_root, tmp_path, repo_root):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"{nproc} processes need {nproc} GPUs; this machine has 1")
    argv = TINY + ["--amp", "--epochs", "1", "--dataset-path", str(synthetic_root),
                   "--output-dir", str(tmp_path), "--run-name", "ddp"]  # fmt: skip
    out = torchrun(nproc, argv, repo_root)
    assert f"{nproc} process(es)" in out and "device cuda:0" in out
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["world_size"] == nproc and results["num_gpus"] == nproc
    assert len(set(results["weights_checksum_per_rank"])) == 1  # every rank holds one model
    assert sum(map(sum, results["confusion_matrix"])) == 28  # each test image counted once


def test_submitit_local_job_on_the_gpus(synthetic_root, tmp_path, repo_root):
    """scripts/submit.py --cluster local: one task per visible GPU, each on cuda:LOCAL_RANK with
    NCCL, one run folder."""
    gpus = torch.cuda.device_count()
    argv = [sys.executable, str(repo_root / "scripts" / "submit.py"), "--cluster", "local",
            "--wait", *TINY, "--amp", "--epochs", "1", "--dataset-path", str(synthetic_root),
            "--output-dir", str(tmp_path), "--run-name", "job"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "job" / "results.json").read_text())
    assert results["world_size"] == gpus and results["num_gpus"] == gpus
    assert len(set(results["weights_checksum_per_rank"])) == 1


@pytest.mark.parametrize("mode", ["train", "val", "test"])
def test_fast_pipeline_on_the_gpu_gives_the_cpus_pixels(mode, synthetic_root):
    """Same seed, same augmentation: pixels within 1e-4 (of 1) but for rotation-mask edges."""
    config = datasets.DataConfig()
    batches = {}
    for device in ("cpu", "cuda"):
        loader = datasets.build_loader(synthetic_root, "train", mode=mode, batch_size=32,
                                       data_config=config, device=device, seed=3)  # fmt: skip
        loader.set_epoch(1)
        x, y = next(iter(loader))
        assert x.device.type == device
        batches[device] = (x.float().cpu(), y.cpu())
    (x_cpu, y_cpu), (x_gpu, y_gpu) = batches["cpu"], batches["cuda"]
    assert torch.equal(y_cpu, y_gpu)
    diff = (x_gpu - x_cpu).abs()
    far = (diff > 1e-4).float().mean().item()
    CUDA_FIGURES.append(
        f"fast pipeline {mode}: GPU vs CPU max |diff| {diff.max():.1e}, "
        f"{100 * far:.4f} % of pixels beyond 1e-4"
    )
    assert far < 1e-4  # a pixel on the edge of a rotated image's valid area may flip


def test_pil_pipeline_with_workers_and_pinned_memory(synthetic_root):
    config = datasets.DataConfig()
    outputs = []
    for device, workers in (("cpu", 0), ("cuda", 2)):
        loader = datasets.build_loader(synthetic_root, "train", mode="train", pipeline="pil",
                                       batch_size=16, data_config=config, device=device,
                                       num_workers=workers, seed=5)  # fmt: skip
        outputs.append([(x.cpu(), y.cpu()) for x, y in loader])
        assert outputs[-1][0][0].shape == (16, 3, 224, 224)
    for (xa, ya), (xb, yb) in zip(*outputs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_golden_official_logits_on_the_gpu(golden_dir, monkeypatch):
    golden = torch.load(golden_dir / "official_emonext_micro.pt", weights_only=True)
    model = create_model("emonext_micro", drop_path_rate=0.0)
    model.load_state_dict(golden["checkpoint"]["model"], strict=True)
    model.cuda().eval()
    x = golden["x"].cuda()
    # Plain fp32: no TF32 (train.py allows TF32 for speed; its difference is reported below).
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with torch.no_grad():
        logits, weights = model(x, return_attention=True)
        fp32 = (logits.cpu() - golden["logits"]).abs().max().item()
        torch.testing.assert_close(logits.cpu(), golden["logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(weights.cpu(), golden["attention_weights"], atol=1e-5, rtol=0)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tf32 = (model(x).cpu() - golden["logits"]).abs().max().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16_logits = model(x).float().cpu()
    bf16 = (bf16_logits - golden["logits"]).abs().max().item()
    scale = golden["logits"].abs().max().item()
    CUDA_FIGURES.append(
        f"golden official logits on the GPU: fp32 max |diff| {fp32:.1e}, TF32 {tf32:.1e}, "
        f"bf16 autocast {bf16:.1e} (logits up to {scale:.2f})"
    )
    assert bf16 < 0.05 * scale + 0.02  # bf16 keeps 8 bits of mantissa: a few per cent
    assert (bf16_logits.argmax(1) == golden["logits"].argmax(1)).float().mean() >= 0.75


def test_compiled_model_on_the_gpu_computes_what_eager_computes(monkeypatch):
    """--compile's Triton kernels against the eager GPU step, in fp32 without TF32 and with
    deterministic cuDNN kernels: logits, every gradient, BatchNorm statistics (train mode,
    stochastic depth included; the CPU suite checks inductor's C++ kernels in both modes)."""
    import torch._inductor.config
    from test_models import assert_same_step, step_micro

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                    allow_tf32=False):  # fmt: skip
        eager = step_micro("train", device="cuda")
        with torch._inductor.config.patch(fallback_random=True):
            compiled = step_micro("train", compiled=True, device="cuda")
    assert compiled["logits"].device.type == "cuda"
    assert_same_step(compiled, eager, "train")


def test_evaluate_predict_export_on_the_gpu(synthetic_root, tmp_path):
    import evaluate
    import predict
    from scripts import export

    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")

    def evaluate_on(device: str) -> dict:
        args = evaluate.get_args_parser().parse_args(
            [
                "--checkpoint",
                str(checkpoint),
                "--dataset-path",
                str(synthetic_root),
                "--device",
                device,
                "--output",
                str(tmp_path / device),
            ]  # fmt: skip
        )
        return evaluate.main(args)

    gpu, cpu = evaluate_on("cuda"), evaluate_on("cpu")
    assert gpu["num_images"] == cpu["num_images"] == 28
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 100 / 28  # at most one borderline image

    # --no-detect: the face detector (YuNet) runs on the CPU; the model is what runs on the GPU.
    args = predict.get_args_parser().parse_args(
        [
            str(ASTRONAUT),
            "--checkpoint",
            str(checkpoint),
            "--device",
            "cuda",
            "--json",
            "--no-detect",
        ]  # fmt: skip
    )
    records = predict.main(args)
    assert len(records) == 1
    assert abs(sum(records[0]["probabilities"].values()) - 1) < 1e-4
    # ONNX Runtime asked for on cuda: CUDA's provider where onnxruntime-gpu has it, else the CPU's
    argv = [str(ASTRONAUT), "--checkpoint", str(checkpoint), "--device", "cuda", "--json",
            "--no-detect", "--backend", "onnxruntime"]  # fmt: skip
    onnx_records = predict.main(predict.get_args_parser().parse_args(argv))
    assert onnx_records[0]["label"] == records[0]["label"]

    onnx_path = tmp_path / "model.onnx"
    args = export.get_args_parser().parse_args(
        [
            "--checkpoint",
            str(checkpoint),
            "--format",
            "onnx",
            "--output",
            str(onnx_path),
            "--device",
            "cuda",
        ]  # fmt: skip
    )
    diff = export.main(args)  # the export against the GPU model; refused above --tolerance
    assert onnx_path.is_file() and diff <= 1e-4
    CUDA_FIGURES.append(f"ONNX export vs the model on the GPU: max |diff| {diff:.1e}")


PAPER_SIZES = ["tiny", "small", "base", "large", "xlarge"]


def peak_step_memory(size: str, checkpointing: bool) -> float:
    """Peak GPU memory (GiB) of a bf16 training step at batch 64, 224 px, as train.py runs it."""
    torch.cuda.init()  # before it, the allocator has no devices to reset (run alone: -k peak)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = create_model(f"emonext_{size}", verbose=False)
    model.to(memory_format=torch.channels_last).set_grad_checkpointing(checkpointing)
    train.freeze_unused_attention(model)  # as train.build_model does
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    x = torch.rand(64, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (64,), device="cuda")
    for _ in range(2):  # the second step holds the optimiser's state too
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = EmoNeXtLoss()(*model(x, return_attention=True), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, x, y, loss
    return peak


def test_peak_memory_of_every_paper_size():
    rows = []
    for size in PAPER_SIZES:
        plain, checkpointed = peak_step_memory(size, False), peak_step_memory(size, True)
        rows.append(
            f"  emonext_{size:<7} {plain:6.1f} GiB   --grad-checkpointing {checkpointed:6.1f}"
        )
        assert checkpointed < plain, size
    CUDA_FIGURES.append("peak GPU memory, bf16 training step, batch 64, 224 px, AdamW:")
    CUDA_FIGURES.extend(rows)
