"""Pass: constant folding at import, on the ONNX graph, before any converter runs.

A value is constant when it depends only on initializers, Constant nodes and the static entries of
shapes: a Shape of a tensor whose dimensions shape inference knows, except dimension 0, the batch,
which stays dynamic (the SNN takes any batch size). Exporters compute pads, Reshape targets, axes,
Slice bounds and Resize scales this way (Shape -> Gather -> Concat -> Cast, ConstantOfShape,
Range, ...). Each such node is run by onnx's reference implementation, as the model's opset
defines it, and its outputs become initializers; so a converter and a support check (`inspect`
too) see a constant, and the node is gone.

What depends on the batch size is evaluated at the two BATCH_PROBES: an output equal at both is
constant; one that differs stays in the graph and reaches the builder as a `BatchDependent`,
which it evaluates the same way (`evaluate`), so that a Reshape can tell the batch entry of its
target (it changes with the batch) from the static ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.defs
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError
from .registry import first_line, node_problem, op_label

# Two batch sizes at which batch-dependent shape arithmetic is evaluated.
BATCH_PROBES = (2, 3)


@dataclass
class BatchDependent:
    """An integer tensor computed from the batch size: its values at the two BATCH_PROBES."""

    values: tuple[np.ndarray, np.ndarray]


Known = np.ndarray | BatchDependent


def fold_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run `node` on constant inputs with onnx's reference implementation, as opset `opset` defines it."""
    from onnx.reference import ReferenceEvaluator

    feeds = {name: value for name, value in zip(node.input, inputs) if name}
    untyped = onnx.TypeProto()
    # a model, not the bare node: only a model's opset import selects the op's version
    graph = helper.make_graph([node], "fold", [helper.make_value_info(name, untyped) for name in feeds],
                              [helper.make_value_info(name, untyped) for name in node.output if name])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        evaluator = ReferenceEvaluator(model)
    except RuntimeError:  # no implementation as old as `opset`: the later one computes the same on valid inputs
        evaluator = ReferenceEvaluator(node)
    return [np.asarray(v) for v in evaluator.run(None, feeds)]


def run_node(node: onnx.NodeProto, inputs: list[Known | None], opset: int) -> list[Known]:
    """The outputs of `node` on constant or batch-dependent inputs: with a batch-dependent input,
    run at each probe; an output equal at both is a constant."""
    if not any(isinstance(v, BatchDependent) for v in inputs):
        return fold_node(node, inputs, opset)
    runs = [fold_node(node, [v.values[k] if isinstance(v, BatchDependent) else v for v in inputs], opset)
            for k in (0, 1)]
    return [a if a.shape == b.shape and np.array_equal(a, b) else BatchDependent((a, b)) for a, b in zip(*runs)]


def shape_of(static: list[int | None], start: int, end: int | None) -> Known:
    """ONNX Shape(start, end) of a tensor whose dimensions but the batch are `static`: a constant
    where the slice leaves the batch out, else its value at each probe. (Python's slice clamps and
    counts from the end as the spec says.)"""
    shapes = [np.array([batch, *static], dtype=np.int64)[start:end] for batch in BATCH_PROBES]
    return shapes[0] if np.array_equal(*shapes) else BatchDependent((shapes[0], shapes[1]))


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every value whose dimensions after the first are all known to shape inference: those dimensions."""
    dims = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shape = value.type.tensor_type.shape
        if value.type.HasField("tensor_type") and shape.dim and all(d.HasField("dim_value") for d in shape.dim[1:]):
            dims[value.name] = [d.dim_value for d in shape.dim[1:]]
    return dims


def _foldable(node: onnx.NodeProto, opset: int) -> bool:
    """A node the reference implementation may run once for all: ONNX's own deterministic ops,
    without subgraphs (whose outer-scope values it would not see)."""
    if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                 for a in node.attribute):
        return False
    try:
        return not onnx.defs.get_schema(node.op_type, max_inclusive_version=opset).non_deterministic
    except onnx.defs.SchemaError:
        return False


@dataclass
class Folding:
    """What `fold_constants` did: the model without the folded nodes, and which nodes they were."""

    model: onnx.ModelProto
    folded: list[int]   # indices of the folded nodes in the input model's node list
    names: list[str]    # their names, Constant nodes left out (they computed nothing)
    # the float constants that a folded DequantizeLinear computed from integers (quantized weights
    # and biases), by name: their scales and zero points, which the integer SNN needs back
    dequantized: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def rewrite(self) -> list[dict]:
        """The conversion report's entry, when something was computed."""
        return [{"pass": "fold_constants", "nodes": self.names}] if self.names else []


def fold_constants(model: onnx.ModelProto, where: str, opset: int) -> Folding:
    """`model` with every node whose outputs are constant (module docstring) replaced by
    initializers of those outputs; shape arithmetic that is left with no reader goes too."""
    graph = model.graph
    static = _static_dims(model)
    known: dict[str, Known] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    folded: set[int] = set()
    dequantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    evaluated: set[int] = set()   # nodes whose outputs are known, constant or batch-dependent
    for index, node in enumerate(graph.node):
        data = [name for name in node.input if name and name not in known]
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and data and node.input[0] in static:
            attributes = {a.name: a.i for a in node.attribute}
            outputs = [shape_of(static[node.input[0]], attributes.get("start", 0), attributes.get("end"))]
        elif not data and _foldable(node, opset):
            try:
                outputs = run_node(node, [known[name] if name else None for name in node.input], opset)
            except Exception as err:  # the reference implementation raises many kinds
                raise UnsupportedModelError(
                    node_problem(where, node, opset, f"cannot fold constant inputs: {first_line(err)}")) from None
        else:
            continue
        known.update((name, value) for name, value in zip(node.output, outputs) if name)
        evaluated.add(index)
        grid = _integer_grid(node, known)
        if grid is not None:
            dequantized[node.output[0]] = grid
        if all(isinstance(value, np.ndarray) for value in outputs):
            folded.add(index)
    folded |= _unread(graph, evaluated - folded, folded)
    return _without(model, folded, known, where, dequantized)


def _integer_grid(node: onnx.NodeProto, known: dict[str, Known]) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of a DequantizeLinear of an int8, uint8 or int32 constant, flattened (the
    zero point int32, zeros where the file gives none)."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    x, scale = (known.get(name) for name in node.input[:2])
    zero = known.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if not isinstance(x, np.ndarray) or x.dtype not in (np.int8, np.uint8, np.int32) or \
            not isinstance(scale, np.ndarray):
        return None
    if zero is not None and not isinstance(zero, np.ndarray):
        return None
    zero = np.zeros(1, np.int32) if zero is None else zero.astype(np.int32).reshape(-1)
    return scale.astype(np.float32).reshape(-1), zero


def _unread(graph: onnx.GraphProto, candidates: set[int], folded: set[int]) -> set[int]:
    """The `candidates` (batch-dependent shape arithmetic) whose outputs nothing left reads."""
    gone = set(folded)
    while True:
        read = {name for index, node in enumerate(graph.node) if index not in gone for name in node.input}
        read |= {value.name for value in graph.output}
        unread = {i for i in candidates - gone if not read.intersection(graph.node[i].output)}
        if not unread:
            return gone - folded
        gone |= unread


def _without(model: onnx.ModelProto, folded: set[int], known: dict[str, Known], where: str,
             dequantized: dict[str, tuple[np.ndarray, np.ndarray]]) -> Folding:
    """A copy of `model` without the `folded` nodes, their outputs that are still read as initializers."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    kept = [node for index, node in enumerate(graph.node) if index not in folded]
    read = {name for node in kept for name in node.input} | {value.name for value in graph.output}
    for index in sorted(folded):
        for name in graph.node[index].output:
            if name in read and isinstance(known.get(name), np.ndarray):
                try:
                    graph.initializer.append(numpy_helper.from_array(known[name], name))
                except (TypeError, ValueError) as err:
                    raise UnsupportedModelError(f"{where}: folded value {name!r} of dtype {known[name].dtype} "
                                                f"cannot be stored: {first_line(err)}") from None
    names = [graph.node[i].name or f"{op_label(graph.node[i])}_{i}" for i in sorted(folded)
             if graph.node[i].op_type != "Constant"]
    del graph.node[:]
    graph.node.extend(kept)
    return Folding(result, sorted(folded), names, dequantized)
