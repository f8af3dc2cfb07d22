"""How many synapses or pooling windows one input spike reaches: the fan-out maps of energy's counts.

A layer's synaptic operations are its input events times the fan-out of each input position: the
convolution of an all-ones kernel of the layer's weight shape (stride, padding, dilation and groups
as in the layer), or for an average pool the number of its windows that hold the position.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..ops import FUNCTION_OPS


def call_argument(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def per_dimension(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def adaptive_window_sizes(length: int, out: int | None) -> Tensor:
    out = length if out is None else int(out)
    starts = [(i * length) // out for i in range(out)]
    ends = [-((-(i + 1) * length) // out) for i in range(out)]
    return torch.tensor([e - s for s, e in zip(starts, ends)], dtype=torch.float64)


def window_sums(kind: str, params: dict, in_shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """A function [B, C, ...] -> the sum of every pooling window (linear; integer on integers)."""
    if kind in ("avg_pool2d", "avg_pool3d"):
        k, s, p, ceil = params["kernel_size"], params["stride"], params["padding"], params["ceil_mode"]
        s = k if s is None or (isinstance(s, (list, tuple)) and len(s) == 0) else s
        pool = F.avg_pool2d if kind == "avg_pool2d" else F.avg_pool3d
        return lambda x: pool(x, k, s, p, ceil, True, 1)
    if kind == "avg_pool1d":
        k, s, p, ceil = (per_dimension(params[n], 1)[0] if params[n] is not None else None
                         for n in ("kernel_size", "stride", "padding", "ceil_mode"))
        s = k if s is None else s
        return lambda x: F.avg_pool2d(x.unsqueeze(-2), (1, k), (1, s), (0, p), bool(ceil), True, 1).squeeze(-2)
    if kind in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
        dims = int(kind[-2])
        out = per_dimension(params["output_size"], dims)
        spatial = in_shape[-dims:]
        sizes = [adaptive_window_sizes(length, o) for length, o in zip(spatial, out)]
        size_map = functools.reduce(lambda a, b: a.unsqueeze(-1) * b, sizes)   # the windows' sizes, outer product
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]

        def adaptive(x: Tensor) -> Tensor:  # mean times window size: integer up to rounding
            return (pool(x.to(torch.float64), params["output_size"]) * size_map.to(x.device)).to(x.dtype)
        return adaptive
    if kind == "mean":
        dim, keepdim = params["dim"], params["keepdim"]
        if dim is None:
            raise UnsupportedModelError("energy: a mean over every dimension (including the batch) has no pooling rule")
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if any(d == 0 or d == -len(in_shape) for d in dims):
            raise UnsupportedModelError("energy: a mean over the batch dimension has no pooling rule")
        return lambda x: x.sum(dims, keepdim=keepdim)
    raise UnsupportedModelError(f"energy: no pooling rule for {kind}")


def pool_params(target: Any, args: tuple, kwargs: dict) -> tuple[str, dict]:
    """(kind, parameters) of an average pool given as a module or a function call."""
    if isinstance(target, nn.Module):   # an average pool of ops.py: AvgPool2d -> avg_pool2d, as its function
        dims = type(target).__name__[-2:].lower()
        if hasattr(target, "output_size"):
            return f"adaptive_avg_pool{dims}", {"output_size": target.output_size}
        return f"avg_pool{dims}", {"kernel_size": target.kernel_size, "stride": target.stride,
                                   "padding": target.padding, "ceil_mode": target.ceil_mode}
    kind = FUNCTION_OPS[target].name.split(".")[-1]   # avg_pool2d, ..., mean
    if kind in ("avg_pool1d", "avg_pool2d"):
        return kind, {"kernel_size": call_argument(args, kwargs, 1, "kernel_size", None),
                      "stride": call_argument(args, kwargs, 2, "stride", None),
                      "padding": call_argument(args, kwargs, 3, "padding", 0),
                      "ceil_mode": call_argument(args, kwargs, 4, "ceil_mode", False)}
    if kind.startswith("adaptive"):
        return kind, {"output_size": call_argument(args, kwargs, 1, "output_size", None)}
    return kind, {"dim": call_argument(args, kwargs, 1, "dim", None), "keepdim": call_argument(args, kwargs, 2, "keepdim", False)}


def conv_ones_kernel(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> Tensor:
    """All-ones kernel of one output channel per group: every output channel of a group reaches the
    same inputs, so the layer's SOPs are this kernel's count times out_channels / groups."""
    w = layer.weight
    return torch.ones((layer.groups,) + tuple(w.shape[1:]), dtype=dtype, device=device)


def conv_fanout(layer: nn.Module, in_shape: tuple[int, ...]) -> Tensor:
    """Per input element [1, ...] (the same for every channel): how many (output element, output
    channel) pairs it reaches, as int64. Computed on one channel: the reach of an input position
    does not depend on its channel, and each reaches out_channels / groups channels."""
    dims = len(in_shape) - 1
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    with torch.enable_grad():
        x = torch.ones((1, 1) + tuple(in_shape[1:]), dtype=torch.float64, requires_grad=True)
        padded, padding = x, layer.padding
        if layer.padding_mode != "zeros":
            padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding = 0
        kernel = torch.ones((1, 1) + tuple(layer.kernel_size), dtype=torch.float64)
        y = conv(padded, kernel, None, layer.stride, padding, layer.dilation, 1)
        (grad,) = torch.autograd.grad(y.sum(), x)
    return torch.round(grad[0] * (layer.out_channels // layer.groups)).to(torch.int64)


def pool_fanout(sums: Callable[[Tensor], Tensor], in_shape: tuple[int, ...]) -> Tensor:
    """Per input element: the number of pooling windows that contain it (int64)."""
    with torch.enable_grad():
        x = torch.ones((1,) + tuple(in_shape), dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(sums(x).sum(), x)
    return torch.round(grad[0]).to(torch.int64)
