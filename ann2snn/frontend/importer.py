"""Import an ONNX CNN as a torch.fx GraphModule that the compiler's passes understand.

    gm = load_onnx("model.onnx")          # call_module: nn.Conv2d, nn.BatchNorm2d, nn.Linear, ...,
    gm, sites = qdq_to_sites(gm)          # QuantDequant -> QuantClippedActivation (ann2snn/compile/qdq_to_sites.py)

The emitted graph uses only the modules and functions listed in CONTRACT_MODULES and
CONTRACT_FUNCTIONS, constants are get_attr buffers of the root module (so `.double()` converts
them), dimension 0 is the batch and stays dynamic. Node and module names come from the ONNX node
names. Every refusal is an UnsupportedModelError with one line that begins with the file's path.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from . import converters  # noqa: F401  (registers the converters)
from .builder import GraphBuilder, sanitize
from .fold_constants import fold_constants
from ..ops import FUNCTION_OPS, MODULE_OPS
from ..runtime.quant import QuantDequant
from .qoperator import expand_qoperator, qoperator_support
from .inference import infer_shapes
from .reader import (FLOAT_INPUTS, check_finite, fix_input_shape, graph_inputs, network_input,
                     probe_shape, read_model, select_output, type_name)
from .registry import GraphView, find_converter, op_label, support_problem, supported_op_types
from ..runtime.graph import conversion_report
from ..errors import UnsupportedModelError

# What an imported graph may contain: the ops of ann2snn/ops.py, which the passes, the simulator,
# energy and the .snn serializer handle, and the float activations and QDQ pairs that the passes
# turn into sites. Indexing and attributes it never emits.
CONTRACT_MODULES = tuple(MODULE_OPS) + (nn.ReLU, nn.Hardtanh, QuantDequant)
CONTRACT_FUNCTIONS = tuple(fn for fn, op in FUNCTION_OPS.items() if op.kind != "access")

__all__ = ["load_onnx", "inspect_onnx", "save_as_imported", "supported_op_types", "QuantDequant",
           "CONTRACT_MODULES", "CONTRACT_FUNCTIONS"]


def _selected(path_or_model: str | os.PathLike | onnx.ModelProto, output: str | None,
              input_shape: Sequence[int] | None) -> tuple[onnx.ModelProto, str, int, int | None, list[dict]]:
    """read_model, then only the graph output `output` (when given) and the input's dynamic
    dimensions sized by `input_shape` (when given); with what that changed, as report entries."""
    model, where, opset, upgraded_from = read_model(path_or_model)
    rewrites = []
    if output is not None:
        rewrites.append({"pass": "import", "output": output, "dropped_outputs": select_output(model, output, where)})
    if input_shape is not None:
        sizes = fix_input_shape(model, input_shape, where)
        if sizes:
            rewrites.append({"pass": "import", "input_sizes": sizes})
    return model, where, opset, upgraded_from, rewrites


def load_onnx(path_or_model: str | os.PathLike | onnx.ModelProto, *, output: str | None = None,
              input_shape: Sequence[int] | None = None) -> fx.GraphModule:
    """The ONNX model as a torch.fx GraphModule in eval mode (see the module docstring).

    output: keep only this graph output (and the nodes it needs); the others are dropped first.
    input_shape: a sample's shape (without the batch) that sizes the input's dynamic dimensions.
    """
    model, where, opset, upgraded_from, rewrites = _selected(path_or_model, output, input_shape)
    # here, not in read_model: onnxruntime must still verify against the file as written (save_as_imported)
    model, qoperator = expand_qoperator(model, where)
    rewrites += [qoperator] if qoperator else []
    model = infer_shapes(model, where)
    data = network_input(model, where)
    check_finite(model, where)
    folding = fold_constants(model, where, opset)
    model = folding.model
    rewrites += folding.rewrite()
    declared = data.dims[0] if isinstance(data.dims[0], int) and data.dims[0] > 0 else None
    builder = GraphBuilder(where, opset, probe_batch=declared or 1, declared_batch=declared,
                           view=GraphView(model.graph, opset))
    builder.dequantized = folding.dequantized
    graph = model.graph
    builder.used_values = {name for node in graph.node for name in node.input if name}
    builder.used_values |= {value.name for value in graph.output}
    for tensor in graph.initializer:
        builder.env[tensor.name] = numpy_helper.to_array(tensor)
    dtype = getattr(torch, FLOAT_INPUTS[data.elem_type])
    probe = torch.zeros(probe_shape(data, builder.probe_batch, where), dtype=dtype)
    builder.env[data.name] = builder.placeholder(data.name, probe)
    for node in graph.node:
        builder.convert(node)
    unfused = builder.unfused_quantize()
    if unfused is not None:
        raise UnsupportedModelError(f"{where}: QuantizeLinear {unfused.node_name!r} is not followed by "
                                    "DequantizeLinear")
    builder.output_node([builder.env[v.name] for v in graph.output], [v.name for v in graph.output])
    gm = fx.GraphModule(builder.root, builder.graph, class_name=sanitize(graph.name, "OnnxGraph"))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.meta["onnx"] = {"file": where, "opset": opset, "upgraded_from": upgraded_from, "input": data.name,
                       "input_shape": data.dims,
                       "dtype": dtype, "outputs": [v.name for v in graph.output],
                       "fixed_batch_nodes": builder.fixed_batch_nodes, "selected_output": output,
                       "sized_input": any("input_sizes" in r for r in rewrites)}
    conversion_report(gm).rewrites.extend(rewrites + builder.rewrites)
    return gm.eval()


def save_as_imported(path: str | os.PathLike, gm: fx.GraphModule, folder: str | os.PathLike) -> str:
    """`path` itself, or, when `load_onnx` selected an output or sized the input for `gm`, that
    model saved in `folder` under the same file name: what onnxruntime must run to compare."""
    meta = gm.meta["onnx"]
    if meta["selected_output"] is None and not meta["sized_input"]:
        return str(path)
    model = _selected(path, meta["selected_output"], meta["input_shape"][1:] if meta["sized_input"] else None)[0]
    target = os.path.join(folder, os.path.basename(str(path)))
    onnx.save(model, target)
    return target


def inspect_onnx(path: str | os.PathLike | onnx.ModelProto) -> dict:
    """A summary of an ONNX file: opset, IR version, input, op counts (supported or not: a node that
    constant folding computes at import is), the folded nodes, QDQ pairs."""
    model, where, opset, upgraded_from = read_model(path)
    inputs = graph_inputs(model)
    counts = Counter(op_label(node) for node in model.graph.node)
    folding = fold_constants(_with_shapes(model), where, opset)
    view = GraphView(folding.model.graph, opset)   # support checks see the folded constants, as in convert
    qoperator = qoperator_support(model)  # nodes that convert rewrites first (qoperator.py)
    ops, refused = {}, {}
    for index, node in enumerate(model.graph.node):
        key = op_label(node)
        if index in folding.folded:   # computed at import: nothing of it is left to convert
            converter, problem = True, None
        elif index in qoperator:   # rewritten into QDQ first: what convert makes of its expansion
            converter, problem = True, qoperator[index]
        else:
            converter = find_converter(node.op_type, opset, node.domain)
            problem = support_problem(node, view) if converter is not None else None  # what convert refuses too
        if problem is not None:
            refused[node.name or f"{key}_{index}"] = problem
        supported = converter is not None and problem is None and ops.get(key, {}).get("supported", True)
        ops[key] = {"count": counts[key], "supported": supported}
    first = inputs[0] if inputs else None
    return {
        "file": where,
        "ir_version": model.ir_version,
        "opset": upgraded_from or opset,
        **({"upgraded_to_opset": opset} if upgraded_from else {}),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "input": {"name": first.name, "shape": first.dims,
                  "dtype": first.type_name}
        if first else None,
        "inputs": len(inputs),
        "outputs": [v.name for v in model.graph.output],
        "ops": ops,
        "all_ops_supported": all(v["supported"] for v in ops.values()),
        "refused_nodes": refused,  # nodes of a supported op that its support check refuses, and why
        "folded_nodes": folding.names,   # computed from constants and static shapes at import (fold_constants.py)
        "qdq_pairs": _qdq_pairs(model.graph, view),
    }


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the shapes onnx infers, which fold the Shape nodes of static dimensions; as it
    is where inference fails (convert refuses such a file, but `inspect` still summarizes it)."""
    try:
        return infer_shapes(model, "")
    except UnsupportedModelError:
        return model


def _range(low: float | None, high: float | None) -> str:
    """A Clip's range as text: 0..15 (an absent bound left empty)."""
    return f"{'' if low is None else f'{low:g}'}..{'' if high is None else f'{high:g}'}"


def _qdq_pairs(graph: onnx.GraphProto, view: GraphView) -> dict:
    """QuantizeLinear -> DequantizeLinear pairs on activations, keyed by the QuantizeLinear's name;
    with a Clip of the integers between them (QCDQ), its range."""
    constants = view.constants
    pairs = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        clips = [c for c in view.readers(node.output[0]) if c.op_type == "Clip"]
        dequantizers = [c for source in [node, *clips] for c in view.readers(source.output[0])
                        if c.op_type == "DequantizeLinear"]
        if not dequantizers:
            continue

        def value(position: int, node: onnx.NodeProto = node) -> list | float | None:
            if position >= len(node.input) or node.input[position] not in constants:
                return None
            try:  # a summary: a scale that is no number (a string tensor) is shown as unknown, not refused
                array = numpy_helper.to_array(constants[node.input[position]]).astype(np.float64).reshape(-1)
            except (ValueError, TypeError):
                return None
            if array.size == 0:
                return None
            return float(array[0]) if array.size == 1 else array.tolist()

        zero = constants.get(node.input[2]) if len(node.input) > 2 else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        pairs[node.name or f"QuantizeLinear_{index}"] = {
            # the names as one string: the CLI summarizes a list as a numeric range
            "input": node.input[0], "dequantize": ", ".join(d.name for d in dequantizers), "scale": value(1),
            "zero_point": value(2) if zero is not None else 0.0,
            "dtype": type_name(zero.data_type) if zero is not None else "UINT8", "axis": axis,
            "clip": ", ".join(_range(value(1, c), value(2, c)) for c in clips) or None}
    return pairs
