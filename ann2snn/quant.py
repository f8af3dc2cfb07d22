"""The quantized clipped activation of METHOD.md section 1: the activation site of a source ANN;
and QuantDequant, the fake quantization of an ONNX QDQ pair.

    q(z) = clamp(floor(z / theta + 1/2), 0, L),  a(z) = q(z) * theta,  theta = lambda / L

lambda (the clipping threshold) is trainable, per layer or per output channel. The floor uses a
straight-through estimator, so dq/dz = 1/theta on [0, lambda]; lambda gets the gradient of the
clamp and the scale as in QCFS (Bu et al., ICLR 2022): 1 where the site saturates, and
(q - z / theta) / L inside.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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
    """The integer level q(z) of METHOD.md section 1 (no gradient)."""
    return torch.clamp(torch.floor(z / theta + 0.5), 0, levels)


def popcount_levels(q: Tensor, levels: int) -> Tensor:
    """Spikes that carry level q: the ones of its binary code (level 8 costs one spike, 7 three).

    q holds integer levels 0..L; the counts come in q's dtype, by Legendre's formula
    popcount(q) = q - sum_{k >= 1} floor(q / 2^k), in floating point (an integer q in float64).
    Every step is exact (q <= 255; scaling by 2^-k and floor are exact), and a few elementwise
    passes cost a CPU several times less than a table lookup (a gather).
    """
    values = q if q.is_floating_point() else q.to(torch.float64)
    count = values.clone()
    for k in range(1, max(1, int(levels).bit_length())):
        count -= torch.floor(values * 2.0**-k)
    return count.to(q.dtype)


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
    """Exact spike count popcount(q(z)) forward; surrogate gradient backward (METHOD.md section 5).

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


class QuantClippedActivation(nn.Module):
    """A ReLU-like activation site quantized to `levels` steps of theta = lambda / levels.

    `channels` > 0 gives a per-channel lambda (over dimension 1), 0 a per-layer one.
    `quantize=False` turns the site into a plain clipped ReLU clamp(z, 0, lambda): the float ANN.
    With `record_spikes = True`, each forward stores `self.spikes`, the site's spike count per
    sample (differentiable through the surrogate), for the regularizer and for logging.
    """

    def __init__(
        self,
        levels: int = 15,
        clip: float = 4.0,
        channels: int = 0,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = int(levels)
        self.quantize = quantize
        shape = (channels,) if channels > 0 else ()
        self.clip = nn.Parameter(torch.full(shape, float(clip)))
        self.record_spikes = False
        self.spikes: Tensor | None = None

    @property
    def timesteps(self) -> int:
        return timesteps_for_levels(self.levels)

    @property
    def per_channel(self) -> bool:
        return self.clip.dim() == 1

    def theta(self) -> Tensor:
        """One quantization step, lambda / L (scalar or per channel)."""
        return self.clip / self.levels

    def forward(self, z: Tensor) -> Tensor:
        if self.quantize and z.is_cuda:
            from .kernels import quant_act_fused  # fused forward and backward on the GPU

            value, spikes = quant_act_fused(z, self.clip, self.levels, with_spikes=self.record_spikes)
            if self.record_spikes:
                self.spikes = spikes
            return value
        clip = channel_view(self.clip, z.dim())
        if not self.quantize:
            return torch.minimum(torch.relu(z), clip)
        theta = clip / self.levels
        if self.record_spikes:
            self.spikes = spike_count(z, theta, self.levels).flatten(1).sum(1)
        scaled = z / theta + 0.5
        # Straight-through floor: forward floor, backward identity.
        q = scaled + (torch.floor(scaled) - scaled).detach()
        return torch.clamp(q, 0, self.levels) * theta

    def extra_repr(self) -> str:
        kind = f"per-channel({self.clip.numel()})" if self.per_channel else "per-layer"
        return f"levels={self.levels}, lambda={kind}, quantize={self.quantize}"


class QuantDequant(nn.Module):
    """QuantizeLinear followed by DequantizeLinear, as onnxruntime computes it:

        q = clamp(round(x / scale) + zero_point, qmin, qmax)     round half to even
        y = (q - zero_point) * scale

    per tensor (scale of one element) or per axis (one scale per index of dimension `axis`).
    """

    # Not linear: the simulator applies it to the integrated potential (a QDQ pair that is no
    # activation site, e.g. on the input or before an Add, is reproduced exactly, not spiked).
    acts_on_potential = True

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int = 1) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().reshape(-1))
        self.register_buffer("zero_point", zero_point.detach().clone().reshape(-1).to(self.scale.dtype))
        self.qmin, self.qmax, self.axis = int(qmin), int(qmax), int(axis)

    @property
    def per_axis(self) -> bool:
        return self.scale.numel() > 1

    def _view(self, values: Tensor, x: Tensor) -> Tensor:
        # never 0-d, so the division is the same elementwise division onnxruntime does
        shape = [1] * x.dim()
        if self.per_axis:
            shape[self.axis] = values.numel()
        return values.reshape(shape).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        scale, zero_point = self._view(self.scale, x), self._view(self.zero_point, x)
        q = torch.clamp(torch.round(x / scale) + zero_point, self.qmin, self.qmax)
        return (q - zero_point) * scale

    def extra_repr(self) -> str:
        kind = f"per-axis({self.axis}, {self.scale.numel()})" if self.per_axis else "per-tensor"
        return f"{kind}, qmin={self.qmin}, qmax={self.qmax}"

    def artifact_config(self) -> dict:
        return {"qmin": self.qmin, "qmax": self.qmax, "axis": self.axis, "channels": self.scale.numel()}

    @classmethod
    def from_artifact_config(cls, config: dict) -> "QuantDequant":
        # scale and zero_point arrive with the state dict
        zeros = torch.zeros(config["channels"])
        return cls(zeros, zeros, config["qmin"], config["qmax"], config["axis"])
