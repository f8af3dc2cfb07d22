"""The integer SNN (issue 27, docs/integer.md): the SNN of an int8-weight QDQ model run on integers.

Behind its first neuron layer every value of the SNN is an integer tensor with a scale: the
levels q of a neuron (value q * theta), or the exact int32 accumulator A = W q + b of an int8
layer (value A * s_in * s_w per output channel). By linearity sum_t 2^(T-1-t) W s_t = W q, so the
time-folded evaluator runs one integer GEMM or convolution per layer on the levels, and the
simulator runs it on each binary plane and integrates the int32 currents by the doubling rule:
both reach the same accumulators, bit for bit.

A neuron turns the accumulators it reads (one layer, or a residual sum of several terms) into
its level as the file's QDQ graph computes it (the QuantizeLinear after a float32 Conv):
    V = sum_i float32(A_i) * float32(S_i)  (float32, in order),  q = clamp(round_half_even(V / theta), 0, L)
From one accumulator this is monotone in A, so it is precomputed as integer thresholds per channel
and level (runtime/integer.py: integer_thresholds), and the level is a count of comparisons
(kernels.levels_fused). The encoding layer, on the analog input, stays float32; the output layer's
accumulator is dequantized, float32(A) * float32(S), and the output head runs in float after it.
Simulation and evaluation compute every level and the logits by the same functions from the same
integers, so their logits are torch.equal and their spike counts identical.

Integer values are never produced from float ones behind the encoder: a float op on integers
(e.g. a float layer, or a windowed average pool) dequantizes them, and no neuron may follow it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import UnsupportedModelError
from ..kernels import IntConv2d, fire_fused, int_linear, levels_fused
from ..levels import channel_view, popcount_sum_
from ..ops import MAX_POOLS
from .integer import round_clamp_, site_thresholds
from .neuron import BitSerialIFNode
from .quant import QuantDequant
from .signal import Signal
from .simulator import FUNCTION_RULES, SimulatedStructural, fold_time, simulate_method

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
_GLOBAL_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
# functions and methods that move integers without arithmetic (any dtype)
_MOVING_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze})
_MOVING_METHODS = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"})


@dataclass
class IntegerWeights:
    """An int8 layer: weight [O, ...] int8 and its float32 scale ([O] or [1]); bias int32 [O] on the
    grid of its float32 scale (the input's scale times the weight's), or None."""

    weight: Tensor
    weight_scale: Tensor
    bias: Tensor | None = None
    bias_scale: Tensor | None = None

    def dequantized(self) -> tuple[Tensor, Tensor | None]:
        """The float32 weight and bias, as DequantizeLinear computes them: float32(I) * scale."""
        scale = self.weight_scale.reshape(-1, *([1] * (self.weight.dim() - 1)))
        bias = None if self.bias is None else self.bias.to(torch.float32) * self.bias_scale
        return self.weight.to(torch.float32) * scale, bias


@dataclass
class MaxPooledSum:
    """A max pool of a residual sum, which has no integer form: the neuron after it requantizes each
    position, then pools its levels (the same, as requantizing is monotone)."""

    terms: list
    pool: nn.Module


@dataclass
class Integers:
    """An integer value: (values + offset) * scale, scale per channel (dimension 1) or one.
    values: evaluate, an integer tensor >= 0 (levels) or any int32 (accumulators); simulate, a
    Signal of integer steps and const. spikes: the binary planes, when a neuron emitted them."""

    values: Tensor | Signal
    scale: Tensor                 # float64: the exact product of the file's float32 scales
    offset: int = 0


def _dequantize(value: Integers, potential: Tensor) -> Tensor:
    """float32(A) * float32(S): what the file's DequantizeLinear, or its float32 conv, gives."""
    scale = value.scale.to(device=potential.device, dtype=torch.float32)
    if value.offset:   # widened first: levels are uint8, and a zero point offset is negative
        potential = potential.to(torch.int32) + value.offset
    return potential.to(torch.float32).mul_(channel_view(scale, potential.dim()))


def integrate(signal: Signal) -> Tensor:
    """The integer potential sum_t 2^(T-1-t) steps_t + const by the doubling rule, in int64."""
    potential = None
    for current in signal.currents():
        current = current.to(torch.int64)
        potential = current if potential is None else 2 * potential + current
    return potential


class IntegerProgram(fx.Interpreter):
    """Runs an SNN graph on integers: `mode` "evaluate" (time folded) or "simulate" (binary planes).
    Returns (logits, {neuron: spikes per sample}) like the float lowerings."""

    def __init__(self, gm: fx.GraphModule, layers: dict[str, IntegerWeights], mode: str) -> None:
        super().__init__(gm)
        self.layers, self.simulate = layers, mode == "simulate"
        self._convs: dict[tuple[str, int], Any] = {}
        self._thresholds: dict[str, Tensor] = {}

    def run(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self.counts: dict[str, Tensor] = {}
        self.dequantized: set[fx.Node] = set()
        try:
            logits = super().run(x)
        except UnsupportedModelError as err:   # without the lines fx.Interpreter adds
            raise UnsupportedModelError(str(err).splitlines()[0]) from None
        return logits, self.counts

    def run_node(self, node: fx.Node) -> Any:
        if node.op != "output" and any(a in self.dequantized for a in node.all_input_nodes):
            if node.op == "call_module" and isinstance(self.module.get_submodule(node.target),
                                                       (BitSerialIFNode, QuantDequant)):
                raise UnsupportedModelError(f"integer SNN: {node.target} fires from values that "
                                            f"{self.dequantized_by} turned back to float")
            self.dequantized.add(node)
        self.node = node
        return super().run_node(node)

    def _to_float(self, value: Any) -> Any:
        """Integers, dequantized (a float op reads them), with every other argument as it is."""
        if isinstance(value, Integers):
            self.dequantized.add(self.node)
            self.dequantized_by = f"{self.node.name} ({self.node.op} {self.node.target})"
            potential = integrate(value.values) if self.simulate else value.values
            return _dequantize(value, potential)
        if isinstance(value, list) and value and all(isinstance(v, Integers) for v in value):
            terms = [self._to_float(v) for v in value]
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            return total
        return value

    def _floats(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (tuple(self._to_float(a) for a in args), {k: self._to_float(v) for k, v in kwargs.items()})

    # --- modules ---------------------------------------------------------------------------
    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.module.get_submodule(target)
        x = args[0] if args else None
        integer = isinstance(x, (Integers, MaxPooledSum)) or (isinstance(x, list) and x and isinstance(x[0], Integers))
        if isinstance(module, BitSerialIFNode):
            return self._fire(target, module, x) if integer else self._encode(target, module, x)
        if integer and isinstance(module, QuantDequant):
            return self._requantized(target, x, module.scale, module.zero_point, module.qmin, module.qmax,
                                     spikes=False)
        if integer and isinstance(x, Integers):
            if target in self.layers:
                return self._layer(target, module, x)
            if isinstance(module, MAX_POOLS):
                return self._on_potential(x, module)
            if isinstance(module, _GLOBAL_POOLS) and all(s == 1 for s in _pair_all(module.output_size)):
                return self._sum_pool(x, tuple(range(2, len(self._shape(x)))))
            if isinstance(module, (nn.Flatten, nn.Identity, nn.Dropout)):
                return self._moved(x, lambda v: module(v), lambda s: SimulatedStructural(module)(s))
        if integer and isinstance(x, list) and isinstance(module, MAX_POOLS):
            return MaxPooledSum(x, module)
        args, kwargs = self._floats(args, kwargs)
        return module(*args, **kwargs)

    def _encode(self, target: str, neuron: BitSerialIFNode, potential: Tensor) -> Integers:
        """The first neurons, on a float potential (the analog input's layer): the float neuron's levels."""
        theta = neuron.theta.to(torch.float64)
        if not self.simulate:
            out = fire_fused(potential, neuron.theta, neuron.membrane_offset, neuron.levels, neuron.timesteps,
                             want_levels=True, per_channel_counts=False)
            self.counts[target] = out.sample_spikes
            return Integers(out.levels.to(_level_dtype(neuron.levels)), theta)
        neuron.reset()
        planes = neuron(potential.unsqueeze(0)).to(torch.uint8)
        neuron.reset()
        self.counts[target] = planes.transpose(0, 1).flatten(1).sum(1).to(torch.int64)
        return Integers(Signal(steps=planes), theta)

    def _fire(self, target: str, neuron: BitSerialIFNode, x: Integers | list) -> Integers:
        return self._requantized(target, x, neuron.theta, torch.zeros(()), 0, neuron.levels, spikes=True,
                                 timesteps=neuron.timesteps)

    def _requantized(self, target: str, x: Integers | list, scale: Tensor, zero_point: Tensor, qmin: int,
                     qmax: int, spikes: bool, timesteps: int = 0) -> Integers:
        """Levels q - qmin of round_half_even(V / scale) + zero point, clamped to qmin..qmax (module
        docstring); with `spikes` a neuron's: counted, and in simulation fired as T binary planes."""
        pool = x.pool if isinstance(x, MaxPooledSum) else None
        terms = x.terms if pool is not None else x if isinstance(x, list) else [x]
        if not bool((zero_point == zero_point.reshape(-1)[0]).all()):
            raise UnsupportedModelError(f"integer SNN: {target} has per-channel zero points")
        zero = int(zero_point.reshape(-1)[0])
        potentials = [integrate(t.values) if self.simulate else t.values for t in terms]
        if len(terms) == 1 and pool is None:
            thresholds = self._thresholds_of(target, terms[0], potentials[0], scale, zero, qmin, qmax)
            out = levels_fused(_as_int32(target, potentials[0]), thresholds, 0,
                               sample_spikes=spikes and not self.simulate)
            levels, sample = out.levels, out.sample_spikes
        else:
            total = _dequantize(terms[0], potentials[0])
            for term, potential in zip(terms[1:], potentials[1:]):
                total += _dequantize(term, potential)
            levels_f = round_clamp_(total, scale, zero, qmin, qmax)   # q - qmin, in float32
            if pool is not None:
                levels_f = pool(levels_f)
            levels = levels_f.to(_level_dtype(qmax - qmin))
            # the levels in float32 (exact) are spent on their spike count
            sample = popcount_sum_(levels_f, qmax - qmin, tuple(range(1, levels.dim()))) \
                if spikes and not self.simulate else None
        value_scale = scale.to(torch.float64).reshape(-1)
        value_scale = value_scale.reshape(()) if value_scale.numel() == 1 else value_scale
        if not spikes:
            return Integers(Signal(const=levels) if self.simulate else levels, value_scale, qmin - zero)
        if not self.simulate:
            self.counts[target] = sample
            return Integers(levels, value_scale)
        planes = fire_msb_first(levels, timesteps)
        self.counts[target] = planes.transpose(0, 1).flatten(1).sum(1).to(torch.int64)
        return Integers(Signal(steps=planes), value_scale)

    def _thresholds_of(self, target: str, term: Integers, potential: Tensor, scale: Tensor, zero: int,
                       qmin: int, qmax: int) -> Tensor:
        """The integer thresholds of one accumulator's requantization (cached per neuron)."""
        if target not in self._thresholds:
            self._thresholds[target] = site_thresholds(term.scale, term.offset, scale, zero, qmin, qmax,
                                                       potential.shape[1])
        return self._thresholds[target].to(potential.device)

    def _layer(self, target: str, module: nn.Module, x: Integers) -> Integers:
        """An int8 layer on integer values: its exact accumulator (bias entering once)."""
        weights = self.layers[target]
        key = (target, x.offset, str(x.values.device if isinstance(x.values, Tensor) else x.values.shape))
        if key not in self._convs:
            self._convs[key] = _integer_layer(target, module, weights, x.offset, self._device(x))
        run, run_without_bias, bias = self._convs[key]
        scale = x.scale * weights.weight_scale.to(torch.float64).reshape(-1)
        if weights.bias is not None and not torch.equal(weights.bias_scale.expand(scale.shape),
                                                        scale.to(torch.float32).expand(weights.bias_scale.shape)):
            raise UnsupportedModelError(f"integer SNN: the bias of layer {target} is not on its accumulator's grid "
                                        "(its scale is not the input's scale times the weight's)")
        if not self.simulate:
            return Integers(run(_nonnegative(target, x.values)), scale)
        out = x.values.map(lambda steps: fold_time(run_without_bias, steps), run)
        if out.const is None:   # the bias enters once
            out.const = channel_view(bias, out.steps.dim() - 1) + torch.zeros_like(out.steps[0])
        return Integers(out, scale)

    def _device(self, x: Integers) -> torch.device:
        values = x.values
        return values.device if isinstance(values, Tensor) else (values.steps if values.steps is not None
                                                                 else values.const).device

    def _shape(self, x: Integers) -> torch.Size:
        return x.values.shape

    def _on_potential(self, x: Integers, fn) -> Integers:
        """A max pool: on the accumulator (the scale is positive, so it commutes with requantizing)."""
        potential = integrate(x.values) if self.simulate else x.values
        pooled = fn(potential.to(torch.float64)).to(potential.dtype)   # float64 holds every int32
        if pooled.dim() > 1 and x.scale.numel() > 1 and pooled.shape[1] != x.scale.numel():
            raise UnsupportedModelError(f"integer SNN: {self.node.name} moves the channels of per-channel scales")
        return Integers(Signal(const=pooled) if self.simulate else pooled, x.scale, x.offset)

    def _sum_pool(self, x: Integers, dims: tuple[int, ...], keepdim: bool = True) -> Integers:
        """A global average pool: the integer sum, its 1 / count moved into the scale."""
        count = 1
        for d in dims:
            count *= self._shape(x)[d]
        if x.offset:
            raise UnsupportedModelError(f"integer SNN: {self.node.name} pools values with a zero point offset")
        if self.simulate:
            values = x.values.map(lambda s: s.sum(tuple(d + 1 for d in dims), keepdim=keepdim),
                                  lambda c: c.sum(dims, keepdim=keepdim))
        else:
            values = x.values.to(torch.int32).sum(dims, keepdim=keepdim, dtype=torch.int32)
        return Integers(values, x.scale / count, 0)

    def _moved(self, x: Integers, on_tensor, on_signal) -> Integers:
        values = on_signal(x.values) if self.simulate else on_tensor(x.values)
        new_shape = values.shape
        scale = x.scale
        if scale.numel() > 1 and (len(new_shape) < 2 or new_shape[1] != scale.numel()):
            old = self._shape(x)
            if len(new_shape) == 2 and len(old) > 2 and new_shape[1] == old[1:].numel():
                scale = scale.repeat_interleave(old[2:].numel())   # flatten: channel-major
            else:
                raise UnsupportedModelError(f"integer SNN: {self.node.name} moves per-channel scales")
        return Integers(values, scale, x.offset)

    # --- functions and methods -------------------------------------------------------------
    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else None
        if target in (operator.add, torch.add) and not kwargs and all(
                isinstance(a, (Integers, list)) for a in args[:2]):
            return [*(args[0] if isinstance(args[0], list) else [args[0]]),
                    *(args[1] if isinstance(args[1], list) else [args[1]])]
        if isinstance(x, Integers):
            if target is getattr:
                return self._shape(x) if args[1] == "shape" else getattr(x.values, args[1])
            if target in _MOVING_FUNCTIONS:
                return self._moved(x, lambda v: target(v, *args[1:], **kwargs),
                                   lambda s: FUNCTION_RULES[target](s, *args[1:], **kwargs))
            if target is torch.mean and kwargs.get("keepdim", False) in (True, False):
                dims = args[1] if len(args) > 1 else kwargs.get("dim")
                dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
                if sorted(d % len(self._shape(x)) for d in dims) == list(range(2, len(self._shape(x)))):
                    return self._sum_pool(x, tuple(d % len(self._shape(x)) for d in dims),
                                          kwargs.get("keepdim", args[2] if len(args) > 2 else False))
            if target in (F.max_pool1d, F.max_pool2d):
                return self._on_potential(x, lambda p: target(p, *args[1:], **kwargs))
            if target is F.pad and kwargs.get("mode", "constant") == "constant" and not kwargs.get("value") \
                    and x.offset == 0:
                return self._moved(x, lambda v: F.pad(v, *args[1:]), lambda s: FUNCTION_RULES[F.pad](s, *args[1:]))
        args, kwargs = self._floats(args, kwargs)
        return target(*args, **kwargs)

    def call_method(self, target: str, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        if isinstance(x, Integers):
            if target in ("size", "dim"):
                shape = self._shape(x)
                return len(shape) if target == "dim" else (shape if not args[1:] else shape[args[1]])
            if target in _MOVING_METHODS:
                return self._moved(x, lambda v: getattr(v, target)(*args[1:], **kwargs),
                                   lambda s: simulate_method(target, s, *args[1:], **kwargs))
        args, kwargs = self._floats(args, kwargs)
        return getattr(args[0], target)(*args[1:], **kwargs)

    def output(self, target: str, args: tuple, kwargs: dict) -> Any:
        return self._to_float(args[0])


def fire_msb_first(levels: Tensor, timesteps: int) -> Tensor:
    """The T binary spike planes [T, N, ...] of levels, most significant first (uint8)."""
    wide = levels.to(torch.int32)
    return torch.stack([((wide >> (timesteps - 1 - t)) & 1).to(torch.uint8) for t in range(timesteps)])


def _level_dtype(levels: int) -> torch.dtype:
    return torch.uint8 if levels <= 255 else torch.int16 if levels <= 32767 else torch.int32


def _pair_all(size: Any) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size,)


def _as_int32(target: str, potential: Tensor) -> Tensor:
    if potential.dtype != torch.int32:
        if potential.numel() and (int(potential.min()) < INT32_MIN or int(potential.max()) > INT32_MAX):
            raise UnsupportedModelError(f"integer SNN: the accumulator of {target} leaves int32")
        potential = potential.to(torch.int32)
    return potential


def _nonnegative(target: str, values: Tensor) -> Tensor:
    if values.dtype == torch.int32 and values.numel() and int(values.min()) < 0:
        raise UnsupportedModelError(f"integer SNN: layer {target} reads negative integers")
    return values


def _integer_layer(target: str, module: nn.Module, weights: IntegerWeights, offset: int, device: torch.device):
    """(with bias, without bias, the bias) of an int8 layer on values u >= 0 whose value carries
    `offset`: W (u + o) + b = W u + (o sum(w) + b)."""
    weight = weights.weight.to(device)
    bias = torch.zeros(weight.shape[0], dtype=torch.int64, device=device) if weights.bias is None \
        else weights.bias.to(device).to(torch.int64)
    bias = bias + offset * weight.reshape(weight.shape[0], -1).to(torch.int64).sum(1)
    if int(bias.abs().max()) > INT32_MAX:
        raise UnsupportedModelError(f"integer SNN: the bias of {target} leaves int32")
    bias = bias.to(torch.int32)
    if isinstance(module, nn.Linear):
        return (lambda q: int_linear(q, weight, bias)), (lambda q: int_linear(q, weight)), bias
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        if offset and any(module.padding):   # its zero padding would read u = 0, the value o * scale
            raise UnsupportedModelError(f"integer SNN: layer {target} pads values with a zero point offset")
        geometry = (module.stride, module.padding, module.dilation, module.groups)
        return IntConv2d(weight, bias, *geometry), IntConv2d(weight, None, *geometry), bias
    raise UnsupportedModelError(f"integer SNN: layer {target} ({type(module).__name__}) has no integer kernel")
