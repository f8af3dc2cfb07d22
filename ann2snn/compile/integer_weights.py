"""Pass: the int8 weights and int32 biases of a QDQ source's layers, recovered exactly (issue 27).

The importer folds each DequantizeLinear of a constant into a float32 weight, float32(I) * scale,
and keeps the scale (node.meta["weight_scale"], ["bias_scale"]). Here I = W / scale is taken back
and kept only where it is exact: integers in int8 (int32 for the bias) whose dequantization gives
every float32 weight back bit for bit. Run after fold_batch_norm (a folded BN changes the weights,
and such a layer is no longer on its integer grid) and before shift_bias (the integer SNN rounds
by its thresholds; the shift is the float neuron's).
"""
from __future__ import annotations

import torch
from torch import Tensor, fx

from ..ops import LAYERS
from ..runtime.graph import module_of
from ..runtime.integer_values import IntegerWeights

_INT8, _INT32 = (-128, 127), (-(2 ** 31), 2 ** 31 - 1)


def _integers(values: Tensor, scale: Tensor, bounds: tuple[int, int]) -> Tensor | None:
    """values / scale (scale per dimension 0, or one) where exact: float32(I) * scale == values."""
    values = values.to(torch.float32)
    scale = scale.to(torch.float32).reshape(-1, *([1] * (values.dim() - 1)))
    if scale.shape[0] not in (1, values.shape[0]) or not bool((scale > 0).all()):
        return None
    integers = torch.round(values.double() / scale.double())
    if not bool(((integers >= bounds[0]) & (integers <= bounds[1])).all()):
        return None
    if not torch.equal(integers.to(torch.float32) * scale, values):
        return None
    return integers


def integer_weights(gm: fx.GraphModule) -> dict[str, IntegerWeights]:
    """The layers whose weight (and bias, if any) the file gave as integers, by module name."""
    layers: dict[str, IntegerWeights] = {}
    for node in gm.graph.nodes:
        layer = module_of(gm, node)
        if not isinstance(layer, LAYERS) or "weight_scale" not in node.meta:
            continue
        weight = _integers(layer.weight.detach(), node.meta["weight_scale"], _INT8)
        if weight is None:
            continue
        bias = bias_scale = None
        if layer.bias is not None:
            if "bias_scale" not in node.meta:
                continue
            bias_scale = node.meta["bias_scale"].to(torch.float32).reshape(-1)
            bias = _integers(layer.bias.detach(), bias_scale, _INT32)
            if bias is None:
                continue
            bias = bias.to(torch.int32)
        layers[node.target] = IntegerWeights(weight.to(torch.int8), node.meta["weight_scale"].to(torch.float32)
                                             .reshape(-1).clone(), bias, bias_scale)
    return layers
