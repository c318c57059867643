"""A trained model outside eager PyTorch: ONNX export with its metadata, ONNX Runtime sessions,
TorchScript files read back with theirs.

`scripts/export.py` writes the ONNX and TorchScript files; `predict.py` runs them, and exports in
memory and runs ONNX Runtime when that is the faster path (docs/INFERENCE.md). The export uses the
TorchScript-based exporter (`dynamo=False`) at opset 20, the lowest at which the STN's
`affine_grid` exports (19 ends in torch's UnsupportedOperatorError). `quantize_int8` and
`to_float16` make the smaller ONNX models of `scripts/export.py --quantize`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from models.hub import input_rule
from models.schema import check_classes, check_data_config, check_face_pipeline, refuse
from models.weights import WeightsError, is_torchscript  # noqa: F401  (predict.py uses it)

OPSET = 20
MIN_OPSET = 20  # aten::affine_grid_generator (the STN) has an ONNX form from opset 20 on
# The newest opset this torch's exporter writes (23 in torch 2.14); above it torch raises.
MAX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", OPSET)
# The extra file of a TorchScript export that holds `onnx_metadata` (as JSON).
TORCHSCRIPT_METADATA = "metadata.json"


def onnx_metadata(
    model: nn.Module,
    classes: list[str],
    data_config: dict,
    source: str,
    weights: str,
    temperature: float | None = None,
    faces: dict | None = None,
) -> dict[str, str]:
    """What travels inside an export (ONNX metadata_props / TorchScript's metadata.json): class
    names, data config, the input rule and the calibration `temperature` where there is one
    (models/calibration.py) and the face pipeline of the training data (`faces`, models/faces/)
    where there are; string keys and values, as ONNX needs."""
    dc = dict(data_config)
    resize = dc.get("resize_size") or round(dc["image_size"] * 236 / 224)
    normalise = dc.get("mean") is not None and dc.get("std") is not None
    output = f"float32 N x {len(classes)}: logits (softmax gives probabilities)"
    if temperature is not None:
        output = (
            f"float32 N x {len(classes)}: logits (softmax(logits / temperature) gives calibrated "
            "probabilities)"
        )
    meta = {
        "classes": json.dumps(list(classes)),
        "data_config": json.dumps(dc),
        "model_name": model.model_name,
        "image_size": str(dc["image_size"]),
        "resize_size": str(resize),
        "in_chans": str(dc["in_chans"]),
        "mean": json.dumps(list(dc["mean"])) if normalise else "none",
        "std": json.dumps(list(dc["std"])) if normalise else "none",
        "input": input_rule(dc),
        "output": output,
        "source_checkpoint": os.path.basename(str(source)),
        "weights": weights,
    }
    if temperature is not None:
        meta["temperature"] = repr(float(temperature))
    if faces is not None:
        meta["faces"] = json.dumps(faces, sort_keys=True)
    return meta


def read_metadata(
    meta: dict, source: str, input_shape: list | None = None, output_shape: list | None = None
) -> tuple[list[str], dict]:
    """(class names, data config) of an export's metadata (`onnx_metadata`), checked as a hub
    folder's are (models/schema.py); against the model's input and output shapes where known."""
    if "classes" not in meta or "data_config" not in meta:
        raise WeightsError(
            f"{source} lacks the classes/data_config metadata of scripts/export.py; export it "
            "again with scripts/export.py"
        )
    accepted = {
        "classes": "a JSON list of class names",
        "data_config": "a JSON object of image_size, resize_size, in_chans, mean, std",
    }
    values = {}
    for key, what in accepted.items():
        try:
            values[key] = json.loads(meta[key])
        except (TypeError, ValueError):
            raise refuse(source, f"metadata {key}", meta[key], what) from None
    outputs = output_shape[-1] if output_shape and isinstance(output_shape[-1], int) else None
    classes = check_classes(values["classes"], source, "metadata classes", outputs)
    data_config = check_data_config(values["data_config"], source, "metadata data_config")
    expected = [data_config["in_chans"], data_config["image_size"], data_config["image_size"]]
    for got, want in zip((input_shape or [])[1:], expected, strict=False):
        if isinstance(got, int) and got != want:
            what = f"in_chans and image_size of the model's input, {input_shape[1:]}"
            raise refuse(source, "metadata data_config", values["data_config"], what)
    return classes, data_config


def read_faces(meta: dict, source: str) -> dict | None:
    """The face pipeline in an export's metadata (`onnx_metadata`'s `faces`), checked; None
    where the export records none."""
    if "faces" not in meta:
        return None
    try:
        value = json.loads(meta["faces"])
    except (TypeError, ValueError):
        raise refuse(source, "metadata faces", meta["faces"], "a JSON object") from None
    return check_face_pipeline(value, source, "metadata faces")


def to_onnx(
    model: nn.Module, example: torch.Tensor, opset: int = OPSET, metadata: dict | None = None
) -> bytes:
    """The serialised, checked ONNX model of `model` (input `input` with a free batch size,
    output `logits`), with `metadata` in its metadata_props."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see the module docstring); its deprecation
        # and tracer warnings would only bury what the caller reports.
        for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def onnx_session(model: bytes | str, device: str = "cpu"):
    """An ONNX Runtime session on the CPU (CUDA first when `device` is CUDA and onnxruntime-gpu
    provides it) for a serialised model or a file path."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model, providers=providers)


def load_torchscript(path: str, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """A TorchScript file of scripts/export.py on `device`, in eval mode, and its metadata
    (`onnx_metadata`'s dict; empty when the file has no metadata.json)."""
    extra = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        # torch.jit.load's deprecation warning says nothing a user of the file can act on.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(path, map_location=device, _extra_files=extra)
    text = extra[TORCHSCRIPT_METADATA]
    meta = json.loads(text) if text else {}
    return module.eval(), meta if isinstance(meta, dict) else {}


def read_torchscript(path: str, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """(module, metadata) of a TorchScript export, its metadata checked and its
    output count checked against the classes by one forward pass of a zero batch. It runs the
    file's code: only for a file the user opted in to (--allow-torchscript)."""
    try:
        module, meta = load_torchscript(path, device)
    except (RuntimeError, ValueError, OSError) as err:  # torch.jit's own reasons
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path} is not a readable TorchScript file ({reason})") from None
    classes, data_config = read_metadata(meta, path)
    shape = (1, data_config["in_chans"], data_config["image_size"], data_config["image_size"])
    try:
        with torch.no_grad():
            logits = module(torch.zeros(shape, device=device))
    except Exception as err:  # whatever the file's code raises
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"{path}: the TorchScript model fails on a zero batch ({reason})"
        ) from None
    outputs = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if outputs != (1, len(classes)):
        raise WeightsError(
            f"{path}: the TorchScript model's output for one image is {outputs}, but its metadata "
            f"names {len(classes)} classes; export it again with scripts/export.py"
        )
    return module, meta


# --------------------------------------------------------------------------- quantized exports

# Ops the float16 export keeps in float32: ONNX Runtime's defaults, plus the STN's AffineGrid and
# GridSample (ONNX Runtime 1.32's float16 AffineGrid fails on a batch of one: "axis 1 is not in
# valid range [-1,0]").
FP16_KEEP_FLOAT32 = ("AffineGrid", "GridSample")


def quantize_int8(model: bytes, batches: Sequence[np.ndarray]) -> bytes:
    """`model` (of `to_onnx`) with int8 matrix products, by ONNX Runtime's static quantization:
    QDQ format, weights int8 per output channel on 7 bits (reduce_range), activations uint8 with
    the min/max ranges they take on `batches` (float32 N x C x S x S). The metadata_props of
    `model` are kept.

    Only MatMul is quantized: in EmoNeXt the blocks' pointwise layers, three quarters of its
    float32 time. On a trained emonext_micro (the demo's, docs/INFERENCE.md) quantizing the
    convolutions as well kept the float32 top-1 class on 96 % of the test faces, and the STN or
    the head (Gemm) 97-99 %, MatMul alone 100 %; int8 convolutions were no faster than float32
    ones. The settings are ONNX Runtime's for x86 CPUs without VNNI (AVX2, like the project's
    AMD EPYC), whose u8 x s8 products can saturate on 8-bit weights; VNNI and ARM cores run them
    too."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        # With `CalibStridedMinMax` ONNX Runtime reduces each range of batches to min/max as it
        # goes; otherwise it holds every intermediate tensor of every batch (~0.2 GB per
        # EmoNeXt-Tiny image). Its `CalibMaxIntermediateOutputs` drops data (1.32).
        def __init__(self):
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.rest = iter(batches[start_index:end_index])

        def get_next(self) -> dict | None:
            batch = next(self.rest, None)
            return None if batch is None else {"input": batch}

    proto = onnx_proto(model)
    with tempfile.TemporaryDirectory(prefix="emonext-int8-") as tmp:
        prepared, quantized = os.path.join(tmp, "prepared.onnx"), os.path.join(tmp, "int8.onnx")
        quant_pre_process(proto, prepared)  # shape inference and graph optimisation, as advised
        quantize_static(
            prepared,
            quantized,
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            extra_options={"CalibStridedMinMax": 1},
        )
        return with_metadata(onnx_proto(quantized), proto.metadata_props)


def to_float16(model: bytes) -> bytes:
    """`model` (of `to_onnx`) with float16 weights and activations, by ONNX Runtime's float16
    converter (onnxruntime.transformers.float16, the converter of onnxconverter-common); the
    input and output stay float32, so the model takes what the float32 export takes."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx_proto(model)
    half = convert_float_to_float16(
        proto, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FLOAT32]
    )
    # The converter appends the input's Cast to float16 after the nodes that read it; ONNX
    # Runtime runs that, ONNX's checker (and other tools) want the nodes in order.
    OnnxModel(half).topological_sort()
    return with_metadata(half, proto.metadata_props)


def onnx_proto(model: bytes | str):
    import onnx

    return onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)


def with_metadata(proto, metadata) -> bytes:
    """`proto` serialised with `metadata` (key/value pairs or metadata_props) as its
    metadata_props, replacing any it had; checked."""
    import onnx

    pairs = metadata.items() if isinstance(metadata, dict) else [(p.key, p.value) for p in metadata]
    del proto.metadata_props[:]
    for key, value in pairs:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
