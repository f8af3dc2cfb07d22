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
(e.g. a float layer, or an average pool with uneven windows) dequantizes them, and no neuron may follow it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import UnsupportedModelError
from ..kernels import IntConv2d, IntegerLayer, IntegerLevels, Requantization, Requantizer, fire_fused
from ..kernels.int_levels import level_dtype
from ..levels import channel_view, popcount_sum_, unpack_spikes
from ..ops import (GLOBAL_AVERAGE_POOLS, INTEGER_KERNEL_LAYERS, LAYERS, MAX_POOLS, RESHAPING_FUNCTIONS,
                   RESIDUAL_ADDS, STRUCTURAL, WINDOW_AVERAGE_POOLS, functions_of)
from .integer import site_thresholds
from .integer_values import (REQUANTIZATION_ROUNDINGS, UNIT_ROUNDOFF, Fired, Integers, IntegerWeights, MaxPooledSum,
                             Observer, ResidualSum, absolute_products, as_int32, dequantize, exact_value,
                             integer_layer, integrate, nonnegative, pair_all, sum_pool, window_count, window_pool)
from .neuron import BitSerialIFNode
from .quant import QuantDequant
from .signal import Signal
from .simulator import FUNCTION_RULES, SimulatedStructural, fold_time, sample_spikes, simulate_method

# methods that move integers without arithmetic (any dtype); ops.RESHAPING_FUNCTIONS the functions
_MOVING_METHODS = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"})


MAX_POOL_FUNCTIONS = functions_of("max_pool")


def _one_zero_point(zero_point: Tensor) -> int | None:
    """The QDQ pair's zero point where all its channels share one (the requantization takes one), else None."""
    first = zero_point.reshape(-1)[0]
    return int(first) if bool((zero_point == first).all()) else None


class IntegerProgram(fx.Interpreter):
    """Runs an SNN graph on integers: `mode` "evaluate" (time folded) or "simulate" (binary planes).
    Returns (logits, {neuron: spikes per sample}) like the float lowerings."""

    def __init__(self, gm: fx.GraphModule, layers: dict[str, IntegerWeights], mode: str,
                 observe: Observer | None = None) -> None:
        super().__init__(gm)
        self.layers, self.simulate = layers, mode == "simulate"
        # observe(site, integers, (value, bound)): each site's integers as the file's QuantizeLinear
        # gives them, the real value they round and how far a float32 evaluation of it may land
        # (integer_values.exact_value; the encoder's from its float potential). Observing runs every
        # layer unfused.
        self.observe = observe
        self._convs: dict[tuple[str, int], Any] = {}
        self._neurons: dict[tuple, IntegerLevels | Requantizer] = {}
        self._scales: dict[str, tuple[Tensor, Tensor]] = {}   # layer -> (input scale, accumulator scale)
        # observing: a float layer's sum |w x| + |b| and fan-in, until the encoding neuron reads it
        self._float_layers: dict[fx.Node, tuple[Tensor, int]] = {}

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
            if node.op == "call_module" and isinstance(self.module.get_submodule(node.target), BitSerialIFNode):
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
            return dequantize(value, potential)
        if isinstance(value, ResidualSum):
            terms = [self._to_float(v) for v in value]
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            return total
        if isinstance(value, (list, tuple)):   # e.g. torch.cat's tensors
            return type(value)(self._to_float(v) for v in value)
        return value

    def _floats(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (tuple(self._to_float(a) for a in args), {k: self._to_float(v) for k, v in kwargs.items()})

    # --- modules ---------------------------------------------------------------------------
    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.module.get_submodule(target)
        x = args[0] if args else None
        integer = isinstance(x, (Integers, MaxPooledSum, Fired, ResidualSum))
        if isinstance(module, BitSerialIFNode):
            return self._fire(target, module, x) if integer else self._encode(target, module, x)
        if integer and isinstance(module, QuantDequant):
            return self._requantized(target, x, module.scale, module.zero_point, module.qmin, module.qmax,
                                     spikes=False)
        if integer and isinstance(x, Integers):
            if target in self.layers:
                return self._fused_step(target, module, x) or self._layer(target, module, x)
            if isinstance(module, MAX_POOLS):
                return self._on_potential(x, module)
            if isinstance(module, GLOBAL_AVERAGE_POOLS) and all(s == 1 for s in pair_all(module.output_size)):
                return sum_pool(x, tuple(range(2, len(self._shape(x)))), True, self.simulate, self.node.name)
            if isinstance(module, WINDOW_AVERAGE_POOLS) and window_count(module, ()) is not None:
                return window_pool(x, module, self.simulate, self.node.name)
            if isinstance(module, STRUCTURAL):
                return self._moved(x, lambda v: module(v), lambda s: SimulatedStructural(module)(s))
        if isinstance(x, ResidualSum) and isinstance(module, MAX_POOLS):
            return MaxPooledSum(x, module)
        args, kwargs = self._floats(args, kwargs)
        if self.observe is not None and isinstance(module, LAYERS) and isinstance(x, Tensor) and \
                any(u.op == "call_module" and isinstance(self.module.get_submodule(u.target), BitSerialIFNode)
                    for u in self.node.users):   # the encoder's layer: its bound (_encode)
            self._float_layers[self.node] = (absolute_products(module, x, module.weight, module.bias),
                                             module.weight[0].numel())
        return module(*args, **kwargs)

    def _encode(self, target: str, neuron: BitSerialIFNode, potential: Tensor) -> Integers:
        """The first neurons, on a float potential (the analog input's layer): the float neuron's levels."""
        theta = neuron.theta.to(torch.float64)
        if not self.simulate:
            out = fire_fused(potential, neuron.theta, neuron.membrane_offset, neuron.levels, neuron.timesteps,
                             want_levels=True, per_channel_counts=False)
            self.counts[target] = out.sample_spikes
            if self.observe is not None:   # z / theta, which the float neuron rounds as floor(z / theta + 1/2)
                step = channel_view(theta, potential.dim())
                shifted = potential.to(torch.float64) + channel_view(neuron.membrane_offset.double(), potential.dim())
                value = shifted / step - 0.5   # the shift (in the bias, or the offset) taken back
                bound = REQUANTIZATION_ROUNDINGS * value.abs()
                products, fan_in = self._float_layers.pop(self.node.args[0], (None, 0))
                if products is not None:   # its float32 layer, run in any order (onnxruntime's)
                    bound = bound + (fan_in + 2) * products / step
                self.observe(target, out.levels.to(torch.int64), (value, UNIT_ROUNDOFF * bound))
            return Integers(out.levels.to(level_dtype(0, neuron.levels)), theta)
        neuron.reset()
        planes = neuron(potential.unsqueeze(0)).to(torch.uint8)
        neuron.reset()
        self.counts[target] = sample_spikes(planes)
        return Integers(Signal(steps=planes), theta)

    def _fire(self, target: str, neuron: BitSerialIFNode, x: Integers | list) -> Integers:
        return self._requantized(target, x, neuron.theta, torch.zeros(()), 0, neuron.levels, spikes=True,
                                 timesteps=neuron.timesteps)

    def _requantized(self, target: str, x: Integers | list, scale: Tensor, zero_point: Tensor, qmin: int,
                     qmax: int, spikes: bool, timesteps: int = 0) -> Integers:
        """Levels q - qmin of round_half_even(V / scale) + zero point, clamped to qmin..qmax (module
        docstring); with `spikes` a neuron's: counted, and in simulation fired as T binary planes."""
        pool = x.pool if isinstance(x, MaxPooledSum) else None
        terms = [] if isinstance(x, Fired) else x.terms if pool is not None else x if isinstance(x, ResidualSum) else [x]
        zero = _one_zero_point(zero_point)
        if zero is None:
            raise UnsupportedModelError(f"integer SNN: {target} has per-channel zero points")
        potentials = [integrate(t.values) if self.simulate else t.values for t in terms]
        count = spikes and not self.simulate
        if isinstance(x, Fired):
            levels, sample = x.levels, x.sample_spikes
        elif pool is None:
            potentials = [p if p.dtype in (torch.uint8, torch.float32) else as_int32(target, p) for p in potentials]
            requantizer = self._requantizer(target, terms, scale, zero, qmin, qmax)
            if len(terms) == 1 and not requantizer.native_supports(potentials):   # e.g. Triton: by thresholds
                out = self._neuron_of(target, terms[0], potentials[0], scale, zero, qmin, qmax)(
                    potentials[0].to(torch.int32), sample_spikes=count)
            else:
                out = requantizer(potentials, sample_spikes=count)
            levels, sample = out.levels, out.sample_spikes
        else:   # a max pool of a residual sum: each position's level, then the window's largest
            levels_f = pool(self._requantizer(target, terms, scale, zero, qmin, qmax).float_levels(potentials))
            levels = levels_f.to(level_dtype(0, qmax - qmin))
            # the levels in float32 (exact) are spent on their spike count
            sample = popcount_sum_(levels_f, qmax - qmin, tuple(range(1, levels.dim()))) if count else None
        if self.observe is not None and not self.simulate:
            value, bound = exact_value(terms, potentials, scale)
            if pool is not None:
                value, bound = pool(value), pool(bound)
            self.observe(target, levels.to(torch.int64) + qmin, (value + zero, bound))
        value_scale = scale.to(torch.float64).reshape(-1)
        value_scale = value_scale.reshape(()) if value_scale.numel() == 1 else value_scale
        if not spikes:
            return Integers(Signal(const=levels) if self.simulate else levels, value_scale, qmin - zero)
        if not self.simulate:
            self.counts[target] = sample
            return Integers(levels, value_scale)
        planes = unpack_spikes(levels, timesteps)
        self.counts[target] = sample_spikes(planes)
        return Integers(Signal(steps=planes), value_scale)

    def _requantizer(self, target: str, terms: list[Integers], scale: Tensor, zero: int, qmin: int,
                     qmax: int) -> Requantizer:
        """The site's requantization (module docstring) of its terms, prepared once."""
        key = ("sum", target, len(terms))
        if key not in self._neurons:
            adds = [torch.tensor([t.offset], dtype=torch.int32) if t.offset else None for t in terms]
            self._neurons[key] = Requantizer([t.scale.to(torch.float32) for t in terms], adds,
                                             Requantization(scale.to(torch.float32), qmin - zero, qmax - zero))
        return self._neurons[key]

    def _neuron_of(self, target: str, term: Integers, potential: Tensor, scale: Tensor, zero: int,
                   qmin: int, qmax: int) -> IntegerLevels:
        """The integer neuron of one accumulator's requantization, its thresholds prepared once."""
        key = (target, str(potential.device))
        if key not in self._neurons:
            thresholds = site_thresholds(term.scale, term.offset, scale, zero, qmin, qmax, potential.shape[1])
            self._neurons[key] = IntegerLevels(thresholds.to(potential.device), 0)
        return self._neurons[key]

    def _accumulator_scale(self, target: str, x: Integers) -> Tensor:
        """The scale of an int8 layer's accumulator on `x`, its bias checked to lie on that grid
        (once per layer: its input's scale is a constant of the graph, compared each batch)."""
        cached = self._scales.get(target)
        if cached is not None and torch.equal(cached[0], x.scale):
            return cached[1]
        weights = self.layers[target]
        scale = x.scale * weights.weight_scale.to(torch.float64).reshape(-1)
        if weights.bias is not None and not torch.equal(weights.bias_scale.expand(scale.shape),
                                                        scale.to(torch.float32).expand(weights.bias_scale.shape)):
            raise UnsupportedModelError(f"integer SNN: the bias of layer {target} is not on its accumulator's grid "
                                        "(its scale is not the input's scale times the weight's)")
        self._scales[target] = (x.scale, scale)
        return scale

    def _fused_step(self, target: str, module: nn.Module, x: Integers) -> Fired | None:
        """Evaluation of an int8 layer on uint8 levels whose one reader is a neuron or QDQ pair: layer
        and requantization in one kernels.IntegerLayer step, the accumulator never materialized."""
        users = list(self.node.users)
        if self.simulate or self.observe is not None or x.values.dtype != torch.uint8 or x.offset or \
                len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (self.node,):
            return None
        if self.layers[target].zero_point is not None:   # asymmetric weights: integer_layer's correction
            return None
        reader = self.module.get_submodule(users[0].target)
        if isinstance(reader, BitSerialIFNode):
            grid = (reader.theta, 0, 0, reader.levels)
        elif isinstance(reader, QuantDequant) and _one_zero_point(reader.zero_point) is not None:
            grid = (reader.scale, _one_zero_point(reader.zero_point), reader.qmin, reader.qmax)
        else:
            return None
        if not isinstance(module, INTEGER_KERNEL_LAYERS) or (isinstance(module, nn.Conv2d) and (
                module.padding_mode != "zeros" or not isinstance(module.padding, tuple))):
            return None
        scale = self._accumulator_scale(target, x)
        key = ("step", target, str(x.values.device))
        if key not in self._convs:
            weights = self.layers[target]
            thresholds = site_thresholds(scale, 0, *grid, module.weight.shape[0])
            geometry = (module.stride, module.padding, module.dilation, module.groups) \
                if isinstance(module, nn.Conv2d) else (1, 0, 1, 1)
            theta, zero, qmin, qmax = grid
            device = x.values.device
            self._convs[key] = IntegerLayer(
                weights.weight.to(device), None if weights.bias is None else weights.bias.to(device),
                thresholds.to(device), 0, *geometry,
                requantize=(scale.to(torch.float32), Requantization(theta.to(torch.float32), qmin - zero, qmax - zero)))
        out = self._convs[key](x.values, sample_spikes=isinstance(reader, BitSerialIFNode))
        return Fired(out.levels, out.sample_spikes)

    def _layer(self, target: str, module: nn.Module, x: Integers) -> Integers:
        """An int8 layer on integer values: its exact accumulator (bias entering once)."""
        key = (target, x.offset, str(x.values.device if isinstance(x.values, Tensor) else x.values.shape))
        if key not in self._convs:
            self._convs[key] = integer_layer(target, module, self.layers[target], x.offset, self._device(x))
        run, run_without_bias, bias = self._convs[key]
        scale = self._accumulator_scale(target, x)
        if not self.simulate:
            values = nonnegative(target, x.values)
            floating = self._float_term(run, values)
            return Integers(run(values) if floating is None else floating, scale,
                            **self._magnitude(target, module, x))
        out = x.values.map(lambda steps: fold_time(run_without_bias, steps), run)
        if out.const is None:   # the bias enters once
            out.const = channel_view(bias, out.steps.dim() - 1) + torch.zeros_like(out.steps[0])
        return Integers(out, scale)

    def _magnitude(self, target: str, module: nn.Module, x: Integers) -> dict:
        """Observing: the layer's sum |w x| + |b| (float64) and fan-in, which bound a float32 run of it
        (integer_values.exact_value)."""
        if self.observe is None:
            return {}
        weights = self.layers[target]   # the file's bias (it folds in the offset's share, in the products)
        products = absolute_products(module, x.values.to(torch.float64) + x.offset, weights.offsets(), weights.bias)
        # a pooled input adds its pool's float32 roundings, each within a roundoff of its sum |w x|
        return {"magnitude": products, "fan_in": weights.weight[0].numel() + x.pooled_count}

    def _float_term(self, conv: Any, levels: Tensor) -> Tensor | None:
        """A conv accumulator that only residual sums read, as oneDNN gives it in float32 with the
        bias (IntConv2d.float_accumulator): float32(A), all its terms read (integer_values.dequantize),
        one pass fewer than the int32. None where it would not be exact."""
        if not isinstance(conv, IntConv2d) or not all(
                u.op == "call_function" and u.target in RESIDUAL_ADDS for u in self.node.users):
            return None
        return conv.float_accumulator(levels, plus_bias=True)

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
        # an observed bound's magnitude pooled too: the window's largest bounds the one chosen
        magnitude = None if x.magnitude is None else fn(x.magnitude)
        return Integers(Signal(const=pooled) if self.simulate else pooled, x.scale, x.offset, magnitude, x.fan_in)

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
        return Integers(values, scale, x.offset, pooled_count=x.pooled_count)

    # --- functions and methods -------------------------------------------------------------
    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else None
        if target in RESIDUAL_ADDS and not kwargs and all(
                isinstance(a, (Integers, ResidualSum)) for a in args[:2]):
            return ResidualSum([*(args[0] if isinstance(args[0], ResidualSum) else [args[0]]),
                                *(args[1] if isinstance(args[1], ResidualSum) else [args[1]])])
        if isinstance(x, Integers):
            if target is getattr:
                return self._shape(x) if args[1] == "shape" else getattr(x.values, args[1])
            if target in RESHAPING_FUNCTIONS:
                return self._moved(x, lambda v: target(v, *args[1:], **kwargs),
                                   lambda s: FUNCTION_RULES[target](s, *args[1:], **kwargs))
            if target is torch.mean and kwargs.get("keepdim", False) in (True, False):
                dims = args[1] if len(args) > 1 else kwargs.get("dim")
                dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
                if sorted(d % len(self._shape(x)) for d in dims) == list(range(2, len(self._shape(x)))):
                    return sum_pool(x, tuple(d % len(self._shape(x)) for d in dims),
                                    kwargs.get("keepdim", args[2] if len(args) > 2 else False), self.simulate,
                                    self.node.name)
            if target in MAX_POOL_FUNCTIONS:
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
