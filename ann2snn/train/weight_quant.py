"""Int8 weights for quantization-aware training: BatchNorm folded, then per-channel symmetric fake quantization.

    fold_batch_norms(model)        conv -> BN becomes one conv with w * gamma / sqrt(var + eps) and its bias
    quantize_weights(model, 8)     every Conv / Linear weight w is used as q_c * s_c, with
                                   s_c = max|w_c| / 127 and q_c = round(w_c / s_c) in [-127, 127]

The fold happens once, at the start of int8 QAT, from the running statistics (what the init file
or the run's float-weight warm-up left, TrainConfig.float_weight_epochs), not per step as torch.ao's
ConvBn QAT does: afterwards the network has no BN, so the weights that train are the int8 weights
the export writes and the converter reads. Measured on digits at T = 2 from scratch (`ann2snn
train`, seed 0): folded at identity statistics with no warm-up, 97.11%; after a 40-epoch warm-up
of 80, see docs/training.md.
The rounding has a straight-through gradient (the identity); the scale follows the weights
(max-calibrated, no gradient). A layer fed by a per-layer site (directly or through ops that only
move values: max pooling, flatten) gets an int32 bias too, b = k * theta_in * s_c, the grid of
onnxruntime's integer kernels: trained on it, the export's int32 bias is the bias trained (a bias
rounded only at export moved levels at T = 2 and cost 0.7 points on digits). Through average pool
modules whose windows count n values in all, the grid is theta_in / n * s_c, the integer SNN's
(it sums the windows): VGG's first classifier layer after its adaptive pool. An adaptive pool's
n follows its input size, recorded at each forward (_record_window_count); in a GraphModule (what
`prepare` makes) pool function calls become their modules first, to be seen. Each is a torch
parametrization: `layer.weight` is the fake-quantized tensor wherever it is read; the float
tensor the optimizer steps is `layer.parametrizations.weight.original`.
"""
from __future__ import annotations

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..compile.trace import SiteTracer
from ..errors import Ann2SnnError
from ..ops import (AVERAGE_POOL_FUNCTION_MODULES, CONVS, INTEGER_AVERAGE_POOLS, LAYERS, NORMS, VALUE_MOVING_FUNCTIONS,
                   VALUE_MOVING_MODULES, methods_of)
from ..runtime.integer_values import window_count
from ..runtime.quant import QuantClippedActivation

# The weight widths `quantize_weights` implements (symmetric, zero point 0, levels -127..127).
WEIGHT_BITS = (8,)
# x.flatten(1), x.view(...), ...: the structural methods only move values, so a site's grid survives them
_VALUE_MOVING_METHODS = methods_of("structural")


def check_weight_bits(bits: int | None) -> None:
    """Refuse a weight width other than those in WEIGHT_BITS (None: float weights)."""
    if bits is not None and bits not in WEIGHT_BITS:
        raise Ann2SnnError(f"weight_bits {bits}: only {', '.join(map(str, WEIGHT_BITS))}-bit weights "
                           "(per-channel symmetric int8) are supported")


def weight_levels_max(bits: int) -> int:
    """The largest level of a symmetric `bits`-bit weight: 127 for int8 (-128 unused, so the grid is symmetric)."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: Tensor, bits: int) -> Tensor:
    """s_c = max|w_c| / 127 per output channel (axis 0), shape [C], in float32 (the file's scale, whatever
    dtype the model runs in); 1 for an all-zero channel (its levels are 0)."""
    amax = weight.detach().float().abs().reshape(weight.shape[0], -1).amax(dim=1)
    return torch.where(amax > 0, amax / weight_levels_max(bits), torch.ones_like(amax))


def weight_integers(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(levels q as int8, scales s [C]) of `weight`: q = round(w / s) in [-127, 127], per output channel."""
    scale = weight_scale(weight, bits)
    limit = weight_levels_max(bits)
    levels = torch.round(weight.detach().float() / _channel_view(scale, weight)).clamp(-limit, limit)
    return levels.to(torch.int8), scale


class WeightFakeQuant(nn.Module):
    """The parametrization w -> q * s (weight_integers), with the straight-through gradient dw."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        check_weight_bits(bits)
        self.bits = bits

    def forward(self, weight: Tensor) -> Tensor:
        levels, scale = weight_integers(weight, self.bits)
        # q * s in float32 in any dtype: a float64 copy (the exactness gate's) holds the float32 weights
        quantized = (levels.float() * _channel_view(scale, weight)).to(weight.dtype)
        # exactly `quantized`: |q - w| <= s / 2 makes q - w exact (Sterbenz), and so the sum
        return weight + (quantized - weight).detach()


class BiasFakeQuant(nn.Module):
    """The parametrization b -> k * theta_in / n * s_c of a layer's bias (bias_integers), straight-through."""

    def __init__(self, layer: nn.Module, site: QuantClippedActivation, pools: tuple[nn.Module, ...] = ()) -> None:
        super().__init__()
        # plain references, not submodules: the layer, its input site and the average pools between
        # them have their own places in the model
        self.__dict__.update(layer=layer, site=site, pools=pools)

    def forward(self, bias: Tensor) -> Tensor:
        scale = bias_grid(self.layer, self.site, self.pools)
        if scale is None:
            return bias
        levels = bias_integers(bias, scale)
        return bias + ((levels.float() * scale).to(bias.dtype) - bias).detach()


def bias_grid(layer: nn.Module, site: QuantClippedActivation, pools: tuple[nn.Module, ...] = ()) -> Tensor | None:
    """The scales theta_in / n * s_c [C] (float32) of the int32 bias of `layer`, whose input is
    `site`'s levels through average pools whose windows count n in all (the integer SNN's
    accumulator grid: runtime/integer_values.py sums the windows and moves 1 / n into the scale,
    in float64). None while there is no grid: the site not calibrated (lambda = inf), or a pool
    not run yet or with windows of different counts (_record_window_count)."""
    count = 1
    for pool in pools:
        window = getattr(pool, "window_count", None)
        if window is None:
            return None
        count *= window
    theta = site.clip.detach().float() / site.levels   # as the export writes the site's scale
    if not bool(torch.isfinite(theta).all()):
        return None
    weight = layer.parametrizations.weight
    scale = weight_scale(weight.original, weight[0].bits)
    return (theta.double() / count * scale.double()).float()


def bias_integers(bias: Tensor, scale: Tensor) -> Tensor:
    """The int32 levels k of `bias` on the grid `scale` (bias_grid): round(b / scale), clamped to int32."""
    info = torch.iinfo(torch.int32)
    return torch.round(bias.detach().double() / scale.double()).clamp(info.min, info.max).to(torch.int32)


def _record_window_count(pool: nn.Module, args: tuple) -> None:
    """Forward pre-hook of an average pool between a site and a layer: the count its windows divide
    by on this input (None: they differ), which the layer's bias grid divides by (bias_grid)."""
    pool.window_count = window_count(pool, args[0].shape)


def _channel_view(scale: Tensor, weight: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def fold_batch_norms(model: nn.Module) -> list[str]:
    """Fold every BN fed by a conv / linear layer alone (each called once) into that layer, in place,
    from the BN's running statistics, and replace the BN by nn.Identity. Returns the folded BNs' names."""
    graph, calls = _graph(model)
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


def _graph(model: nn.Module) -> tuple[fx.Graph, dict[str, int]]:
    """The fx graph of `model` (traced unless it is a GraphModule) and how often each module is called."""
    graph = model.graph if isinstance(model, fx.GraphModule) else SiteTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return graph, calls


def _pools_as_modules(gm: fx.GraphModule) -> None:
    """Each average pool function call (F.adaptive_avg_pool2d(x, 1), ...) of constant arguments becomes
    a call of its module, in place: a module's forward pre-hook sees its input size (_record_window_count)."""
    for node in list(gm.graph.nodes):
        pool = AVERAGE_POOL_FUNCTION_MODULES.get(node.target) if node.op == "call_function" else None
        arguments = [*node.args[1:], *node.kwargs.values()]
        if pool is None or not node.args or any(isinstance(a, fx.Node) for a in arguments):
            continue
        name = f"{node.name}_pool"
        gm.add_submodule(name, pool(*node.args[1:], **node.kwargs))
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.call_module(name, (node.args[0],)))
        gm.graph.erase_node(node)
    gm.recompile()


def _input_site(model: nn.Module, node: fx.Node, calls: dict[str, int]
                ) -> tuple[QuantClippedActivation, tuple[nn.Module, ...]] | None:
    """The quantizing per-layer site whose levels reach `node`'s input through value-moving ops and
    average pools (each called once) alone, and those pools."""
    value = node.args[0] if node.args else None
    pools: list[nn.Module] = []
    while isinstance(value, fx.Node):
        module = model.get_submodule(value.target) if value.op == "call_module" else None
        if isinstance(module, QuantClippedActivation):
            return (module, tuple(pools)) if module.quantize and not module.per_channel else None
        pooled = isinstance(module, INTEGER_AVERAGE_POOLS) and calls[value.target] == 1
        if pooled:
            pools.append(module)
        moves = pooled or isinstance(module, VALUE_MOVING_MODULES) or \
            (value.op == "call_function" and value.target in VALUE_MOVING_FUNCTIONS) or \
            (value.op == "call_method" and value.target in _VALUE_MOVING_METHODS)
        value = value.args[0] if moves and value.args else None
    return None


def quantize_weights(model: nn.Module, bits: int) -> list[str]:
    """Fold the BNs (fold_batch_norms), then fake-quantize the weight of every Conv / Linear layer of
    `model` in place (WeightFakeQuant), and the bias of those fed by a per-layer site, also through
    average pools (BiasFakeQuant).
    Returns the quantized layers' names. Call it after the sites are placed and before the optimizer
    is built: folding gives the layers new weight and bias parameters."""
    check_weight_bits(bits)
    fold_batch_norms(model)
    if isinstance(model, fx.GraphModule):
        _pools_as_modules(model)
    graph, calls = _graph(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LAYERS) and not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", WeightFakeQuant(bits))
            names.append(name)
    hooked: set[nn.Module] = set()   # one recording hook a pool, however many layers read it
    for node in graph.nodes:
        layer = model.get_submodule(node.target) if node.op == "call_module" and calls[node.target] == 1 else None
        found = _input_site(model, node, calls) if layer is not None and node.target in names else None
        if found is not None and layer.bias is not None:
            site, pools = found
            for pool in set(pools) - hooked:
                pool.register_forward_pre_hook(_record_window_count)
            hooked.update(pools)
            parametrize.register_parametrization(layer, "bias", BiasFakeQuant(layer, site, pools))
    if not names:
        raise Ann2SnnError(f"{type(model).__name__}: no Conv or Linear layer whose weights could be quantized")
    return names


def integer_tensors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """The integer levels and per-output-channel scales of every fake-quantized weight (int8) and bias
    (int32) of `model`, by parameter name (layer.weight, layer.bias)."""
    tensors = {}
    for name, module in model.named_modules():
        quantizers = getattr(module, "parametrizations", {})
        prefix = f"{name}." if name else ""
        if "weight" in quantizers and isinstance(quantizers.weight[0], WeightFakeQuant):
            tensors[f"{prefix}weight"] = weight_integers(quantizers.weight.original, quantizers.weight[0].bits)
        if "bias" in quantizers and isinstance(quantizers.bias[0], BiasFakeQuant):
            bias = quantizers.bias[0]
            scale = bias_grid(bias.layer, bias.site, bias.pools)
            if scale is not None:
                tensors[f"{prefix}bias"] = (bias_integers(quantizers.bias.original, scale), scale)
    return tensors
