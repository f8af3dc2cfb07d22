"""The arithmetic of levels and spikes, below everything else: it imports torch alone.

docs/method.md's integers: L = 2^T - 1 levels, the level q(z) = clamp(floor(z / theta + 1/2), 0, L) of
an activation site (section 1), the level clamp(floor(V / theta), 0, L) that MSB-first firing
emits from a potential V (section 3), popcount(q) spikes per level (section 5), and the spike
code of a level. The modules (`ann2snn.runtime.quant`, `ann2snn.runtime.neuron`) and the kernels' pure-PyTorch
references (`ann2snn.kernels`) compute with these functions, so dependencies point one way:
levels <- kernels <- quant, neuron <- the compiler.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def levels_for_timesteps(timesteps: int) -> int:
    """L = 2^T - 1: the levels a T-step bit-serial neuron represents."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    return 2**timesteps - 1


def timesteps_for_levels(levels: int) -> int:
    """T = ceil(log2(L + 1)): the fewest time steps that represent L levels."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    return max(1, math.ceil(math.log2(levels + 1)))


def channel_view(values: Tensor, ndim: int, channel_dim: int = 1) -> Tensor:
    """Reshape a per-channel vector (or scalar) so it broadcasts over an [N, C, ...] tensor."""
    if values.dim() == 0 or values.numel() == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[channel_dim] = values.numel()
    return values.reshape(shape)


def quantize_levels(z: Tensor, theta: Tensor, levels: int) -> Tensor:
    """The integer level q(z) of docs/method.md section 1 (no gradient)."""
    return torch.clamp(torch.floor(z / theta + 0.5), 0, levels)


def popcount_levels(q: Tensor, levels: int) -> Tensor:
    """Spikes that carry level q: the ones of its binary code (level 8 costs one spike, 7 three),
    in q's dtype. The one popcount of torch tensors (the kernels have their own, in Triton and C).

    Floating-point q holds integer levels 0..L: Legendre's formula popcount(q) = q - sum_{k >= 1}
    floor(q / 2^k), every step exact (scaling by 2^-k and floor), and a few elementwise passes cost
    a CPU several times less than a table lookup (a gather). Integer q (spike codes, uint8 or
    int32, `spike_code_arithmetic_dtype`) counts its bits in registers instead (SWAR), whatever L.
    """
    if not q.is_floating_point():
        return _popcount_bits(q)
    count = q.clone()
    for k in range(1, max(1, int(levels).bit_length())):
        count -= torch.floor(q * 2.0**-k)
    return count


def _popcount_bits(x: Tensor) -> Tensor:
    """Ones in the binary code of every element of a uint8 or int32 tensor (SWAR bit counting)."""
    if x.dtype == torch.uint8:
        x = x - ((x >> 1) & 0x55)
        x = (x & 0x33) + ((x >> 2) & 0x33)
        return (x + (x >> 4)) & 0x0F
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    return (x + (x >> 16)) & 0x3F


def popcount_sum_(q: Tensor, levels: int, dims: tuple[int, ...]) -> Tensor:
    """popcount(q) summed over `dims`, as int64; q is overwritten. Legendre's formula summed term by
    term: sum q - sum_k sum floor(q / 2^k), each floor(q / 2^k) computed in place from the last.

    Sums run in q's dtype while every partial sum stays below 2^24 (exact in float32: at most
    elements * L), else in float64; no count tensor is allocated, which makes this the cheapest
    exact way to count a layer's spikes on a CPU.
    """
    summed = math.prod(q.shape[d] for d in dims)
    exact_in_float32 = q.dtype in (torch.float32, torch.float64) and summed * levels < 2**24
    dtype = None if exact_in_float32 else torch.float64
    total = q.sum(dims, dtype=dtype)
    for _ in range(1, max(1, int(levels).bit_length())):
        total -= q.mul_(0.5).floor_().sum(dims, dtype=dtype)
    return total.to(torch.int64)


class SpikeCountSurrogate(torch.autograd.Function):
    """Exact spike count popcount(q(z)) forward; surrogate gradient backward (docs/method.md section 5).

    popcount is piecewise constant in q, so its gradient is replaced by a constant slope of one
    spike per level (the mean of the per-bit gradients), times the straight-through derivatives of
    q = z / theta on [0, lambda]: 1/theta for z and -z/theta^2 for theta. With both, scaling z and
    theta together leaves the count's gradient neutral: the regularizer can only lower z relative
    to theta. (With z's term alone, a site behind a batch norm, whose scale is free, lets training
    shrink z and lambda together while the push on z grows as 1/theta, until the site dies.)
    """

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, levels: int) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.levels = levels
        return popcount_levels(quantize_levels(z, theta, levels), levels).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_count: Tensor) -> tuple[Tensor, Tensor | None, None]:
        z, theta = ctx.saved_tensors
        inside = (z >= 0) & (z <= theta * ctx.levels)
        grad_q = grad_count * inside.to(z.dtype)
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = (-grad_q * (z / theta) / theta).sum_to_size(theta.shape)
        return grad_q / theta, grad_theta, None


def spike_count(z: Tensor, theta: Tensor, levels: int) -> Tensor:
    """Per-neuron spike counts of an activation site, differentiable through the surrogate."""
    return SpikeCountSurrogate.apply(z, theta, levels)

def quantized_activation(z: Tensor, clip: Tensor, levels: int, with_spikes: bool) -> tuple[Tensor, Tensor | None]:
    """a(z) = q(z) * theta of a site with lambda = `clip` (scalar or [C]), differentiable (the
    straight-through floor, QCFS's lambda gradient), and its spikes per sample through the
    surrogate when `with_spikes` (else None)."""
    theta = channel_view(clip, z.dim()) / levels
    spikes = spike_count(z, theta, levels).flatten(1).sum(1) if with_spikes else None
    scaled = z / theta + 0.5
    # Straight-through floor: forward floor, backward identity.
    q = scaled + (torch.floor(scaled) - scaled).detach()
    return torch.clamp(q, 0, levels) * theta, spikes


def step_thresholds(theta: Tensor, timesteps: int) -> list[Tensor]:
    """The threshold of each output step, MSB first: 2^(T-1-t) * theta."""
    return [theta * float(2 ** (timesteps - 1 - t)) for t in range(timesteps)]


def cap_potential(potential: Tensor, theta: Tensor, levels: int, timesteps: int) -> Tensor:
    """With L < 2^T - 1 levels the potential is capped at (L + 1/2) theta, so no level exceeds L."""
    if levels < 2**timesteps - 1:
        potential = torch.minimum(potential, theta * (levels + 0.5))
    return potential


def fire_msb_first(potential: Tensor, theta: Tensor, levels: int, timesteps: int) -> Tensor:
    """Spike planes [T, ...] of a neuron with the given potential (compare, then subtract)."""
    v = cap_potential(potential, theta, levels, timesteps)
    spikes = []
    for threshold in step_thresholds(theta, timesteps):
        spike = (v >= threshold).to(v.dtype)
        v = v - spike * threshold
        spikes.append(spike)
    return torch.stack(spikes)


def decode_levels(spikes: Tensor) -> Tensor:
    """sum_t s_t 2^(T-1-t): the level a spike train [T, ...] carries."""
    timesteps = spikes.shape[0]
    weights = torch.tensor([2.0 ** (timesteps - 1 - t) for t in range(timesteps)], dtype=spikes.dtype,
                           device=spikes.device)
    return torch.tensordot(weights, spikes, dims=1)


def fire_levels(potential: Tensor, theta: Tensor, levels: int, timesteps: int) -> Tensor:
    """The level the T output spikes carry: exactly what compare-and-subtract firing decodes to.

    Each subtraction of the firing loop is exact in floating point (Sterbenz: the potential lies
    in [2^k theta, 2^(k+1) theta) when threshold 2^k theta fires), so firing computes the exact
    floor(V / theta) of the real quotient, clamped to [0, L]. For float32 / float16 potentials
    that floor is taken in float64, which cannot round across an integer (the distance of
    V / theta from one is at least 2^-25, the float64 error at most L 2^-53 <= 2^-37 for
    T <= 16); float64 potentials run the loop itself. The time-folded evaluator uses this, and
    for equal potentials agrees with the simulator bit for bit.
    """
    if potential.dtype == torch.float64:
        return decode_levels(fire_msb_first(potential, theta, levels, timesteps))
    top = min(levels, 2**timesteps - 1)
    quotient = potential.to(torch.float64)  # a new tensor: the in-place steps below save allocations
    return quotient.div_(theta.to(torch.float64)).floor_().clamp_(0, top).to(potential.dtype)


# The most time steps a neuron may have: the evaluator's spike code of a level has at most 16 bits.
MAX_TIMESTEPS = 16


def spike_code_dtype(timesteps: int) -> torch.dtype:
    """The dtype of the bit-packed spike code of a T-step neuron (bit T-1-t = spike at step t, so the
    code is the level q itself): uint8 for T <= 8, uint16 for T <= 16. The one place that says so."""
    if type(timesteps) is not int or not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"a spike code holds 1..{MAX_TIMESTEPS} time steps, got T={timesteps!r}")
    return torch.uint8 if timesteps <= 8 else torch.uint16


def spike_code_arithmetic_dtype(timesteps: int) -> torch.dtype:
    """The dtype to shift, mask and add spike codes in: the code's own dtype, except uint16, which
    torch stores and converts but cannot shift or add on the CPU: int32 then."""
    code = spike_code_dtype(timesteps)
    return torch.int32 if code == torch.uint16 else code


def check_levels_exact(levels: int, dtype: torch.dtype) -> None:
    """Refuse L levels that `dtype` cannot hold as exact integers (float16 holds 0..2048, so T <= 11;
    bfloat16 0..256, T <= 8): the evaluator carries q in the potential's dtype, and a rounded q
    would fire and count the wrong spikes without a word."""
    exact = int(2 / torch.finfo(dtype).eps)   # 2^(mantissa bits + 1)
    if levels > exact:
        raise ValueError(f"{levels} levels are not exact in {str(dtype).removeprefix('torch.')} (integers up to "
                         f"{exact}): the SNN needs float32")


def unpack_spikes(levels: Tensor, timesteps: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """Binary spike planes [T, ...] of bit-packed levels, MSB first: plane t is bit T-1-t."""
    work = spike_code_arithmetic_dtype(timesteps)
    shifts = torch.arange(timesteps - 1, -1, -1, device=levels.device, dtype=work)
    shifts = shifts.reshape((timesteps,) + (1,) * levels.dim())
    return ((levels.to(work).unsqueeze(0) >> shifts) & 1).to(dtype)


def pack_spikes(planes: Tensor) -> Tensor:
    """The spike code (`spike_code_dtype(T)`) of binary spike planes [T, ...], T <= 16, MSB first:
    the inverse of unpack."""
    timesteps = planes.shape[0]
    work = spike_code_arithmetic_dtype(timesteps)
    code = torch.zeros(planes.shape[1:], dtype=work, device=planes.device)
    for plane in planes:
        code = (code << 1) | (plane != 0).to(work)
    return code.to(spike_code_dtype(timesteps))
