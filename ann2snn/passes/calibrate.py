"""Pass for float source models (METHOD.md section 1, second source of sites).

Float Relu / Clip(0, c) / Relu6 become activation sites whose lambda is then calibrated from data
(ann2snn.train.calibrate_clips): a high percentile of the site's activations, or the clip bound c
when smaller. This is post-training quantization, so it is lossy: the conversion reports the gap.
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn

from ..quant import QuantClippedActivation, levels_for_timesteps
from .graph_utils import conversion_report, finish, module_of

def clip_bound(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """inf for a ReLU, c for Clip(0, c) / ReLU6; None when the node is no ReLU-like site."""
    module = module_of(gm, node)
    if isinstance(module, nn.ReLU):
        return math.inf
    if isinstance(module, nn.ReLU6):
        return 6.0
    if isinstance(module, nn.Hardtanh) and module.min_val == 0:
        return float(module.max_val)
    if node.op == "call_function" and node.target in (torch.relu, nn.functional.relu):
        return math.inf
    if node.op == "call_function" and node.target is torch.clamp:
        low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        high = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
        if low == 0 and (high is None or isinstance(high, (int, float))):
            return math.inf if high is None else float(high)
    return None


def float_activations_to_sites(gm: fx.GraphModule, timesteps: int) -> fx.GraphModule:
    """Replace each float ReLU-like node by a QuantClippedActivation with L = 2^T - 1.

    The clip starts at the op's own bound (inf for ReLU); calibrate_sites sets it from data.
    """
    report = conversion_report(gm)
    for node in list(gm.graph.nodes):
        bound = clip_bound(gm, node)
        if bound is None:
            continue
        target = node.target if node.op == "call_module" else f"site_{node.name}"
        site = QuantClippedActivation(levels=levels_for_timesteps(timesteps), clip=bound)
        gm.add_submodule(target, site)
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        report["sites"].setdefault(target, {})["source"] = {"kind": "float", "clip_bound": bound}
    return finish(gm)
