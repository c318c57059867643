"""Calibration: ECE, NLL and Brier with intervals, the reliability diagram, temperature scaling
fitted by evaluate.py and used by predict.py, the ONNX export and hub folders."""

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from inference_utils import CLASSES, command_error, make_project_checkpoint

import engine
import evaluate
import models
import predict
from models import calibration
from utils import CLIError

REPO = Path(__file__).resolve().parents[1]


def textbook_ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s ECE as torchmetrics bins it: [k/bins, (k+1)/bins), confidence 1 apart."""
    confidence, correct = probs.max(1), probs.argmax(1) == y
    total = 0.0
    for k in range(bins + 1):
        upper = (k + 1) / bins if k < bins else math.inf
        inside = (confidence >= k / bins) & (confidence < upper)
        if inside.any():
            gap = correct[inside].mean() - confidence[inside].mean()
            total += inside.mean() * abs(gap)
    return total


def random_scores(n: int = 400, k: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 3
    logits[:5, 0] = 80.0  # softmax exactly 1.0 in float64: the bin torchmetrics adds for it
    y = torch.randint(0, k, (n,), generator=g)
    y[:3] = 0
    return logits, y


def test_ece_is_torchmetrics_multiclass_calibration_error():
    logits, y = random_scores()
    probs = torch.softmax(logits.double(), 1)
    assert (probs.max(1).values == 1.0).sum() == 5
    ece = engine.calibration_metrics(logits, y, 7)["ece"]
    assert ece == pytest.approx(100 * textbook_ece(probs.numpy(), y.numpy()), abs=1e-9)
    try:
        from torchmetrics.classification import MulticlassCalibrationError
    except ImportError:  # the textbook definition above is the check then
        return
    expected = MulticlassCalibrationError(7, n_bins=15, norm="l1")(probs.float(), y)
    assert ece == pytest.approx(100 * float(expected), abs=1e-4)  # torchmetrics: float32


def test_nll_and_brier_are_the_textbooks():
    logits, y = random_scores(seed=1)
    got = engine.calibration_metrics(logits, y, 7)
    assert got["nll"] == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-12)
    probs = torch.softmax(logits.double(), 1)
    brier = ((probs - F.one_hot(y, 7)) ** 2).sum(1).mean().item()  # Brier (1950), in [0, 2]
    assert got["brier"] == pytest.approx(brier, rel=1e-12)
    from sklearn.metrics import brier_score_loss

    assert got["brier"] == pytest.approx(brier_score_loss(y, probs, labels=range(7)), rel=1e-9)


def test_calibration_intervals_use_every_other_intervals_resamples():
    logits, y = random_scores(n=120, seed=2)
    metrics = engine.metrics_with_intervals(logits, y, CLASSES, resamples=40, seed=5)
    samples = {"ece": [], "nll": [], "brier": []}
    for idx in engine.bootstrap_indices(120, 40, 5):
        for row in idx:
            one = engine.calibration_metrics(logits[row], y[row], 7)
            for name in samples:
                samples[name].append(one[name])
    for name, values in samples.items():
        assert metrics[f"{name}_ci95"] == pytest.approx(engine.percentile_interval(values))
        assert metrics[name] == engine.calibration_metrics(logits, y, 7)[name]
    report = engine.format_report(metrics)
    assert f"ECE {metrics['ece']:.2f} % 95 % CI" in report and "NLL" in report and "Brier" in report
    without = engine.metrics_with_intervals(logits, y, CLASSES, resamples=0)
    assert "ece" in without and "ece_ci95" not in without


def test_fit_temperature_recovers_a_known_temperature_and_keeps_every_prediction():
    g = torch.Generator().manual_seed(3)
    calibrated = torch.randn(6000, 5, generator=g) * 2
    y = torch.multinomial(torch.softmax(calibrated, 1), 1, generator=g)[:, 0]
    overconfident = 2.5 * calibrated  # softmax(overconfident / 2.5) is calibrated
    t = engine.fit_temperature(overconfident, y)
    assert t == pytest.approx(2.5, rel=0.05)
    nll = [F.cross_entropy(overconfident / s, y).item() for s in (t / 1.01, t, t * 1.01)]
    assert nll[1] < nll[0] and nll[1] < nll[2]  # the minimum
    assert torch.equal((overconfident / t).argmax(1), overconfident.argmax(1))
    before = engine.calibration_metrics(overconfident, y, 5)
    after = engine.calibration_metrics(overconfident / t, y, 5)
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"]


def test_reliability_bins_hold_what_the_diagram_shows():
    logits, y = random_scores(n=200, seed=4)
    bins = engine.reliability_bins(logits, y, 7)
    assert sum(bins["count"]) == 200 and len(bins["count"]) == 16 and bins["count"][15] == 5
    probs = torch.softmax(logits.double(), 1)
    confidence, right = probs.max(1).values, probs.argmax(1) == y
    inside = (confidence >= 0.6) & (confidence < 0.6 + 1 / 15)  # bin 9
    assert bins["count"][9] == int(inside.sum())
    assert bins["accuracy"][9] == pytest.approx(100 * right[inside].double().mean().item())
    assert bins["confidence"][9] == pytest.approx(100 * confidence[inside].mean().item())


@pytest.fixture(scope="module")
def fitted(synthetic_root, tmp_path_factory):
    """evaluate.py --fit-temperature on a project checkpoint: (checkpoint, eval.json, stdout)."""
    folder = tmp_path_factory.mktemp("calibrated")
    checkpoint = make_project_checkpoint(folder / "checkpoint.pt")
    argv = ["--checkpoint", checkpoint, "--dataset-path", synthetic_root, "--tta", "none",
            "--fit-temperature", "--output", folder / "out", "--bootstrap", "50"]  # fmt: skip
    record = evaluate.main(evaluate.parse_args([str(a) for a in argv]))
    return checkpoint, record, folder / "out"


def test_evaluate_reports_calibration_and_draws_the_reliability_diagram(fitted):
    _, record, out = fitted
    saved = json.loads((out / "eval.json").read_text())
    for key in ("balanced_accuracy", "ece", "nll", "brier"):
        assert saved[f"{key}_ci95"][0] - 1e-9 <= saved[key] <= saved[f"{key}_ci95"][1] + 1e-9
    assert sum(saved["reliability"]["count"]) == 28
    png = (out / "reliability_test.png").read_bytes()
    assert png[:4] == b"\x89PNG" and not list(out.glob("*.tmp*"))


def test_fit_temperature_fits_on_val_and_stores_it_beside_the_checkpoint(fitted, synthetic_root):
    checkpoint, record, _ = fitted
    val_args = evaluate.parse_args(args_for(checkpoint, synthetic_root) + ["--split", "val"])
    val = evaluate.score(str(checkpoint), val_args, torch.device("cpu"))
    expected = engine.fit_temperature(val.logits, val.targets)
    temperature = record["temperature"]
    assert temperature["value"] == pytest.approx(expected, rel=1e-9)
    assert temperature["fitted_on"]["split"] == "val" and temperature["fitted_on"]["images"] == 28
    assert (
        temperature["same_predictions"]
        and temperature["val_nll_after"] <= (temperature["val_nll_before"])
    )
    assert temperature["before"]["ece"] == record["ece"]  # the test split's, before and after
    test_args = evaluate.parse_args(args_for(checkpoint, synthetic_root))
    test = evaluate.score(str(checkpoint), test_args, torch.device("cpu"))
    after = engine.calibration_metrics(test.logits / expected, test.targets, 7)
    assert temperature["after"]["nll"] == pytest.approx(after["nll"], rel=1e-6)
    stored = json.loads(calibration.sidecar_path(checkpoint).read_text())
    assert stored["temperature"] == temperature["value"] and stored["weights"] == "ema"
    assert temperature["stored_in"] == str(calibration.sidecar_path(checkpoint))
    _, _, _, ckpt = models.load_trained_model(str(checkpoint))
    assert ckpt["temperature"] == temperature["value"]


def args_for(checkpoint, root) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--dataset-path", str(root), "--tta", "none"]


def test_predict_onnx_and_hub_use_the_stored_temperature(fitted, synthetic_root, tmp_path):
    from scripts import export as export_script

    checkpoint, record, _ = fitted
    t = record["temperature"]["value"]
    face = sorted((synthetic_root / "test" / "Happy").iterdir())[0]
    model, _, data_config, _ = models.load_trained_model(str(checkpoint))
    crop = predict.read_image(str(face))
    with torch.no_grad():
        logits = model(predict.face_tensor([crop], data_config))[0]
    expected = torch.softmax(logits / t, 0)

    def predicted(source) -> dict:
        argv = [str(face), "--no-detect", "--checkpoint", str(source), "--json"]
        (face_record,) = predict.main(predict.parse_args(argv))
        return face_record

    onnx_path, hub_path = tmp_path / "m.onnx", tmp_path / "hub"
    for fmt, path in (("onnx", onnx_path), ("hub", hub_path)):
        export_script.main(export_script.parse_args(
            ["--checkpoint", str(checkpoint), "--format", fmt, "--output", str(path)]))  # fmt: skip
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert float(meta["temperature"]) == t and "temperature" in meta["output"]
    assert json.loads((hub_path / "config.json").read_text())["temperature"] == t
    for source in (checkpoint, onnx_path, hub_path):
        r = predicted(source)
        assert r["calibrated"] is True and r["temperature"] == t, source
        got = torch.tensor([r["probabilities"][c] for c in CLASSES])
        assert torch.allclose(got, expected, atol=1e-5), source
    # without a stored temperature: the plain softmax, and --json says so
    plain = make_project_checkpoint(tmp_path / "plain.pt")
    r = predicted(plain)
    assert r["calibrated"] is False and r["temperature"] is None
    assert torch.allclose(torch.tensor([r["probabilities"][c] for c in CLASSES]),
                          torch.softmax(logits, 0), atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("value", ["NaN", "0", "-1.5", "Infinity", '"warm"', "true", "null"])
def test_a_stored_temperature_is_validated(value, tmp_path, capsys):
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    sidecar = calibration.sidecar_path(checkpoint)
    sidecar.write_text(f'{{"temperature": {value}, "weights": "ema"}}')
    face = REPO / "tests" / "data" / "astronaut.png"
    status, err = command_error(capsys, REPO / "predict.py",
                                [face, "--no-detect", "--checkpoint", checkpoint])  # fmt: skip
    assert status == 1 and str(sidecar) in err and "finite number > 0" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(CLIError, match="finite number > 0"):
        predict.stored_temperature({"temperature": value}, "m.onnx")


def test_a_temperature_of_other_weights_is_not_applied(fitted, tmp_path):
    checkpoint, record, _ = fitted
    _, _, _, ckpt = models.load_trained_model(str(checkpoint), weights="model")
    assert ckpt["temperature"] is None and "ema weights" in ckpt["temperature_note"]
    retrained = tmp_path / "checkpoint.pt"
    make_project_checkpoint(retrained, seed=1)  # the same file name, other weights
    calibration.sidecar_path(retrained).write_text(calibration.sidecar_path(checkpoint).read_text())
    _, _, _, ckpt = models.load_trained_model(str(retrained))
    assert ckpt["temperature"] is None and "SHA-256" in ckpt["temperature_note"]


def test_fit_temperature_flags_are_checked(tmp_path, capsys):
    checkpoint = make_project_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit) as err:
        evaluate.parse_args(["--checkpoint", str(checkpoint), "--split", "val",
                             "--fit-temperature"])  # fmt: skip
    assert err.value.code == 2 and "--fit-temperature fits on the val" in capsys.readouterr().err
