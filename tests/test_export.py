"""scripts/export.py: ONNX and TorchScript exports agree with PyTorch and carry their metadata."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from inference_utils import (
    ASTRONAUT,
    CLASSES,
    command_error,
    make_official_checkpoint,
    make_project_checkpoint,
)

import predict
from models import load_trained_model
from utils import CLIError


def export(argv: list) -> float:
    from scripts import export as export_script

    args = export_script.get_args_parser().parse_args([str(a) for a in argv])
    return export_script.main(args)


def real_and_random(data_config: dict) -> torch.Tensor:
    rgb = predict.read_image(str(ASTRONAUT))
    ((crop, _, _),) = predict.crop_faces(rgb, predict.YuNetDetector()(rgb), 1.15)
    face = predict.face_tensor([crop], data_config)
    size = data_config["image_size"]
    return torch.cat([face, torch.rand(3, 3, size, size, generator=torch.Generator())])


def test_onnx_matches_pytorch_and_runs_in_predict(tmp_path):
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    path = tmp_path / "model.onnx"
    assert export(["--checkpoint", checkpoint, "--format", "onnx", "--output", path]) <= 1e-4

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    assert meta["image_size"] == "64" and meta["mean"] == "none" and meta["std"] == "none"
    assert "no normalisation" in meta["input"] and meta["weights"] == "ema"

    model, _, data_config, _ = load_trained_model(str(checkpoint))
    x = real_and_random(data_config)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch_logits = model(x).numpy()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4

    from_onnx = predict.main(
        predict.get_args_parser().parse_args([str(ASTRONAUT), "--checkpoint", str(path)])
    )
    from_torch = predict.main(
        predict.get_args_parser().parse_args([str(ASTRONAUT), "--checkpoint", str(checkpoint)])
    )
    assert len(from_onnx) == 1 and from_onnx[0]["box"] == from_torch[0]["box"]
    for c in CLASSES:
        assert from_onnx[0]["probabilities"][c] == pytest.approx(
            from_torch[0]["probabilities"][c], abs=1e-5
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_of_official_checkpoint(golden_dir, tmp_path):
    checkpoint = make_official_checkpoint(golden_dir, tmp_path / "official.pt")
    path = tmp_path / "model.ts"
    export(["--checkpoint", checkpoint, "--format", "torchscript", "--output", path])
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert json.loads(meta["classes"]) == CLASSES and meta["model_name"] == "emonext_micro"
    model, _, data_config, _ = load_trained_model(str(checkpoint))
    x = real_and_random(data_config)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-4


def test_failed_check_leaves_no_file(tmp_path, repo_root, capsys):
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    path = tmp_path / "model.ts"
    with pytest.raises(CLIError, match="differs from PyTorch"):
        export(
            ["--checkpoint", checkpoint, "--format", "torchscript", "--output", path]
            + ["--tolerance", "-1"]
        )
    assert list(tmp_path.iterdir()) == [checkpoint]
    argv = ["--checkpoint", ASTRONAUT, "--format", "onnx", "--output", path]
    status, message = command_error(capsys, repo_root / "scripts" / "export.py", argv)
    assert status == 1 and message.count("\n") == 1
    assert (
        message.startswith("export.py: error: ") and "not a readable PyTorch checkpoint" in message
    )
    assert list(tmp_path.iterdir()) == [checkpoint]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_an_existing_file_is_replaced_only_when_it_is_an_earlier_export(
    tmp_path, capsys, repo_root, monkeypatch
):
    """`--format onnx|torchscript --output FILE` overwrote whatever FILE was. A file this script
    did not write is refused in one line, with or without --force; an earlier export is replaced
    with --force only, through a temporary file, so a failure midway leaves it as it was."""
    import onnx.helper as oh

    from scripts import export as export_script

    script = repo_root / "scripts" / "export.py"
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    notes = tmp_path / "notes.onnx"
    notes.write_text("a user's notes")
    graph = oh.make_graph([oh.make_node("Identity", ["x"], ["y"])], "g", [], [])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(oh.make_model(graph), str(foreign))  # an ONNX model without our metadata
    for path in (notes, foreign, tmp_path / "checkpoint.pt"):
        for force in ([], ["--force"]):
            argv = ["--checkpoint", checkpoint, "--format", "onnx", "--output", path] + force
            status, message = command_error(capsys, script, argv)
            assert status == 2 and message.count("\n") == 1, message
            assert f"--output {path} exists and is not a file scripts/export.py wrote" in message
    assert notes.read_text() == "a user's notes"

    path = tmp_path / "model.ts"
    argv = ["--checkpoint", checkpoint, "--format", "torchscript", "--output", path]
    export(argv)
    assert export_script.is_file_export(path) and not export_script.is_file_export(foreign)
    status, message = command_error(capsys, script, argv)
    assert status == 2 and message.count("\n") == 1, message
    assert f"--output {path} holds an earlier export; pass --force to replace it" in message
    before, listing = path.read_bytes(), sorted(tmp_path.iterdir())

    def fails_midway(*args, **kwargs):
        raise RuntimeError("the check failed midway")

    with monkeypatch.context() as patch:
        patch.setattr(export_script, "max_difference", fails_midway)
        with pytest.raises(RuntimeError, match="midway"):
            export(argv + ["--force"])
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == listing
    export(argv + ["--force"])
    assert export_script.is_file_export(path) and sorted(tmp_path.iterdir()) == listing


def test_real_input_is_yunets_face_on_any_opencv(monkeypatch):
    """The check's real input is the face predict.py would crop, with or without Haar cascades
    (OpenCV 5 has none); an OpenCV that cannot run YuNet checks on the whole photo instead."""
    import cv2

    from scripts import export as export_script

    data_config = {"image_size": 32, "in_chans": 3, "mean": None, "std": None}
    face = export_script.real_input(data_config)
    rgb = predict.read_image(str(ASTRONAUT))
    ((crop, _, _),) = predict.crop_faces(rgb, predict.YuNetDetector()(rgb), 1.15)
    assert torch.equal(face, predict.face_tensor([crop], data_config))
    monkeypatch.delattr(cv2, "CascadeClassifier", raising=False)
    assert torch.equal(export_script.real_input(data_config), face)
    monkeypatch.setattr(cv2, "__version__", "4.5.3")
    whole = export_script.real_input(data_config)
    assert whole.shape == (1, 3, 32, 32) and not torch.equal(face, whole)


def test_predict_runs_the_projects_torchscript_export(tmp_path, capsys, repo_root):
    """predict.py used to refuse a TorchScript file of this project as "not a readable PyTorch
    checkpoint (damaged, truncated...)"; with --allow-torchscript it now runs it with the classes
    and data config of its metadata.json and predicts what the .pt does. Without the flag, and
    in evaluate.py, it is refused as what it is: a TorchScript file, code."""
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    path = tmp_path / "model.ts"
    export(["--checkpoint", checkpoint, "--format", "torchscript", "--output", path])
    for script, argv in [
        ("predict.py", [ASTRONAUT, "--checkpoint", path]),
        ("evaluate.py", ["--checkpoint", path, "--dataset-path", tmp_path / "FER2013"]),
    ]:
        status, message = command_error(capsys, repo_root / script, argv)
        assert status == 1 and message.count("\n") == 1, message
        assert f"{path} is a TorchScript file, not a checkpoint: it holds code" in message
        assert "damaged" not in message
    (from_ts,) = predict.main(
        predict.parse_args([str(ASTRONAUT), "--checkpoint", str(path), "--allow-torchscript"])
    )
    (from_pt,) = predict.main(predict.parse_args([str(ASTRONAUT), "--checkpoint", str(checkpoint)]))
    assert from_ts["box"] == from_pt["box"] and from_ts["label"] == from_pt["label"]
    assert list(from_ts["probabilities"]) == CLASSES
    for c in CLASSES:
        assert from_ts["probabilities"][c] == pytest.approx(from_pt["probabilities"][c], abs=1e-5)
    # ONNX Runtime cannot run it: said in one line, not tried.
    argv = [ASTRONAUT, "--checkpoint", path, "--backend", "onnxruntime", "--allow-torchscript"]
    status, message = command_error(capsys, repo_root / "predict.py", argv)
    assert status == 1 and message.count("\n") == 1 and "TorchScript file" in message, message


class RunsCode(torch.nn.Module):
    """A TorchScript program posing as weights: loading it creates MARKER.load, running it
    MARKER (torch.from_file with shared=True creates the file it names)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker, self.loaded = marker, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ran = torch.from_file(self.marker, shared=True, size=1)
        return torch.zeros(x.shape[0], 7) + ran.sum()  # 7: len(CLASSES)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.loaded = torch.from_file(self.marker + ".load", shared=True, size=1).numel()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_a_torchscript_file_runs_only_with_allow_torchscript(tmp_path, capsys, repo_root):
    """`predict.py --checkpoint innocent_weights.pt`, a TorchScript archive, ran its code (it
    read /etc/passwd in the report). Every command and loader now refuses it unread, in one line
    that says why; predict.py runs it only with --allow-torchscript."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "innocent_weights.pt"
    data_config = {"image_size": 32, "resize_size": None, "in_chans": 3, "mean": None, "std": None}
    meta = {"classes": json.dumps(CLASSES), "data_config": json.dumps(data_config)}
    torch.jit.save(
        torch.jit.script(RunsCode(str(marker))), path, {"metadata.json": json.dumps(meta)}
    )
    for script, argv in [
        ("predict.py", [ASTRONAUT, "--checkpoint", path, "--no-detect", "--json"]),
        ("evaluate.py", ["--checkpoint", path, "--dataset-path", tmp_path / "FER2013"]),
        ("scripts/export.py", ["--checkpoint", path, "--format", "onnx", "--output", "m.onnx"]),
    ]:
        status, message = command_error(capsys, repo_root / script, argv)
        assert status == 1 and message.count("\n") == 1, message
        assert "is a TorchScript file, not a checkpoint: it holds code, which would run" in message
        assert ("--allow-torchscript runs it" in message) == (script != "scripts/export.py")
    with pytest.raises(CLIError, match="is a TorchScript file"):
        load_trained_model(path)
    assert not list(tmp_path.glob("code-ran*"))  # nothing of it ran
    argv = [str(ASTRONAUT), "--checkpoint", str(path), "--no-detect", "--allow-torchscript"]
    (record,) = predict.main(predict.parse_args(argv))
    assert sorted(p.name for p in tmp_path.glob("code-ran*")) == ["code-ran", "code-ran.load"]
    assert list(record["probabilities"]) == CLASSES


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_evaluate_runs_a_torchscript_export_with_allow_torchscript(
    synthetic_root, tmp_path, capsys, repo_root
):
    """evaluate.py had no --allow-torchscript: a TorchScript export could not be scored at all.
    It takes predict.py's flag now (utils.add_allow_torchscript_argument), refuses the file in one
    line naming it without the flag, and with it scores what the .pt scores."""
    import evaluate

    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    path = tmp_path / "model.ts"
    export(["--checkpoint", checkpoint, "--format", "torchscript", "--output", path])
    common = ["--dataset-path", synthetic_root, "--tta", "none", "--bootstrap", "0"]
    argv = ["--checkpoint", path, "--output", tmp_path / "ts"] + common
    status, message = command_error(capsys, repo_root / "evaluate.py", argv)
    assert status == 1 and message.count("\n") == 1, message
    assert "is a TorchScript file" in message and "--allow-torchscript runs it" in message
    assert not (tmp_path / "ts").exists()
    runs = [
        evaluate.main(evaluate.parse_args([str(a) for a in argv + extra]))
        for argv, extra in [
            (argv, ["--allow-torchscript"]),
            (["--checkpoint", checkpoint, "--output", tmp_path / "pt"] + common, []),
        ]
    ]
    assert runs[0]["model_name"] == runs[1]["model_name"] == "emonext_micro"
    assert runs[0]["accuracy"] == runs[1]["accuracy"]
    assert runs[0]["nll"] == pytest.approx(runs[1]["nll"], abs=1e-4)


class FiveOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_a_torchscript_with_another_number_of_outputs_is_one_line(
    synthetic_root, tmp_path, capsys, repo_root
):
    """A TorchScript file whose logits have 5 columns but whose metadata names 7 classes: predict
    and evaluate scored it against the wrong classes (or failed deep inside); one line now."""
    path = tmp_path / "five.ts"
    data_config = {"image_size": 32, "resize_size": None, "in_chans": 3, "mean": None, "std": None}
    meta = {"classes": json.dumps(CLASSES), "data_config": json.dumps(data_config)}
    torch.jit.save(torch.jit.script(FiveOutputs()), path, {"metadata.json": json.dumps(meta)})
    for script, argv in [
        ("predict.py", [ASTRONAUT, "--no-detect", "--json"]),
        ("evaluate.py", ["--dataset-path", synthetic_root, "--output", tmp_path / "out"]),
    ]:
        argv = argv + ["--checkpoint", path, "--allow-torchscript"]
        status, message = command_error(capsys, repo_root / script, argv)
        assert status == 1 and message.count("\n") == 1, message
        assert (
            f"{path}: the TorchScript model's output for one image is (1, 5), but its " in message
        )
        assert "metadata names 7 classes" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.ts"]


def test_tampered_onnx_metadata_is_one_line(tmp_path):
    """Classes that are not JSON, a dict, the wrong number of classes for the output, a string
    image size or one the input does not have: tracebacks before; one line naming the key now."""
    import onnx

    from models import deploy

    torch.manual_seed(0)  # a stand-in model: the metadata is what is tested
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 7, 32), torch.nn.Flatten()).eval()
    model.model_name = "emonext_atto"
    data_config = {"image_size": 32, "resize_size": None, "in_chans": 3, "mean": None, "std": None}
    meta = deploy.onnx_metadata(model, CLASSES, data_config, "x.pt", "model")
    good = tmp_path / "good.onnx"
    good.write_bytes(deploy.to_onnx(model, torch.rand(1, 3, 32, 32), metadata=meta))
    assert predict.load_onnx(str(good)).classes == CLASSES
    config = json.loads(meta["data_config"])
    cases = [
        ("classes", "Angry, Disgust", "metadata classes is 'Angry, Disgust' (a str)"),
        ("classes", json.dumps({"0": "Angry"}), "accepted: a list of 7 distinct class names"),
        ("classes", json.dumps(CLASSES[:6]), "(the model has 7 outputs)"),
        ("classes", json.dumps(CLASSES[:6] + ["Angry"]), "'Angry' appears twice"),
        ("data_config", json.dumps({**config, "image_size": "32"}), "data_config.image_size"),
        ("data_config", json.dumps({**config, "image_size": 48}), "the model's input, [3, 32"),
        ("data_config", "{", "a JSON object of image_size"),
    ]
    for key, value, expected in cases:
        proto = onnx.load(str(good))
        next(p for p in proto.metadata_props if p.key == key).value = value
        path = tmp_path / "tampered.onnx"
        onnx.save(proto, str(path))
        with pytest.raises(CLIError) as err:
            predict.load_onnx(str(path))
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert expected in message, message


def test_opset_and_output_are_checked_before_anything_is_loaded(tmp_path, capsys, repo_root):
    """`--opset 10` ended in torch's UnsupportedOperatorError traceback after the model was
    loaded and traced; an --output under a file, or a file export onto a folder, after the
    export. Each is one line and exit status 2 now (the checkpoint does not even exist)."""
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    missing = tmp_path / "never-read.pt"
    for extra, expected in [
        (["--opset", "10"], "--opset 10: must be 20 to "),
        (["--opset", "19"], "--opset 19: must be 20 to "),
        (["--opset", "99"], "--opset 99: must be 20 to "),
        (["--output", blocker / "model.onnx"], "is a file, not a folder"),
        (["--output", tmp_path], "is a folder; give the path of the onnx file"),
    ]:
        argv = ["--checkpoint", missing, "--format", "onnx", "--output", tmp_path / "m.onnx"]
        status, message = command_error(capsys, repo_root / "scripts" / "export.py", argv + extra)
        assert status == 2 and message.count("\n") == 1, message
        assert message.startswith("export.py: error: ") and expected in message, message
    assert sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize(
    "device, available, expected",
    [
        ("cuda:0", ["CUDAExecutionProvider", "CPUExecutionProvider"],
         ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        ("cuda:0", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),  # onnxruntime without GPU
        ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ],
)  # fmt: skip
def test_onnx_sessions_take_cuda_only_on_a_cuda_device_that_has_it(
    device, available, expected, monkeypatch
):
    """CUDA's rule for ONNX Runtime, simulated: CUDA first only when asked for and provided."""
    import onnxruntime as ort

    from models import deploy

    seen = {}
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(
        ort, "InferenceSession", lambda m, providers: seen.setdefault("p", providers)
    )
    deploy.onnx_session(b"model", device)
    assert seen["p"] == expected


# --------------------------------------------------------------------------- --quantize


def head_checkpoint(path, bias: list[float], args: dict | None = None):
    """emonext_micro at 48 pixels (the synthetic faces' size), random but for its head: rows 0
    and 1 of its weight equal and its bias `bias`, which decides what it predicts. The blocks'
    layer scales are 1 (not 1e-6), so that their int8 products make a difference."""
    from models import create_model

    torch.manual_seed(0)
    model = create_model("emonext_micro", img_size=48)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
        model.head.weight[1] = model.head.weight[0]
        model.head.bias.copy_(torch.tensor(bias))
    ckpt = {"model": model.state_dict(), "model_name": model.model_name, "epoch": 0}
    ckpt |= {"args": args or {}}  # train.py's arguments: its dataset_path among them
    ckpt |= {"model_kwargs": model.model_kwargs, "classes": CLASSES}
    torch.save(ckpt | {"data_config": model.data_config}, path)
    return path


def test_int8_export_holds_its_agreement_and_runs_in_predict(synthetic_root, tmp_path):
    """--quantize int8 writes an int8 model (calibrated on the val split) whose metadata holds its
    top-1 agreement with the float32 model and the largest probability difference on the test
    split, as recomputed here from the test images and the PyTorch model; predict.py runs it."""
    # Happy's bias 3 above the others: every face is Happy, in float32 and int8 alike (100 %).
    checkpoint = head_checkpoint(tmp_path / "checkpoint.pt", [0, 0, 0, 3, 0, 0, 0])
    path = tmp_path / "int8.onnx"
    argv = ["--checkpoint", checkpoint, "--format", "onnx", "--output", path]
    export(argv + ["--quantize", "int8", "--dataset-path", synthetic_root])
    assert sorted(tmp_path.iterdir()) == [checkpoint, path]

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["quantization"] == "int8" and json.loads(meta["classes"]) == CLASSES
    assert "28 images of the val split of synthetic" in meta["quantization_method"]
    assert meta["agreement_on"] == "28 test images of synthetic, against the float32 export"
    assert meta["top1_agreement_percent"] == "100.00"
    # The blocks' pointwise layers (MatMul, two per block) take int8 weights, through QDQ.
    producer = {out: node for node in proto.graph.node for out in node.output}
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and "pwconv" in n.name]
    assert len(matmuls) == 8
    for node in matmuls:
        dequantize = producer[node.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        assert weights[dequantize.input[0]] == onnx.TensorProto.INT8

    model, _, data_config, _ = load_trained_model(str(checkpoint))
    faces = sorted((synthetic_root / "test").rglob("*.png"))
    x = predict.face_tensor([predict.read_image(str(f)) for f in faces], data_config)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    quantized = torch.softmax(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), 1)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1)
    assert (quantized.argmax(1) == 3).all() and (expected.argmax(1) == 3).all()
    worst = (quantized - expected).abs().max().item()
    assert worst > 1e-4 and float(meta["max_probability_difference"]) == pytest.approx(
        worst, abs=1e-4
    )

    (record,) = predict.main(predict.parse_args([str(ASTRONAUT), "--checkpoint", str(path)]))
    (from_pt,) = predict.main(predict.parse_args([str(ASTRONAUT), "--checkpoint", str(checkpoint)]))
    assert record["box"] == from_pt["box"] and record["label"] == "Happy"
    for c in CLASSES:
        assert record["probabilities"][c] == pytest.approx(from_pt["probabilities"][c], abs=0.05)


def test_agreement_below_min_agreement_is_one_line_and_writes_nothing(
    synthetic_root, tmp_path, capsys, repo_root
):
    """Disgust's bias 2e-6 above Angry's, their head rows equal: float32 predicts Disgust on every
    face, float16 (where 8 + 2e-6 is 8) ties them and predicts Angry: 0 % agreement. Below
    --min-agreement (99 % by default) that is one line and no file; at --min-agreement 0 the
    fp16 model is written with its 0 % in its metadata and predict.py runs it. Without
    --dataset-path the export reads the dataset the checkpoint was trained on."""
    bias = [8, 8 + 2e-6, 0, 0, 0, 0, 0]
    trained_on = {"dataset_path": str(synthetic_root)}
    checkpoint = head_checkpoint(tmp_path / "checkpoint.pt", bias, trained_on)
    path = tmp_path / "fp16.onnx"
    argv = ["--checkpoint", checkpoint, "--format", "onnx", "--output", path, "--quantize", "fp16"]
    script = repo_root / "scripts" / "export.py"
    status, message = command_error(capsys, script, argv + ["--dataset-path", synthetic_root])
    assert status == 1 and message.count("\n") == 1, message
    assert message.startswith(
        "export.py: error: fp16: the float32 model's top-1 class on 0 of 28 test images of "
        "synthetic (0.00 %), probabilities within "
    ) and message.endswith(": below --min-agreement 99 %; nothing written\n"), message
    assert list(tmp_path.iterdir()) == [checkpoint]

    export(argv + ["--min-agreement", "0"])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["quantization"] == "fp16" and meta["top1_agreement_percent"] == "0.00"
    assert meta["agreement_on"] == "28 test images of synthetic, against the float32 export"
    (record,) = predict.main(predict.parse_args([str(ASTRONAUT), "--checkpoint", str(path)]))
    assert record["label"] == "Angry"


def test_quantize_flags_are_checked_in_one_line(tmp_path, capsys, repo_root):
    """Bad --quantize, --min-agreement, --calibration-images and --dataset-path values are one
    line before the checkpoint is read (exit status 2; it does not exist); a checkpoint that
    records no dataset, without --dataset-path, is one line before anything is exported."""
    missing = tmp_path / "never-read.pt"
    script = repo_root / "scripts" / "export.py"
    base = ["--checkpoint", missing, "--output", tmp_path / "m.onnx"]
    for extra, expected in [
        (["--format", "onnx", "--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
        (["--format", "torchscript", "--quantize", "int8"], "--quantize int8 needs --format onnx"),
        (["--format", "onnx", "--quantize", "int8", "--min-agreement", "101"],
         "--min-agreement 101.0: a percentage, 0 to 100"),
        (["--format", "onnx", "--quantize", "int8", "--min-agreement", "nan"],
         "--min-agreement nan: a percentage, 0 to 100"),
        (["--format", "onnx", "--quantize", "int8", "--calibration-images", "0"],
         "--calibration-images 0: at least 1"),
        (["--format", "onnx", "--dataset-path", tmp_path],
         "--dataset-path is read with --quantize int8 or fp16 only"),
    ]:  # fmt: skip
        status, message = command_error(capsys, script, base + extra)
        assert status == 2 and message.count("\n") == 1, message
        assert message.startswith("export.py: error: ") and expected in message, message
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    argv = ["--checkpoint", checkpoint, "--format", "onnx", "--output", tmp_path / "m.onnx"]
    status, message = command_error(capsys, script, argv + ["--quantize", "int8"])
    assert status == 1 and message.count("\n") == 1, message
    assert "--quantize int8 needs --dataset-path" in message
    status, message = command_error(
        capsys, script, argv + ["--quantize", "int8", "--dataset-path", tmp_path]
    )
    assert status == 1 and message.count("\n") == 1, message
    assert f"--dataset-path {tmp_path} has no val split" in message
    assert sorted(tmp_path.iterdir()) == [checkpoint]
