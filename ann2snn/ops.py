"""What each torch module of an SNN graph means to the compiler: one table, read by every part.

A module's kind says how it treats spikes, and so how every part handles it:
- "layer" (conv, linear): weights on each time step's spike plane (accumulate only) and the bias
  once; it costs synaptic operations on spikes, MACs on analog values; its bias carries a shift;
- "norm" (an inference BatchNorm left unfolded): a per-channel scale of the currents and a shift
  that enters once; it carries a bias shift like a layer;
- "average_pool": linear and weightless, applied to currents and spike planes; on spikes it costs
  one accumulate per pooling window an input spike reaches;
- "structural" (flatten, identity, inference dropout): moves values, costs nothing;
- "max_pool": not linear but monotone, so it acts on the integrated potential (the compiler moves
  it before the neuron, docs/method.md section 3); a per-channel constant passes through it;
- "output" (softmax, log-softmax, sigmoid): applied to the output potentials only, not spiking,
  counted in neither network's energy.
The output head is what follows the last layer and computes on its output alone: ops of the kinds
in HEAD_KINDS (and a QDQ pair's fake quantization, ann2snn/runtime/quant.py), run in float after the SNN.
Each entry also lists the constructor arguments the .snn artifact saves (the weights travel with
the state dict).

Functions and tensor methods have kinds too: the same pools and structural moves, "matmul" (a
layer written as a function: linear, with weights), "add" (a residual sum: both inputs' events),
"scale" (by a constant: the events stay), "activation" (a clamp on the potential, before sites
replace it) and "access" (indexing and attributes, no values); functions also have the name the
artifact writes. The simulator keeps one rule per function where the time axis needs one (a
reshape, a concat) and takes the others (pools, ops on the potential) by kind.

The simulator, energy, the artifact, the passes and the onnxruntime comparison take their sets
from here; tests/test_ops.py walks the table and checks that every entry is simulated, evaluated,
counted, saved and loaded alike, and that the simulator's function rules are this table's.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
_AVG_POOL_1D = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_AVG_POOL = _AVG_POOL_1D + ("divisor_override",)


@dataclass(frozen=True)
class ModuleOp:
    kind: str                  # layer, norm, average_pool, structural, max_pool, output (module docstring)
    fields: tuple[str, ...]    # the constructor arguments the artifact saves


MODULE_OPS: dict[type[nn.Module], ModuleOp] = {
    nn.Conv1d: ModuleOp("layer", _CONV), nn.Conv2d: ModuleOp("layer", _CONV), nn.Conv3d: ModuleOp("layer", _CONV),
    nn.Linear: ModuleOp("layer", ("in_features", "out_features")),
    nn.BatchNorm1d: ModuleOp("norm", _NORM), nn.BatchNorm2d: ModuleOp("norm", _NORM),
    nn.BatchNorm3d: ModuleOp("norm", _NORM),
    nn.AvgPool1d: ModuleOp("average_pool", _AVG_POOL_1D), nn.AvgPool2d: ModuleOp("average_pool", _AVG_POOL),
    nn.AvgPool3d: ModuleOp("average_pool", _AVG_POOL),
    nn.AdaptiveAvgPool1d: ModuleOp("average_pool", ("output_size",)),
    nn.AdaptiveAvgPool2d: ModuleOp("average_pool", ("output_size",)),
    nn.AdaptiveAvgPool3d: ModuleOp("average_pool", ("output_size",)),
    nn.Flatten: ModuleOp("structural", ("start_dim", "end_dim")), nn.Identity: ModuleOp("structural", ()),
    nn.Dropout: ModuleOp("structural", ("p",)),
    nn.MaxPool1d: ModuleOp("max_pool", _MAX_POOL), nn.MaxPool2d: ModuleOp("max_pool", _MAX_POOL),
    nn.MaxPool3d: ModuleOp("max_pool", _MAX_POOL),
    nn.AdaptiveMaxPool1d: ModuleOp("max_pool", ("output_size",)),
    nn.AdaptiveMaxPool2d: ModuleOp("max_pool", ("output_size",)),
    nn.AdaptiveMaxPool3d: ModuleOp("max_pool", ("output_size",)),
    nn.Softmax: ModuleOp("output", ("dim",)), nn.LogSoftmax: ModuleOp("output", ("dim",)),
    nn.Sigmoid: ModuleOp("output", ()),
}

KINDS = ("layer", "norm", "average_pool", "structural", "max_pool", "output")


def modules_of(*kinds: str) -> tuple[type[nn.Module], ...]:
    """The module types of these kinds, for isinstance checks."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown module kinds {sorted(unknown)}")
    return tuple(t for t, op in MODULE_OPS.items() if op.kind in kinds)


def kind_of(module: nn.Module | None) -> str | None:
    """The kind of a module (by its exact type, as the artifact saves it), None when not in the table."""
    op = MODULE_OPS.get(type(module))
    return None if op is None else op.kind


LAYERS = modules_of("layer")
CONVS = tuple(t for t in LAYERS if t is not nn.Linear)
NORMS = modules_of("norm")
AVERAGE_POOLS = modules_of("average_pool")
MAX_POOLS = modules_of("max_pool")
OUTPUT_OPS = modules_of("output")
STRUCTURAL = modules_of("structural")
# the module kinds the output head may hold (module docstring); their function and method kinds below
HEAD_KINDS = ("output", "structural")
HEAD_MODULES = modules_of(*HEAD_KINDS)



@dataclass(frozen=True)
class FunctionOp:
    kind: str   # structural, average_pool, max_pool, matmul, add, scale, activation, access
    name: str   # as the artifact writes it


FUNCTION_KINDS = ("structural", "average_pool", "max_pool", "matmul", "add", "scale", "activation", "access")

FUNCTION_OPS: dict[Callable, FunctionOp] = {
    **{fn: FunctionOp("structural", name) for fn, name in (
        (torch.flatten, "torch.flatten"), (torch.reshape, "torch.reshape"), (torch.permute, "torch.permute"),
        (torch.squeeze, "torch.squeeze"), (torch.unsqueeze, "torch.unsqueeze"), (torch.cat, "torch.cat"),
        (torch.concat, "torch.concat"), (F.pad, "F.pad"))},
    torch.matmul: FunctionOp("matmul", "torch.matmul"),
    **{fn: FunctionOp("average_pool", name) for fn, name in (
        (F.avg_pool1d, "F.avg_pool1d"), (F.avg_pool2d, "F.avg_pool2d"), (F.adaptive_avg_pool1d, "F.adaptive_avg_pool1d"),
        (F.adaptive_avg_pool2d, "F.adaptive_avg_pool2d"), (torch.mean, "torch.mean"))},
    **{fn: FunctionOp("max_pool", name) for fn, name in (
        (F.max_pool1d, "F.max_pool1d"), (F.max_pool2d, "F.max_pool2d"), (F.adaptive_max_pool1d, "F.adaptive_max_pool1d"),
        (F.adaptive_max_pool2d, "F.adaptive_max_pool2d"))},
    **{fn: FunctionOp("add", name) for fn, name in (
        (operator.add, "operator.add"), (torch.add, "torch.add"), (operator.sub, "operator.sub"),
        (torch.sub, "torch.sub"))},
    **{fn: FunctionOp("scale", name) for fn, name in (
        (operator.mul, "operator.mul"), (torch.mul, "torch.mul"), (operator.truediv, "operator.truediv"),
        (torch.div, "torch.div"), (operator.neg, "operator.neg"))},
    **{fn: FunctionOp("activation", name) for fn, name in (
        (torch.relu, "torch.relu"), (F.relu, "F.relu"), (torch.clamp, "torch.clamp"))},
    **{fn: FunctionOp("access", name) for fn, name in ((operator.getitem, "operator.getitem"), (getattr, "getattr"))},
}

# x.method(...) in an fx graph: the same kinds
METHOD_KINDS: dict[str, str] = {
    **dict.fromkeys(("view", "reshape", "flatten", "permute", "squeeze", "unsqueeze", "contiguous"), "structural"),
    "mean": "average_pool", "add": "add", "sub": "add", "mul": "scale", "div": "scale",
    "size": "access", "dim": "access",
}


def functions_of(*kinds: str) -> tuple[Callable, ...]:
    """The functions of these kinds, for `node.target in ...` checks."""
    unknown = set(kinds) - set(FUNCTION_KINDS)
    if unknown:
        raise ValueError(f"unknown function kinds {sorted(unknown)}")
    return tuple(fn for fn, op in FUNCTION_OPS.items() if op.kind in kinds)


def methods_of(*kinds: str) -> frozenset[str]:
    return frozenset(name for name, kind in METHOD_KINDS.items() if kind in kinds)


# the output head's functions and methods: moves of the output's values (flatten, reshape, squeeze, ...)
HEAD_FUNCTIONS = functions_of("structural")
HEAD_METHODS = methods_of("structural")


# Ops that select or move the values of one tensor without arithmetic: a quantization grid survives
# them, and they commute with a clamp (ann2snn/compile/qdq_to_sites.py).
VALUE_MOVING_MODULES = MAX_POOLS + (nn.Flatten, nn.Identity, nn.Dropout)
# Reshapes that keep dimension 1 (the channels) where it is, or flatten it with what follows.
RESHAPING_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
VALUE_MOVING_FUNCTIONS = RESHAPING_FUNCTIONS + (torch.permute,) + functions_of("max_pool")
# Ops a per-channel constant passes through unchanged, max(z + c) = max(z) + c: a bias shift may sit
# before them (ann2snn/compile/shift_bias.py).
SHIFT_TRANSPARENT_MODULES = MAX_POOLS + (nn.Identity, nn.Dropout)
# A residual sum (not a difference, which would negate it): one branch's bias carries the shift.
RESIDUAL_ADDS = (operator.add, torch.add)
SHIFT_TRANSPARENT_FUNCTIONS = RESIDUAL_ADDS
# The integer SNN (ann2snn/runtime/integer_snn.py): layers with an int8 kernel (ann2snn.kernels), and
# the average pools it runs as integer sums (output size 1, the global pool; windows of one count),
# each by the number of dimensions it pools.
INTEGER_KERNEL_LAYERS = (nn.Conv2d, nn.Linear)
AVERAGE_POOL_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AvgPool1d: 1, nn.AvgPool2d: 2}
GLOBAL_AVERAGE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
WINDOW_AVERAGE_POOLS = (nn.AvgPool1d, nn.AvgPool2d)
INTEGER_AVERAGE_POOLS = GLOBAL_AVERAGE_POOLS + WINDOW_AVERAGE_POOLS
# the functions of those pools, each with the module of the same arguments (after the input)
AVERAGE_POOL_FUNCTION_MODULES = {F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d,
                                 F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d,
                                 F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d}


@dataclass(frozen=True)
class PadMode:
    torch_mode: str       # F.pad's name of it
    copies_values: bool   # the border repeats the tensor's own values


# Padding modes, by ONNX Pad's name. A mode that copies values pads a spike plane to a spike plane
# (the simulator pads each step alike, energy counts the copies' events: a border input reaches
# more synapses) and lets a per-channel constant through, pad(z + c) = pad(z) + c, so a bias shift
# may sit before it (shift_bias.py). Constant padding carries no spikes; its value enters once
# (the simulator's const), and the border gets no shift.
PAD_MODES: dict[str, PadMode] = {"constant": PadMode("constant", False), "edge": PadMode("replicate", True),
                                 "reflect": PadMode("reflect", True)}
VALUE_COPYING_PADS = frozenset(mode.torch_mode for mode in PAD_MODES.values() if mode.copies_values)

