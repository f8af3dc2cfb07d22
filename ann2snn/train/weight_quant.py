"""Int8 weights for quantization-aware training: BatchNorm folded, then per-channel symmetric fake quantization.

    fold_batch_norms(model)        conv -> BN becomes one conv with w * gamma / sqrt(var + eps) and its bias
    quantize_weights(model, 8)     every Conv / Linear weight w is used as q_c * s_c, with
                                   s_c = max|w_c| / 127 and q_c = round(w_c / s_c) in [-127, 127]

The fold happens once, at the start of QAT, from the running statistics: afterwards the network
has no BN, so the weights that train are the weights that export writes as int8 and that the
converter reads, with no second set of statistics that could drift apart from them. The rounding
has a straight-through gradient (the identity) and the scale follows the weights (max-calibrated,
no gradient). The weight is a torch parametrization: `layer.weight` is the fake-quantized tensor
wherever it is read; the float weight that the optimizer steps is `parametrizations.weight.original`.
"""
from __future__ import annotations

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..compile.trace import SiteTracer
from ..errors import Ann2SnnError
from ..ops import CONVS, LAYERS, NORMS

# The weight widths `quantize_weights` implements (symmetric, zero point 0, levels -127..127).
WEIGHT_BITS = (8,)


def check_weight_bits(bits: int | None) -> None:
    """Refuse a weight width other than those in WEIGHT_BITS (None: float weights)."""
    if bits is not None and bits not in WEIGHT_BITS:
        raise Ann2SnnError(f"weight_bits {bits}: only {', '.join(map(str, WEIGHT_BITS))}-bit weights "
                           "(per-channel symmetric int8) are supported")


def weight_levels_max(bits: int) -> int:
    """The largest level of a symmetric `bits`-bit weight: 127 for int8 (-128 unused, so the grid is symmetric)."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: Tensor, bits: int) -> Tensor:
    """s_c = max|w_c| / 127 per output channel (axis 0), shape [C]; 1 for an all-zero channel (its levels are 0)."""
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    return torch.where(amax > 0, amax / weight_levels_max(bits), torch.ones_like(amax))


def weight_integers(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(levels q as int8, scales s [C]) of `weight`: q = round(w / s) in [-127, 127], per output channel."""
    scale = weight_scale(weight, bits)
    limit = weight_levels_max(bits)
    levels = torch.round(weight.detach() / _channel_view(scale, weight)).clamp(-limit, limit)
    return levels.to(torch.int8), scale


class WeightFakeQuant(nn.Module):
    """The parametrization w -> q * s (weight_integers), with the straight-through gradient dw."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        check_weight_bits(bits)
        self.bits = bits

    def forward(self, weight: Tensor) -> Tensor:
        levels, scale = weight_integers(weight, self.bits)
        quantized = levels.to(weight.dtype) * _channel_view(scale, weight)
        return weight + (quantized - weight).detach()


def _channel_view(scale: Tensor, weight: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)


def fold_batch_norms(model: nn.Module) -> list[str]:
    """Fold every BN fed by a conv / linear layer alone (each called once) into that layer, in place,
    from the BN's running statistics, and replace the BN by nn.Identity. Returns the folded BNs' names."""
    graph = model.graph if isinstance(model, fx.GraphModule) else SiteTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in graph.nodes:
        producer = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module" or len(producer.users) != 1 \
                or calls[node.target] != 1 or calls[producer.target] != 1:
            continue
        norm, layer = model.get_submodule(node.target), model.get_submodule(producer.target)
        if not isinstance(norm, NORMS) or not norm.track_running_stats or not isinstance(layer, LAYERS):
            continue
        fuse = fuse_conv_bn_weights if isinstance(layer, CONVS) else fuse_linear_bn_weights
        with torch.no_grad():
            weight, bias = fuse(layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps,
                                norm.weight if norm.affine else torch.ones_like(norm.running_var),
                                norm.bias if norm.affine else torch.zeros_like(norm.running_mean))
        # the new bias trains like the weight (torch's fusion leaves a created bias frozen)
        layer.weight, layer.bias = weight, nn.Parameter(bias.detach(), requires_grad=weight.requires_grad)
        model.set_submodule(node.target, nn.Identity())
        folded.append(node.target)
    return folded


def quantize_weights(model: nn.Module, bits: int) -> list[str]:
    """Fold the BNs (fold_batch_norms), then fake-quantize the weight of every Conv / Linear layer of
    `model` in place (WeightFakeQuant). Returns the quantized layers' names. Call it before the
    optimizer is built: folding gives the layers new weight and bias parameters."""
    check_weight_bits(bits)
    fold_batch_norms(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LAYERS) and not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", WeightFakeQuant(bits))
            names.append(name)
    if not names:
        raise Ann2SnnError(f"{type(model).__name__}: no Conv or Linear layer whose weights could be quantized")
    return names


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` whose weight is fake-quantized by quantize_weights, by name."""
    return {name: module for name, module in model.named_modules()
            if parametrize.is_parametrized(module, "weight")
            and any(isinstance(p, WeightFakeQuant) for p in module.parametrizations.weight)}
