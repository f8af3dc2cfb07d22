"""The fused quantized clipped activation for training (docs/method.md sections 1 and 5), in Triton.

Forward, one pass over z: a(z) = clamp(floor(z / theta + 1/2), 0, L) * theta and, on request,
the spikes per sample, sum of popcount(q). Backward, one pass over z and the incoming gradients:
- z: the straight-through floor passes the gradient where floor(z / theta + 1/2) lies in [0, L]
  (the clamp's own rule), plus the spike-count surrogate grad_count * [0 <= z <= lambda] / theta
  (ann2snn.runtime.quant.SpikeCountSurrogate);
- lambda = L theta: theta is used twice, as the scale of the output (gradient clamp(q)) and as
  the divisor of z / theta (gradient -g_q z / theta^2); inside [0, L] the two give the QCFS
  (q - z / theta), above it 1 (times L / L), below it 0; the count's surrogate adds
  -grad_count z / theta^2 on [0, lambda]. Reduced over batch and space per tile, then by one
  float64 atomic add per tile and channel.
Every value is rounded in the dtype torch computes in, so the result equals the autograd of
`QuantClippedActivation.forward` (kernels/quant_act_reference.py) up to float rounding of the
lambda reduction. One case differs by backend in torch itself: a float16/bfloat16 z with a
float32 per-layer lambda, where torch's CPU kernels divide by the unrounded float32 theta and its
CUDA kernels, like this one, by theta rounded to z's dtype (a level may differ at a tie).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..levels import channel_view

from .device_functions import channel_tile, load_per_channel, popcount, ratio_and_level, round_to, tile_sum
from .dispatch import lazy_jit, use_triton
from .layout import channel_layout, tile_launch
from .quant_act_reference import quant_act_fused_reference

# triton.language, bound when a kernel is first launched (kernels/dispatch.py: LazyKernel)
tl = None

__all__ = ["quant_act_fused", "quant_act_fused_triton"]


@lazy_jit
def _quant_act_forward_kernel(
    z_ptr, theta_ptr, value_ptr, spikes_ptr,
    N, C, S, stride_n, stride_c, stride_s,    # the [N, C, S] view shared by z and value
    LEVELS: tl.constexpr,
    THETA_PER_CHANNEL: tl.constexpr,
    WITH_SPIKES: tl.constexpr,
    FP64: tl.constexpr,                       # compute in float64 (else float32)
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WIDE: tl.constexpr,                       # int64 element offsets
):
    n, c, mask_n, mask_c, mask, offsets = channel_tile(N, C, S, stride_n, stride_c, stride_s,
                                                       BLOCK_N, BLOCK_C, BLOCK_S, WIDE)

    compute = tl.float64 if FP64 else tl.float32
    work = theta_ptr.dtype.element_ty         # the dtype of torch's z / theta
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute)
    theta = load_per_channel(theta_ptr, c[None, :, None], mask_c[None, :, None], THETA_PER_CHANNEL, compute, 1.0)
    ratio, level = ratio_and_level(z, theta, work, FP64)
    level = tl.minimum(tl.maximum(level, 0.0), LEVELS)
    tl.store(value_ptr + offsets, round_to(level * theta, work).to(work), mask=mask)

    if WITH_SPIKES:
        spikes = popcount(tl.where(mask, level.to(tl.int32), 0))
        per_sample = tile_sum(tile_sum(spikes, 2), 1)
        tl.atomic_add(spikes_ptr + n, per_sample.to(tl.int64), mask=mask_n, sem="relaxed")


@lazy_jit
def _quant_act_backward_kernel(
    z_ptr, theta_ptr, grad_value_ptr, grad_spikes_ptr,   # inputs
    grad_z_ptr, grad_theta_ptr,                          # outputs (grad_theta: float64, zeroed)
    N, C, S, stride_n, stride_c, stride_s,               # the [N, C, S] view of z, grad_value, grad_z
    LEVELS: tl.constexpr,
    THETA_PER_CHANNEL: tl.constexpr,
    HAS_GRAD_VALUE: tl.constexpr,
    HAS_GRAD_SPIKES: tl.constexpr,
    WANT_GRAD_Z: tl.constexpr,
    WANT_GRAD_THETA: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WIDE: tl.constexpr,                       # int64 element offsets
):
    n, c, mask_n, mask_c, mask, offsets = channel_tile(N, C, S, stride_n, stride_c, stride_s,
                                                       BLOCK_N, BLOCK_C, BLOCK_S, WIDE)

    compute = tl.float64 if FP64 else tl.float32
    work = theta_ptr.dtype.element_ty
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute)
    theta = load_per_channel(theta_ptr, c[None, :, None], mask_c[None, :, None], THETA_PER_CHANNEL, compute, 1.0)
    ratio, level = ratio_and_level(z, theta, work, FP64)

    grad_z = tl.full([BLOCK_N, BLOCK_C, BLOCK_S], 0, compute)
    grad_theta = tl.full([BLOCK_N, BLOCK_C, BLOCK_S], 0, compute)
    if FP64:
        dratio_dtheta = ratio / theta
    else:
        dratio_dtheta = tl.math.div_rn(ratio, theta)
    if HAS_GRAD_VALUE:
        g = tl.load(grad_value_ptr + offsets, mask=mask, other=0.0).to(compute)
        # value = clamp(q) * theta: the clamp passes its gradient where q lies in [0, L]
        passed = (level >= 0.0) & (level <= LEVELS)
        g_level = tl.where(passed, round_to(g * theta, work), 0.0)
        if FP64:
            grad_z = g_level / theta
        else:
            grad_z = tl.math.div_rn(g_level, theta)
        # theta as the output's scale, and as the divisor of z / theta
        grad_theta = g * tl.minimum(tl.maximum(level, 0.0), LEVELS) - g_level * dratio_dtheta
    if HAS_GRAD_SPIKES:
        # SpikeCountSurrogate: one spike per level, times dq/dz = 1 / theta and dq/dtheta = -z / theta^2
        # on [0, lambda]
        g_count = tl.load(grad_spikes_ptr + n, mask=mask_n, other=0.0).to(compute)[:, None, None]
        counted = (z >= 0.0) & (z <= round_to(theta * LEVELS, work))
        g_q = tl.where(counted, g_count, 0.0)
        if FP64:
            grad_z += g_q / theta
        else:
            grad_z += tl.math.div_rn(g_q, theta)
        grad_theta -= g_q * dratio_dtheta
    if WANT_GRAD_THETA:
        grad_theta = tl.where(mask, grad_theta, 0.0)
        if THETA_PER_CHANNEL:
            per_channel = tile_sum(tile_sum(grad_theta, 2), 0)
            tl.atomic_add(grad_theta_ptr + c, per_channel.to(tl.float64), mask=mask_c, sem="relaxed")
        else:
            tl.atomic_add(grad_theta_ptr, tile_sum(tile_sum(tile_sum(grad_theta, 2), 1), 0).to(tl.float64),
                          sem="relaxed")
    if WANT_GRAD_Z:
        out = grad_z_ptr.dtype.element_ty
        tl.store(grad_z_ptr + offsets, round_to(grad_z, out).to(out), mask=mask)


class QuantActFunction(torch.autograd.Function):
    """a(z) and spikes per sample forward, the reference's autograd backward, both in Triton."""

    @staticmethod
    def forward(ctx, z: Tensor, clip: Tensor, levels: int, with_spikes: bool):
        layout = channel_layout(z)
        theta = (clip.detach() / levels).reshape(-1)   # the reference's theta, value for value
        # torch computes z / theta in the promoted dtype; so does the kernel
        work = torch.result_type(z, channel_view(theta, z.dim()))
        theta = theta.to(work).contiguous()
        value = layout.empty_like(work)
        spikes = torch.zeros(layout.n, dtype=torch.int64, device=z.device) if with_spikes else None
        grid, view, tile = tile_launch(layout)
        if z.numel():
            _quant_act_forward_kernel[grid](
                layout.tensor, theta, value, value if spikes is None else spikes,
                *view,
                LEVELS=levels, THETA_PER_CHANNEL=theta.numel() > 1,
                WITH_SPIKES=with_spikes, FP64=work == torch.float64,
                **tile,
            )
        ctx.save_for_backward(layout.tensor, theta)
        ctx.levels = levels
        ctx.clip_shape, ctx.clip_dtype = clip.shape, clip.dtype
        ctx.set_materialize_grads(False)   # an unused output's gradient arrives as None: skip its term
        if with_spikes:
            return value, spikes.to(z.dtype)
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor | None, grad_spikes: Tensor | None = None):
        z, theta = ctx.saved_tensors
        want_z, want_clip = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not want_z and not want_clip:
            return None, None, None, None
        layout = channel_layout(z)
        if grad_value is not None and grad_value.stride() != z.stride():
            # the kernel indexes z and its gradients alike: an expanded or otherwise laid out grad is copied
            grad_value = torch.empty_strided(z.shape, z.stride(), dtype=grad_value.dtype,
                                             device=z.device).copy_(grad_value)
        if grad_spikes is not None:
            grad_spikes = grad_spikes.contiguous()
        grad_z = layout.empty_like(z.dtype) if want_z else None
        grad_theta = torch.zeros(theta.numel(), dtype=torch.float64, device=z.device) if want_clip else None
        grid, view, tile = tile_launch(layout)
        if z.numel():
            _quant_act_backward_kernel[grid](
                z, theta, z if grad_value is None else grad_value, z if grad_spikes is None else grad_spikes,
                z if grad_z is None else grad_z, z if grad_theta is None else grad_theta,
                *view,
                LEVELS=ctx.levels, THETA_PER_CHANNEL=theta.numel() > 1,
                HAS_GRAD_VALUE=grad_value is not None, HAS_GRAD_SPIKES=grad_spikes is not None,
                WANT_GRAD_Z=want_z, WANT_GRAD_THETA=want_clip, FP64=theta.dtype == torch.float64,
                **tile,
            )
        grad_clip = None
        if want_clip:
            # theta = lambda / L
            grad_clip = (grad_theta / ctx.levels).to(ctx.clip_dtype).reshape(ctx.clip_shape)
        return grad_z, grad_clip, None, None


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def quant_act_fused_triton(z: Tensor, clip: Tensor, levels: int, *,
                           with_spikes: bool) -> tuple[Tensor, Tensor | None]:
    """`quant_act_fused` on the Triton kernels, whatever the device (CPU needs TRITON_INTERPRET=1)."""
    if z.dim() < 2:
        raise ValueError(f"expected z [N, C, *spatial], got shape {tuple(z.shape)}")
    if z.dtype not in _SUPPORTED_DTYPES or clip.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"quant_act_fused supports {_SUPPORTED_DTYPES}, got z {z.dtype}, clip {clip.dtype}")
    if clip.numel() not in (1, z.shape[1]):
        raise ValueError(f"clip has {clip.numel()} values for {z.shape[1]} channels")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if with_spikes:
        value, spikes = QuantActFunction.apply(z, clip, int(levels), True)
        return value, spikes
    return QuantActFunction.apply(z, clip, int(levels), False), None


def quant_act_fused(z: Tensor, clip: Tensor, levels: int, *, with_spikes: bool) -> tuple[Tensor, Tensor | None]:
    """The quantized clipped activation of a site, differentiable (docs/method.md sections 1 and 5).

    z: [N, C, *spatial] or [N, C]; clip: lambda, a scalar or per-channel [C] tensor (trainable);
    levels: L. Returns (a(z), spikes per sample [N] if with_spikes else None), with the gradients
    of `QuantClippedActivation` (straight-through floor, QCFS lambda gradient) and of its spike
    count (SpikeCountSurrogate). Triton where `use_triton(z)`, else the reference.
    """
    if use_triton(z):
        return quant_act_fused_triton(z, clip, levels, with_spikes=with_spikes)
    return quant_act_fused_reference(z, clip, levels, with_spikes=with_spikes)
