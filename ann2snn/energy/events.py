"""Events: the spikes that reach each edge of the SNN, in the form of the executor that carries them.

A layer's synaptic operations are the events at its input times their fan-out, so energy needs,
beside every value that carries spikes, the spikes themselves: structural ops move them, a residual
add carries both inputs' events, a scale keeps them, and an average pool passes on the nonzero
entries of its pooled planes (docs/method.md section 6). Two forms, one per executor:
- `Planes` (the simulator): per-step counts [T, N, ...], binary where one neuron fired them;
- `Levels` (the evaluator): level maps [N, ...] whose binary digits are the planes; a sum of
  several neurons' spikes keeps one map per neuron, as level maps do not add.
Both give the same counts (tests/test_energy.py checks it against brute force).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..levels import pack_spikes, popcount_levels, spike_code_arithmetic_dtype, unpack_spikes
from ..runtime.signal import Signal, align_steps
from ..runtime.simulator import fold_time, simulate_call, simulate_method
from ..ops import VALUE_COPYING_PADS
from .fanout import call_argument, conv_fanout, conv_ones_kernel, pool_fanout


def count_dtype(device: torch.device) -> torch.dtype:
    # float64 on CPU; on CUDA float32 (counts per element stay far below 2^24, so sums are exact)
    return torch.float64 if device.type == "cpu" else torch.float32


def total(counts: Tensor) -> Tensor:
    """The exact sum of a count tensor, as an int64 scalar (float counts are whole numbers)."""
    if counts.is_floating_point():
        return torch.round(counts.sum(dtype=torch.float64)).to(torch.int64)
    return counts.sum(dtype=torch.int64)


class Op:
    """A structural op of the SNN graph as its events see it: a module, a function or a method name."""

    def __init__(self, target: Any, call: str) -> None:
        self.target, self.call = target, call   # call: call_module, call_function or call_method

    def arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.target is F.pad:  # constant padding carries no events, whatever its value; edge, reflect copy them
            mode = call_argument(args, kwargs, 2, "mode", "constant")
            return (args[0], call_argument(args, kwargs, 1, "pad", None)), \
                ({"mode": mode} if mode in VALUE_COPYING_PADS else {})
        return args, kwargs


class Planes:
    """The simulator's events: spikes per time step [T, N, ...]."""

    def __init__(self, planes: Tensor) -> None:
        self.planes = planes
        self._counts: Tensor | None = None

    def counts(self) -> Tensor:
        """Events summed over time steps, per element [N, ...]."""
        if self._counts is None:
            self._counts = self.planes.sum(0)
        return self._counts

    def __add__(self, other: "Planes") -> "Planes":
        a, b = align_steps(self.planes, other.planes)
        return Planes(a + b)

    def structural(self, op: Op, args: tuple, kwargs: dict) -> "Planes":
        """The simulator's own rule for `op`, on these planes (other tensor inputs carry none)."""
        def stand_in(value: Any) -> Any:
            if isinstance(value, Planes):
                return Signal(steps=value.planes)
            if isinstance(value, (Signal, Tensor)):
                return Signal(const=self.planes.new_zeros(value.shape))
            return value
        args, kwargs = _map(stand_in, args), {k: _map(stand_in, v) for k, v in kwargs.items()}
        if op.call == "call_module":
            return Planes(fold_time(op.target, args[0].steps))
        if op.call == "call_function":
            return Planes(simulate_call(op.target, *args, **kwargs).steps)
        return Planes(simulate_method(op.target, *args, **kwargs).steps)

    def layer_synaptic_ops(self, layer: nn.Module, fanouts: dict) -> Tensor:
        """By the definition: the event map convolved with an all-ones kernel of the weight's shape
        (no fan-out map: `fanouts` is for Levels' fast path, the same signature)."""
        count = self.counts()
        dtype = count_dtype(count.device)
        occupancy = layer._conv_forward(count.to(dtype), conv_ones_kernel(layer, dtype, count.device), None)
        return total(occupancy) * (layer.out_channels // layer.groups)

    def pool_synaptic_ops(self, sums: Callable[[Tensor], Tensor], fanouts: dict) -> Tensor:
        """By the definition: the sum of every pooling window of the event map."""
        return total(sums(self.counts().to(count_dtype(self.planes.device))))

    def pooled(self, sums: Callable[[Tensor], Tensor]) -> "Planes":
        """The events after an average pool: the nonzero entries of each step's pooled plane."""
        pooled = fold_time(sums, self.planes.to(count_dtype(self.planes.device)))
        return Planes((pooled != 0).to(self.planes.dtype))


class Levels:
    """The evaluator's events: level maps [N, ...] whose binary digits are the spike planes."""

    def __init__(self, maps: list[Tensor], timesteps: int) -> None:
        self.maps, self.timesteps = maps, timesteps
        self._counts: Tensor | None = None

    @staticmethod
    def fired(levels: Tensor, timesteps: int) -> "Levels":
        """A neuron's spike code, in the dtype its codes are shifted and added in."""
        return Levels([levels.to(spike_code_arithmetic_dtype(timesteps))], timesteps)

    def counts(self) -> Tensor:
        """popcount(q): the spikes that carry level q, summed over the maps [N, ...]."""
        if self._counts is None:
            levels = 2**self.timesteps - 1
            self._counts = popcount_levels(self.maps[0], levels)
            for m in self.maps[1:]:
                self._counts = self._counts + popcount_levels(m, levels)
        return self._counts

    def __add__(self, other: "Levels") -> "Levels":
        return Levels(self.maps + other.maps, self.timesteps)

    def structural(self, op: Op, args: tuple, kwargs: dict) -> "Levels":
        """`op` on each level map (other tensor inputs carry none: zeros)."""
        dtype = self.maps[0].dtype
        components = max(len(v.maps) for v in _events_in((args, kwargs)))
        maps = []
        for k in range(components):
            def stand_in(value: Any) -> Any:
                if isinstance(value, Levels):
                    return value.maps[k] if k < len(value.maps) else value.maps[0].new_zeros(value.maps[0].shape)
                if isinstance(value, Tensor):
                    return torch.zeros(value.shape, dtype=dtype, device=value.device)
                return value
            a, kw = _map(stand_in, args), {name: _map(stand_in, v) for name, v in kwargs.items()}
            if op.call == "call_method":
                maps.append(getattr(a[0], op.target)(*a[1:], **kw))
            else:
                maps.append(op.target(*a, **kw))
        return Levels(maps, self.timesteps)

    def layer_synaptic_ops(self, layer: nn.Module, fanouts: dict) -> Tensor:
        """The fast path: the popcount map, summed over images and channels, times the fan-out map."""
        count = self.counts()
        key = (count.shape[1:], count.device)
        if key not in fanouts:
            fanouts[key] = conv_fanout(layer, tuple(count.shape[1:])).to(count.device)
        positions = count.sum((0, 1), dtype=torch.int64)
        return (positions * fanouts[key][0]).sum()

    def pool_synaptic_ops(self, sums: Callable[[Tensor], Tensor], fanouts: dict) -> Tensor:
        count = self.counts()
        key = (count.shape[1:], count.device)
        if key not in fanouts:
            fanouts[key] = pool_fanout(sums, tuple(count.shape[1:])).to(count.device)
        return (count * fanouts[key]).sum()

    def planes(self) -> Tensor:
        dtype = count_dtype(self.maps[0].device)
        return sum(unpack_spikes(m, self.timesteps, dtype) for m in self.maps)

    def pooled(self, sums: Callable[[Tensor], Tensor]) -> "Levels":
        """The events after an average pool: the nonzero entries of each step's pooled plane."""
        pooled = fold_time(sums, self.planes())
        return Levels.fired(pack_spikes(pooled != 0), self.timesteps)


Events = Planes | Levels


def _map(fn: Callable[[Any], Any], value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    return fn(value)


def _events_in(values: Any) -> list[Events]:
    if isinstance(values, (Planes, Levels)):
        return [values]
    if isinstance(values, (list, tuple)):
        return [e for v in values for e in _events_in(v)]
    if isinstance(values, dict):
        return _events_in(list(values.values()))
    return []


def structural_events(op: Op, args: tuple, kwargs: dict) -> Events:
    """The events after a structural op, from those of its inputs (given in place of their values)."""
    args, kwargs = op.arguments(args, kwargs)
    events = _events_in((args, kwargs))
    return events[0].structural(op, args, kwargs)


def summed_events(*events: Events) -> Events:
    """A residual add: both inputs' events."""
    out = events[0]
    for e in events[1:]:
        out = out + e
    return out
