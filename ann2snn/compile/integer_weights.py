"""Pass: the int8 weights and int32 biases of a QDQ source's layers, recovered exactly (issue 27).

The importer folds each DequantizeLinear of a constant into a float32 weight, float32(I - z) * scale,
and keeps the scale and zero point (node.meta["weight_scale"], ["weight_zero_point"], ["bias_scale"],
["bias_zero_point"]). Here J = I - z = W / scale is taken back and kept only where it is exact:
integers whose dequantization gives every float32 weight back bit for bit, stored as int8 I8 with
a zero point z8, J = I8 - z8: the file's own I and z for int8 weights, both less 128 for uint8
weights (an asymmetric layer: runtime/integer_values.py subtracts z8 times its inputs' sum). A
bias is int32 with zero point 0. Run after fold_batch_norm (a folded BN changes the weights,
and such a layer is no longer on its integer grid) and before shift_bias (the integer SNN rounds
by its thresholds; the shift is the float neuron's).
"""
from __future__ import annotations

import torch
from torch import Tensor, fx

from ..ops import LAYERS
from ..runtime.graph import module_of
from ..runtime.integer_values import IntegerWeights

_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_OFFSETS = (-(2 ** 8) + 1, 2 ** 8 - 1)   # I - z of int8 or uint8 integers
_UINT8_SHIFT = 128                      # uint8 I enters as the int8 I - 128


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


def _int8_storage(offsets: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """(I8 int8, z8 int32 [O] or [1], or None where 0) with I8 - z8 = the offsets J, from the file's
    zero point z (per dimension 0, or one): I = J + z as int8, or as uint8 less 128."""
    zero = zero_point.to(torch.int64).reshape(-1, *([1] * (offsets.dim() - 1)))
    if zero.shape[0] not in (1, offsets.shape[0]):
        return None
    if not bool(zero.any()) and bool(((offsets >= -128) & (offsets <= 127)).all()):
        return offsets.to(torch.int8), None
    integers = offsets.to(torch.int64) + zero
    if bool(((integers >= 0) & (integers <= 255)).all()) and not bool(((integers >= -128) & (integers <= 127)).all()):
        integers, zero = integers - _UINT8_SHIFT, zero - _UINT8_SHIFT
    if not bool(((integers >= -128) & (integers <= 127)).all()):
        return None
    return integers.to(torch.int8), zero.reshape(-1).to(torch.int32) if bool(zero.any()) else None


def integer_weights(gm: fx.GraphModule) -> dict[str, IntegerWeights]:
    """The layers whose weight (and bias, if any) the file gave as integers, by module name."""
    layers: dict[str, IntegerWeights] = {}
    for node in gm.graph.nodes:
        layer = module_of(gm, node)
        if not isinstance(layer, LAYERS) or "weight_scale" not in node.meta:
            continue
        offsets = _integers(layer.weight.detach(), node.meta["weight_scale"], _OFFSETS)
        stored = None if offsets is None else _int8_storage(offsets, node.meta["weight_zero_point"])
        if stored is None:
            continue
        bias = bias_scale = None
        if layer.bias is not None:
            if "bias_scale" not in node.meta or bool(node.meta["bias_zero_point"].any()):
                continue
            bias_scale = node.meta["bias_scale"].to(torch.float32).reshape(-1)
            bias = _integers(layer.bias.detach(), bias_scale, _INT32)
            if bias is None:
                continue
            bias = bias.to(torch.int32)
        layers[node.target] = IntegerWeights(stored[0], node.meta["weight_scale"].to(torch.float32).reshape(-1).clone(),
                                             bias, bias_scale, stored[1])
    return layers
