"""Baselines and ablations: ResEmoteNet, the small CNN, timm models, and EmoNeXt without parts."""

import re

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from ema import EMA
from losses import EmoNeXtLoss
from models import TimmModel, WeightsError, create_model, load_checkpoint, load_model

# Small timm models (about 0.2-0.3 M parameters, 160 x 160 input): nothing is downloaded.
BASELINES = ["resemotenet", "simple_cnn", "timm:test_convnext", "timm:test_vit"]
DATA_CONFIG_KEYS = {"image_size", "resize_size", "in_chans", "mean", "std"}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batch(model: torch.nn.Module, n: int = 2) -> torch.Tensor:
    cfg = model.data_config
    return torch.rand(n, cfg["in_chans"], cfg["image_size"], cfg["image_size"])


def checkpoint_of(model: torch.nn.Module, ema: EMA) -> dict:
    """A checkpoint as train.py writes it."""
    return {
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "classes": ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"],
        "data_config": dict(model.data_config),
        "args": {"model": model.model_name, "epochs": 1},
    }


@pytest.mark.parametrize("name", BASELINES)
def test_forward_backward_at_the_models_input_size(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert model.model_name == name and model.num_classes == 7
    assert set(model.data_config) == DATA_CONFIG_KEYS
    x = batch(model, 3)
    logits, weights = model(x, return_attention=True)
    assert logits.shape == (3, 7) and weights is None
    assert torch.equal(model.eval()(x), model(x, return_attention=True)[0])
    model.train()
    EmoNeXtLoss()(model(x), None, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    # create_model(model_name, **model_kwargs) rebuilds the same architecture
    with torch.device("meta"):
        again = create_model(model.model_name, **model.model_kwargs)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_data_configs():
    assert create_model("resemotenet").data_config == {
        "image_size": 64,  # ResEmoteNet's transforms: Resize((64, 64)), Grayscale(3), ImageNet
        "resize_size": 64,
        "in_chans": 3,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    cnn = create_model("simple_cnn").data_config
    assert (cnn["image_size"], cnn["in_chans"], cnn["mean"], cnn["std"]) == (48, 1, (0.5,), (0.5,))
    assert create_model("emonext_micro").data_config == {
        "image_size": 224,
        "resize_size": None,
        "in_chans": 3,
        "mean": None,
        "std": None,
    }
    # timm's: input size and mean/std of the pretrained config, or the img_size asked for
    vit = create_model("timm:test_vit").data_config
    assert (vit["image_size"], vit["in_chans"], vit["mean"]) == (160, 3, (0.5, 0.5, 0.5))
    assert create_model("timm:test_vit", img_size=64).data_config["image_size"] == 64
    assert create_model("simple_cnn", img_size=64).data_config["image_size"] == 64


@pytest.mark.parametrize("name", ["resemotenet", "simple_cnn", "timm:test_convnext"])
def test_two_steps_with_adamw_loss_and_ema(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    criterion = EmoNeXtLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(model, update_every=1, update_after_step=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        logits, weights = model(batch(model), return_attention=True)
        loss = criterion(logits, weights, torch.tensor([3, 5]))
        assert criterion.parts["sa"] == 0 and torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update()
    assert ema.step == 2
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    ema_sd = ema.ema_model.state_dict()
    assert any(not torch.equal(ema_sd[k], before[k]) for k in changed)


def test_resemotenet_parameter_count():
    """80,238,599 for 7 classes, worked out layer by layer from their code."""

    def conv(i, o, k):
        return i * o * k * k + o  # their convolutions keep PyTorch's default bias

    def bn(c):
        return 2 * c

    def res(i, o):
        return conv(i, o, 3) + bn(o) + conv(o, o, 3) + bn(o) + conv(i, o, 1) + bn(o)

    stem = conv(3, 64, 3) + bn(64) + conv(64, 128, 3) + bn(128) + conv(128, 256, 3) + bn(256)
    se = 2 * 256 * (256 // 16)
    blocks = res(256, 512) + res(512, 1024) + res(1024, 2048)
    mlp = (2048 + 1) * 1024 + (1024 + 1) * 512 + (512 + 1) * 256 + (256 + 1) * 7
    with torch.device("meta"):
        model = create_model("resemotenet")
    assert num_params(model) == stem + se + blocks + mlp == 80_238_599


# EmoNeXt-Tiny with 7 classes (REFERENCE.md section 1: 30.56 M) and its ablations.
EMONEXT_TINY = 30_564_331
# STN (REFERENCE.md section 2): Conv2d(3, 8, 7), BN(8), Conv2d(8, 10, 5), BN(10),
# Linear(10 * 52 * 52, 32), Linear(32, 6).
STN = (3 * 8 * 49 + 8) + 2 * 8 + (8 * 10 * 25 + 10) + 2 * 10 + (10 * 52 * 52 + 1) * 32 + 33 * 6
# SE in downsampling layers 1-3: two bias-free Linear(C, C / 16) / Linear(C / 16, C) each.
SE = sum(2 * c * (c // 16) for c in (192, 384, 768))


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({}, EMONEXT_TINY),
        ({"stn": False}, EMONEXT_TINY - STN),  # --no-stn
        ({"se": False}, EMONEXT_TINY - SE),  # --no-se
        ({"stn": False, "se": False}, EMONEXT_TINY - STN - SE),  # --no-stn --no-se
    ],
)
def test_ablation_parameter_counts(flags, expected):
    with torch.device("meta"):
        model = create_model("emonext_tiny", **flags)
    assert num_params(model) == expected
    assert (STN, SE) == (868_740, 96_768)
    # --sa-weight 0 changes the loss only: the attention module stays (its weights unused)
    assert any(k.startswith("attention.") for k in model.state_dict())


@pytest.mark.parametrize("name", ["resemotenet", "simple_cnn", "timm:test_convnext"])
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name).eval()
    ema = EMA(model)
    ema.update()
    with torch.no_grad():  # make the EMA weights differ from the online ones
        for p in ema.ema_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "last.pt"
    torch.save(checkpoint_of(model, ema), path)
    x = batch(model)
    rebuilt, ckpt = load_model(path)
    assert type(rebuilt) is type(model) and rebuilt.model_name == name
    assert rebuilt.data_config == ckpt["data_config"] == model.data_config
    assert ckpt["weights_used"] == "ema"
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ema.ema_model(x))
        if name != "resemotenet":  # 80 M parameters: load it once only
            rebuilt, _ = load_model(path, weights="model")
            torch.testing.assert_close(rebuilt(x), model(x))


def test_timm_checkpoint_keys_are_not_converted_to_the_convnext_layout():
    """timm ConvNeXt keys (`stem.*`, `stages.N.blocks.*`) must stay timm's in a `timm:` model."""
    model = create_model("timm:test_convnext")
    assert any(".blocks." in k for k in model.state_dict())
    other = create_model("timm:test_convnext")
    load_checkpoint(other, {"model": model.state_dict()})
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    # a plain timm state dict (no `model.` prefix) loads too
    plain = timm.create_model("test_convnext", num_classes=7)
    load_checkpoint(other, plain.state_dict())
    torch.testing.assert_close(other.model.stem[0].weight, plain.stem[0].weight)
    assert isinstance(other, TimmModel)


def bare_emonext_checkpoint(**flags) -> dict:
    return create_model("emonext_micro", img_size=64, **flags).state_dict()


@pytest.mark.parametrize(
    "flags", [{"stn": False}, {"se": False}, {"stn": False, "se": False}, {"attention": False}]
)
def test_ablated_checkpoints_rebuild_without_flags(flags, tmp_path):
    torch.manual_seed(0)
    model = create_model("emonext_micro", img_size=64, **flags).eval()
    ema = EMA(model)
    ema.update()
    x = torch.rand(2, 3, 64, 64)
    for i, ckpt in enumerate([checkpoint_of(model, ema), bare_emonext_checkpoint(**flags)]):
        path = tmp_path / f"{i}.pt"
        torch.save(ckpt, path)
        rebuilt, _ = load_model(path)  # project checkpoint, then a bare state dict
        assert rebuilt.has_stn == flags.get("stn", True)
        assert rebuilt.has_se == flags.get("se", True)
        assert rebuilt.has_attention == flags.get("attention", True)
        assert sorted(rebuilt.state_dict()) == sorted(model.state_dict())
        assert num_params(rebuilt) == num_params(model)
    rebuilt, _ = load_model(tmp_path / "0.pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_bare_resemotenet_state_dict_needs_its_name(tmp_path):
    torch.manual_seed(0)
    model = create_model("simple_cnn").eval()
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError, match="not an EmoNeXt/ConvNeXt"):
        load_model(path)
    rebuilt, _ = load_model(path, model_name="simple_cnn")
    x = batch(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_from_a_local_file(suffix, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_convnext", num_classes=1000)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = create_model("timm:test_convnext", pretrained=str(path), verbose=False)
    report = model.load_report
    assert sorted(report.discarded) == ["head.fc.bias (1000,)", "head.fc.weight (1000, 64)"]
    assert report.loaded == len(source.state_dict()) - 2
    assert model.model.head.fc.out_features == 7
    torch.testing.assert_close(model.model.stages[1].blocks[0].conv_dw.weight,
                               source.stages[1].blocks[0].conv_dw.weight)  # fmt: skip
    with pytest.raises(WeightsError, match="lacks .* tensors of this timm model"):
        create_model("timm:test_vit", pretrained=str(path))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: huggingface_hub reads HF_HUB_OFFLINE at import, so set its constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_timm_pretrained_offline_is_a_clear_error(offline):
    with pytest.raises(WeightsError) as err:
        create_model("timm:test_convnext", pretrained="timm")
    message = str(err.value)
    assert "timm/test_convnext.r160_in1k" in message  # what to fetch
    assert "HF_HUB_OFFLINE" in message and "local path" in message  # and how to use it


def test_named_weights_pick_a_timm_tag(offline):
    with pytest.raises(WeightsError, match=re.escape("convnext_tiny.fb_in22k ")):
        create_model("timm:convnext_tiny", pretrained="in22k")
    with pytest.raises(WeightsError, match="no in22k weights for test_vit"):
        create_model("timm:test_vit", pretrained="in22k")


def test_baselines_from_scratch_have_no_named_weights():
    with pytest.raises(WeightsError, match="resemotenet has no in22k pretrained weights"):
        create_model("resemotenet", pretrained="in22k")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resemotenet_tiny")


def test_recorded_arguments_are_used_when_the_name_is_given(tmp_path):
    model = create_model("simple_cnn", img_size=40)
    path = tmp_path / "best.pt"
    torch.save(checkpoint_of(model, EMA(model)), path)
    rebuilt, _ = load_model(path, model_name="simple_cnn", weights="model")
    assert rebuilt.data_config["image_size"] == 40 and rebuilt.model_kwargs["img_size"] == 40


def test_the_picked_timm_tag_is_recorded(monkeypatch):
    """in22k picks the 22k weights' tag; the model name records it (no download: stubbed)."""
    create = timm.create_model
    monkeypatch.setattr(
        timm, "create_model", lambda name, **kw: create(name, **kw | {"pretrained": 0})
    )
    model = create_model("timm:convnext_atto", pretrained="in1k", verbose=False)
    assert model.model_name == "timm:convnext_atto.d2_in1k"
    assert model.model_kwargs == {"num_classes": 7}
    assert create_model("timm:test_vit").model_name == "timm:test_vit"
