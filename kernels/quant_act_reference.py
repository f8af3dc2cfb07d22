"""Pure-PyTorch reference of the fused quantized clipped activation (kernels/quant_act.py).

It is not a copy of the formulas: it is `ann2snn.levels.quantized_activation`, which
`QuantClippedActivation` itself runs off the GPU, so autograd differentiates the training code
(straight-through floor, QCFS clip gradient, SpikeCountSurrogate) and the kernel is checked
against exactly that.
"""
from __future__ import annotations

from torch import Tensor

from ..levels import quantized_activation


def quant_act_fused_reference(z: Tensor, clip: Tensor, levels: int, *,
                              with_spikes: bool) -> tuple[Tensor, Tensor | None]:
    """(a(z), spikes per sample or None) of a quantized site with lambda = clip (scalar or [C])."""
    return quantized_activation(z, clip, levels, with_spikes)
