"""Passes for float source models (METHOD.md section 1, second source of sites).

Float Relu / Clip(0, c) / Relu6 become activation sites whose lambda is calibrated from data: a
high percentile of the site's activations (default 99.99), or the clip bound c when smaller.
This is post-training quantization, so it is lossy: the conversion reports the gap.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, fx, nn

from ..quant import QuantClippedActivation, levels_for_timesteps
from .graph_utils import conversion_report, finish, module_of

# Subsample of each site's activations a percentile is taken from: bounds memory on big data.
_MAX_SAMPLES = 1 << 22


def _clip_bound(gm: fx.GraphModule, node: fx.Node) -> float | None:
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
        bound = _clip_bound(gm, node)
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


@torch.no_grad()
def calibrate_sites(model: nn.Module, batches: Iterable[Tensor], percentile: float = 99.99) -> dict[str, float]:
    """Set every site's lambda to the `percentile` of its input activations (capped at its clip bound).

    Runs `model` on `batches` with the sites unquantized and unclipped. Returns {site: lambda}.
    """
    sites = {name: m for name, m in model.named_modules() if isinstance(m, QuantClippedActivation)}
    bounds = {name: m.clip.detach().clone() for name, m in sites.items()}
    samples: dict[str, list[Tensor]] = {name: [] for name in sites}
    generator = torch.Generator().manual_seed(0)

    def record(name: str):
        def hook(module, inputs, output):
            values = inputs[0].detach().flatten()
            values = values[values > 0]
            if values.numel() > _MAX_SAMPLES:
                values = values[torch.randint(values.numel(), (_MAX_SAMPLES,), generator=generator)]
            samples[name].append(values.to(torch.float64).cpu())
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in sites.items()]
    modes = {name: m.quantize for name, m in sites.items()}
    for m in sites.values():
        m.quantize = False
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for name, m in sites.items():
            m.quantize = modes[name]
    calibrated = {}
    for name, m in sites.items():
        values = torch.cat(samples[name]) if samples[name] else torch.zeros(0, dtype=torch.float64)
        if values.numel() > _MAX_SAMPLES:
            values = values[torch.randint(values.numel(), (_MAX_SAMPLES,), generator=generator)]
        high = torch.quantile(values, percentile / 100).item() if values.numel() else 1.0
        lam = max(min(high, bounds[name].max().item()), 1e-6)
        m.clip.data.fill_(lam)
        calibrated[name] = lam
    return calibrated
