"""Pure-PyTorch reference of the fused neuron (kernels/neuron.py), and the bit-packed spike code.

The neuron of the time-folded evaluator (docs/method.md section 7): offset, cap, MSB-first firing,
q * theta and popcount(q), written with ann2snn's own `fire_levels` and `popcount_sum_`, so the
kernel is checked against exactly what the evaluator and the simulator compute.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..levels import MAX_TIMESTEPS, channel_view, check_levels_exact, fire_levels, popcount_sum_, spike_code_dtype


class NeuronOutput(NamedTuple):
    """What one fused neuron pass returns.

    value: q * theta in the potential's dtype and memory format (what the next layer consumes).
    levels: q as the bit-packed spike code (bit T-1-t = spike at step t) in
        `ann2snn.levels.spike_code_dtype(T)` (uint8 for T <= 8, uint16 up to 16), or None.
    channel_spikes: int64 [C], spikes per channel summed over the batch and space, or None.
    sample_spikes: int64 [N], spikes per sample summed over channels and space, or None.
    """

    value: Tensor
    levels: Tensor | None
    channel_spikes: Tensor | None
    sample_spikes: Tensor | None


def check_neuron_args(potential: Tensor, levels: int, timesteps: int) -> None:
    """The limits shared by the kernels and the reference: the code of a level has at most 16 bits,
    and the potential's dtype holds every level exactly."""
    if not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"timesteps must be in 1..{MAX_TIMESTEPS} (a spike code of at most {MAX_TIMESTEPS} bits), "
                         f"got {timesteps}")
    if not 1 <= levels <= 2**timesteps - 1:
        raise ValueError(f"levels must be in 1..{2**timesteps - 1} for T={timesteps}, got {levels}")
    if potential.dim() < 2:
        raise ValueError(f"expected a potential [N, C, *spatial], got shape {tuple(potential.shape)}")
    if not potential.is_floating_point():
        raise TypeError(f"expected a floating-point potential, got {potential.dtype}")
    check_levels_exact(levels, potential.dtype)


def as_channel_tensor(values: Tensor | float | None, like: Tensor, name: str) -> Tensor:
    """theta or membrane_offset as a scalar or [C] tensor in the potential's dtype and device."""
    if values is None:
        values = 0.0
    t = torch.as_tensor(values, device=like.device).to(like.dtype).reshape(-1)
    if t.numel() == 1:
        return t.reshape(())
    if t.numel() != like.shape[1]:
        raise ValueError(f"{name} has {t.numel()} values for {like.shape[1]} channels")
    return t


def fire_fused_reference(potential: Tensor, theta: Tensor | float, membrane_offset: Tensor | float | None,
                         levels: int, timesteps: int, *, want_levels: bool = False,
                         per_sample_counts: bool = True, per_channel_counts: bool = True) -> NeuronOutput:
    """The evaluator's neuron in plain torch ops: same results as `kernels.neuron.fire_fused`."""
    check_neuron_args(potential, levels, timesteps)
    theta_c = channel_view(as_channel_tensor(theta, potential, "theta"), potential.dim())
    offset = as_channel_tensor(membrane_offset, potential, "membrane_offset")
    if bool(offset.any()):  # adding zeros changes nothing (-0 aside): skip the pass
        potential = potential + channel_view(offset, potential.dim())
    q = fire_levels(potential, theta_c, levels, timesteps)
    value = q * theta_c
    codes = q.to(spike_code_dtype(timesteps)) if want_levels else None
    spatial = tuple(range(2, potential.dim()))
    # the counts consume q in place: the last count may have it
    channel = popcount_sum_(q.clone() if per_sample_counts else q, levels, (0,) + spatial) \
        if per_channel_counts else None
    sample = popcount_sum_(q, levels, (1,) + spatial) if per_sample_counts else None
    return NeuronOutput(value=value, levels=codes, channel_spikes=channel, sample_spikes=sample)
