"""Which converter handles an ONNX node: one small function per (domain, op type, schema version).

As in onnx2torch, a converter is registered at the since-version of an operator schema, and
`onnx.defs.get_schema(op, max_inclusive_version=opset).since_version` tells which schema a
model's opset means; so one registration serves every opset until the schema changes. No table
of opsets is written by hand.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import onnx
import onnx.defs

from ..errors import UnsupportedModelError

# A converter gets the node's context (see builder.NodeContext) and returns one value per output.
Converter = Callable[[Any], list]


class OperationKey(NamedTuple):
    domain: str
    op_type: str
    version: int


_CONVERTERS: dict[OperationKey, Converter] = {}


# Activations no bit-serial neuron can represent (METHOD.md section 1: a site is a clipped ReLU).
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


def get_converter(node: onnx.NodeProto, opset: int, where: str = "<model>") -> Converter:
    """The converter of `node`, else UnsupportedModelError naming file, node, op and opset."""
    converter = find_converter(node.op_type, opset, node.domain)
    if converter is None:
        op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        hint = (f"; a bit-serial neuron fires only ReLU-like (clipped, non-negative) levels: retrain it with ReLU "
                f"(ann2snn train --init {where} ...)" if node.op_type in NON_SPIKING_ACTIVATIONS else "")
        raise UnsupportedModelError(
            f"{where}: node {node.name or '<unnamed>'!r}: op {op} (opset {opset}) is not supported{hint}; "
            f"supported op types: {', '.join(supported_op_types())}")
    return converter
