"""Torch modules the ONNX importer emits beyond torch.nn: the fake quantization of a QDQ pair."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..artifact import register_module


@register_module
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
