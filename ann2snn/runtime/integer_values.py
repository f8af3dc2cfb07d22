"""The values of the integer SNN (runtime/integer_snn.py, docs/integer.md): int8 layers' integers, integer tensors
with their scale, and the helpers both of its ways of running share."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..kernels import IntConv2d, int_linear
from ..kernels.int_levels import INT32_MAX, INT32_MIN
from ..levels import channel_view
from ..ops import AVERAGE_POOL_DIMS, WINDOW_AVERAGE_POOLS
from .signal import Signal
from .simulator import fold_time



@dataclass
class IntegerWeights:
    """An int8 layer: weight [O, ...] int8 and its float32 scale ([O] or [1]); bias int32 [O] on the
    grid of its float32 scale (the input's scale times the weight's), or None; zero_point int32
    ([O] or [1]) of an asymmetric layer, whose integer weights are weight - zero_point, or None."""

    weight: Tensor
    weight_scale: Tensor
    bias: Tensor | None = None
    bias_scale: Tensor | None = None
    zero_point: Tensor | None = None

    def offsets(self) -> Tensor:
        """The layer's integer weights J = I - z, int32."""
        weight = self.weight.to(torch.int32)
        if self.zero_point is None:
            return weight
        return weight - self.zero_point.to(torch.int32).reshape(-1, *([1] * (weight.dim() - 1)))

    def dequantized(self) -> tuple[Tensor, Tensor | None]:
        """The float32 weight and bias, as DequantizeLinear computes them: float32(I - z) * scale."""
        scale = self.weight_scale.reshape(-1, *([1] * (self.weight.dim() - 1)))
        bias = None if self.bias is None else self.bias.to(torch.float32) * self.bias_scale
        return self.offsets().to(torch.float32) * scale, bias


class ResidualSum(list):
    """The terms (Integers) of a residual add: a neuron after it requantizes their sum."""


@dataclass
class MaxPooledSum:
    """A max pool of a residual sum, which has no integer form: the neuron after it requantizes each
    position, then pools its levels (the same, as requantizing is monotone)."""

    terms: list
    pool: nn.Module


@dataclass
class Fired:
    """The levels (q - qmin) of a neuron or QDQ pair that kernels.IntegerLayer computed with its layer."""

    levels: Tensor
    sample_spikes: Tensor | None


@dataclass
class Integers:
    """An integer value: (values + offset) * scale, scale per channel (dimension 1) or one.
    values: evaluate, an integer tensor >= 0 (levels) or any int32 (accumulators); simulate, a
    Signal of integer steps and const. spikes: the binary planes, when a neuron emitted them."""

    values: Tensor | Signal
    scale: Tensor                 # float64: the exact product of the file's float32 scales
    offset: int = 0
    # an int8 layer's accumulator, observed (IntegerProgram(observe=)): sum |w x| + |b| per element
    # (float64, accumulator units) and the layer's fan-in, which bound a float32 conv's error
    magnitude: Tensor | None = None
    fan_in: int = 0
    # an average pool's sums: the count of its windows, as many float32 roundings as its float run takes
    pooled_count: int = 0


def dequantize(value: Integers, potential: Tensor) -> Tensor:
    """float32(A) * float32(S): what the file's DequantizeLinear, or its float32 conv, gives."""
    scale = value.scale.to(device=potential.device, dtype=torch.float32)
    if value.offset:   # widened first: levels are uint8, and a zero point offset is negative
        potential = potential.to(torch.int32) + value.offset
    # a float32 accumulator (IntegerProgram._float_term) is read once: scaled in place
    return potential.to(torch.float32).mul_(channel_view(scale, potential.dim()))


# what IntegerProgram(observe=) calls at each site: (site, integers, (value, bound) or None)
Observer = Callable[[str, Tensor, "tuple[Tensor, Tensor] | None"], None]
UNIT_ROUNDOFF = 2.0 ** -24   # float32
# float32 roundings of a requantization of a few terms, in any order (a scale's product and
# quotient, each conversion, product and sum, each within one roundoff of the magnitude), with room
REQUANTIZATION_ROUNDINGS = 16


def exact_value(terms: list[Integers], potentials: list[Tensor], theta: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_i (A_i + o_i) S_i / theta, bound) in float64: the real value that a site's requantization
    rounds (its scales the file's float32 values, multiplied exactly), and a bound on how far any
    float32 evaluation of it can land: REQUANTIZATION_ROUNDINGS roundoffs of sum_i |A_i S_i|, plus
    for a layer's accumulator (n + 2) roundoffs of (sum |w x| + |b|) S for fan-in n, the error of a
    float32 convolution in any order (onnxruntime runs some QDQ convolutions in float32)."""
    value = bound = None
    for term, potential in zip(terms, potentials):
        scale = channel_view(term.scale.to(potential.device, torch.float64), potential.dim())
        part = (potential.to(torch.float64) + term.offset) * scale
        error = REQUANTIZATION_ROUNDINGS * part.abs()
        if term.magnitude is not None:
            error = error + (term.fan_in + 2) * term.magnitude * scale
        value = part if value is None else value + part
        bound = error if bound is None else bound + error
    theta = channel_view(theta.to(value.device, torch.float64), value.dim())
    return value / theta, UNIT_ROUNDOFF * bound / theta


def absolute_products(layer: nn.Module, inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """sum |w| |x| + |b| of a conv or linear layer at each output, in float64: what bounds a float32
    evaluation of it in any order (exact_value)."""
    inputs = inputs.detach().to(torch.float64).abs()
    weight = weight.detach().to(inputs.device, torch.float64).abs()
    if isinstance(layer, nn.Linear):
        products = F.linear(inputs, weight)
    else:
        products = F.conv2d(inputs, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if bias is not None:
        products += channel_view(bias.detach().to(products.device, torch.float64).abs(), products.dim())
    return products


def integrate(signal: Signal) -> Tensor:
    """The integer potential sum_t 2^(T-1-t) steps_t + const by the doubling rule, in int64."""
    potential = None
    for current in signal.currents():
        current = current.to(torch.int64)
        potential = current if potential is None else 2 * potential + current
    return potential


def pair_all(size: Any) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size,)


def as_int32(target: str, potential: Tensor) -> Tensor:
    if potential.dtype != torch.int32:
        if potential.numel() and (int(potential.min()) < INT32_MIN or int(potential.max()) > INT32_MAX):
            raise UnsupportedModelError(f"integer SNN: the accumulator of {target} leaves int32")
        potential = potential.to(torch.int32)
    return potential


def nonnegative(target: str, values: Tensor) -> Tensor:
    if values.dtype == torch.int32 and values.numel() and int(values.min()) < 0:
        raise UnsupportedModelError(f"integer SNN: layer {target} reads negative integers")
    return values


def integer_layer(target: str, module: nn.Module, weights: IntegerWeights, offset: int, device: torch.device):
    """(with bias, without bias, the bias) of an int8 layer on values u >= 0 whose value carries
    `offset`: W (u + o) + b = W u + (o sum(w) + b). An asymmetric layer's W = I8 - z8 runs as
    I8 u - z8 sum(u), the sum over each output's inputs taken by the same kernel with weights 1."""
    weight = weights.weight.to(device)
    bias = torch.zeros(weight.shape[0], dtype=torch.int64, device=device) if weights.bias is None \
        else weights.bias.to(device).to(torch.int64)
    bias = bias + offset * weights.offsets().to(device).reshape(weight.shape[0], -1).to(torch.int64).sum(1)
    if int(bias.abs().max()) > INT32_MAX:
        raise UnsupportedModelError(f"integer SNN: the bias of {target} leaves int32")
    bias = bias.to(torch.int32)
    if isinstance(module, nn.Linear):
        run, run_without_bias = (lambda q: int_linear(q, weight, bias)), (lambda q: int_linear(q, weight))
        window_sum = lambda q: q.sum(1, keepdim=True, dtype=torch.int32)   # noqa: E731
    elif isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        if offset and any(module.padding):   # its zero padding would read u = 0, the value o * scale
            raise UnsupportedModelError(f"integer SNN: layer {target} pads values with a zero point offset")
        geometry = (module.stride, module.padding, module.dilation, module.groups)
        run, run_without_bias = IntConv2d(weight, bias, *geometry), IntConv2d(weight, None, *geometry)
        ones = IntConv2d(torch.ones(module.groups, *weight.shape[1:], dtype=torch.int8, device=device), None, *geometry)
        per_group = weight.shape[0] // module.groups   # one group's sum broadcasts over every output
        window_sum = ones if module.groups == 1 else (lambda q: ones(q).repeat_interleave(per_group, dim=1))
    else:
        raise UnsupportedModelError(f"integer SNN: layer {target} ({type(module).__name__}) has no integer kernel")
    if weights.zero_point is None:
        return run, run_without_bias, bias
    zero = weights.zero_point.to(device)

    def asymmetric(layer):
        return lambda q: layer(q) - channel_view(zero, q.dim()) * window_sum(q)

    return asymmetric(run), asymmetric(run_without_bias), bias



def window_count(pool: nn.Module, shape: Sequence[int]) -> int | None:
    """The one count every window of the average pool `pool` divides by on an input of `shape`, or
    None where windows count differently. A windowed pool: its kernel (or divisor_override), with no
    ceil_mode partial window at the end and its padding (if any) counted. An adaptive pool: the
    product of input / output size over its dimensions, where every output size divides its input's."""
    dims = AVERAGE_POOL_DIMS[type(pool)]

    def per_dim(size: Any) -> tuple:   # an int stands for every dimension
        return tuple(size) if isinstance(size, (tuple, list)) else (size,) * dims

    if isinstance(pool, WINDOW_AVERAGE_POOLS):
        if pool.ceil_mode or (not pool.count_include_pad and any(per_dim(pool.padding))):
            return None
        return getattr(pool, "divisor_override", None) or math.prod(per_dim(pool.kernel_size))
    count = 1
    for size, out in zip(shape[-dims:], per_dim(pool.output_size)):
        out = size if out is None else out
        if size % out:
            return None
        count *= size // out
    return count


def sum_pool(x: Integers, dims: tuple[int, ...], keepdim: bool, simulate: bool, where: str) -> Integers:
    """A global average pool over `dims`: the integer sum, its 1 / count moved into the scale."""
    count = 1
    for d in dims:
        count *= x.values.shape[d]
    if x.offset:
        raise UnsupportedModelError(f"integer SNN: {where} pools values with a zero point offset")
    if simulate:
        values = x.values.map(lambda s: s.sum(tuple(d + 1 for d in dims), keepdim=keepdim, dtype=torch.int32),
                              lambda c: c.sum(dims, keepdim=keepdim, dtype=torch.int32))
    else:
        values = x.values.sum(dims, keepdim=keepdim, dtype=torch.int32)
    return Integers(values, x.scale / count, 0, pooled_count=count)


def window_pool(x: Integers, pool: nn.Module, simulate: bool, where: str) -> Integers:
    """An average pool whose every window counts k values (window_count): the integer sum over each
    window (float64 holds it exactly: the pool's mean times k, rounded), its 1 / k moved into the
    scale, and the offset o summed to k o (no padding may read it)."""
    count = window_count(pool, ())
    if x.offset and any(pair_all(pool.padding)):
        raise UnsupportedModelError(f"integer SNN: {where} pads values with a zero point offset")

    def window_sum(values: Tensor) -> Tensor:
        return torch.round(pool(values.to(torch.float64)) * count).to(torch.int32)

    values = x.values.map(lambda steps: fold_time(window_sum, steps), window_sum) if simulate else window_sum(x.values)
    return Integers(values, x.scale / count, x.offset * count, pooled_count=count)
