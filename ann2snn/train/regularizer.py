"""The spike regularizer of quantization-aware training (docs/method.md section 5)."""
from __future__ import annotations


import torch
from torch import Tensor, nn

from ..compile.calibrate import activation_sites, first_tensor


def sample_spikes(model: nn.Module) -> Tensor | None:
    """Per-sample spike counts summed over the sites the last forward pass recorded; None: no site."""
    counts = [s.spikes for s in activation_sites(model).values()
              if s.quantize and s.record_spikes and s.spikes is not None]
    return torch.stack(counts).sum(0) if counts else None


def spike_regularizer(model: nn.Module) -> Tensor:
    """sum over sites of the per-sample spike counts popcount(q), averaged over the batch (docs/method.md section 5).

    The loss adds beta times this. Reads the counts the last forward pass recorded
    (sites with record_spikes=True); differentiable through the surrogate of SpikeCountSurrogate.
    """
    counts = sample_spikes(model)
    if counts is None:
        return torch.zeros((), device=first_tensor(model).device)
    return counts.mean()
