"""One layer of the integer SNN per time-folded step: integer layer, then integer neuron (issue 27).

`IntegerLayer(weight, bias, thresholds, lo, stride, padding, dilation, groups)` is an int8 Conv2d
(weight [O, C/groups, kh, kw]) or Gemm (weight [O, K]) with an int32 bias, followed by its
integer neuron: `layer(levels, sample_spikes=False) -> IntLevels` equals
`IntegerLevels(thresholds, lo)(A)` for the layer's exact int32 accumulator A = W q + bias
(`layer.accumulator(levels)`; a residual site adds its skip term to that and calls `layer.neuron`).

Where the levels are uint8 the step makes no pass of its own over A: the bias (for a Gemm also the
128 * sum(w) of the b - 128 shift, kernels/int_layers.py) is taken from the thresholds once, at
construction (IntegerLevels' offset), and on the CPU the C levels pass reads oneDNN's float32
convolution output as it is (integers below 2^24, which convert exactly). Elsewhere it is
`layer.neuron(layer.accumulator(levels))`. bench/int_kernels.py times the step ("int step").

With `requantize=(scale, requantization)`, the thresholds' own expression (kernels/requantize.py:
the accumulator's float32 scale and the site's QuantizeLinear), the CPU's C pass evaluates that
expression on the raw accumulator instead of counting thresholds: the same levels, faster.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .int_layers import SHIFT, IntConv2d, int8_gemm, int_linear, shifted
from .int_levels import IntegerLevels, IntLevels
from .requantize import Requantization, Requantizer

__all__ = ["IntegerLayer"]


class IntegerLayer:
    """An int8 Conv2d or Gemm and its integer neuron, prepared once (see the module docstring)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, thresholds: Tensor, lo: int, stride=1, padding=0,
                 dilation=1, groups: int = 1, requantize: tuple[Tensor, Requantization] | None = None) -> None:
        if weight.dtype != torch.int8 or weight.dim() not in (2, 4):
            raise TypeError(f"IntegerLayer takes an int8 weight [O, K] (Gemm) or [O, C/groups, kh, kw] (Conv2d), "
                            f"got {weight.dtype} {tuple(weight.shape)}")
        if requantize is not None and lo != 0:
            raise ValueError(f"IntegerLayer: a requantization gives levels from 0, got thresholds from lo = {lo}")
        if thresholds.dim() != 2 or thresholds.shape[0] != weight.shape[0]:
            raise ValueError(f"IntegerLayer: thresholds must be [O={weight.shape[0]}, K], one row per output "
                             f"channel of the weight, got {tuple(thresholds.shape)}")
        self.weight, self.bias = weight, bias
        self.neuron = IntegerLevels(thresholds, lo)
        offset = torch.zeros(weight.shape[0], dtype=torch.int64) if bias is None else bias.to(torch.int64)
        if weight.dim() == 4:
            self.conv: IntConv2d | None = IntConv2d(weight, bias, stride, padding, dilation, groups)
        else:
            self.conv, self._weight_t = None, weight.t()
            offset = offset + SHIFT * weight.sum(1, dtype=torch.int64)
        # the neuron of the accumulator without what offset holds, which no pass then adds
        self._raw_neuron = IntegerLevels(thresholds, lo, offset)
        self._raw_requantizer = None if requantize is None else Requantizer([requantize[0]], [offset], requantize[1])

    def accumulator(self, levels: Tensor) -> Tensor:
        """The layer's exact int32 accumulator A = W q + bias (IntConv2d / int_linear)."""
        return self.conv(levels) if self.conv is not None else int_linear(levels, self.weight, self.bias)

    def __call__(self, levels: Tensor, *, sample_spikes: bool = False) -> IntLevels:
        """The neuron's levels of the layer on `levels` (and with `sample_spikes` the spikes per sample)."""
        if levels.dtype == torch.uint8:
            raw = int8_gemm(shifted(levels), self._weight_t) if self.conv is None else \
                self.conv.float_accumulator(levels)
            if raw is not None:
                if self._raw_requantizer is not None and self._raw_requantizer.native_supports([raw]):
                    return self._raw_requantizer.native([raw], sample_spikes)
                return self._raw_neuron.run(raw, sample_spikes, exact_float=True)
        return self.neuron(self.accumulator(levels), sample_spikes=sample_spikes)
