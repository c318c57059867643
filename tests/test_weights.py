"""Pretrained weights: official ConvNeXt files, URLs through the hub cache, timm layout, errors."""

import functools
import http.server
import os
import re
import threading

import pytest
import timm
import torch

import datasets
from models import WeightsError, create_model, load_trained_model
from models.weights import (
    OFFICIAL_CLASSES,
    PRETRAINED_URLS,
    load_pretrained,
    read_checkpoint,
    resolve_pretrained,
)
from utils import CLIError


def convnext_checkpoint(name: str, num_classes: int = 1000, seed: int = 0) -> dict:
    """An official-ConvNeXt-style file: {"model": plain ConvNeXt weights with a 1000-class head}."""
    torch.manual_seed(seed)
    return {"model": create_model(name, num_classes=num_classes).state_dict()}


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_official_tiny_loads_with_exactly_stn_se_attention_missing(tmp_path):
    path = tmp_path / "convnext_tiny_22k_224.pth"
    ckpt = convnext_checkpoint("convnext_tiny", num_classes=21841)
    torch.save(ckpt, path)
    model = create_model("emonext_tiny", pretrained=str(path), verbose=False)
    report = model.load_report
    assert set(report.missing) == {"stn", "se", "attention"}
    assert sum(len(v) for v in report.missing.values()) == 30  # REFERENCE.md section 4
    assert len(report.missing["se"]) == 6 and len(report.missing["attention"]) == 8
    assert report.loaded == len(ckpt["model"]) - 2  # all but the 21841-class head
    assert report.discarded == ["head.weight (21841, 768)", "head.bias (21841,)"]
    assert model.head.out_features == 7
    sd = model.state_dict()
    for k, v in ckpt["model"].items():
        if not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    assert "loaded 180 tensors" in str(report)


def test_num_classes_and_in_chans_adapt(tmp_path):
    path = tmp_path / "atto.pth"
    torch.save(convnext_checkpoint("convnext_atto"), path)
    model = create_model(
        "emonext_atto", num_classes=5, in_chans=1, img_size=64, pretrained=str(path)
    )
    assert model.head.out_features == 5
    assert model.downsample_layers[0][0].weight.shape[1] == 1
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 5)


def test_timm_layout_state_dict_loads(tmp_path):
    torch.manual_seed(0)
    timm_model = timm.create_model("convnext_atto", num_classes=1000)
    path = tmp_path / "timm_atto.pth"
    torch.save(timm_model.state_dict(), path)
    model = create_model("emonext_atto", img_size=64, pretrained=str(path), verbose=False)
    assert set(model.load_report.missing) == {"stn", "se", "attention"}
    torch.testing.assert_close(
        model.stages[2][3].dwconv.weight, timm_model.stages[2].blocks[3].conv_dw.weight
    )
    torch.testing.assert_close(
        model.stages[1][0].pwconv1.weight, timm_model.stages[1].blocks[0].mlp.fc1.weight.flatten(1)
    )


def test_wrong_size_is_an_error_naming_the_tensor(tmp_path):
    path = tmp_path / "atto.pth"
    torch.save(convnext_checkpoint("convnext_atto"), path)
    with pytest.raises(WeightsError, match=r"downsample_layers\.0\.0\.weight has shape"):
        create_model("emonext_femto", pretrained=str(path))
    sd = convnext_checkpoint("convnext_atto")["model"]
    del sd["stages.2.5.dwconv.weight"]
    torch.save({"model": sd}, path)
    with pytest.raises(WeightsError, match=r"lacks 1 backbone tensors.*stages\.2\.5\.dwconv"):
        create_model("emonext_atto", pretrained=str(path))


def test_named_weights_resolve_to_the_official_urls():
    assert resolve_pretrained("in1k", "tiny") == (
        "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"
    )
    assert resolve_pretrained("in22k", "xlarge").endswith("/convnext_xlarge_22k_224.pth")
    with pytest.raises(WeightsError, match="no official in1k ConvNeXt weights for size 'xlarge'"):
        resolve_pretrained("in1k", "xlarge")
    with pytest.raises(WeightsError, match="no official in22k"):
        create_model("emonext_atto", pretrained="in22k")
    assert len(PRETRAINED_URLS) == 9


def test_url_download_goes_through_the_hub_cache(http_server, tmp_path, monkeypatch):
    root, base = http_server
    torch.save(convnext_checkpoint("convnext_atto"), root / "convnext_atto_test.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = create_model("emonext_atto", pretrained=f"{base}/convnext_atto_test.pth")
    assert model.load_report.loaded == 126  # 128 tensors less the 1000-class head
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "convnext_atto_test.pth").is_file()


def test_cached_official_file_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    ckpt = convnext_checkpoint("convnext_tiny")
    torch.save(ckpt, cache / "convnext_tiny_1k_224_ema.pth")
    model = create_model("emonext_tiny", pretrained="in1k", verbose=False)
    assert torch.equal(model.norm.weight, ckpt["model"]["norm.weight"])


def test_offline_error_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "http://127.0.0.1:9/convnext_atto_missing.pth"  # port 9 (discard): nothing listens
    with pytest.raises(WeightsError) as err:
        create_model("emonext_atto", pretrained=url)
    message = str(err.value)
    assert url in message
    assert str(tmp_path / "hub" / "checkpoints" / "convnext_atto_missing.pth") in message
    assert re.search("TORCH_HOME", message)


class RunsCode:
    """Pickles as a call of os.mkdir(marker): what a malicious checkpoint would do on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_unsafe_or_broken_checkpoints_are_refused_without_unsafe_advice(tmp_path):
    marker = tmp_path / "code-ran"
    files = {"zip": tmp_path / "evil.pt", "legacy": tmp_path / "evil_legacy.pt"}
    torch.save({"model": RunsCode(marker)}, files["zip"])
    torch.save({"model": RunsCode(marker)}, files["legacy"], _use_new_zipfile_serialization=False)
    files["random"] = tmp_path / "random.pt"
    files["random"].write_bytes(bytes(range(256)) * 16)
    files["truncated"] = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(1000)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:2000])
    for kind, path in files.items():
        for load in (read_checkpoint, load_trained_model):
            with pytest.raises(WeightsError) as err:
                load(str(path))
            message = str(err.value)
            assert str(path) in message and "\n" not in message, message
            # torch's own text advises weights_only=False (runs the code) or allow-listing
            assert not re.search(r"weights.only|safe_globals|allowlist|False", message), message
            if kind in ("zip", "legacy"):
                assert re.search(r"would run Python code \(\w+\.mkdir\)", message), message
    assert not marker.exists()


def test_load_pretrained_reports_unexpected_keys(tmp_path):
    sd = convnext_checkpoint("convnext_atto")["model"]
    sd["extra.thing"] = torch.zeros(1)
    path = tmp_path / "x.pth"
    torch.save(sd, path)
    report = load_pretrained(create_model("emonext_atto"), str(path))
    assert report.unexpected == ["extra.thing"]


def test_official_class_order_is_the_datasets():
    """The official trainer's checkpoints record no classes: their outputs are ImageFolder's
    sorted folder names, which must be the order datasets/ reads FER2013 in."""
    assert list(OFFICIAL_CLASSES) == datasets.CLASSES == sorted(datasets.CLASSES)


def test_weights_errors_are_one_line_command_errors(tmp_path, capsys):
    """A WeightsError is a CLIError: a command prints it as `prog: error: message`, status 1."""
    from utils import run_command

    assert issubclass(WeightsError, CLIError)
    missing = tmp_path / "missing.pt"
    with pytest.raises(CLIError, match="does not exist"):
        load_trained_model(missing)
    with pytest.raises(SystemExit) as exit_info:
        run_command("evaluate.py", load_trained_model, missing)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"evaluate.py: error: checkpoint {missing} does not exist\n"
    path = tmp_path / "atto.pt"
    torch.save({"model": create_model("emonext_atto", img_size=64).state_dict()}, path)
    with pytest.raises(WeightsError, match="unknown model 'emonext_huge'"):
        load_trained_model(path, model_name="emonext_huge")
    model, classes, data_config, ckpt = load_trained_model(path)
    assert classes == list(OFFICIAL_CLASSES) and ckpt["weights_used"] == "model"
    assert model.model_name == "emonext_atto" and data_config["image_size"] == 64


def test_bare_safetensors_state_dict_loads(tmp_path):
    """A .safetensors file of weights alone (timm's and the Hub's format): read without pickle,
    the architecture off its shapes, as for a bare .pt state dict."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("emonext_atto", img_size=64).eval()
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    loaded, classes, _, ckpt = load_trained_model(tmp_path / "weights.safetensors")
    assert loaded.model_name == "emonext_atto" and ckpt["weights_used"] == "bare"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nope}")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "broken.safetensors")


def test_weights_that_cannot_be_right_are_refused_by_every_loader(tmp_path):
    """int64 and bool tensors were cast silently (every probability 0.14), NaN weights gave NaN
    probabilities and a plausible accuracy. Every loader refuses them in one line naming the
    file and the tensor: .pt (this project's, the official trainer's, a bare state dict),
    .safetensors, a hub folder, and pretrained backbones."""
    from safetensors.torch import save_file

    from models import hub

    torch.manual_seed(0)
    model = create_model("emonext_atto", img_size=32, drop_path_rate=0.0).eval()
    good, kwargs = model.state_dict(), model.model_kwargs
    bad = {
        "int64": ("head.weight", good["head.weight"].round().long(), "is int64, where the model"),
        "bool": ("head.bias", good["head.bias"] > 0, "is bool, where the model"),
        "nan": ("norm.weight", torch.full_like(good["norm.weight"], float("nan")), "holds 320 NaN"),
        "inf": ("stages.0.0.gamma", good["stages.0.0.gamma"] / 0, "holds 40 NaN or infinite"),
    }

    def project(path, sd):
        torch.save({"model": sd, "model_name": "emonext_atto", "model_kwargs": kwargs}, path)

    def official(path, sd):
        ema = {f"ema_model.{k}": v for k, v in sd.items()}
        torch.save({"model": sd, "ema": ema, "best_acc": 0.5}, path)

    def hub_folder(path, sd):
        config = hub.hub_config(model, list(OFFICIAL_CLASSES), model.data_config, "model", {})
        hub.publish(hub.write_folder(path, sd, config, "card"), path)

    writers = [  # (file, how it is written, which bad tensor): each loader, each kind of fault
        ("project.pt", project, "int64"),
        ("official.pth", official, "nan"),
        ("bare.pt", lambda path, sd: torch.save(sd, path), "bool"),
        ("bare.safetensors", lambda path, sd: save_file(sd, str(path)), "inf"),
        ("hub", hub_folder, "nan"),
    ]
    for name, write, kind in writers:
        key, value, expected = bad[kind]
        path = tmp_path / name
        write(path, {**good, key: value})
        with pytest.raises(WeightsError) as err:
            load_trained_model(path)
        message = str(err.value)
        assert str(path) in message and f"tensor {key} " in message, message
        assert expected in message and "\n" not in message, message
    backbone = convnext_checkpoint("convnext_atto")
    backbone["model"]["stages.1.0.pwconv1.weight"][0, 0] = float("nan")
    torch.save(backbone, tmp_path / "convnext_atto_nan.pth")
    with pytest.raises(WeightsError, match="tensor stages.1.0.pwconv1.weight holds 1 NaN"):
        create_model("emonext_atto", pretrained=str(tmp_path / "convnext_atto_nan.pth"))
