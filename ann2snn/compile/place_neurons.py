"""Pass: every activation site becomes a bit-serial IF neuron (docs/method.md section 3)."""
from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError
from ..runtime.neuron import BitSerialIFNode
from ..levels import MAX_TIMESTEPS
from ..runtime.quant import QuantClippedActivation
from ..ops import OUTPUT_OPS
from ..runtime.graph import (conversion_report, finish, head_input, module_of, node_label, output_head, set_module,
                          site_nodes)

FLOAT_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)


def place_neurons(gm: fx.GraphModule, timesteps: int | None = None) -> fx.GraphModule:
    """Replace each QuantClippedActivation by a BitSerialIFNode with theta = lambda / L.

    `timesteps` is the SNN's T; None takes each site's own T = ceil(log2(L + 1)). A site with more
    levels than T steps can carry is refused: converting it would not be error-free.
    """
    report = conversion_report(gm)
    head = output_head(gm)
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if isinstance(module, OUTPUT_OPS):
            if node not in head:
                later = _first_non_head_user(gm, node)
                raise UnsupportedModelError(
                    f"{node_label(gm, node)} is not after the last layer: {node_label(gm, later)} follows it; an "
                    "SNN applies it only to its output, after the last layer (inside the network, retrain it "
                    "with ReLU)")
            report.rewrites.append({"pass": "place_neurons", "output_op": node.target,
                                    "op": type(module).__name__, "note": "applied to the output potentials"})
            continue
        if isinstance(module, FLOAT_ACTIVATIONS):
            raise UnsupportedModelError(f"{node_label(gm, node)} is a float activation: quantize it first "
                                        "(ann2snn.prepare, or convert with calibration data)")
    for node in site_nodes(gm):
        site: QuantClippedActivation = gm.get_submodule(node.target)
        if not site.quantize:
            raise UnsupportedModelError(f"site {node.target} does not quantize (a plain clipped ReLU): an SNN "
                                        "computes only quantized levels; fine-tune it with quantization first")
        if not bool(torch.isfinite(site.clip).all()) or not bool((site.clip > 0).all()):
            raise UnsupportedModelError(f"site {node.target} has lambda {site.clip.detach().tolist()}: it must be "
                                        "finite and positive (calibrate the site first)")
        steps = site.timesteps if timesteps is None else int(timesteps)
        if steps > MAX_TIMESTEPS:
            raise UnsupportedModelError(f"site {node.target}: T={steps} exceeds {MAX_TIMESTEPS}, the spike code "
                                        f"of a neuron has at most {MAX_TIMESTEPS} bits")
        if site.levels > 2**steps - 1:
            raise UnsupportedModelError(
                f"site {node.target} has {site.levels} levels, more than T={steps} steps carry "
                f"(needs T >= {site.timesteps})")
        theta = site.theta().detach()
        offset = node.meta.get("membrane_offset", torch.zeros((), dtype=theta.dtype))
        set_module(gm, node.target, BitSerialIFNode(theta, site.levels, steps, offset))
        entry = report.sites.setdefault(node.target, {})
        entry.update({"lambda": site.clip.detach().tolist(), "theta": theta.tolist(), "levels": site.levels,
                      "timesteps": steps, "per_channel": site.per_channel})
    return finish(gm)


def _first_non_head_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The first op after `node`, past any of the head's kinds (reshapes, QDQ pairs), that no output head
    holds: a layer, a sum, an activation (the op that makes `node` not part of the head)."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop(0)
        if user in seen or user.op == "output":
            continue
        seen.add(user)
        if head_input(gm, user) is None:
            return user
        stack.extend(user.users)
    return next(iter(node.users))   # its value reaches the output twice: the first use names it
