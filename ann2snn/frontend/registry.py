"""Which converter handles an ONNX node: one small function per (domain, op type, schema version).

As in onnx2torch, a converter is registered at the since-version of an operator schema, and
`onnx.defs.get_schema(op, max_inclusive_version=opset).since_version` tells which schema a
model's opset means; so one registration serves every opset until the schema changes. No table
of opsets is written by hand.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import onnx
import onnx.defs
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError

# A converter gets the node's context (see builder.NodeContext) and returns one value per output.
Converter = Callable[[Any], list]


class OperationKey(NamedTuple):
    domain: str
    op_type: str
    version: int


_CONVERTERS: dict[OperationKey, Converter] = {}


def attribute_defaults(schema: onnx.defs.OpSchema) -> dict[str, Any]:
    """The spec's default of every attribute that has one."""
    defaults = {}
    for name, attribute in schema.attributes.items():
        default = attribute.default_value
        if default.type != onnx.AttributeProto.UNDEFINED:
            defaults[name] = decode_attribute(helper.get_attribute_value(default))
    return defaults


def decode_attribute(value: Any) -> Any:
    """An attribute value with its strings (bytes in the protobuf) as str."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [decode_attribute(v) for v in value]
    return value


def graph_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name: its initializers and the outputs of its Constant nodes."""
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            constants[node.output[0]] = node.attribute[0].t
    return constants


class GraphView:
    """What a support check sees of an ONNX graph, the same for `convert` and `inspect`: a node's
    attributes with the spec's defaults, the constant tensors (initializers, Constant nodes), and
    who reads each value. No shapes: `inspect` infers none, so a check cannot depend on them."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.opset = opset
        self.outputs = {value.name for value in graph.output}
        self.constants = graph_constants(graph)
        self._readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self._readers.setdefault(name, []).append(node)

    def attributes(self, node: onnx.NodeProto) -> dict[str, Any]:
        """The node's attributes, the spec's default for each one not given."""
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=self.opset, domain=node.domain)
        return {**attribute_defaults(schema),
                **{a.name: decode_attribute(helper.get_attribute_value(a)) for a in node.attribute}}

    def constant(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        """Input `index` of `node` when it is an initializer or a Constant, else None."""
        if index >= len(node.input) or node.input[index] not in self.constants:
            return None
        return numpy_helper.to_array(self.constants[node.input[index]])

    def readers(self, value: str) -> list[onnx.NodeProto]:
        """The nodes that read `value`."""
        return self._readers.get(value, [])

    def consumers(self, value: str) -> list[onnx.NodeProto] | None:
        """The nodes that read `value`; None when it is also a graph output."""
        return None if value in self.outputs else self.readers(value)


# A support check: None when the converter handles the node as the graph uses it, else the reason.
SupportCheck = Callable[[onnx.NodeProto, GraphView], "str | None"]
_CHECKS: dict[tuple[str, str], SupportCheck] = {}


# Activations no bit-serial neuron can represent (docs/method.md section 1: a site is a clipped ReLU).
NON_SPIKING_ACTIVATIONS = frozenset({"HardSwish", "HardSigmoid", "PRelu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu",
                                     "Mish", "Softplus", "Softsign", "Swish", "Tanh", "ThresholdedRelu"})


def add_converter(op_type: str, version: int, domain: str = "") -> Callable[[Converter], Converter]:
    """Register the decorated function for schema `version` (a since-version) of `op_type`."""
    key = OperationKey(domain, op_type, version)

    def register(converter: Converter) -> Converter:
        if key in _CONVERTERS:
            raise ValueError(f"converter for {key} registered twice")
        _CONVERTERS[key] = converter
        return converter

    return register


def add_support_check(op_type: str, domain: str = "") -> Callable[[SupportCheck], SupportCheck]:
    """Register the decorated function as the attribute check of every version of `op_type`: run
    before its converter by `convert`, and by `inspect`, so that the two always agree."""
    def register(check: SupportCheck) -> SupportCheck:
        _CHECKS[(domain, op_type)] = check
        return check

    return register


def support_problem(node: onnx.NodeProto, view: GraphView) -> str | None:
    """Why the converter of `node` refuses it as the graph uses it (its support check), else None."""
    check = _CHECKS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
    return check(node, view) if check is not None else None


def supported_op_types() -> list[str]:
    """Op types (default domain) with at least one converter, sorted."""
    return sorted({key.op_type for key in _CONVERTERS if key.domain == ""})


def find_converter(op_type: str, opset: int, domain: str = "") -> Converter | None:
    """The converter for `op_type` as opset `opset` defines it, or None."""
    domain = "" if domain == "ai.onnx" else domain
    try:
        schema = onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain=domain)
    except onnx.defs.SchemaError:
        return None
    return _CONVERTERS.get(OperationKey(domain, op_type, schema.since_version))


def op_label(node: onnx.NodeProto) -> str:
    """The node's op, with its domain where that is not ONNX's own (com.microsoft::QLinearAdd)."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def node_problem(where: str, node: onnx.NodeProto, opset: int, problem: str) -> str:
    """The one line that refuses a node: file, node, op and opset, then what is wrong."""
    return f"{where}: node {node.name or '<unnamed>'!r} ({op_label(node)}, opset {opset}): {problem}"


def get_converter(node: onnx.NodeProto, opset: int, where: str = "<model>",
                  view: GraphView | None = None) -> Converter:
    """The converter of `node`, else UnsupportedModelError naming file, node, op and opset; with
    `view`, also refused when its support check says why."""
    converter = find_converter(node.op_type, opset, node.domain)
    problem = support_problem(node, view) if converter is not None and view is not None else None
    if problem is not None:
        raise UnsupportedModelError(node_problem(where, node, opset, problem))
    if converter is None:
        op = op_label(node)
        hint = (f"; a bit-serial neuron fires only ReLU-like (clipped, non-negative) levels: retrain it with ReLU "
                f"(ann2snn train --init {where} ...)" if node.op_type in NON_SPIKING_ACTIVATIONS else "")
        raise UnsupportedModelError(
            f"{where}: node {node.name or '<unnamed>'!r}: op {op} (opset {opset}) is not supported{hint}; "
            f"supported op types: {', '.join(supported_op_types())}")
    return converter


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
