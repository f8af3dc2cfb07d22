"""The integer layers of an .snn artifact (issue 27, docs/artifact.md): int8 weights in place of float.

An integer SNN's layers are stored as the file gave them: `{layer}.weight` int8 with
`{layer}.weight_scale` float32 (per output channel or one), and `{layer}.bias_integers` int32 with
`{layer}.bias_scale`, and for an asymmetric layer `{layer}.weight_zero_point` int32 (its integer
weights are weight - zero point); the header lists the layers ("integer_layers"). The layer's float weight is
not stored: reading takes it back as float32(I - z) * scale, bit for bit the weight the compiler
checked (compile/integer_weights.py). The float bias stays (it carries the float neuron's bias shift).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArtifactError
from .artifact_tensors import most_common_dtype
from .integer_values import IntegerWeights

_SCALE, _BIAS, _BIAS_SCALE, _ZERO = ".weight_scale", ".bias_integers", ".bias_scale", ".weight_zero_point"


def integer_tensors(tensors: dict[str, Tensor], layers: dict[str, IntegerWeights]) -> dict[str, Tensor]:
    """`tensors` (a state dict) with each integer layer's weight stored as its integers."""
    stored = dict(tensors)
    for name, layer in layers.items():
        stored[f"{name}.weight"] = layer.weight.contiguous().clone()
        stored[name + _SCALE] = layer.weight_scale.to(torch.float32).contiguous().clone()
        if layer.zero_point is not None:
            stored[name + _ZERO] = layer.zero_point.to(torch.int32).contiguous().clone()
        if layer.bias is not None:
            stored[name + _BIAS] = layer.bias.to(torch.int32).contiguous().clone()
            stored[name + _BIAS_SCALE] = layer.bias_scale.to(torch.float32).contiguous().clone()
    return stored


def _tensor(tensors: dict[str, Tensor], name: str, dtype: torch.dtype, what: str) -> Tensor:
    tensor = tensors.pop(name, None)
    if tensor is None:
        raise ArtifactError(f"integer layer {what}: the artifact lacks tensor {name}")
    if tensor.dtype != dtype:
        raise ArtifactError(f"tensor {name} should be {str(dtype).removeprefix('torch.')}, the file holds "
                            f"{str(tensor.dtype).removeprefix('torch.')}")
    return tensor


def float_tensors(tensors: dict[str, Tensor], names: list) -> tuple[dict[str, Tensor], dict[str, IntegerWeights]]:
    """(the state dict with the float weights of the integer layers `names` back, in the SNN's
    floating dtype, and those layers' integers), each tensor checked."""
    tensors = dict(tensors)
    layers: dict[str, IntegerWeights] = {}
    if not names:
        return tensors, layers
    extra = {f"{n}{suffix}" for n in names for suffix in (_SCALE, _BIAS, _BIAS_SCALE, _ZERO)}
    dtype = most_common_dtype(t.dtype for k, t in tensors.items() if t.is_floating_point() and k not in extra) \
        or torch.float32
    for name in names:
        if not isinstance(name, str) or f"{name}.weight" not in tensors:
            raise ArtifactError(f"integer layer {name!r} has no weight in the artifact")
        weight = _tensor(tensors, f"{name}.weight", torch.int8, name)
        scale = _tensor(tensors, name + _SCALE, torch.float32, name)
        if scale.dim() != 1 or scale.numel() not in (1, weight.shape[0]) or not bool((scale > 0).all()):
            raise ArtifactError(f"tensor {name}{_SCALE} must hold one positive scale or one per output channel")
        bias = bias_scale = None
        if name + _BIAS in tensors:
            bias = _tensor(tensors, name + _BIAS, torch.int32, name)
            bias_scale = _tensor(tensors, name + _BIAS_SCALE, torch.float32, name)
            if bias.shape != (weight.shape[0],) or bias_scale.numel() not in (1, weight.shape[0]):
                raise ArtifactError(f"integer layer {name}: its bias does not match its {weight.shape[0]} outputs")
        zero = None
        if name + _ZERO in tensors:
            zero = _tensor(tensors, name + _ZERO, torch.int32, name)
            if zero.dim() != 1 or zero.numel() not in (1, weight.shape[0]) or not bool(
                    ((zero >= -128) & (zero <= 127)).all()):
                raise ArtifactError(f"tensor {name}{_ZERO} must hold one zero point in -128..127 or one per output "
                                    "channel")
        layer = IntegerWeights(weight, scale, bias, bias_scale, zero)
        tensors[f"{name}.weight"] = layer.dequantized()[0].to(dtype)
        layers[name] = layer
    return tensors, layers
