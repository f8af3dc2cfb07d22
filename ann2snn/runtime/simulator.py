"""Lowering to the time-stepped simulator (docs/method.md section 7, first way).

`lower_to_simulator` rewrites the SNN graph so that every edge carries a Signal: spike planes and
synaptic currents over [T, N, ...], MSB first, plus what enters once. Layers apply their weights
to each step's spike plane (accumulate only) and their bias once; neurons integrate by the
doubling rule and fire T steps. This is the SNN a neuromorphic chip would run.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import UnsupportedModelError
from .neuron import BitSerialIFNode
from ..ops import AVERAGE_POOLS, LAYERS, MAX_POOLS, NORMS, OUTPUT_OPS, STRUCTURAL, VALUE_COPYING_PADS, functions_of
from ..levels import channel_view
from .signal import Signal, add_signals, scale_signal

# linear and weightless: applied to each step's currents and to const alike
_LINEAR_WEIGHTLESS = AVERAGE_POOLS + STRUCTURAL
# not linear: they see the integrated potential, and their output enters once
_ON_POTENTIAL = MAX_POOLS + OUTPUT_OPS


# The unfold buffer of a float64 convolution, at most (SimulatedLayer).
_UNFOLD_BYTES = 1 << 28


def fold_time(fn: Callable[[Tensor], Tensor], steps: Tensor) -> Tensor:
    """Run a per-sample op on every step at once, with time folded into the batch."""
    return fn(steps.flatten(0, 1)).unflatten(0, steps.shape[:2])


class SimulatedLayer(nn.Module):
    """Conv / linear: weights on each step's spikes (accumulate only); the bias enters once."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def _without_bias(self, x: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, self.layer.weight)
        conv = lambda planes: self.layer._conv_forward(planes, self.layer.weight, None)  # noqa: E731
        if x.dtype == torch.float64:
            # float64 convolutions take PyTorch's unfold path, whose buffer holds C_in k k values per
            # output element of the whole batch (1.85 GB for the T = 8 planes of one VGG16 image):
            # in chunks of planes it stays bounded, and each plane's sums are the same
            per_plane = self.layer.weight[0].numel() * x[0, 0].numel() * x.element_size()
            chunk = max(1, _UNFOLD_BYTES // per_plane)
            if chunk < len(x):
                return torch.cat([conv(planes) for planes in x.split(chunk)])
        return conv(x)

    def forward(self, signal: Signal) -> Signal:
        out = signal.map(lambda s: fold_time(self._without_bias, s), self.layer)
        if out.const is None and self.layer.bias is not None:
            out.const = channel_view(self.layer.bias, out.steps.dim() - 1) + torch.zeros_like(out.steps[0])
        return out


class SimulatedBatchNorm(nn.Module):
    """An inference BN that was not folded: a per-channel scale on steps, scale and shift on const."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, signal: Signal) -> Signal:
        n = self.norm
        scale = torch.rsqrt(n.running_var + n.eps)
        if n.weight is not None:
            scale = scale * n.weight
        ndim = len(signal.shape)
        out = signal.map(lambda s: s * channel_view(scale, ndim), n)
        if out.const is None:
            out.const = n(torch.zeros_like(out.steps[0]))
        return out


class SimulatedStructural(nn.Module):
    """Pooling by averaging, flatten, identity: linear without bias, so the same on both parts."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, signal: Signal) -> Signal:
        return signal.map(lambda s: fold_time(self.module, s), self.module)


class SimulatedOnPotential(nn.Module):
    """MaxPool and other monotone or nonlinear ops: applied to the integrated potential."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, signal: Signal) -> Signal:
        return Signal(const=self.module(signal.potential()))


class SimulatedNeuron(nn.Module):
    """Integrate the input currents, fire T binary planes; pass them on scaled by theta."""

    def __init__(self, neuron: BitSerialIFNode) -> None:
        super().__init__()
        self.neuron = neuron

    def forward(self, signal: Signal) -> Signal:
        self.neuron.reset()
        spikes = self.neuron(signal.currents())
        theta = channel_view(self.neuron.theta.to(spikes.dtype), spikes.dim() - 1)
        return Signal(steps=spikes * theta, spikes=spikes)


def simulation_module(module: nn.Module) -> nn.Module:
    """The simulator's stand-in for one module of the SNN graph."""
    if isinstance(module, BitSerialIFNode):
        return SimulatedNeuron(module)
    if isinstance(module, LAYERS):
        return SimulatedLayer(module)
    if isinstance(module, NORMS):
        return SimulatedBatchNorm(module)
    if isinstance(module, _LINEAR_WEIGHTLESS):
        return SimulatedStructural(module)
    if isinstance(module, _ON_POTENTIAL) or getattr(module, "acts_on_potential", False):
        return SimulatedOnPotential(module)
    raise UnsupportedModelError(f"the simulator has no rule for module {type(module).__name__}")


# --- functions -------------------------------------------------------------------------------

def _time_dim(dim: int) -> int:
    return dim + 1 if dim >= 0 else dim


def _add(a: Any, b: Any) -> Signal:
    if isinstance(a, Signal) and isinstance(b, Signal):
        return add_signals(a, b)
    signal, constant = (a, b) if isinstance(a, Signal) else (b, a)
    base = signal.const if signal.const is not None else torch.zeros_like(signal.steps[0])
    return Signal(steps=signal.steps, const=base + constant)


def _sub(a: Any, b: Any) -> Signal:
    return _add(a, _mul(b, -1.0))


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, Signal) and isinstance(b, Signal):
        raise UnsupportedModelError("the product of two spiking signals is not a spiking layer")
    signal, factor = (a, b) if isinstance(a, Signal) else (b, a)
    return scale_signal(signal, factor)


def _div(a: Signal, b: Any) -> Signal:
    if isinstance(b, Signal):
        raise UnsupportedModelError("division by a spiking signal is not a spiking layer")
    return scale_signal(a, 1.0 / b)


def _cat(tensors: list, dim: int = 0) -> Signal:
    signals = [t if isinstance(t, Signal) else Signal(const=t) for t in tensors]
    steps = max(s.timesteps for s in signals)

    def steps_of(s: Signal) -> Tensor:
        if s.steps is None:
            return torch.zeros((steps,) + tuple(s.shape), dtype=s.const.dtype, device=s.const.device)
        return s.steps if s.timesteps == steps else torch.cat([s.steps.new_zeros(
            (steps - s.timesteps,) + s.steps.shape[1:]), s.steps])

    def const_of(s: Signal) -> Tensor:
        return s.const if s.const is not None else torch.zeros_like(s.steps[0])

    out_steps = torch.cat([steps_of(s) for s in signals], _time_dim(dim)) if steps else None
    has_const = any(s.const is not None for s in signals)
    out_const = torch.cat([const_of(s) for s in signals], dim) if has_const else None
    return Signal(steps=out_steps, const=out_const)


def _structural(on_steps: Callable, on_const: Callable) -> Callable:
    def rule(x: Signal, *args, **kwargs) -> Signal:
        return x.map(lambda s: on_steps(s, *args, **kwargs), lambda c: on_const(c, *args, **kwargs))
    return rule


def _flatten_steps(s: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    if start_dim == 0:
        raise UnsupportedModelError("flatten over the batch dimension cannot be simulated per time step")
    return torch.flatten(s, _time_dim(start_dim), _time_dim(end_dim))


def _reshape_steps(s: Tensor, shape) -> Tensor:
    return torch.reshape(s, (s.shape[0],) + tuple(shape))


def _permute_steps(s: Tensor, dims) -> Tensor:
    if dims[0] != 0:
        raise UnsupportedModelError("a permutation that moves the batch dimension cannot be simulated")
    return torch.permute(s, (0,) + tuple(_time_dim(d) for d in dims))


def _squeeze_steps(s: Tensor, dim=None) -> Tensor:
    if dim is None:
        raise UnsupportedModelError("squeeze without a dim cannot be simulated (it may drop the batch)")
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return torch.squeeze(s, tuple(_time_dim(d) for d in dims))


def _unsqueeze_steps(s: Tensor, dim: int) -> Tensor:
    return torch.unsqueeze(s, dim + 1 if dim >= 0 else dim)


def _mean_steps(s: Tensor, dim, keepdim: bool = False) -> Tensor:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return torch.mean(s, tuple(_time_dim(d) for d in dims), keepdim=keepdim)


def _pad(x: Signal, pad, mode: str = "constant", value: float | None = None) -> Signal:
    """Padding that copies values (edge, reflect) pads each step's plane and const alike: a border
    copy of a spike plane is a spike plane. Constant padding carries no spikes; its value enters
    once, with const."""
    if mode in VALUE_COPYING_PADS:
        return x.map(lambda s: fold_time(lambda t: F.pad(t, pad, mode=mode), s), lambda c: F.pad(c, pad, mode=mode))
    if mode != "constant":
        raise UnsupportedModelError(f"pad mode {mode!r} cannot be simulated")
    const = torch.zeros_like(x.steps[0]) if x.const is None and value else x.const
    return Signal(steps=None if x.steps is None else F.pad(x.steps, pad),
                  const=None if const is None else F.pad(const, pad, value=value or 0.0))


def _on_potential(fn: Callable) -> Callable:
    def rule(x: Signal, *args, **kwargs) -> Signal:
        return Signal(const=fn(x.potential(), *args, **kwargs))
    return rule


def _linear_function(fn: Callable) -> Callable:
    return _structural(lambda s, *a, **k: fold_time(lambda t: fn(t, *a, **k), s), fn)


FUNCTION_RULES: dict[Callable, Callable] = {
    operator.add: _add, torch.add: _add,
    operator.sub: _sub, torch.sub: _sub,
    operator.mul: _mul, torch.mul: _mul,
    operator.truediv: _div, torch.div: _div,
    operator.neg: lambda x: scale_signal(x, -1.0),
    torch.cat: _cat, torch.concat: _cat,
    torch.flatten: _structural(_flatten_steps, torch.flatten),
    torch.reshape: _structural(_reshape_steps, torch.reshape),
    torch.permute: _structural(_permute_steps, torch.permute),
    torch.squeeze: _structural(_squeeze_steps, torch.squeeze),
    torch.unsqueeze: _structural(_unsqueeze_steps, torch.unsqueeze),
    torch.mean: _structural(_mean_steps, torch.mean),
    torch.matmul: _structural(torch.matmul, torch.matmul),
    F.pad: _pad,
    # every pool function but the mean (above) runs on each step with time folded into the batch
    **{fn: _linear_function(fn) for fn in functions_of("average_pool") if fn is not torch.mean},
    **{fn: _on_potential(fn) for fn in functions_of("max_pool", "activation")},
    getattr: lambda x, name: x.shape if name == "shape" else getattr(x, name),
}

METHOD_FUNCTIONS: dict[str, Callable] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "flatten": torch.flatten, "mean": torch.mean, "squeeze": torch.squeeze, "unsqueeze": torch.unsqueeze,
}


def _has_signal(values: Any) -> bool:
    if isinstance(values, Signal):
        return True
    if isinstance(values, (list, tuple)):
        return any(_has_signal(v) for v in values)
    if isinstance(values, dict):
        return any(_has_signal(v) for v in values.values())
    return False


def simulate_call(fn: Callable, *args, **kwargs) -> Any:
    """A call_function node of the SNN graph, on Signals."""
    if not _has_signal((args, kwargs)):
        return fn(*args, **kwargs)
    rule = FUNCTION_RULES.get(fn)
    if rule is None:
        raise UnsupportedModelError(f"the simulator has no rule for function {getattr(fn, '__name__', fn)}")
    return rule(*args, **kwargs)


def simulated_function(fn: Callable) -> Callable:
    """A function for the lowered graph that runs `fn` on Signals (fx cannot print `fn` as an argument)."""
    def simulated(*args, **kwargs):
        return simulate_call(fn, *args, **kwargs)
    simulated.__name__ = f"simulated_{getattr(fn, '__name__', 'function')}"
    return simulated


def simulate_method(name: str, self_: Any, *args, **kwargs) -> Any:
    """A call_method node (x.view(...), x.size(0), ...), on Signals."""
    if not isinstance(self_, Signal):
        return getattr(self_, name)(*args, **kwargs)
    if name in ("size", "dim"):
        return self_.size(*args) if name == "size" else len(self_.shape)
    if name == "contiguous":
        return self_
    if name in ("view", "reshape"):
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        return FUNCTION_RULES[torch.reshape](self_, tuple(shape))
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return FUNCTION_RULES[torch.permute](self_, tuple(dims))
    if name in METHOD_FUNCTIONS:
        return simulate_call(METHOD_FUNCTIONS[name], self_, *args, **kwargs)
    raise UnsupportedModelError(f"the simulator has no rule for method .{name}()")


def read_out(signal: Any) -> Tensor:
    """The output layer has no neuron: the logits are its integrated potential."""
    if not isinstance(signal, Signal):
        raise UnsupportedModelError("the SNN graph must return one tensor of logits")
    return signal.potential()


def sample_spikes(planes: Tensor) -> Tensor:
    """Spikes per sample [N] of binary planes [T, N, ...]."""
    return planes.transpose(0, 1).flatten(1).sum(1).to(torch.int64)


def spikes_per_sample(signal: Signal) -> Tensor:
    return sample_spikes(signal.spikes)


def lower_to_simulator(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule computing (logits, {neuron: spikes per sample}) by time-stepped simulation.

    It shares its weights and neurons with `gm` (SpikingJelly monitors on gm's neurons see the
    spike planes). Each node that holds the value of a node of `gm` names it in meta["snn_node"].
    """
    graph = fx.Graph()
    root: dict[str, Any] = {}
    env: dict[fx.Node, fx.Node] = {}
    counts: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        args = fx.map_arg(node.args, env.__getitem__)
        kwargs = fx.map_arg(node.kwargs, env.__getitem__)
        if node.op == "placeholder":
            env[node] = graph.call_function(Signal.analog, (graph.placeholder(node.target),))
        elif node.op == "get_attr":
            root[node.target] = getattr_path(gm, node.target)
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            root[node.target] = simulation_module(module)
            env[node] = graph.call_module(node.target, args, kwargs)
            if isinstance(module, BitSerialIFNode):
                counts[node.target] = graph.call_function(spikes_per_sample, (env[node],))
        elif node.op == "call_function":
            env[node] = graph.call_function(simulated_function(node.target), args, kwargs)
        elif node.op == "call_method":
            env[node] = graph.call_function(simulate_method, (node.target,) + args, kwargs)
        elif node.op == "output":
            logits = graph.call_function(read_out, (args[0],))
            graph.output((logits, counts))
        if node in env:
            env[node].meta["snn_node"] = node.name
    return fx.GraphModule(root, graph, "SNNSimulator")


def getattr_path(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value
