"""Pure-PyTorch reference of the fused quantized clipped activation (kernels/quant_act.py).

It is not a copy of the formulas: it runs `QuantClippedActivation.forward` itself, unbound, on a
namespace that holds the caller's `clip` tensor, so autograd differentiates the training code of
ann2snn.quant (straight-through floor, QCFS clip gradient, SpikeCountSurrogate) and the kernel is
checked against exactly that.
"""
from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor

from ann2snn.quant import QuantClippedActivation


def quant_act_fused_reference(z: Tensor, clip: Tensor, levels: int, *,
                              with_spikes: bool) -> tuple[Tensor, Tensor | None]:
    """(a(z), spikes per sample or None) of a quantized site with lambda = clip (scalar or [C])."""
    site = SimpleNamespace(clip=clip, levels=int(levels), quantize=True, record_spikes=with_spikes, spikes=None)
    value = QuantClippedActivation.forward(site, z)
    return value, site.spikes
