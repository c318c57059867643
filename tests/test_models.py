"""The model: shapes, sizes, the official layout and numerical parity with the official code."""

import re
import shutil

import pytest
import timm
import torch
import torch._inductor.config
from timm.models.convnext import checkpoint_filter_fn

import models
from losses import EmoNeXtLoss
from models import WeightsError, create_model, load_checkpoint, load_model

# REFERENCE.md section 1: parameters for 7 classes, in millions.
PAPER_PARAMS = {
    "emonext_tiny": 30.56,
    "emonext_small": 52.20,
    "emonext_base": 91.77,
    "emonext_large": 204.58,
    "emonext_xlarge": 362.31,
    "convnext_tiny": 27.83,
    "convnext_small": 49.46,
    "convnext_base": 87.57,
    "convnext_large": 196.24,
    "convnext_xlarge": 348.16,
}
SMALL_MODELS = [n for n in models.list_models() if n.split("_")[-1] in ("atto", "micro", "femto")]


@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "official_emonext_micro.pt", weights_only=True)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Layer scales of 1e-6 make every block nearly the identity; give them real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PAPER_PARAMS[name]


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_forward_backward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=64)
    x = torch.rand(3, 3, 64, 64)
    logits, weights = model(x, return_attention=True)
    assert logits.shape == (3, 7)
    if name.startswith("emonext"):
        assert weights.shape == (3, 3)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    else:
        assert weights is None
    EmoNeXtLoss()(logits, weights, torch.tensor([0, 1, 2])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # As in the official code the attended output is unused: only `value` gets no gradient.
    assert no_grad == (
        ["attention.value.weight", "attention.value.bias"] if weights is not None else []
    )
    features = model.forward_features(x)
    assert features.shape == (3, model.num_features)
    assert model.stn(x).shape == x.shape


@pytest.mark.parametrize("size", [48, 64, 100, 224])
def test_any_input_size(size):
    model = create_model("emonext_micro", img_size=size).eval()
    assert model(torch.rand(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (6, 6), (6, 9), (7, 7), (12, 12)])
def test_small_map_depthwise_convolution_computes_the_convolution(shape):
    """Maps under 7 x 7 (48-pixel inputs' last stages) take the matrix product instead of the
    convolution: the same outputs and the same gradients for the input, weight and bias."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 5, 7, padding=3, groups=5).double()
    x = torch.randn(3, 5, *shape, dtype=torch.float64, requires_grad=True)
    calls = []
    conv.register_forward_hook(lambda *_: calls.append(1))
    ours = models.emonext.depthwise_conv(conv, x)
    assert len(calls) == (max(shape) >= 7), "the product replaces the convolution below 7"
    theirs = conv._conv_forward(x, conv.weight, conv.bias)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    grad = torch.randn_like(theirs)
    params = (x, conv.weight, conv.bias)
    ours_grads = torch.autograd.grad(ours, params, grad)
    for g_ours, g_theirs in zip(ours_grads, torch.autograd.grad(theirs, params, grad), strict=True):
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-12, rtol=0)


def test_stn_starts_at_identity():
    model = create_model("emonext_atto", img_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model.stn(x), x, atol=1e-5, rtol=0)


def test_ablation_switches_change_the_architecture():
    counts = {}
    for kw in ({}, {"stn": False}, {"se": False}, {"stn": False, "se": False}):
        with torch.device("meta"):
            model = create_model("emonext_tiny", **kw)
        counts[tuple(kw)] = sum(p.numel() for p in model.parameters())
        keys = model.state_dict().keys()
        assert any(k.startswith("localization.") for k in keys) == kw.get("stn", True)
        assert any(re.match(r"downsample_layers\.\d\.2\.", k) for k in keys) == kw.get("se", True)
    stn = 3 * 8 * 49 + 8 + 2 * 8 + 8 * 10 * 25 + 10 + 2 * 10 + (10 * 52 * 52 + 1) * 32 + 33 * 6
    se = 2 * (192 * 12 + 384 * 24 + 768 * 48)
    assert counts[()] - counts[("stn",)] == stn
    assert counts[()] - counts[("se",)] == se
    assert counts[()] - counts[("stn", "se")] == stn + se


def official_layout_keys(depths, dims, num_classes=7):
    """The state-dict keys of the official EmoNeXt, written out from REFERENCE.md section 2."""
    keys = []
    for i in (0, 4):
        keys += [f"localization.{i}.weight", f"localization.{i}.bias"]
    for i in (1, 5):
        keys += [f"localization.{i}.{n}" for n in ("weight", "bias", "running_mean")]
        keys += [f"localization.{i}.{n}" for n in ("running_var", "num_batches_tracked")]
    keys += [f"fc_loc.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")]
    keys += [f"downsample_layers.0.{i}.{n}" for i in (0, 1) for n in ("weight", "bias")]
    for s in (1, 2, 3):
        keys += [f"downsample_layers.{s}.{i}.{n}" for i in (0, 1) for n in ("weight", "bias")]
        keys += [f"downsample_layers.{s}.2.fc.{i}.weight" for i in (0, 2)]
    for s, depth in enumerate(depths):
        for j in range(depth):
            keys.append(f"stages.{s}.{j}.gamma")
            for m in ("dwconv", "norm", "pwconv1", "pwconv2"):
                keys += [f"stages.{s}.{j}.{m}.weight", f"stages.{s}.{j}.{m}.bias"]
    keys += ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    keys += [
        f"attention.{m}.{n}" for m in ("norm", "query", "key", "value") for n in ("weight", "bias")
    ]
    return keys


def test_official_layout_loads_strictly():
    model = create_model("emonext_tiny")
    expected = official_layout_keys((3, 3, 9, 3), (96, 192, 384, 768))
    assert sorted(model.state_dict()) == sorted(expected)
    official = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    result = model.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_golden_parity_with_official_code(golden):
    model = create_model("emonext_micro", **{"drop_path_rate": 0.0})
    model.load_state_dict(golden["checkpoint"]["model"], strict=True)
    model.eval()
    with torch.no_grad():
        logits, weights = model(golden["x"], return_attention=True)
        features = model.forward_features(golden["x"])
    torch.testing.assert_close(logits, golden["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(features, golden["features"], atol=1e-4, rtol=0)
    torch.testing.assert_close(weights, golden["attention_weights"], atol=1e-6, rtol=0)
    assert (logits - golden["logits"]).abs().max() < 1e-5  # measured: 1.2e-7


def test_official_trainer_checkpoint_ema_and_model(golden, tmp_path):
    path = tmp_path / "official.pt"
    torch.save(golden["checkpoint"], path)
    model, ckpt = load_model(path)  # architecture read off the tensors
    assert model.model_name == "emonext_micro" and model.img_size == 224
    assert ckpt["weights_used"] == "ema"
    with torch.no_grad():
        torch.testing.assert_close(model(golden["x"]), golden["ema_logits"], atol=1e-4, rtol=0)
    model, ckpt = load_model(path, weights="model")
    with torch.no_grad():
        torch.testing.assert_close(model(golden["x"]), golden["logits"], atol=1e-4, rtol=0)
    # the EMA and online weights differ, so the test above distinguishes them
    assert (golden["ema_logits"] - golden["logits"]).abs().max() > 1e-3


def test_backbone_equals_timm_convnext():
    torch.manual_seed(0)
    ours = randomise(create_model("convnext_atto", img_size=64)).eval()
    theirs = timm.create_model("convnext_atto", pretrained=False, num_classes=7).eval()
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours.forward_features(x),
            theirs.forward_head(theirs.forward_features(x), True),
            atol=1e-5,
            rtol=0,
        )
    # and back: timm's layout loads into ours
    back = create_model("convnext_atto", img_size=64).eval()
    load_checkpoint(back, theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), atol=1e-5, rtol=0)


def test_emonext_without_stn_and_se_equals_timm_backbone():
    torch.manual_seed(1)
    ours = randomise(create_model("emonext_atto", img_size=64, stn=False, se=False)).eval()
    theirs = timm.create_model("convnext_atto", num_classes=7).eval()
    sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("attention.")}
    theirs.load_state_dict(checkpoint_filter_fn(sd, theirs), strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    model = create_model("emonext_atto", img_size=64)
    with pytest.raises(WeightsError, match="does not fit this model"):
        load_checkpoint(model, create_model("emonext_femto", img_size=64).state_dict())
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(model, bad)
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(model, tmp_path / "missing.pt")


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoints_never_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(WeightsError, match=r"would run Python code \(print\)") as err:
        load_checkpoint(create_model("emonext_atto", img_size=64), path)
    assert "weights_only" not in str(err.value)  # never the advice that would run it
    assert "code ran" not in capsys.readouterr().out


def test_ddp_and_compile_prefixes_are_stripped():
    model = create_model("emonext_atto", img_size=64)
    sd = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    other = create_model("emonext_atto", img_size=64)
    load_checkpoint(other, {"model": sd})
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


def step_micro(
    mode: str,
    channels_last: bool = False,
    checkpointing: bool = False,
    compiled: bool = False,
    device: str = "cpu",
) -> dict:
    """One forward/backward of a seeded emonext_micro with a trained-looking STN (its identity
    initialisation would send no gradient into it) and layer scales (1e-6 would hide the blocks'
    gradients): logits, loss, gradients, buffers."""
    x, y = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(4)
    torch.manual_seed(0)
    model = randomise(create_model("emonext_micro", img_size=32, drop_path_rate=0.5))
    model.fc_loc[2].weight.data.normal_(0, 0.1)
    model.set_grad_checkpointing(checkpointing)
    model.train(mode == "train").to(device)
    x, y = x.to(device), y.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    if not compiled:  # a hook's side effect would split the compiled graph
        model.stages[2][0].register_forward_pre_hook(lambda *_: calls.append(1))
    forward = torch.compile(model) if compiled else model
    torch.manual_seed(1)  # the same stochastic-depth draws
    logits, weights = forward(x, return_attention=True)
    loss = EmoNeXtLoss()(logits, weights, y)
    loss.backward()
    return {
        "logits": logits.detach(),
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "block_calls": len(calls),
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_grad_checkpointing_same_loss_and_gradients(mode):
    """--grad-checkpointing recomputes activations: stochastic depth included, nothing changes."""
    plain, checkpointed = step_micro(mode), step_micro(mode, checkpointing=True)
    assert plain["block_calls"] == 1 and checkpointed["block_calls"] == 2  # recomputed
    assert torch.equal(plain["loss"], checkpointed["loss"]) and len(plain["grads"]) > 50
    assert plain["grads"].keys() == checkpointed["grads"].keys()
    for name, g in plain["grads"].items():
        torch.testing.assert_close(checkpointed["grads"][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_same_outputs_and_gradients(mode):
    """The GPU default (channels-last, STN included) computes what NCHW computes, in fp32."""
    assert_same_step(step_micro(mode, channels_last=True), step_micro(mode), mode)


def assert_same_step(variant: dict, plain: dict, mode: str) -> None:
    """The same logits, gradients and BatchNorm statistics as the plain fp32 step's."""
    torch.testing.assert_close(variant["logits"], plain["logits"], atol=1e-5, rtol=1e-5)
    assert plain["grads"]["localization.0.weight"].abs().max() > 1e-4  # the STN learns
    assert variant["grads"].keys() == plain["grads"].keys() and len(plain["grads"]) > 50
    for name, g in plain["grads"].items():
        if mode == "train" and name in ("localization.0.bias", "localization.4.bias"):
            # Followed by BatchNorm in train mode: their true gradient is 0 and both
            # computations give rounding noise around it.
            assert variant["grads"][name].abs().max() < 1e-5 and g.abs().max() < 1e-5
            continue
        torch.testing.assert_close(variant["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)
    for name, b in plain["buffers"].items():  # BatchNorm running statistics
        torch.testing.assert_close(variant["buffers"][name], b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on the CPU needs a C++ compiler")
def test_compiled_model_same_outputs_and_gradients():
    """--compile's fused kernels (inductor; its C++ backend here, Triton on a GPU) compute what
    the eager model computes: logits, every gradient and the BatchNorm statistics, with the
    same stochastic-depth draws (fallback_random: eager's random numbers inside the graph).
    In train mode only: --compile compiles training batches, and evaluation runs the module
    itself (engine.CompileTrainingBatches). Scalar C++ (no vec_isa): the graphs,
    decompositions and lowerings that a GPU's compile goes through too, compiled in about half
    the time of vectorised code (81 s with an empty inductor cache, one thread, 2 cores).
    inductor's own accuracy-bug injection (cpp.inject_relu_bug_TESTING_ONLY) fails this test."""
    with torch._inductor.config.patch({"fallback_random": True, "cpp.vec_isa_ok": False}):
        compiled = step_micro("train", compiled=True)
    assert_same_step(compiled, step_micro("train"), "train")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stn_warps_in_fp32_under_bf16_autocast(mode):
    """--amp's bf16 leaves the STN's geometry (theta, the sampling grid) in fp32: bf16 would put
    the sampling positions up to ~0.7 pixel off at the edge of a 224 image. With fc_loc's last
    weight zero, theta is its bias whatever the (bf16) localisation features are, so the warp
    and theta's gradient must be fp32's."""
    torch.manual_seed(0)
    model = create_model("emonext_micro", img_size=224).train(mode == "train")
    with torch.no_grad():
        model.fc_loc[2].bias.copy_(torch.tensor([0.9, 0.1, 0.05, -0.1, 0.95, 0.02]))
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))

    def warp_and_theta_grad(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            warped = model.stn(x)
        (warped * target).sum().backward()
        return warped.detach(), model.fc_loc[2].bias.grad.clone()

    fp32_warp, fp32_grad = warp_and_theta_grad(False)
    amp_warp, amp_grad = warp_and_theta_grad(True)
    assert amp_warp.dtype == torch.float32
    assert fp32_grad.abs().min() > 1.0  # theta is learning something
    torch.testing.assert_close(amp_warp, fp32_warp, atol=1e-6, rtol=0)
    torch.testing.assert_close(amp_grad, fp32_grad, atol=1e-3, rtol=1e-5)


def test_timm_knows_every_emonext_size_and_builds_the_same_model():
    """`import models` registers the EmoNeXt sizes with timm (not the plain convnext_*, which
    would replace timm's own); timm.create_model gives models.create_model's model."""
    assert timm.list_models("emonext*") == sorted(f"emonext_{s}" for s in models.SIZES)
    assert "convnext_atto" in timm.list_models("convnext_atto")  # timm's own, still there
    with torch.device("meta"):
        assert not isinstance(timm.create_model("convnext_atto"), models.EmoNeXt)
        assert timm.create_model("emonext_tiny", pretrained=False).num_classes == 7
    for name in ("emonext_atto", "emonext_micro"):
        torch.manual_seed(0)
        theirs = timm.create_model(name, num_classes=7, img_size=64).eval()
        torch.manual_seed(0)
        ours = create_model(name, num_classes=7, img_size=64).eval()
        assert type(ours) is type(theirs) is models.EmoNeXt
        assert list(theirs.state_dict()) == list(ours.state_dict())
        x = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x), atol=0, rtol=0)
        assert theirs.model_name == name and theirs.model_kwargs == ours.model_kwargs
    assert not hasattr(ours, "pretrained_cfg")  # models.create_model's model is as it was


def test_timm_benchmark_script_calls_work():
    """What timm's benchmark.py does with a model name: create_model with its classifier
    options, resolve_data_config for the input, an inference and an SGD training step."""
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2

    model = timm.create_model(
        "emonext_micro", in_chans=3, global_pool="fast", scriptable=False, drop_rate=0.0
    )
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 224, 224) and config["mean"] == (0.0, 0.0, 0.0)
    x = torch.randn((2,) + config["input_size"])
    optimizer = create_optimizer_v2(model.train(), opt="sgd", lr=1e-4)
    torch.nn.CrossEntropyLoss()(model(x), torch.tensor([0, 1])).backward()
    optimizer.step()
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 7)
    with pytest.raises(ValueError, match="no classifier dropout"):
        timm.create_model("emonext_micro", drop_rate=0.5)
