"""Reading and validating an ONNX file, with one-line errors that begin with the file's path.

Everything goes through the onnx package (load, checker, shape inference); protobuf is never
parsed by hand.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.checker
import onnx.defs
import onnx.external_data_helper
import onnx.shape_inference
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from ..errors import UnsupportedModelError
from .builder import first_line

MIN_OPSET = 11
FLOAT_INPUTS = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16"}
_FLOAT_TENSORS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass
class NetworkInput:
    name: str
    dims: list[int | str | None]  # an int, a symbolic name, or None (unknown)
    elem_type: int


def describe(path_or_model: str | os.PathLike | onnx.ModelProto) -> str:
    """How error messages name the model: its path, or the in-memory graph's name."""
    if isinstance(path_or_model, onnx.ModelProto):
        return f"<ModelProto {path_or_model.graph.name or 'graph'}>"
    return str(path_or_model)


def read_model(path_or_model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, int]:
    """The model with its external data loaded, checked by onnx.checker; its name for errors; its opset."""
    where = describe(path_or_model)
    if isinstance(path_or_model, onnx.ModelProto):
        model, base_dir = onnx.ModelProto(), None
        model.CopyFrom(path_or_model)  # never modify the caller's proto
    else:
        path = os.fspath(path_or_model)
        if not os.path.isfile(path):
            raise UnsupportedModelError(f"{where}: no such file")
        model, base_dir = _parse(path, where), os.path.dirname(os.path.abspath(path))
    if not model.HasField("graph") or model.ir_version == 0:
        raise UnsupportedModelError(f"{where}: not an ONNX model (it has no graph or no IR version)")
    opset = default_opset(model, where)  # before the checker, whose message for an odd opset is vaguer
    _load_external_data(model, base_dir, where)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise UnsupportedModelError(f"{where}: the ONNX checker rejects the model: {first_line(err)}") from None
    except ValueError as err:  # over 2 GB in memory: check the file instead
        if base_dir is None:
            raise UnsupportedModelError(f"{where}: cannot check the model: {first_line(err)}") from None
        try:
            onnx.checker.check_model(os.fspath(path_or_model))
        except onnx.checker.ValidationError as err2:
            raise UnsupportedModelError(f"{where}: the ONNX checker rejects the model: {first_line(err2)}") from None
    return model, where, opset


def _parse(path: str, where: str) -> onnx.ModelProto:
    try:
        return onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeDecodeError) as err:
        with open(path, "rb") as f:
            head = f.read(1)
        # an ONNX file starts with its IR version (protobuf field 1, varint: byte 0x08)
        kind = "a truncated or corrupt ONNX file" if head == b"\x08" else "not an ONNX file"
        raise UnsupportedModelError(f"{where}: {kind} (protobuf parse error: {first_line(err)})") from None


def _tensors(model: onnx.ModelProto):
    """Every initializer and Constant-node tensor of the main graph."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t


def _load_external_data(model: onnx.ModelProto, base_dir: str | None, where: str) -> None:
    external = [t for t in _tensors(model) if onnx.external_data_helper.uses_external_data(t)]
    if not external:
        return
    if base_dir is None:
        raise UnsupportedModelError(f"{where}: tensor {external[0].name!r} has external data; load the model "
                                    "from its file path")
    root = os.path.realpath(base_dir)
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        resolved = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([root, resolved]) != root or os.path.isabs(location):
            raise UnsupportedModelError(f"{where}: external data of tensor {tensor.name!r} at {location!r} lies "
                                        "outside the model's folder")
        if not os.path.isfile(resolved):
            raise UnsupportedModelError(f"{where}: external data file {location!r} of tensor {tensor.name!r} "
                                        "is missing")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, root)
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise UnsupportedModelError(f"{where}: cannot read external data: {first_line(err)}") from None


def default_opset(model: onnx.ModelProto, where: str) -> int:
    """The default-domain opset, refused outside MIN_OPSET .. the installed onnx's newest."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise UnsupportedModelError(f"{where}: the model imports no default-domain (ai.onnx) opset")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= versions[0] <= newest:
        raise UnsupportedModelError(f"{where}: opset {versions[0]} is not supported (supported: {MIN_OPSET}..{newest})")
    return versions[0]


def infer_shapes(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as err:
        raise UnsupportedModelError(f"{where}: ONNX shape inference fails: {first_line(err)}") from None


def graph_inputs(model: onnx.ModelProto) -> list[NetworkInput]:
    """The graph inputs that are not initializers (IR < 4 lists initializers as inputs too)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        inputs.append(NetworkInput(value.name, dims, tensor_type.elem_type))
    return inputs


def network_input(model: onnx.ModelProto, where: str) -> NetworkInput:
    """The one data input: rank 2..4, float, every dimension but the batch static."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise UnsupportedModelError(f"{where}: expected exactly one graph input (besides initializers), "
                                    f"found {len(inputs)}: {names}")
    value = inputs[0]
    if not 2 <= len(value.dims) <= 4:
        raise UnsupportedModelError(f"{where}: input {value.name!r} has rank {len(value.dims)}; supported ranks "
                                    "are 2 to 4 ([N, features], [N, C, L], [N, C, H, W])")
    if value.elem_type not in FLOAT_INPUTS:
        raise UnsupportedModelError(f"{where}: input {value.name!r} has type "
                                    f"{onnx.helper.tensor_dtype_to_string(value.elem_type)}; a float input is needed")
    dynamic = [(i, d) for i, d in enumerate(value.dims) if i > 0 and (not isinstance(d, int) or d <= 0)]
    if dynamic:
        axis, dim = dynamic[0]
        raise UnsupportedModelError(f"{where}: input {value.name!r} has a dynamic dimension {axis} ({dim!r}); "
                                    "only the batch dimension (0) may be dynamic")
    return value


def check_finite(model: onnx.ModelProto, where: str) -> None:
    """NaN or Inf in a weight would only surface as NaN logits much later: refuse it now.

    Only initializers: a Constant node may hold an infinite bound on purpose (Clip, padding value).
    """
    for tensor in model.graph.initializer:
        if tensor.data_type in _FLOAT_TENSORS:
            values = numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(values)):
                kind = "NaN" if np.isnan(values).any() else "Inf"
                raise UnsupportedModelError(f"{where}: initializer {tensor.name or '<constant>'!r} contains {kind}")
