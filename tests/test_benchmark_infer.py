"""scripts/benchmark.py infer: predict.py's stages per model and precision (figures not judged)."""

import json

from inference_utils import command_error

from scripts import benchmark


def test_infer_times_every_stage_of_every_configuration(capsys):
    argv = ["infer", "--models", "emonext_micro@32", "--precisions", "fp32,int8,fp16"]
    result = benchmark.main(argv + ["--runs", "2", "--frames", "1", "--json"])
    assert json.loads(capsys.readouterr().out) == result
    rows = {r["precision"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "int8", "fp16"] and result["runs"] == 2
    for r in rows.values():
        stages = [r[f"{s}_ms"] for s in ("decode", "detect", "crop", "model")]
        assert r["model"] == "emonext_micro@32" and all(ms > 0 for ms in stages)
        # fps is rounded from the unrounded total, so it may differ from the stored total's by 0.1
        assert abs(r["fps"] - 1000 / r["total_ms"]) <= 0.1 and r["model_fps"] > 0
    # int8 stores its pointwise weights in a byte, fp16 all of them in two
    assert rows["int8"]["onnx_mb"] < rows["fp32"]["onnx_mb"]
    assert rows["fp16"]["onnx_mb"] < rows["fp32"]["onnx_mb"]


def test_infer_flags_are_one_line(capsys, repo_root):
    script = repo_root / "scripts" / "benchmark.py"
    for extra, expected in [
        (["--precisions", "int4"], "--precisions takes torch,fp32,int8,fp16"),
        (["--models", "emonext_nope"], "--models emonext_nope: unknown model 'emonext_nope'"),
    ]:
        status, message = command_error(capsys, script, ["infer", *extra])
        assert status == 1 and message.count("\n") == 1, message
        assert expected in message, message
