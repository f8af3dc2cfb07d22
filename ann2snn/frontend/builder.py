"""Builds the torch.fx graph of an ONNX graph, one node at a time, through the registered converters.

Every ONNX value becomes one of:
- an `fx.Node`: a tensor that depends on the network input; its dimension 0 is the batch, always
  (converters refuse what would move it), so the batch size stays dynamic;
- a `numpy.ndarray`: a constant: an initializer (fold_constants.py has made the outputs of every node
  computed from constants and inferred static shapes initializers, by onnx's reference
  implementation, so folding follows the spec exactly), or shape arithmetic on a Shape that only
  the probe's static shape knows, folded here the same way;
- a `BatchDependent`: a small integer tensor computed from the batch size, e.g. Shape -> Gather(0) ->
  Concat before a Reshape; evaluated at the two probe batch sizes (fold_constants.run_node), so a
  Reshape can tell which entry is the batch (it changes with it) from the static ones (they do not);
- a `Quantized`: the output of a QuantizeLinear on a tensor, waiting for its DequantizeLinear.

Each emitted node also runs once on a probe tensor at import, so converters know static shapes and
a node that cannot run fails here, with its ONNX name, not later in a pass.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import helper
from torch import fx, nn

from ..errors import UnsupportedModelError
from .fold_constants import BatchDependent, run_node
from .registry import GraphView, attribute_defaults, decode_attribute, first_line, get_converter, node_problem


@dataclass
class Quantized:
    """A QuantizeLinear on a tensor: becomes a QuantDequant when its DequantizeLinear comes."""

    source: fx.Node
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int
    node_name: str
    fused: dict = field(default_factory=dict)  # what undid it: "node", its QuantDequant; or "clip", a QCDQ Clip


# The ops that may read a QuantizeLinear's integers: its DequantizeLinear, and a Clip between them
# (QCDQ, Brevitas' export of fewer bits than the integer type holds).
READS_INTEGERS = frozenset({"DequantizeLinear", "Clip"})

Value = Any  # fx.Node | np.ndarray | BatchDependent | Quantized | None (an absent optional input)


def sanitize(name: str, fallback: str) -> str:
    """A Python identifier from an ONNX name: '/layer1/conv/Conv' -> 'layer1_conv_Conv'."""
    text = re.sub(r"\W+", "_", name).strip("_") or fallback
    if text[0].isdigit() or keyword.iskeyword(text):
        text = f"n_{text}"
    return text


class GraphBuilder:
    """The fx graph under construction, with its root module of layers and constant buffers."""

    def __init__(self, where: str, opset: int, probe_batch: int, declared_batch: int | None,
                 view: GraphView | None = None) -> None:
        self.where = where
        self.opset = opset
        self.view = view  # for the converters' support checks (registry.GraphView)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self.probes: dict[fx.Node, torch.Tensor] = {}
        self.probe_batch = probe_batch
        # A file exported with a fixed batch size B0 has constant reshape targets [B0, ...]:
        # their B0 is read as the (now dynamic) batch size.
        self.declared_batch = declared_batch
        self._buffers: dict[int, tuple[np.ndarray, fx.Node]] = {}
        self._quantized: list[Quantized] = []
        self.used_values: set[str] = set()
        self.fixed_batch_nodes: list[str] = []  # nodes whose constants fit the declared batch only
        self.rewrites: list[dict] = []  # what the import changed, for the conversion report
        self.dequantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # fold_constants.Folding.dequantized

    # --- naming ----------------------------------------------------------------------------
    def attribute_name(self, base: str) -> str:
        """An attribute name for the root module that nothing uses yet."""
        name, index = base, 1
        while hasattr(self.root, name) or hasattr(nn.Module, name) or hasattr(fx.GraphModule, name):
            index += 1
            name = f"{base}_{index}"
        return name

    # --- emitting nodes --------------------------------------------------------------------
    def placeholder(self, name: str, probe: torch.Tensor) -> fx.Node:
        node = self.graph.placeholder(sanitize(name, "input"))
        self.probes[node] = probe
        return node

    def buffer(self, array: np.ndarray, base: str) -> fx.Node:
        """A get_attr node of a constant, registered as a buffer of the root module."""
        key = id(array)  # the same constant used twice gets one buffer
        if key in self._buffers:
            return self._buffers[key][1]
        tensor = to_torch(array, self.where, base)
        name = self.attribute_name(sanitize(base, "const"))
        self.root.register_buffer(name, tensor)
        node = self.graph.get_attr(name)
        self.probes[node] = tensor
        self._buffers[key] = (array, node)  # holding the array keeps its id unique
        return node

    def call_module(self, module: nn.Module, args: tuple, base: str, onnx_node: onnx.NodeProto) -> fx.Node:
        name = self.attribute_name(base)
        self.root.add_module(name, module.eval())
        node = self.graph.call_module(name, args)
        # a layer's quantized weight and bias: their scales and zero points, for the integer SNN
        # (compile/integer_weights.py)
        for meta, index in (("weight", 1), ("bias", 2)):
            if hasattr(module, "weight") and len(onnx_node.input) > index and \
                    onnx_node.input[index] in self.dequantized:
                scale, zero = self.dequantized[onnx_node.input[index]]
                node.meta[f"{meta}_scale"], node.meta[f"{meta}_zero_point"] = map(torch.from_numpy, (scale, zero))
        return self._probe(node, module, args, {}, onnx_node)

    def call_function(self, fn: Callable, args: tuple, kwargs: dict | None, base: str,
                      onnx_node: onnx.NodeProto) -> fx.Node:
        node = self.graph.create_node("call_function", fn, args, kwargs or {}, name=base)
        return self._probe(node, fn, args, kwargs or {}, onnx_node)

    def _probe(self, node: fx.Node, fn: Callable, args: tuple, kwargs: dict, onnx_node: onnx.NodeProto) -> fx.Node:
        """Run the new node on the probe values of its inputs (no grad), for static shapes."""
        node.meta["onnx_node"] = onnx_node.name
        node.meta["onnx_op"] = onnx_node.op_type
        real_args, real_kwargs = fx.node.map_arg((args, kwargs), lambda n: self.probes[n])
        try:
            with torch.no_grad():
                self.probes[node] = fn(*real_args, **real_kwargs)
            node.meta["rank"] = self.probes[node].dim()
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise UnsupportedModelError(
                node_problem(self.where, onnx_node, self.opset, f"cannot run: {first_line(err)}")) from None
        return node

    # --- the ONNX graph --------------------------------------------------------------------
    def convert(self, node: onnx.NodeProto) -> None:
        converter = get_converter(node, self.opset, self.where, self.view)
        ctx = NodeContext(self, node)
        inputs = [self.env.get(name) if name else None for name in node.input]
        missing = [name for name in node.input if name and name not in self.env]
        if missing:
            raise UnsupportedModelError(f"{self.where}: node {node.name!r} ({node.op_type}) reads undefined "
                                        f"value {missing[0]!r} (the graph is not topologically sorted)")
        if not any(isinstance(v, (fx.Node, Quantized)) for v in inputs):
            outputs = ctx.fold(inputs)
        else:
            outputs = converter(ctx)
            ctx.check_attributes_read()
        for index, name in enumerate(node.output):
            if not name:
                continue
            if index >= len(outputs) or outputs[index] is None:
                if name in self.used_values:
                    ctx.fail(f"output {index} ({name!r}) is not supported")
                continue
            self.env[name] = outputs[index]

    def quantized(self, value: Quantized) -> Quantized:
        self._quantized.append(value)
        return value

    def unfused_quantize(self) -> Quantized | None:
        """A QuantizeLinear on a tensor that no DequantizeLinear undid, if any."""
        return next((q for q in self._quantized if not q.fused), None)

    def output_node(self, values: list[Value], names: list[str]) -> None:
        results = []
        for name, value in zip(names, values):
            if isinstance(value, Quantized):
                raise UnsupportedModelError(
                    f"{self.where}: QuantizeLinear {value.node_name!r} is not followed by DequantizeLinear "
                    f"(its integer output {name!r} is a graph output)")
            if isinstance(value, BatchDependent):
                raise UnsupportedModelError(f"{self.where}: graph output {name!r} is computed from the batch size")
            if isinstance(value, np.ndarray):
                value = self.buffer(value, name)
            results.append(value)
        self.graph.output(results[0] if len(results) == 1 else tuple(results))


class NodeContext:
    """What a converter sees of one ONNX node: attributes with the spec's defaults, inputs, and emitters."""

    def __init__(self, builder: GraphBuilder, node: onnx.NodeProto) -> None:
        self.builder = builder
        self.node = node
        self.opset = builder.opset
        self.op_type = node.op_type
        self.name = sanitize(node.name, node.op_type.lower())
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=builder.opset, domain=node.domain)
        self._defaults = attribute_defaults(schema)
        self._given = {a.name: decode_attribute(helper.get_attribute_value(a)) for a in node.attribute}
        self._read: set[str] = set()

    # --- errors ----------------------------------------------------------------------------
    def fail(self, detail: str) -> None:
        raise UnsupportedModelError(node_problem(self.builder.where, self.node, self.opset, detail))

    def unsupported(self, attribute: str, value: Any, why: str = "") -> None:
        self.fail(f"attribute {attribute}={value!r} is not supported" + (f" ({why})" if why else ""))

    # --- attributes ------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """The attribute's value, else the spec's default, else `default`."""
        self._read.add(name)
        if name in self._given:
            return self._given[name]
        return self._defaults.get(name, default)

    def has_attr(self, name: str) -> bool:
        return name in self._given

    def check_attributes_read(self) -> None:
        """An attribute the converter never looked at must not change the result: refuse it."""
        for name, value in self._given.items():
            if name not in self._read and value != self._defaults.get(name, object()):
                self.unsupported(name, value, "not read by the converter")

    # --- inputs ----------------------------------------------------------------------------
    def has_input(self, index: int) -> bool:
        return index < len(self.node.input) and bool(self.node.input[index])

    def input(self, index: int) -> Value:
        if not self.has_input(index):
            return None
        value = self.builder.env[self.node.input[index]]
        if isinstance(value, Quantized) and self.op_type not in READS_INTEGERS:
            self.fail(f"QuantizeLinear {value.node_name!r} is not followed by DequantizeLinear "
                      f"(its integer output feeds {self.op_type})")
        return value

    def dynamic(self, index: int) -> fx.Node:
        """Input `index`, which must depend on the network input."""
        value = self.input(index)
        if not isinstance(value, fx.Node):
            self.fail(f"input {index} ({self.node.input[index]!r}) must be the network's data, not a constant")
        return value

    def constant(self, index: int, what: str = "") -> np.ndarray | None:
        """Input `index` as a constant array (None when the optional input is absent)."""
        value = self.input(index)
        if value is None or isinstance(value, np.ndarray):
            return value
        kind = "depends on the batch size" if isinstance(value, BatchDependent) else "is not a constant"
        self.fail(f"input {index} ({what or self.node.input[index]!r}) {kind}; only constant values are supported")

    def is_dynamic(self, index: int) -> bool:
        return isinstance(self.input(index), fx.Node)

    def shape(self, value: fx.Node) -> tuple[int, ...]:
        """The shape of a tensor at the probe batch size (dimension 0 is the batch)."""
        return tuple(self.builder.probes[value].shape)

    def probe(self, value: fx.Node) -> torch.Tensor:
        return self.builder.probes[value]

    def output_used(self, index: int) -> bool:
        return index < len(self.node.output) and self.node.output[index] in self.builder.used_values

    # --- emitters ----------------------------------------------------------------------------
    def tensor(self, value: fx.Node | np.ndarray, base: str = "") -> fx.Node:
        """A graph value for an operand: the node itself, or a constant as a get_attr buffer."""
        if isinstance(value, fx.Node):
            return value
        return self.builder.buffer(value, base or f"{self.name}_const")

    def call_module(self, module: nn.Module, *args: Any, suffix: str = "") -> fx.Node:
        return self.builder.call_module(module, args, self.name + suffix, self.node)

    def call_function(self, fn: Callable, *args: Any, suffix: str = "", **kwargs: Any) -> fx.Node:
        return self.builder.call_function(fn, args, kwargs, self.name + suffix, self.node)

    def fold(self, inputs: list[Value]) -> list[Value]:
        """Shape arithmetic on what only the probes know: batch-dependent values, and the shapes
        that shape inference left unknown (fold_constants.py folded everything else before)."""
        try:
            return run_node(self.node, inputs, self.opset)
        except Exception as err:  # the reference implementation raises many kinds
            self.fail(f"cannot fold constant inputs: {first_line(err)}")


def to_torch(array: np.ndarray, where: str, name: str) -> torch.Tensor:
    """A constant as a torch tensor (refuses dtypes torch lacks: strings, float8, int4)."""
    try:
        return torch.from_numpy(np.array(array, copy=True))
    except TypeError:
        raise UnsupportedModelError(
            f"{where}: constant {name!r} has dtype {array.dtype}, which torch cannot hold") from None
