"""The graph that ann2snn/frontend/qoperator.py rewrites from QOperator into QDQ, and the nodes a
replacement is made of: its constants, the names in use, the scale and zero point of each quantized
tensor, and the DequantizeLinear, float op and QuantizeLinear written in place of a node.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .registry import decode_attribute, graph_constants


class Refused(Exception):
    """A node the rewrite cannot express; the message says why."""


class Rewrite:
    """The graph being rewritten: its constants, the names in use, and the scale and zero point of
    every quantized tensor (the outputs of QuantizeLinear and of the QOperator nodes)."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.opset = opset
        self.constants = graph_constants(graph)
        self.node_names = {n.name for n in graph.node}
        self.values = {v for n in graph.node for v in [*n.input, *n.output]}
        self.values |= {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | set(self.constants)
        self.quantized: dict[str, tuple[str, str]] = {}   # tensor -> (scale, zero point) names
        self.initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []               # the current node's replacement

    def fresh(self, base: str, names: set[str] | None = None) -> str:
        """A name not in `names` (the value names unless given), then taken."""
        names = self.values if names is None else names
        name, index = base, 1
        while name in names:
            index += 1
            name = f"{base}_{index}"
        names.add(name)
        return name

    def node_name(self, base: str) -> str:
        return self.fresh(base, self.node_names)

    def constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            raise Refused(f"{what} (input {index}) is absent")
        if node.input[index] not in self.constants:
            raise Refused(f"{what} ({node.input[index]!r}) is not a constant; the QDQ form needs fixed scales")
        return numpy_helper.to_array(self.constants[node.input[index]])

    def initializer(self, array: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(array, name))
        self.constants[name] = self.initializers[-1]
        return name

    def dequantize(self, node: onnx.NodeProto, tensor: str, scale: str, zero_point: str | None,
                   axis: int | None = None) -> str:
        """A DequantizeLinear of `tensor`, its float output's name."""
        output = self.fresh(f"{tensor}_dequantized")
        inputs = [tensor, scale] + ([zero_point] if zero_point else [])
        per_axis = numpy_helper.to_array(self.constants[scale]).size > 1 if scale in self.constants else False
        attributes = {"axis": axis} if per_axis and axis is not None else {}
        if attributes and self.opset < 13:
            raise Refused(f"per-channel scales need DequantizeLinear's axis (opset 13); the model imports opset "
                           f"{self.opset}")
        name = self.node_name(f"{node.name or node.output[0]}/DequantizeLinear")
        self.nodes.append(helper.make_node("DequantizeLinear", inputs, [output], name, **attributes))
        return output

    def quantize(self, node: onnx.NodeProto, value: str, scale: str, zero_point: str | None, output: str) -> None:
        """A QuantizeLinear of `value` into the QOperator node's own output, under the node's name."""
        self.nodes.append(helper.make_node("QuantizeLinear", [value, scale] + ([zero_point] if zero_point else []),
                                           [output], self.node_name(node.name or output)))
        self.quantized[output] = (scale, zero_point or "")

    def float_op(self, node: onnx.NodeProto, op_type: str, inputs: list[str], outputs: int = 1,
                 **attributes) -> list[str]:
        names = [self.fresh(f"{node.output[k]}_float") for k in range(outputs)]
        name = self.node_name(f"{node.name or node.output[0]}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, names, name, **attributes))
        return names

    def scalar(self, node: onnx.NodeProto, index: int, what: str) -> float:
        value = self.constant(node, index, what)
        if value.size != 1:
            raise Refused(f"{what} has {value.size} values; onnxruntime reads one (per tensor)")
        return float(value.reshape(()))


def op_attributes(node: onnx.NodeProto) -> dict:
    """The node's attributes for its float op: channels_last (an NHWC layout) is refused when set."""
    given = {a.name: decode_attribute(helper.get_attribute_value(a)) for a in node.attribute}
    if given.pop("channels_last", 0):
        raise Refused("channels_last=1 (an NHWC layout) is not supported")
    return given


def optional_input(node: onnx.NodeProto, index: int) -> str:
    """The node's input `index`, or "" when it has none there."""
    return node.input[index] if index < len(node.input) else ""
