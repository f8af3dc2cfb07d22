"""The quantized clipped activation of docs/method.md section 1: the activation site of a source ANN;
and QuantDequant, the fake quantization of an ONNX QDQ pair.

    q(z) = clamp(floor(z / theta + 1/2), 0, L),  a(z) = q(z) * theta,  theta = lambda / L

lambda (the clipping threshold) is trainable, per layer or per output channel. The floor uses a
straight-through estimator, so dq/dz = 1/theta on [0, lambda]; lambda gets the gradient of the
clamp and the scale as in QCFS (Bu et al., ICLR 2022): 1 where the site saturates, and
(q - z / theta) / L inside.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import quant_act_fused
from ..levels import channel_view, quantized_activation, timesteps_for_levels


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
        if self.quantize and z.is_cuda:   # fused forward and backward on the GPU
            value, spikes = quant_act_fused(z, self.clip, self.levels, with_spikes=self.record_spikes)
            if self.record_spikes:
                self.spikes = spikes
            return value
        if not self.quantize:
            return torch.minimum(torch.relu(z), channel_view(self.clip, z.dim()))
        value, spikes = quantized_activation(z, self.clip, self.levels, self.record_spikes)
        if self.record_spikes:
            self.spikes = spikes
        return value

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
