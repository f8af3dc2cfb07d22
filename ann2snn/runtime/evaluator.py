"""Lowering to the time-folded evaluator (docs/method.md section 7, the fast path).

By linearity sum_t 2^(T-1-t) W s_t = W q, so each layer consumes the levels q (times theta)
directly and runs at about the cost of the ANN; a neuron's spike count is popcount(q). Levels are
the exact floor(V / theta) that the simulator's compare-and-subtract fires (ann2snn.levels, and each
kernel of `fire_fused`), so both agree for equal potentials.
"""
from __future__ import annotations

import operator
from typing import Any

from torch import Tensor, fx, nn

from ..kernels import fire_fused
from .neuron import BitSerialIFNode
from .simulator import getattr_path


class TimeFoldedNeuron(nn.Module):
    """The neuron of the evaluator: potential in; (q * theta, spikes per sample) out, and with
    `levels` the spike code q too (energy counts its events)."""

    def __init__(self, neuron: BitSerialIFNode, levels: bool = False) -> None:
        super().__init__()
        self.neuron, self.levels = neuron, levels

    def forward(self, potential: Tensor) -> tuple[Tensor, ...]:
        n = self.neuron
        # the fused neuron in Triton on CUDA, in C on float32 CPU tensors, else its reference: same results
        out = fire_fused(potential, n.theta, n.membrane_offset, n.levels, n.timesteps, want_levels=self.levels,
                         per_channel_counts=False)
        return (out.value, out.sample_spikes) + ((out.levels,) if self.levels else ())


def lower_to_evaluator(gm: fx.GraphModule, levels: bool = False) -> fx.GraphModule:
    """A GraphModule computing (logits, {neuron: spikes per sample}) with time folded away.

    Each node that holds the value of a node of `gm` names it in meta["snn_node"]; with `levels`,
    each neuron's spike code is a node too, named in meta["snn_levels"]."""
    graph = fx.Graph()
    root: dict[str, Any] = {}
    env: dict[fx.Node, fx.Node] = {}
    counts: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output((fx.map_arg(node.args[0], env.__getitem__), counts))
            continue
        if node.op in ("call_module", "get_attr"):
            root[node.target] = getattr_path(gm, node.target)
        new = graph.node_copy(node, env.__getitem__)
        if isinstance(root.get(node.target) if node.op == "call_module" else None, BitSerialIFNode):
            root[node.target] = TimeFoldedNeuron(root[node.target], levels)
            counts[node.target] = graph.call_function(operator.getitem, (new, 1))
            if levels:
                graph.call_function(operator.getitem, (new, 2)).meta["snn_levels"] = node.name
            new = graph.call_function(operator.getitem, (new, 0))
        new.meta["snn_node"] = node.name
        env[node] = new
    return fx.GraphModule(root, graph, "SNNEvaluator")
