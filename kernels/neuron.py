"""The fused neuron of the time-folded evaluator (docs/method.md sections 3 and 7), in one Triton pass.

Per element: V + membrane_offset, then the level q that MSB-first compare-and-subtract firing
(with the cap at L) decodes to: the exact floor(V / theta) clamped to [0, L], computed directly
(kernels/device_functions.fire_levels), so q equals `ann2snn.levels.fire_levels` bit for bit, and so
the simulator's spikes for the same potential. Outputs, from the one read of V: q * theta,
optionally q as the bit-packed spike code (uint8 for T <= 8, uint16 up to 16:
`ann2snn.levels.spike_code_dtype`), and popcount(q) reduced per sample and, on
request, per channel (a tile-level sum, then one atomic add per tile).

The reference is kernels/neuron_reference.py. Where Triton does not run (kernels/dispatch.py),
`fire_fused` takes the same neuron in C for float32 CPU potentials (kernels/native.py), else the
reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..levels import spike_code_dtype
from .device_functions import channel_tile, fire_levels, load_per_channel, popcount, round_to, tile_sum
from .dispatch import lazy_jit, use_triton
from .layout import channel_layout, tile_launch
from .native import fire_fused_native, native_neuron_supports
from .neuron_reference import NeuronOutput, as_channel_tensor, check_neuron_args, fire_fused_reference

# triton.language, bound when a kernel is first launched (kernels/dispatch.py: LazyKernel)
tl = None

__all__ = ["NeuronOutput", "fire_fused", "fire_fused_triton"]


@lazy_jit
def _fire_kernel(
    v_ptr, theta_ptr, offset_ptr,                 # inputs: potential, theta, membrane offset
    value_ptr, levels_ptr, channel_ptr, sample_ptr,  # outputs
    N, C, S, stride_n, stride_c, stride_s,        # the [N, C, S] view shared by V, value and levels
    LEVELS: tl.constexpr,                         # L, the largest level
    THETA_PER_CHANNEL: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    OFFSET_PER_CHANNEL: tl.constexpr,
    WANT_LEVELS: tl.constexpr,
    WANT_CHANNEL: tl.constexpr,
    WANT_SAMPLE: tl.constexpr,
    FP64: tl.constexpr,                           # compute in float64 (float64 potentials), else float32
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WIDE: tl.constexpr,                           # int64 element offsets
):
    n, c, mask_n, mask_c, mask, offsets = channel_tile(N, C, S, stride_n, stride_c, stride_s,
                                                       BLOCK_N, BLOCK_C, BLOCK_S, WIDE)
    compute = tl.float64 if FP64 else tl.float32
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(compute)
    io = v_ptr.dtype.element_ty
    c3, mask_c3 = c[None, :, None], mask_c[None, :, None]
    theta = load_per_channel(theta_ptr, c3, mask_c3, THETA_PER_CHANNEL, compute, 1.0)
    # V + offset is rounded to the potential's dtype, as torch's add in the reference
    if HAS_OFFSET:
        v = round_to(v + load_per_channel(offset_ptr, c3, mask_c3, OFFSET_PER_CHANNEL, compute, 0.0), io)
    level, code = fire_levels(v, theta, LEVELS, FP64)
    tl.store(value_ptr + offsets, round_to(level * theta, io).to(io), mask=mask)
    if WANT_LEVELS:   # the spike code, in levels_ptr's dtype (uint8 or uint16)
        tl.store(levels_ptr + offsets, code.to(levels_ptr.dtype.element_ty), mask=mask)
    count = tl.where(mask, popcount(code), 0)
    # relaxed atomics: the counts are read only after the kernel ends, and the default (acq_rel)
    # fences each program's stores before its add
    if WANT_CHANNEL:
        per_channel = tile_sum(tile_sum(count, 2), 0)
        tl.atomic_add(channel_ptr + c, per_channel.to(tl.int64), mask=mask_c, sem="relaxed")
    if WANT_SAMPLE:
        per_sample = tile_sum(tile_sum(count, 2), 1)
        tl.atomic_add(sample_ptr + n, per_sample.to(tl.int64), mask=mask_n, sem="relaxed")


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fire_fused_triton(potential: Tensor, theta: Tensor | float, membrane_offset: Tensor | float | None,
                      levels: int, timesteps: int, *, want_levels: bool = False,
                      per_sample_counts: bool = True, per_channel_counts: bool = True) -> NeuronOutput:
    """`fire_fused` on the Triton kernel, whatever the device (CPU needs TRITON_INTERPRET=1)."""
    check_neuron_args(potential, levels, timesteps)
    if potential.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fire_fused supports {_SUPPORTED_DTYPES}, got {potential.dtype}")
    layout = channel_layout(potential)
    theta_t = as_channel_tensor(theta, layout.tensor, "theta").contiguous()
    offset_t = as_channel_tensor(membrane_offset, layout.tensor, "membrane_offset").contiguous()

    device = potential.device
    value = layout.empty_like(potential.dtype)
    codes = layout.empty_like(spike_code_dtype(timesteps)) if want_levels else None
    channel = torch.zeros(layout.c, dtype=torch.int64, device=device) if per_channel_counts else None
    sample = torch.zeros(layout.n, dtype=torch.int64, device=device) if per_sample_counts else None
    if potential.numel() == 0:
        return NeuronOutput(value, codes, channel, sample)

    grid, view, tile = tile_launch(layout)
    # unused outputs get a harmless pointer: the constexpr flags compile their stores away
    _fire_kernel[grid](layout.tensor, theta_t, offset_t, value, value if codes is None else codes,
                       value if channel is None else channel, value if sample is None else sample, *view,
                       LEVELS=levels,
                       THETA_PER_CHANNEL=theta_t.dim() == 1,
                       HAS_OFFSET=membrane_offset is not None,
                       OFFSET_PER_CHANNEL=offset_t.dim() == 1,
                       WANT_LEVELS=want_levels,
                       WANT_CHANNEL=per_channel_counts,
                       WANT_SAMPLE=per_sample_counts,
                       FP64=potential.dtype == torch.float64,
                       **tile)
    return NeuronOutput(value, codes, channel, sample)


def fire_fused(potential: Tensor, theta: Tensor | float, membrane_offset: Tensor | float | None,
               levels: int, timesteps: int, *, want_levels: bool = False,
               per_sample_counts: bool = True, per_channel_counts: bool = True) -> NeuronOutput:
    """Fire a layer of bit-serial neurons from their potentials in one pass (inference only).

    potential: [N, C, *spatial] or [N, C]; float16, bfloat16, float32 or float64; NCHW-contiguous
        or channels-last (outputs keep the input's memory format; other layouts are copied first).
    theta, membrane_offset: scalars or per-channel [C]; cast to the potential's dtype.
    levels: L (1..2^T - 1); timesteps: T (1..16).
    Returns NeuronOutput(value, levels, channel_spikes, sample_spikes): see its docstring.

    Runs the Triton kernel where `use_triton` says so, the C kernel (kernels/native.py) on float32
    CPU potentials, else the reference; a potential that needs a gradient also takes the
    reference, which autograd can follow.
    """
    arguments = dict(want_levels=want_levels, per_sample_counts=per_sample_counts,
                     per_channel_counts=per_channel_counts)
    if torch.is_grad_enabled() and potential.requires_grad:
        return fire_fused_reference(potential, theta, membrane_offset, levels, timesteps, **arguments)
    if use_triton(potential):
        return fire_fused_triton(potential, theta, membrane_offset, levels, timesteps, **arguments)
    if native_neuron_supports(potential):
        return fire_fused_native(potential, theta, membrane_offset, levels, timesteps, **arguments)
    return fire_fused_reference(potential, theta, membrane_offset, levels, timesteps, **arguments)
