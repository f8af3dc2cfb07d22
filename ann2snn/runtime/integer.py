"""Integer thresholds: a layer's requantization as per-channel comparisons of its int32 accumulator.

A quantized Conv/Gemm gives, per output channel c, the int32 accumulator A = sum w q + bias and
the output level y(A) = clamp(round_half_even(A * M_c) + zp, lo, hi). y is monotone in A for
M_c > 0, so it is fully described by the smallest A reaching each level k in (lo, hi]:
    t[c, k] = min{A : y_c(A) >= k},   y = lo + #{k : t[c, k] <= A}.
`integer_thresholds` finds each t by a binary search over int32, evaluating y exactly as
onnxruntime's CPU kernels do, in float32, so the integer comparison reproduces it bit for bit.

onnxruntime computes y in one of two ways (its source, onnxruntime/core):
- `requantize_qlinear`, its integer kernels (QLinearConv, and a QDQ Conv that its default
  session fuses into one): providers/cpu/nn/qlinearconv.cc takes the multiplier
  M_c = X_scale * W_scale[c] / Y_scale in float32, left to right; mlas/lib/quantize.cpp's
  MlasRequantizeOutput adds the int32 bias, converts to float32 (cvtdq2ps, nearest even),
  multiplies by M_c, clamps to [lo - zp, hi - zp] in float, converts with cvtps2dq (nearest even)
  and adds zp.
- `requantize_qdq`, the QDQ graph as written (ann2snn.frontend.reader.onnxruntime_session):
  DequantizeLinear, a float32 Conv/Gemm, then QuantizeLinear, which MlasQuantizeLinear computes
  as z / Y_scale in float32, clamped to [lo - zp, hi - zp], cvtps2dq, + zp. Here z is modelled as
  float32(A) * float32(X_scale * W_scale[c]), the exact product rounded once. The float32 conv
  sums its rounded products in its own order, so that model, and the thresholds, are exact
  where the conv is: when X_scale and every W_scale[c] are powers of two (each product q w s_x s_w
  is then exact) and |A| < 2^24 (so is every partial sum and the bias's own dequantization).
  Otherwise a value one float32 ulp from a rounding tie may land on the other level.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import Ann2SnnError
from ..kernels.int_levels import INT32_MAX, INT32_MIN
from ..kernels.int_levels_reference import UNREACHABLE, levels_from_thresholds
from ..kernels.requantize_reference import quantize_

__all__ = ["integer_thresholds", "levels_from_thresholds", "qlinear_multiplier", "requantize_qdq",
           "requantize_qlinear", "round_clamp", "site_thresholds"]



def _float32(values) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32).reshape(-1)


def _positive(scale: Tensor, name: str) -> Tensor:
    """The scale, refused unless finite and > 0 in every channel (else y is not monotone in A)."""
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise Ann2SnnError(f"integer thresholds: the {name} must be finite and > 0 in every channel, got "
                           f"{scale.tolist()[:8]}")
    return scale


def qlinear_multiplier(x_scale: float, w_scale, y_scale: float) -> Tensor:
    """onnxruntime's QLinearConv multiplier per channel, X_scale * W_scale[c] / Y_scale in float32."""
    return _float32(x_scale) * _float32(w_scale) / _float32(y_scale)


def _clamp_round(value: Tensor, zero_point: int, lo: int, hi: int) -> Tensor:
    """MLAS's last steps: clamp to [lo - zp, hi - zp] in float32, round half to even, add zp."""
    return torch.round(value.clamp(float(lo - zero_point), float(hi - zero_point))).to(torch.int64) + zero_point


def _as_float32(accumulator: Tensor) -> Tensor:
    """float32(A) as cvtdq2ps gives it (nearest even): an int32 accumulator, converted once."""
    return accumulator.to(torch.int32).to(torch.float32)


def requantize_qlinear(accumulator: Tensor, multiplier: Tensor, zero_point: int, lo: int, hi: int) -> Tensor:
    """MlasRequantizeOutput: y = clamp(round(float32(A) * M_c)) + zp; A [C, ...] (channel first)."""
    m = _positive(_float32(multiplier), "multiplier").reshape(-1, *([1] * (accumulator.dim() - 1)))
    return _clamp_round(_as_float32(accumulator) * m, zero_point, lo, hi)


def requantize_qdq(accumulator: Tensor, product_scale: Tensor, y_scale: float, zero_point: int, lo: int,
                   hi: int) -> Tensor:
    """DequantizeLinear -> float32 Conv -> QuantizeLinear, the conv output modelled as
    float32(A) * S_c with S_c = float32(X_scale * W_scale[c]) (exact where the module docstring
    says); A [C, ...] (channel first)."""
    s = _positive(_float32(product_scale), "input-times-weight scale").reshape(-1, *([1] * (accumulator.dim() - 1)))
    y = _positive(_float32(y_scale), "output scale")
    return _clamp_round(_as_float32(accumulator) * s / y, zero_point, lo, hi)


def integer_thresholds(requantize: Callable[[Tensor], Tensor], channels: int, lo: int, hi: int) -> Tensor:
    """t[c, k - lo - 1] = the smallest int32 A with requantize(A)[c] >= k, for k in (lo, hi], int64
    [channels, hi - lo]; UNREACHABLE (2^31) where no int32 A reaches k.

    `requantize` maps int64 accumulators [channels, n] to levels [channels, n] and must be
    monotone non-decreasing in A (a positive multiplier): the search checks the result.
    """
    targets = torch.arange(lo + 1, hi + 1, dtype=torch.int64).expand(channels, hi - lo)
    low = torch.full((channels, hi - lo), INT32_MIN, dtype=torch.int64)
    high = torch.full((channels, hi - lo), UNREACHABLE, dtype=torch.int64)
    while bool((low < high).any()):   # 32 halvings of [-2^31, 2^31]
        middle = torch.div(low + high, 2, rounding_mode="floor")
        reached = requantize(middle.clamp(max=INT32_MAX)) >= targets
        reached |= middle == UNREACHABLE
        high = torch.where(reached, middle, high)
        low = torch.where(reached, low, middle + 1)
    thresholds = high
    _check_monotone(requantize, thresholds, targets)
    return thresholds


def _check_monotone(requantize: Callable[[Tensor], Tensor], thresholds: Tensor, targets: Tensor) -> None:
    """Each found threshold t reaches its level and t - 1 does not, and the level at the top of
    int32 is not below the one at its bottom: a requantization that is not monotone fails here
    rather than giving wrong thresholds."""
    ends = requantize(torch.tensor([INT32_MIN, INT32_MAX]).expand(thresholds.shape[0], 2))
    found = thresholds < UNREACHABLE
    reaches = requantize(thresholds.clamp(max=INT32_MAX)) >= targets
    below = requantize((thresholds - 1).clamp(INT32_MIN, INT32_MAX)) < targets
    first = thresholds == INT32_MIN
    checks = [ends[:, 0] <= ends[:, 1], reaches | ~found, below | first | ~found,
              thresholds[:, 1:] >= thresholds[:, :-1]]
    if not all(bool(check.all()) for check in checks):
        raise Ann2SnnError("integer thresholds: the requantization is not monotone in the accumulator")


def round_clamp(value: Tensor, scale: Tensor, zero: int, qmin: int, qmax: int, channel_dim: int = 1) -> Tensor:
    """MLAS's QuantizeLinear of float32 values: clamp(value / scale, qmin - zp, qmax - zp), round
    half to even, + zp (int64)."""
    return round_clamp_(value.clone(), scale, zero, qmin, qmax, channel_dim).to(torch.int64) + qmin


def round_clamp_(value: Tensor, scale: Tensor, zero: int, qmin: int, qmax: int, channel_dim: int = 1) -> Tensor:
    """`round_clamp` minus qmin (the level above the lowest), in place, in value's float dtype."""
    return quantize_(value, scale, qmin - zero, qmax - zero, channel_dim)


def site_thresholds(product_scale: Tensor, offset: int, scale: Tensor, zero: int, qmin: int, qmax: int,
                    channels: int) -> Tensor:
    """t[c, k]: the smallest accumulator u whose level q = clamp(round_half_even(float32(u + offset) *
    float32(S_c) / scale_c) + zero, qmin, qmax) reaches qmin + k + 1, int64 [channels, qmax - qmin]
    (2^31 where none does): the integer form of one accumulator's requantization."""
    product = product_scale.to(torch.float32).reshape(-1).expand(channels)
    theta = scale.to(torch.float32).reshape(-1).expand(channels)

    def requantize(accumulator: Tensor) -> Tensor:   # channel first, [C, n]
        value = (accumulator + offset).to(torch.int32).to(torch.float32) * product[:, None]
        return round_clamp(value, theta[:, None], zero, qmin, qmax, channel_dim=0)

    return integer_thresholds(requantize, channels, qmin, qmax).clamp(max=UNREACHABLE)
