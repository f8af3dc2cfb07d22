"""Pass: the BN bias shift of docs/method.md section 2.

The neuron computes floor(V / theta); the ANN rounds, floor(z / theta + 1/2). Adding theta / 2 to
the bias of the linear layer that produces z makes the two equal. Run after fold_batch_norm, so
the bias of a conv followed by BN is the folded one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops import NORMS, SHIFT_TRANSPARENT_FUNCTIONS, SHIFT_TRANSPARENT_MODULES, VALUE_COPYING_PADS
from ..runtime.quant import QuantClippedActivation
from ..runtime.graph import LINEAR_PRODUCERS, conversion_report, module_of, site_nodes


def use_count(value: fx.Node) -> int:
    """How often `value` is an argument: c + c uses c twice through one user."""
    uses: list[fx.Node] = []
    for user in value.users:
        fx.node.map_arg((user.args, user.kwargs), lambda a: uses.append(a) if a is value else None)
    return len(uses)


def find_bias_carrier(gm: fx.GraphModule, value: fx.Node) -> fx.Node | None:
    """The linear layer whose bias can carry a shift of `value`, or None.

    It must feed `value` alone, once (a shared output would shift its other users too). Through
    a residual add exactly one branch carries the shift; through edge or reflect padding the shift
    reaches the border too (ops.PAD_MODES), through constant padding it would not.
    """
    if not isinstance(value, fx.Node) or use_count(value) != 1:
        return None
    module = module_of(gm, value)
    if isinstance(module, LINEAR_PRODUCERS):
        return value
    if isinstance(module, SHIFT_TRANSPARENT_MODULES) or (value.target is F.pad and value.kwargs.get("mode")
                                                         in VALUE_COPYING_PADS):
        return find_bias_carrier(gm, value.args[0])
    if value.op == "call_function" and value.target in SHIFT_TRANSPARENT_FUNCTIONS and "alpha" not in value.kwargs:
        for branch in value.args[:2]:
            carrier = find_bias_carrier(gm, branch)
            if carrier is not None:
                return carrier
    return None


def _add_to_bias(layer: nn.Module, shift: torch.Tensor) -> None:
    channels = layer.weight.shape[0]
    shift = shift.to(layer.weight.dtype).expand(channels)
    if isinstance(layer, NORMS):
        if layer.bias is None:
            raise ValueError("a BatchNorm without affine bias cannot carry a bias shift")
        layer.bias.data += shift
    elif layer.bias is None:
        layer.bias = nn.Parameter(shift.clone())
    else:
        layer.bias.data += shift


def shift_bias(gm: fx.GraphModule) -> fx.GraphModule:
    """Add theta / 2 of every activation site to its producer's bias, else to its membrane.

    A site whose input has no bias carrier gets `node.meta["membrane_offset"] = theta / 2`, which
    place_neurons turns into the neuron's initial membrane offset. Every shift goes in the report.
    """
    report = conversion_report(gm)
    for node in site_nodes(gm):
        site: QuantClippedActivation = gm.get_submodule(node.target)
        half_step = (site.theta() / 2).detach()
        carrier = find_bias_carrier(gm, node.args[0])
        if carrier is not None:
            _add_to_bias(gm.get_submodule(carrier.target), half_step)
            shift = {"kind": "bias", "target": carrier.target}
        else:
            node.meta["membrane_offset"] = half_step
            shift = {"kind": "membrane", "target": node.target}
        shift["amount"] = half_step.tolist()
        report.sites.setdefault(node.target, {})["bias_shift"] = shift
    gm.recompile()
    return gm
