"""Shape inference and the checker's view of a model: its skeleton, the graph without its weights'
data, which is all that either needs; and, when inference fails, the node at fault."""
from __future__ import annotations

import math

import onnx
import onnx.shape_inference
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto

from ..errors import UnsupportedModelError
from .registry import first_line

FLOAT_TENSORS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


_INFERENCE_ERRORS = (onnx.shape_inference.InferenceError, ValueError, RuntimeError)


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def infer_shapes(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """`model` with the value_info (and output types) of onnx's strict shape inference, in place
    (strict: a conflict is an error, which names the node at fault: onnx's own text names only its
    op type, and its name where it has one). Inference runs on its `shape_skeleton`: the weights'
    values never decide a shape, and copying them to C++ and back would take four times a large
    model's size."""
    skeleton = shape_skeleton(model)
    try:
        inferred = _inferred(skeleton)
    except _INFERENCE_ERRORS as err:
        index, detail = _failing_node(skeleton)
        if index is None:
            raise UnsupportedModelError(f"{where}: ONNX shape inference fails: {first_line(err)}") from None
        node = model.graph.node[index]
        name = repr(node.name) if node.name else "<unnamed>"
        raise UnsupportedModelError(f"{where}: ONNX shape inference fails at node {name} ({node.op_type}, number "
                                    f"{index} of {len(model.graph.node)}): {detail}") from None
    initializers = {t.name for t in model.graph.initializer}
    del model.graph.value_info[:], model.graph.output[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in initializers)
    model.graph.output.extend(inferred.graph.output)
    return model


# A float initializer of more elements than this is a weight, whose values no shape depends on.
_SKELETON_MIN_ELEMENTS = 1024


def large_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer
            if t.data_type in FLOAT_TENSORS and math.prod(t.dims) > _SKELETON_MIN_ELEMENTS]


def repeated_field(field: FieldDescriptor) -> bool:
    # `label` is gone from protobuf 6's descriptors, `is_repeated` new in them
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if repeated_field(field):
            getattr(target, field.name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large float initializers (weights) are graph inputs of the same type
    and shape instead: what the checker and shape inference need of the graph, without its data."""
    large = large_initializers(model)
    names = {t.name for t in large}
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip="initializer")
    graph.initializer.extend(t for t in model.graph.initializer if t.name not in names)
    declared = {value.name for value in model.graph.input}
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in large if t.name not in declared)
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    skeleton.graph.CopyFrom(graph)
    return skeleton


def _failing_node(model: onnx.ModelProto) -> tuple[int | None, str]:
    """The first node whose inference fails, with onnx's message, found by bisecting on prefixes of
    the (topologically sorted) graph, each with the graph outputs it computes; (None, "") when no
    prefix fails alone."""
    def failure(count: int) -> str | None:
        prefix = onnx.ModelProto()
        prefix.CopyFrom(model)
        nodes = list(prefix.graph.node)[:count]
        produced = {name for node in nodes for name in node.output}
        outputs = [value for value in prefix.graph.output if value.name in produced]
        del prefix.graph.node[:], prefix.graph.output[:]
        prefix.graph.node.extend(nodes)
        prefix.graph.output.extend(outputs)
        try:
            _inferred(prefix)
        except _INFERENCE_ERRORS as err:
            return first_line(err)
        return None

    low, high = 0, len(model.graph.node)   # the prefix of `low` nodes passes; find the shortest that fails
    if failure(high) is None:
        return None, ""
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if failure(middle) is None else (low, middle)
    return high - 1, failure(high)
