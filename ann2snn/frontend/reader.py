"""Reading and validating an ONNX file, with one-line errors that begin with the file's path.

Everything goes through the onnx package (load, checker, shape inference); protobuf is never
parsed by hand.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx.checker
import onnx.defs
import onnx.version_converter
import onnx.external_data_helper
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import TensorProto, numpy_helper

from ..errors import UnsupportedModelError
from .inference import FLOAT_TENSORS, large_initializers, repeated_field, shape_skeleton
from .registry import first_line

MIN_OPSET = 11
OLDEST_UPGRADABLE_OPSET = 7   # opsets 7..10 are upgraded (upgrade_opset)
UPGRADE_TO = 13
# The importer runs every node once on a zero tensor of the input's shape (builder.py): an input
# larger than this (256 MiB of float32; ImageNet's 3 x 224 x 224 is 150,528) is refused before
# that tensor is allocated, since a layer's output is often many times the input.
MAX_PROBE_ELEMENTS = 2**26
FLOAT_INPUTS = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16"}
# Integer types that the protobuf stores widened in int32_data: the range each must fit.
_SMALL_INTEGERS = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
                   TensorProto.UINT16: (0, 65535)}


@dataclass
class NetworkInput:
    name: str
    dims: list[int | str | None]  # an int, a symbolic name, or None (unknown)
    elem_type: int                # 0 (UNDEFINED) for what is not a tensor
    type_name: str                # FLOAT, DOUBLE, ...; sequence_type, map_type, ... for what is not a tensor


def type_name(data_type: int) -> str:
    """An ONNX element type as messages show it: FLOAT, UINT8, ... (a number onnx does not know as is)."""
    try:
        return onnx.helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.")
    except (KeyError, ValueError):
        return f"type {data_type}"


def describe(path_or_model: str | os.PathLike | onnx.ModelProto) -> str:
    """How error messages name the model: its path, or the in-memory graph's name."""
    if isinstance(path_or_model, onnx.ModelProto):
        return f"<ModelProto {path_or_model.graph.name or 'graph'}>"
    return str(path_or_model)


def read_model(path_or_model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, int, int | None]:
    """The model with its external data loaded, checked by onnx.checker; its name for errors; its
    opset; and the opset it was upgraded from (upgrade_opset), else None."""
    where = describe(path_or_model)
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)  # never modify the caller's proto
        _load_external_data(model, None, where)  # refuses any: no folder to read it from
    else:
        model = load_checked(path_or_model)
    if not model.HasField("graph") or model.ir_version == 0:
        raise UnsupportedModelError(f"{where}: not an ONNX model (it has no graph or no IR version)")
    check_utf8(model, where)
    opset = default_opset(model, where)  # before the checker, whose message for an odd opset is vaguer
    try:   # the graph without its weights' data (a copy of kilobytes), then each weight alone
        onnx.checker.check_model(shape_skeleton(model))
        for tensor in large_initializers(model):
            onnx.checker.check_tensor(tensor)
    except onnx.checker.ValidationError as err:
        raise UnsupportedModelError(f"{where}: the ONNX checker rejects the model: {first_line(err)}") from None
    check_tensors(model, where)
    upgraded_from = None
    if opset < MIN_OPSET:
        model, upgraded_from, opset = upgrade_opset(model, where, opset), opset, UPGRADE_TO
    return model, where, opset, upgraded_from


def load_checked(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """The ONNX file parsed by onnx, its external data checked (inside the model's folder, no link
    out, no absolute path, within its file) and, with `load_external_data`, read. The one way the
    package loads an ONNX file: an UnsupportedModelError naming the file for what it refuses."""
    where = describe(path)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UnsupportedModelError(f"{where}: no such file")
    model = _parse(path, where)
    _load_external_data(model, os.path.dirname(os.path.abspath(path)), where, load=load_external_data)
    return model


def _parse(path: str, where: str) -> onnx.ModelProto:
    try:
        return onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeDecodeError) as err:
        with open(path, "rb") as f:
            head = f.read(1)
        # an ONNX file starts with its IR version (protobuf field 1, varint: byte 0x08)
        kind = "a truncated or corrupt ONNX file" if head == b"\x08" else "not an ONNX file"
        raise UnsupportedModelError(f"{where}: {kind} (protobuf parse error: {first_line(err)})") from None


def check_utf8(message: Message, where: str, field_path: str = "model") -> None:
    """Every string field is UTF-8, as protobuf requires. onnx's parser hands an invalid one over
    as bytes, which every later name lookup or message would trip on."""
    for field, value in message.ListFields():
        repeated = repeated_field(field)
        items = value if repeated else [value]
        for index, item in enumerate(items):
            at = f"{field_path}.{field.name}" + (f"[{index}]" if repeated else "")
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                check_utf8(item, where, at)
            elif field.type == FieldDescriptor.TYPE_STRING and isinstance(item, bytes):
                raise UnsupportedModelError(f"{where}: {at} is not valid UTF-8: {item!r}")


def _tensors(model: onnx.ModelProto):
    """Every initializer and Constant-node tensor of the main graph."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t


def _stored_tensors(graph: onnx.GraphProto | onnx.FunctionProto):
    """Every tensor whose data onnx's external-data loader reads: initializers and node attributes,
    in subgraphs (If, Loop, Scan bodies) too."""
    yield from getattr(graph, "initializer", ())
    for node in graph.node:
        for attribute in node.attribute:
            yield from [attribute.t] if attribute.HasField("t") else ()
            yield from attribute.tensors
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _stored_tensors(subgraph)


def _load_external_data(model: onnx.ModelProto, base_dir: str | None, where: str, load: bool = True) -> None:
    """Refuse external data outside `base_dir` (the model's folder), missing, or past its file's end
    (before anything is read); with `load`, read it into the model."""
    graphs = [model.graph, *model.functions]
    external = [t for g in graphs for t in _stored_tensors(g) if onnx.external_data_helper.uses_external_data(t)]
    if not external:
        return
    if base_dir is None:
        raise UnsupportedModelError(f"{where}: tensor {external[0].name!r} has external data; load the model "
                                    "from its file path")
    root = os.path.realpath(base_dir)
    for tensor in external:
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        resolved = os.path.realpath(os.path.join(root, location))  # a link resolves to where it points
        if os.path.commonpath([root, resolved]) != root or os.path.isabs(location):
            raise UnsupportedModelError(f"{where}: external data of tensor {tensor.name!r} at {location!r} lies "
                                        "outside the model's folder")
        if not os.path.isfile(resolved):
            raise UnsupportedModelError(f"{where}: external data file {location!r} of tensor {tensor.name!r} "
                                        "is missing")
        try:
            end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        except ValueError:
            raise UnsupportedModelError(f"{where}: external data of tensor {tensor.name!r} has an offset or "
                                        "length that is no integer") from None
        if end > os.path.getsize(resolved):
            raise UnsupportedModelError(f"{where}: external data of tensor {tensor.name!r} ends at byte {end:,}, "
                                        f"past the end of {location!r} ({os.path.getsize(resolved):,} bytes)")
    if not load:
        return
    try:
        onnx.external_data_helper.load_external_data_for_model(model, root)
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise UnsupportedModelError(f"{where}: cannot read external data: {first_line(err)}") from None


def default_opset(model: onnx.ModelProto, where: str) -> int:
    """The default-domain opset, refused outside MIN_OPSET .. the installed onnx's newest."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise UnsupportedModelError(f"{where}: the model imports no default-domain (ai.onnx) opset")
    if len(versions) > 1:  # the checker accepts it; which one applies is anyone's guess
        raise UnsupportedModelError(f"{where}: the model imports the default domain (ai.onnx) {len(versions)} "
                                    f"times, as opsets {', '.join(map(str, versions))}; it must name one opset")
    newest = onnx.defs.onnx_opset_version()
    if not OLDEST_UPGRADABLE_OPSET <= versions[0] <= newest:
        raise UnsupportedModelError(f"{where}: opset {versions[0]} is not supported (supported: "
                                    f"{OLDEST_UPGRADABLE_OPSET}..{newest}; below {MIN_OPSET} upgraded to {UPGRADE_TO})")
    return versions[0]


def upgrade_opset(model: onnx.ModelProto, where: str, opset: int) -> onnx.ModelProto:
    """An opset 7..10 model upgraded to UPGRADE_TO by onnx.version_converter (old exports, such as
    tf2onnx's at opset 9, are common); the converters are written for opsets MIN_OPSET and up."""
    try:
        return onnx.version_converter.convert_version(model, UPGRADE_TO)
    except Exception as err:  # the converter raises RuntimeError, ValueError or its own C++ errors
        raise UnsupportedModelError(f"{where}: opset {opset} could not be upgraded to {UPGRADE_TO} by "
                                    f"onnx.version_converter: {first_line(err)}") from None


def graph_inputs(model: onnx.ModelProto) -> list[NetworkInput]:
    """The graph inputs that are not initializers (IR < 4 lists initializers as inputs too)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        elem_type = tensor_type.elem_type if kind == "tensor_type" else 0
        inputs.append(NetworkInput(value.name, dims, elem_type,
                                   type_name(elem_type) if kind == "tensor_type" else str(kind)))
    return inputs


def network_input(model: onnx.ModelProto, where: str) -> NetworkInput:
    """The one data input: rank 2..4, float, every dimension but the batch static."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise UnsupportedModelError(f"{where}: expected exactly one graph input (besides initializers), "
                                    f"found {len(inputs)}: {names}")
    value = inputs[0]
    if value.elem_type not in FLOAT_INPUTS:
        raise UnsupportedModelError(f"{where}: input {value.name!r} has type {value.type_name}; a float tensor "
                                    f"({', '.join(type_name(t) for t in FLOAT_INPUTS)}) is needed")
    if not 2 <= len(value.dims) <= 4:
        raise UnsupportedModelError(f"{where}: input {value.name!r} has rank {len(value.dims)}; supported ranks "
                                    "are 2 to 4 ([N, features], [N, C, L], [N, C, H, W])")
    shape = format_dims(value.dims)
    for axis, dim in enumerate(value.dims[1:], start=1):  # a batch of 0 is read as a dynamic batch
        if isinstance(dim, int) and dim <= 0:  # a dim_value of 0 is a size, not "unknown"
            raise UnsupportedModelError(f"{where}: input {value.name!r} {shape} has size {dim} in dimension "
                                        f"{axis}; every dimension needs a positive size")
        if not isinstance(dim, int):
            raise UnsupportedModelError(
                f"{where}: input {value.name!r} {shape} has a dynamic dimension {axis} ({dim!r}); only the batch "
                f"dimension (0) may be dynamic: pass --input-shape {_SAMPLE_DIMS[len(value.dims)]} (or calibration "
                "data, whose shape fixes it)")
    return value


_SAMPLE_DIMS = {2: "F", 3: "C,L", 4: "C,H,W"}  # how --input-shape names a sample's dimensions, by input rank


def fix_input_shape(model: onnx.ModelProto, sample_shape: Sequence[int], where: str) -> dict[str, int]:
    """Give the network input's dynamic dimensions (all but the batch) their sizes in `sample_shape`
    (a sample's shape, without the batch), in place; its static ones stay, for the caller to compare.
    Returns the sizes given, by dimension name."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        return {}  # network_input refuses it
    value = inputs[0]
    if all(isinstance(d, int) for d in value.dims[1:]):
        return {}  # nothing to size: the caller compares the static shape
    if len(sample_shape) != len(value.dims) - 1:
        raise UnsupportedModelError(f"{where}: input {value.name!r} {format_dims(value.dims)} takes samples of rank "
                                    f"{len(value.dims) - 1}, not of shape {list(sample_shape)}")
    proto = next(v for v in model.graph.input if v.name == value.name)
    fixed = {}
    for dim, old, size in zip(proto.type.tensor_type.shape.dim[1:], value.dims[1:], sample_shape):
        if not isinstance(old, int):
            dim.dim_value = int(size)  # clears dim_param, the oneof's other member
            fixed[old or "?"] = int(size)
    return fixed


def select_output(model: onnx.ModelProto, name: str, where: str) -> list[str]:
    """Keep only the graph output `name` and the nodes it needs, in place; returns the outputs dropped.
    Refuses a name that is no graph output, listing the outputs."""
    outputs = [value.name for value in model.graph.output]
    if name not in outputs:
        raise UnsupportedModelError(f"{where}: the model has no output {name!r}; its outputs are "
                                    f"{', '.join(map(repr, outputs)) or 'none'}")
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)  # what is kept is copied back from here
    needed, nodes = {name}, []
    for node in reversed(graph.node):  # the nodes are topologically sorted (the checker says so)
        if needed.intersection(node.output):
            needed.update(node.input)
            nodes.append(node)
    del model.graph.output[:], model.graph.node[:]
    model.graph.output.extend(value for value in graph.output if value.name == name)
    model.graph.node.extend(reversed(nodes))
    return [o for o in outputs if o != name]


def format_dims(dims: list[int | str | None]) -> str:
    """An input shape as messages show it: [N, 3, 224, 224] (a symbolic or unknown dimension by name)."""
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def probe_shape(value: NetworkInput, batch: int, where: str) -> tuple[int, ...]:
    """The shape of the importer's probe tensor, refused before allocation when it is too large."""
    shape = (batch, *value.dims[1:])
    if math.prod(shape) > MAX_PROBE_ELEMENTS:
        raise UnsupportedModelError(
            f"{where}: input {value.name!r} {format_dims(value.dims)} is too large: {math.prod(shape):,} elements "
            f"per {'batch' if batch > 1 else 'sample'}, more than the {MAX_PROBE_ELEMENTS:,} the importer handles")
    return shape


def check_tensors(model: onnx.ModelProto, where: str) -> None:
    """Every initializer and Constant tensor holds as many values as its dims say, and its small
    integers fit its type: numpy_helper would wrap a uint8 zero point of 300 silently to 44."""
    for tensor in _tensors(model):
        try:
            numpy_helper.to_array(tensor)
        except (ValueError, TypeError, KeyError) as err:  # KeyError: a data type onnx does not know
            raise UnsupportedModelError(f"{where}: tensor {tensor.name or '<constant>'!r} of shape "
                                        f"{list(tensor.dims)} is corrupt: {first_line(err)}") from None
        if tensor.data_type in _SMALL_INTEGERS and tensor.int32_data:
            low, high = _SMALL_INTEGERS[tensor.data_type]
            values = np.asarray(tensor.int32_data)
            bad = values[(values < low) | (values > high)]
            if bad.size:
                raise UnsupportedModelError(
                    f"{where}: tensor {tensor.name or '<constant>'!r} of type {type_name(tensor.data_type)} "
                    f"holds {int(bad[0])}, outside its range {low}..{high}")


def check_finite(model: onnx.ModelProto, where: str) -> None:
    """NaN or Inf in a weight would only surface as NaN logits much later: refuse it now.

    Only initializers: a Constant node may hold an infinite bound on purpose (Clip, padding value).
    """
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TENSORS:
            values = numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(values)):
                kind = "NaN" if np.isnan(values).any() else "Inf"
                raise UnsupportedModelError(f"{where}: initializer {tensor.name or '<constant>'!r} contains {kind}")


def onnxruntime_session(path: str | os.PathLike | bytes, integer_kernels: bool = False,
                        threads: int | None = None) -> "onnxruntime.InferenceSession":  # noqa: F821
    """A CPU onnxruntime session that computes the QDQ graph as written (no int8 weight rewriting),
    or with `integer_kernels` as its default session does (QDQ nodes fused into integer kernels),
    on `threads` threads (default: onnxruntime's); `path` may also be a serialized model. onnxruntime reads a file's external data itself: the file
    is checked first as every load is (reader.load_checked)."""
    import onnxruntime

    if not isinstance(path, bytes):
        load_checked(path, load_external_data=False)

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if not integer_kernels:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        options.intra_op_num_threads = threads
    # no arena: it would keep the largest batch's activations (680 MiB for 13 VGG16 images) for good
    options.enable_cpu_mem_arena = False
    model = path if isinstance(path, bytes) else str(path)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
