"""Small helpers shared by the passes: module lookup and node predicates on torch.fx graphs."""
from __future__ import annotations

from torch import fx, nn

from ..neuron import BitSerialIFNode
from ..ops import LAYERS, NORMS, OUTPUT_OPS
from ..quant import QuantClippedActivation

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


def is_output_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An OUTPUT_OPS module whose result goes only to the graph's output."""
    return is_instance_node(gm, node, OUTPUT_OPS) and all(user.op == "output" for user in node.users)


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


def conversion_report(gm: fx.GraphModule) -> dict:
    """The report that the passes fill in gm.meta as they rewrite the graph."""
    return gm.meta.setdefault("conversion_report", {"sites": {}, "rewrites": []})


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
