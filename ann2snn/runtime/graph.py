"""Small helpers shared by the passes: module lookup and node predicates on torch.fx graphs."""
from __future__ import annotations

import torch
from torch import fx, nn

from .metadata import ConversionReport
from .neuron import BitSerialIFNode
from ..ops import (FUNCTION_OPS, HEAD_FUNCTIONS, HEAD_METHODS, HEAD_MODULES, LAYERS, METHOD_KINDS, NORMS,
                   STRUCTURAL)
from .quant import QuantClippedActivation, QuantDequant

# layers and unfolded norms: a bias shift goes into their bias (ann2snn/ops.py)
LINEAR_PRODUCERS = LAYERS + NORMS


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a call_module node runs, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def is_instance_node(gm: fx.GraphModule, node: object, types: tuple[type, ...]) -> bool:
    return isinstance(node, fx.Node) and isinstance(module_of(gm, node), types)


def site_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Activation sites of a quantized ANN graph, in graph order."""
    return [n for n in gm.graph.nodes if is_instance_node(gm, n, (QuantClippedActivation,))]


def neuron_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Bit-serial neurons of a converted SNN graph, in graph order."""
    return [n for n in gm.graph.nodes if is_instance_node(gm, n, (BitSerialIFNode,))]


def _is_access(node: fx.Node) -> bool:
    """A size or attribute of a value (x.size(0), getattr(x, "shape")): no values of its own."""
    kind = METHOD_KINDS.get(node.target) if node.op == "call_method" else \
        getattr(FUNCTION_OPS.get(node.target), "kind", None) if node.op == "call_function" else None
    return kind == "access"


def head_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The one value an op of the output head computes on; None when `node` is no such op, or reads
    other values too."""
    if node.op == "call_module":
        is_head = isinstance(module_of(gm, node), HEAD_MODULES + (QuantDequant,))
    else:
        is_head = (node.op == "call_function" and node.target in HEAD_FUNCTIONS) or (
            node.op == "call_method" and node.target in HEAD_METHODS)
    values = [a for a in node.all_input_nodes if not _is_access(a)]
    return values[0] if is_head and len(values) == 1 else None


def output_head(gm: fx.GraphModule) -> list[fx.Node]:
    """The output head, in graph order: the chain of ops (softmax, log-softmax, sigmoid, QDQ pairs,
    flatten, reshapes: ann2snn/ops.py) that ends the graph and computes on the last layer's output
    alone, each used only by the next (or by a size the next reads)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    head: list[fx.Node] = []
    value = output.args[0]
    while isinstance(value, fx.Node):
        source = head_input(gm, value)
        later = set(head[-1:]) | {output}
        if source is None or not all(user in later or _is_access(user) for user in value.users):
            break
        head.append(value)
        value = source
    return head[::-1]


def head_arithmetic(gm: fx.GraphModule) -> list[fx.Node]:
    """The ops of the output head that compute (Softmax, LogSoftmax, Sigmoid, QDQ pairs), not reshapes."""
    return [n for n in output_head(gm) if n.op == "call_module" and not isinstance(module_of(gm, n), STRUCTURAL)]


def node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as a refusal names it: its ONNX node, op and the file's opset where it came from a file
    (ann2snn.frontend.registry.node_problem), else its graph node and module type."""
    module = module_of(gm, node)
    op = node.meta.get("onnx_op") or (type(module).__name__ if module is not None else
                                      getattr(node.target, "__name__", str(node.target)))
    opset = getattr(gm, "meta", {}).get("onnx", {}).get("opset")
    return f"node {node.meta.get('onnx_node', node.name)!r} ({op}{f', opset {opset}' if opset else ''})"


def layer_weight_dtypes(gm: fx.GraphModule) -> dict[str, torch.dtype]:
    """Layer name -> the dtype of its weight, for each module the graph calls that holds a `weight`
    tensor, in graph order (so the first is the layer that encodes the input)."""
    dtypes: dict[str, torch.dtype] = {}
    for node in gm.graph.nodes:
        weight = getattr(module_of(gm, node), "weight", None)
        if isinstance(weight, torch.Tensor) and node.target not in dtypes:
            dtypes[node.target] = weight.dtype
    return dtypes


def free_name(gm: fx.GraphModule, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first name no attribute of `gm` has."""
    name, index = base, 0
    while hasattr(gm, name):
        index += 1
        name = f"{base}_{index}"
    return name


def set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Install `module` at a dotted path, replacing what was there."""
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def conversion_report(gm: fx.GraphModule) -> ConversionReport:
    """The report that the passes fill in gm.meta as they rewrite the graph."""
    return gm.meta.setdefault("conversion_report", ConversionReport())


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
