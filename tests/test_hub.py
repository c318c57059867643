"""Hub folders: export, model card, loading back (folder, hf-hub:, timm), every --checkpoint, push.

No network: hf-hub: names are served by a stand-in for huggingface.co's file endpoint on
127.0.0.1, and uploads are refused (a closed port) or stopped at huggingface_hub's upload call.
"""

import hashlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from inference_utils import ASTRONAUT, CLASSES, command_error, make_project_checkpoint

import evaluate
import models
import predict
import train
from models import hub
from utils import CLIError

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the stand-in Hub's one revision


def export(argv: list) -> float:
    from scripts import export as export_script

    return export_script.main(export_script.parse_args([str(a) for a in argv]))


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as train.py leaves it: last.pt and results.json (which scores last.pt)."""
    folder = tmp_path_factory.mktemp("run")
    checkpoint = make_project_checkpoint(folder / "last.pt")
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt.update(step=120, epoch=9, args={"dataset_path": "/data/FER2013", "lr": 0.001})
    ckpt["git_commit"], ckpt["versions"] = "abc1234", {"torch": "2.14.1"}
    torch.save(ckpt, checkpoint)
    results = {
        "test_accuracy": 71.25,
        "test_accuracy_ci95": [69.75, 72.75],
        "macro_f1": 68.5,
        "macro_f1_ci95": [66.0, 70.25],
        "test_accuracy_best_online": 70.0,
        "test_accuracy_best_ema": 70.5,
        "test_accuracy_best_online_ci95": [68.5, 71.5],
        "best_epoch": 7,
        "steps": 120,
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture(scope="module")
def hub_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "emonext-fer"
    export(["--checkpoint", run_dir / "last.pt", "--format", "hub", "--output", out])
    return out


def test_hub_folder_files_config_and_card(hub_dir, run_dir):
    assert sorted(p.name for p in hub_dir.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert not any(p.name.startswith(".") for p in hub_dir.parent.iterdir())  # no temporary left
    config = json.loads((hub_dir / "config.json").read_text())
    assert config["model_name"] == config["architecture"] == "emonext_micro"
    assert config["model_kwargs"] == {"num_classes": 7, "img_size": 64, "drop_path_rate": 0.0}
    assert config["label_names"] == CLASSES and config["weights"] == "ema"
    assert config["data_config"] == {
        "image_size": 64, "resize_size": None, "in_chans": 3, "mean": None, "std": None
    }  # fmt: skip
    assert "resize shorter side to 67 -> centre crop 64" in config["input"]
    assert "0.299 R + 0.587 G + 0.114 B" in config["grey_to_rgb"]
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert (
        config["source"]["checkpoint"] == "last.pt" and config["source"]["git_commit"] == "abc1234"
    )

    card = ModelCard.load(hub_dir / "README.md")  # huggingface_hub parses the YAML front matter
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and data["license"] == "mit"
    assert "facial-expression-recognition" in data["tags"] and data["datasets"] == ["fer2013"]
    assert data["metrics"] == ["accuracy", "f1"]
    scores = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"accuracy": 71.25, "f1": 68.5}
    # results.json's scores of the final EMA weights, with their intervals; the recipe, commit,
    # and how to load it.
    assert (
        "accuracy 71.25 % (95 % CI 69.75-72.75), macro-F1 68.50 (95 % CI 66.00-70.25)" in card.text
    )
    assert "`lr=0.001`" in card.text and "abc1234" in card.text and "epoch 10" in card.text
    assert "load_trained_model(" in card.text and "local-dir:" in card.text


def test_card_scores_only_the_weights_results_json_scored(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    last = {"step": 120, "epoch": 9}
    assert hub.applicable_scores(results, last, "ema")["accuracy_ci95"] == [69.75, 72.75]
    assert hub.applicable_scores(results, last, "model") is None  # last.pt's online: unscored
    best = {"step": 96, "epoch": 7}
    assert hub.applicable_scores(results, best, "model")["accuracy"] == 70.0
    assert hub.applicable_scores(results, best, "model")["accuracy_ci95"] == [68.5, 71.5]
    assert hub.applicable_scores(results, {"step": 50, "epoch": 4}, "ema") is None


def test_folder_loads_back_with_the_checkpoints_logits(hub_dir, run_dir):
    from_pt, ckpt = models.load_model(run_dir / "last.pt")
    from_hub, hub_ckpt = models.load_model(hub_dir)
    assert ckpt["weights_used"] == hub_ckpt["weights_used"] == "ema"
    torch.testing.assert_close(logits(from_hub), logits(from_pt), atol=1e-6, rtol=0)
    model, classes, data_config, _ = models.load_trained_model(hub_dir / "model.safetensors")
    assert classes == CLASSES and data_config["image_size"] == 64
    torch.testing.assert_close(logits(model), logits(from_pt), atol=1e-6, rtol=0)
    # timm reads the same folder once `import models` has registered the EmoNeXt names.
    with_timm = timm.create_model(f"local-dir:{hub_dir}", pretrained=True)
    torch.testing.assert_close(logits(with_timm), logits(from_pt), atol=1e-6, rtol=0)
    with pytest.raises(CLIError, match=r"holds only the ema weights.*--weights auto or ema"):
        models.load_trained_model(hub_dir, weights="model")


def test_every_command_takes_a_hub_folder(hub_dir, run_dir, synthetic_root, tmp_path):
    def predict_run(checkpoint) -> dict:
        argv = [ASTRONAUT, "--checkpoint", checkpoint]
        return predict.main(predict.parse_args([str(a) for a in argv]))[0]["probabilities"]

    expected = predict_run(run_dir / "last.pt")
    assert predict_run(hub_dir) == pytest.approx(expected, abs=1e-6)

    def evaluate_run(checkpoint, out) -> dict:
        argv = ["--checkpoint", checkpoint, "--dataset-path", synthetic_root, "--output", out]
        argv += ["--tta", "none"]
        return evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in argv]))

    a, b = evaluate_run(run_dir / "last.pt", tmp_path / "a"), evaluate_run(hub_dir, tmp_path / "b")
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]

    assert export(["--checkpoint", hub_dir, "--format", "onnx", "--output", tmp_path / "m.onnx"])
    assert (tmp_path / "m.onnx").is_file()

    argv = ["--dataset-path", synthetic_root, "--model-size", "micro", "--input-size", "64"]
    argv += ["--output-dir", tmp_path / "runs", "--checkpoint", hub_dir]
    args = train.parse_args([str(a) for a in argv])
    model, _, _ = train.build_model(args, len(CLASSES), torch.device("cpu"))
    torch.testing.assert_close(logits(model), logits(models.load_model(hub_dir)[0]))
    args = train.parse_args([str(a) for a in argv[:-1]] + ["hf-hub:someone/emonext"])
    assert args.checkpoint == "hf-hub:someone/emonext"  # refused only when it is fetched


def test_export_writes_only_into_new_empty_or_its_own_folders(
    run_dir, hub_dir, tmp_path, capsys, monkeypatch
):
    """`--output myproj` replaced the user's README.md and config.json, and `--output .` in a
    git checkout the project's README.md. A folder holding files the export did not write is
    refused before anything is read, with or without --force; an earlier hub export is replaced
    with --force only. A failed check leaves nothing."""
    from scripts import export as export_script

    never_read = tmp_path / "never-read.pt"  # each refusal comes before the checkpoint is read
    mine = tmp_path / "myproj"
    mine.mkdir()
    (mine / "README.md").write_text("# my project\n")
    (mine / "config.json").write_text('{"lr": 0.1}\n')
    checkout = tmp_path / "checkout"  # a git checkout of a project: `--output .` from inside it
    (checkout / ".git").mkdir(parents=True)
    (checkout / "README.md").write_text("# the project\n")
    earlier = tmp_path / "earlier"
    shutil.copytree(hub_dir, earlier)
    (earlier / "README.md").write_text("the earlier export's card\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.chdir(checkout)
    cases = [
        (mine, [], "holds files that scripts/export.py did not write (e.g. README.md)"),
        (mine, ["--force"], "not even with --force: give a new or empty folder"),
        (".", ["--force"], "--output . holds files that scripts/export.py did not write"),
        (earlier, [], "holds an earlier hub export; pass --force to replace it"),
    ]
    for output, extra, expected in cases:
        argv = ["--checkpoint", never_read, "--format", "hub", "--output", output, *extra]
        status, message = command_error(capsys, Path(export_script.__file__), argv)
        assert status == 2 and message.count("\n") == 1, message
        assert message.startswith("export.py: error: ") and expected in message, message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    export(["--checkpoint", run_dir / "last.pt", "--format", "hub", "--output", earlier, "--force"])
    assert (earlier / "README.md").read_text().startswith("---\n")  # a new model card
    assert sorted(p.name for p in earlier.iterdir()) == sorted(p.name for p in hub_dir.iterdir())
    with pytest.raises(CLIError, match="differs from PyTorch"):
        export(
            ["--checkpoint", run_dir / "last.pt", "--format", "hub", "--output", tmp_path / "new"]
            + ["--tolerance", "-1"]
        )
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))


def test_broken_folders_are_one_line_errors(hub_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CLIError, match="folder without config.json"):
        models.load_trained_model(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hub_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((hub_dir / "model.safetensors").read_bytes()[:999])
    with pytest.raises(CLIError, match="not a readable safetensors file") as err:
        models.load_trained_model(broken)
    assert "\n" not in str(err.value)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CLIError, match="not readable JSON"):
        models.load_trained_model(broken)


def _bad_configs(url: str, pickle: Path) -> list:
    """(change to a good config.json, what its refusal says): each a value that reached model
    building unchecked at a04f099."""

    def kwargs(**values):
        return lambda config: config["model_kwargs"].update(values)

    def data(**values):
        return lambda config: config["data_config"].update(values)

    def top(key, value=None):
        if value is None:
            return lambda config: config.pop(key)
        return lambda config: config.update({key: value})

    def timm_with_pickle(config):
        config.update(model_name="timm:resnet18")
        config["model_kwargs"] = {"num_classes": 7, "checkpoint_path": str(pickle)}

    return [
        (kwargs(pretrained=f"{url}/convnext.pth"), f"model_kwargs.pretrained is '{url}/"),
        (timm_with_pickle, "model_kwargs.checkpoint_path is"),
        (kwargs(colour=True), "model_kwargs.colour is not an argument of emonext_micro; accepted"),
        (top("model_kwargs", [7, 64]), "model_kwargs is [7, 64] (a list); accepted: an object"),
        (kwargs(img_size="64"), "model_kwargs.img_size is '64' (a str); accepted: an integer"),
        (top("data_config"), "data_config is missing; it is required"),
        (data(image_size="48"), "data_config.image_size is '48' (a str); accepted: an integer"),
        (data(image_size=48), "data_config.image_size is 48 (a int); accepted: 64, the model's"),
        (data(mean=[0.5] * 3, std=[0.0] * 3), "data_config.std is [0.0, 0.0, 0.0] (a list)"),
        (top("label_names"), "label_names is missing; it is required"),
        (top("label_names", "Angry"), "label_names is 'Angry' (a str); accepted: a list of 7"),
        (top("label_names", CLASSES[:6] + ["Angry"]), "'Angry' appears twice"),
        (top("label_names", CLASSES[:6]), "accepted: a list of 7 distinct class names"),
        (top("model_name", "timm:hf-hub:someone/model"), "model_name is 'timm:hf-hub:someone/"),
        (top("model_name", "emonext_huge"), "model_name is 'emonext_huge' (a str); accepted:"),
        (top("weights", "all"), 'weights is \'all\' (a str); accepted: "model", "ema" or'),
        (top("url", url), "unknown key 'url'; accepted: model_name, label_names"),
    ]


def test_config_json_is_checked_before_anything_is_built(hub_dir, tmp_path, capsys, repo_root):
    """`model_kwargs.pretrained` set to a URL was downloaded; `timm:resnet18` with a
    `checkpoint_path` read a pickle; a missing data_config, `image_size: "48"`, model_kwargs
    as a list or with unknown keys were tracebacks; missing or duplicate label_names went through
    with FER2013's names or 6 classes. config.json is now checked whole first: one line naming
    the file, the key and what is accepted, and nothing is downloaded or opened."""
    requests = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    pickle = tmp_path / "resnet18.pth"
    pickle.write_bytes(b"never opened")
    try:
        for n, (change, expected) in enumerate(_bad_configs(url, pickle)):
            folder = tmp_path / f"bad{n}"
            folder.mkdir()
            (folder / "model.safetensors").symlink_to(hub_dir / "model.safetensors")
            config = json.loads((hub_dir / "config.json").read_text())
            change(config)
            (folder / "config.json").write_text(json.dumps(config))
            with pytest.raises(CLIError) as err:
                models.load_trained_model(folder)
            message = str(err.value)
            assert message.startswith(f"{folder / 'config.json'}: "), message
            assert expected in message and "\n" not in message, message
        argv = [ASTRONAUT, "--checkpoint", tmp_path / "bad0"]  # through a command: exit 1
        status, message = command_error(capsys, repo_root / "predict.py", argv)
        assert status == 1 and message.count("\n") == 1 and "model_kwargs.pretrained" in message
    finally:
        server.shutdown()
    assert requests == []  # nothing was downloaded


# --------------------------------------------------------------------------- hf-hub: names


class FakeHub(http.server.BaseHTTPRequestHandler):
    """huggingface.co's `/{repo}/resolve/{revision}/{file}`, enough for hf_hub_download."""

    repos: dict = {}  # repo id -> local folder
    requests: list = []

    def log_message(self, *args):
        pass

    def _file(self) -> Path | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve":
            return None
        folder = self.repos.get("/".join(parts[:2]))
        path = folder / parts[4] if folder else None
        return path if path and path.is_file() else None

    def _answer(self, body: bool) -> None:
        self.requests.append((self.command, self.path))
        path = self._file()
        if path is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, hub_dir):
    handler = type(
        "Handler", (FakeHub,), {"repos": {"someone/emonext-fer": hub_dir}, "requests": []}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield handler
    server.shutdown()


def test_hf_hub_names_download_once_and_load_offline(fake_hub, hub_dir, tmp_path, monkeypatch):
    model, ckpt = models.load_model("hf-hub:someone/emonext-fer")
    torch.testing.assert_close(
        logits(model), logits(models.load_model(hub_dir)[0]), atol=1e-6, rtol=0
    )
    assert ckpt["classes"] == CLASSES
    gets = [p for m, p in fake_hub.requests if m == "GET"]
    assert sorted(os.path.basename(p) for p in gets) == ["config.json", "model.safetensors"]
    cached = tmp_path / "hf-cache" / "models--someone--emonext-fer" / "snapshots" / COMMIT
    assert (cached / "model.safetensors").is_file()

    # Offline (HF_HUB_OFFLINE=1): from the cache, without a request.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    fake_hub.requests.clear()
    again, _ = models.load_model("hf-hub:someone/emonext-fer")
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)
    assert fake_hub.requests == []
    with pytest.raises(CLIError, match=r"could not reach the Hugging Face Hub.*not in the cache"):
        models.load_model("hf-hub:someone/other")


def test_evaluate_writes_beside_the_caller_for_hf_hub_names(
    fake_hub, synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", "hf-hub:someone/emonext-fer", "--dataset-path", str(synthetic_root)]
    evaluate.main(evaluate.get_args_parser().parse_args(argv + ["--tta", "none"]))
    assert (tmp_path / "eval.json").is_file()  # not in a folder named "hf-hub:someone"
    assert not (tmp_path / "hf-hub:someone").exists()


def test_hf_hub_errors_are_one_line(fake_hub, capsys, repo_root):
    with pytest.raises(CLIError, match="has no config.json and model.safetensors"):
        models.load_model("hf-hub:someone/missing")
    with pytest.raises(CLIError, match="not a valid Hugging Face model id"):
        models.load_model("hf-hub:not a name")
    status, message = command_error(
        capsys, repo_root / "predict.py", [ASTRONAUT, "--checkpoint", "hf-hub:someone/missing"]
    )
    assert status == 1 and message.count("\n") == 1 and "hf-hub:someone/missing" in message


# --------------------------------------------------------------------------- --push


def test_push_uploads_the_folder(run_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class RepoUrl:
        repo_id = "someone/emonext-fer"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl()

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        assert sorted(os.listdir(kwargs["folder_path"])) == [
            "README.md", "config.json", "model.safetensors"
        ]  # fmt: skip
        return "https://huggingface.co/someone/emonext-fer/commit/1"

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "emonext-fer"
    export(
        ["--checkpoint", run_dir / "last.pt", "--format", "hub", "--output", out]
        + ["--push", "someone/emonext-fer", "--private"]
    )
    assert [c[:2] for c in calls] == [
        ("create_repo", "someone/emonext-fer"), ("upload_folder", "someone/emonext-fer")
    ]  # fmt: skip
    assert calls[0][2]["private"] is True and calls[1][2]["folder_path"] == str(out)
    assert "hf-hub:someone/emonext-fer" in (out / "README.md").read_text()


def test_push_without_token_or_network_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """Each failure is one line whose `hf upload` command works as printed: run through the hf
    command line (its upload calls stopped), it uploads the folder, spaces in its name and all,
    to the repository's root, private when --private was given (it was uploaded public)."""
    import shlex

    import huggingface_hub
    from huggingface_hub.cli import hf

    from scripts import export as export_script

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token there
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    out = tmp_path / "my models" / "emonext-fer"
    argv = ["--checkpoint", run_dir / "last.pt", "--format", "hub", "--output", out]
    argv += ["--push", "someone/emonext-fer", "--private"]
    status, message = command_error(capsys, Path(export_script.__file__), argv)
    assert status == 1 and message.count("\n") == 1, message
    assert "needs a Hugging Face token" in message and "hf auth login" in message
    assert (out / "model.safetensors").is_file()  # written; the message says how to upload later
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # port 9: nothing listens
    status, message = command_error(capsys, Path(export_script.__file__), argv + ["--force"])
    assert status == 1 and message.count("\n") == 1, message
    assert "could not reach the Hugging Face Hub" in message and "hf upload" in message

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, **kwargs: calls.append(kwargs) or type("Url", (), {"repo_id": "x"}),
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "upload_folder", lambda self, **kwargs: calls.append(kwargs) or ""
    )
    printed = message.split("`")[1]
    monkeypatch.setattr("sys.argv", shlex.split(printed))
    with pytest.raises(SystemExit) as exit_info:
        hf.main()
    assert exit_info.value.code in (0, None), printed
    created, uploaded = calls
    assert created["repo_id"] == "someone/emonext-fer" and created["private"] is True
    assert uploaded["folder_path"] == str(out) and uploaded["path_in_repo"] == "."


def test_push_checks_the_repository_id_before_the_export(tmp_path, capsys):
    """A --push id the Hub refuses failed after the export, in huggingface_hub's words; it is
    now one line and exit status 2 before anything is read (the checkpoint does not exist)."""
    from scripts import export as export_script

    for repo_id in ("emonext fer", "someone/emonext/fer", "someone/emonext@main", "emonext-fer"):
        argv = ["--checkpoint", tmp_path / "never-read.pt", "--format", "hub"]
        argv += ["--output", tmp_path / "out", "--push", repo_id]
        status, message = command_error(capsys, Path(export_script.__file__), argv)
        assert status == 2 and message.count("\n") == 1, message
        assert f"--push {repo_id}: not a Hugging Face repository id; give USER/NAME" in message
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_hub_is_one_line_without_its_retry_log(monkeypatch):
    """huggingface_hub logs each failed attempt (a warning per retry when the network is down):
    while it downloads, its warnings are off, so the user sees only the one line saying what to
    do; its level is as it was afterwards."""
    import logging

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    warns = []

    def unreachable(*args, **kwargs):
        warns.append(logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING))
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    level = logging.getLogger("huggingface_hub").level
    with pytest.raises(CLIError, match="could not reach the Hugging Face Hub"):
        models.load_model("hf-hub:someone/emonext-fer")
    assert warns == [False]
    assert logging.getLogger("huggingface_hub").level == level
