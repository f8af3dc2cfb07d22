"""Integer layers: int8 weights times unsigned levels, accumulated exactly in int32 (issue 27).

The time-folded evaluator runs one GEMM per layer on the levels q (docs/method.md section 7:
the sum of the planes' GEMMs, each weighted 2^(T-1-t), is W q). torch._int_mm and tl.dot multiply
int8 by int8, so an unsigned level byte b in [0, 255] enters as b - 128 (its top bit flipped,
read as int8) and each output gets back 128 * sum(w) of its weights:
    W b = W (b - 128) + 128 * sum(w).
Levels wider than a byte (T > 8) are split into digits, q = sum_j 2^(bits j) d_j, one GEMM each.
Both are exact identities; the result is the exact accumulator wherever it fits int32, which is
the range onnxruntime's own int32 accumulators have.

- `int_linear`: levels [N, K] x weight [O, K] (+ int32 bias) -> int32 [N, O].
- `IntConv2d` / `int_conv2d`: nn.Conv2d's stride, padding (zeros), dilation and groups -> int32
  [N, O, H', W'] in channels-last memory. On the CPU it runs oneDNN's u8 x s8 convolution
  (torch.ops.onednn.qconv2d_pointwise, weights packed once, scales 1) with a float32 output: oneDNN
  accumulates in int32 and converts, which is exact while |accumulator| < 2^24, so the digits are
  chosen small enough that (2^bits - 1) * sum|w| < 2^24 in every channel (8 bits while
  sum|w| <= 65793, e.g. 576 taps of mean |w| up to 114). bench/int_kernels.py measured it 1.5-1.8x faster than im2col + _int_mm per layer (median).
  Elsewhere (Triton, CUDA), or where even 1-bit digits could round: im2col on a strided view of
  the channels-last levels and one GEMM per group; padding is level 0, i.e. -128 after the shift,
  which the correction cancels like any other tap.
The GEMM runs in Triton where `use_triton` says so (`int8_gemm_triton`), else torch._int_mm.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import lazy_jit, use_triton
from .layout import cdiv

# triton.language, bound when a kernel is first launched (kernels/dispatch.py: LazyKernel)
tl = None

__all__ = ["IntConv2d", "int8_gemm", "int8_gemm_triton", "int_conv2d", "int_linear"]

_LEVEL_DTYPES = (torch.uint8, torch.int16, torch.int32)
SHIFT = 128   # an unsigned byte b enters the int8 GEMM as b - 128
EXACT_FLOAT32 = 2 ** 24   # every integer of smaller magnitude is a float32


@lazy_jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, c_ptr,                      # a [M, K] int8, b [K, N] int8, c [M, N] int32
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    accumulator = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + depth
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (cols[None, :] < N), other=0)
        accumulator = tl.dot(a, b, accumulator, out_dtype=tl.int32)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, accumulator,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def int8_gemm_triton(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32 [M, N] in Triton (the CPU needs TRITON_INTERPRET=1)."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=torch.int32, device=a.device)
    if c.numel():
        block_m, block_n, block_k = 64, 64, 32   # tl.dot needs every block >= 16
        _int8_gemm_kernel[(cdiv(m, block_m), cdiv(n, block_n))](
            a, b, c, m, n, k, *a.stride(), *b.stride(), *c.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return c


def int8_gemm(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32 [M, N]: Triton where `use_triton(a)`, else torch._int_mm."""
    if use_triton(a):
        return int8_gemm_triton(a, b)
    if not a.is_cuda:
        return torch._int_mm(a, b)   # the CPU kernel takes any shape
    # cuBLASLt's constraints (m > 16, k and n multiples of 8): pad with zeros, which add nothing
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(17 - m, 0), -k % 8, -n % 8
    a = torch.nn.functional.pad(a, (0, pk, 0, pm))
    b = torch.nn.functional.pad(b, (0, pn, 0, pk))
    return torch._int_mm(a, b)[:m, :n]


def _level_digits(levels: Tensor, bits: int) -> list[Tensor]:
    """The levels as uint8 digits d_j of `bits` bits, least significant first: q = sum 2^(bits j) d_j."""
    if levels.dtype not in _LEVEL_DTYPES:
        raise TypeError(f"integer layers take levels as {_LEVEL_DTYPES}, got {levels.dtype}")
    if levels.dtype == torch.uint8 and bits == 8:
        return [levels]
    mask = (1 << bits) - 1
    return [((levels >> (bits * j)) & mask).to(torch.uint8) for j in range(8 * levels.element_size() // bits)]


def shifted(digit: Tensor) -> Tensor:
    """A uint8 digit b as the int8 b - 128 (its top bit flipped)."""
    return (digit ^ SHIFT).view(torch.int8)


def _combine(gemm, digits: list[Tensor], bits: int) -> Tensor:
    """sum_j 2^(bits j) gemm(d_j), in int32."""
    accumulator = None
    for j, digit in enumerate(digits):
        part = gemm(digit)
        if j:
            part = part * (1 << (bits * j))
        accumulator = part if accumulator is None else accumulator + part
    return accumulator


def _plus_bias(accumulator: Tensor, bias: Tensor | None) -> Tensor:
    """The accumulator [N, O, *spatial] plus an int32 bias [O]."""
    if bias is None:
        return accumulator
    return accumulator + bias.to(torch.int32).reshape(-1, *([1] * (accumulator.dim() - 2)))


def int_linear(levels: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The int32 accumulator of a Gemm: levels [N, K] (uint8, or int16/int32 >= 0) x int8 weight [O, K]."""
    weight_t = weight.t()
    correction = SHIFT * weight.sum(1, dtype=torch.int32)
    accumulator = _combine(lambda digit: int8_gemm(shifted(digit), weight_t) + correction,
                           _level_digits(levels, 8), 8)
    return _plus_bias(accumulator, bias)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _im2col(levels: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int) -> tuple[Tensor, tuple[int, int]]:
    """Shifted [N, C, H, W] uint8 -> [groups, N H' W', kh kw C/groups] int8, taps in (kh, kw, c)
    order, and (H', W')."""
    n, c, h, w = levels.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    nhwc = torch.nn.functional.pad(shifted(levels.permute(0, 2, 3, 1)), (0, 0, pw, pw, ph, ph), value=-SHIFT)
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s_n, s_h, s_w, s_c = nhwc.stride()
    patches = nhwc.as_strided((n, out_h, out_w, kh, kw, groups, c // groups),
                              (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c * (c // groups), s_c))
    columns = patches.permute(5, 0, 1, 2, 3, 4, 6).reshape(groups, n * out_h * out_w, kh * kw * (c // groups))
    return columns, (out_h, out_w)


def _onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")


ENGINES = ("auto", "im2col")


class IntConv2d:
    """nn.Conv2d on integer levels with int8 weights and an int32 bias, its weights packed once.

    engine "auto" takes oneDNN on the CPU where it is exact (see the module docstring), else
    im2col; "im2col" always takes im2col + int8 GEMM (bench/int_kernels.py compares the two).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, engine: str = "auto") -> None:
        if weight.dtype != torch.int8:
            raise TypeError(f"IntConv2d takes int8 weights, got {weight.dtype}")
        if engine not in ENGINES:
            raise ValueError(f"IntConv2d engine must be one of {ENGINES}, got {engine!r}")
        self.weight, self.bias, self.groups = weight, bias, groups
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        out_channels, _, kh, kw = weight.shape
        per_group = out_channels // groups
        # [groups, kh kw C/groups, O/groups], taps in the order of _im2col's columns
        self._columns = (weight.reshape(groups, per_group, -1, kh, kw).permute(0, 3, 4, 2, 1)
                         .reshape(groups, -1, per_group))
        self._correction = SHIFT * weight.reshape(out_channels, -1).sum(1, dtype=torch.int32)
        # the widest digits whose float32 accumulator oneDNN cannot round
        largest = int(weight.reshape(out_channels, -1).long().abs().sum(1).max()) if weight.numel() else 0
        self._onednn_bits = next((bits for bits in (8, 4, 2, 1) if ((1 << bits) - 1) * largest < EXACT_FLOAT32), None)
        if engine == "im2col":
            self._onednn_bits = None
        self._packed = None

    def _takes_onednn(self, levels: Tensor) -> bool:
        return (not levels.is_cuda and not use_triton(levels) and self._onednn_bits is not None
                and _onednn_available())

    def float_accumulator(self, levels: Tensor, plus_bias: bool = False) -> Tensor | None:
        """The accumulator without the bias (with `plus_bias`, with it) as oneDNN gives it, float32:
        the integers of magnitude < 2^24 it holds are exact (see __init__), and the sum with a
        bias below 2^24 is float32(A), rounded once. In one convolution, where the levels are uint8
        and oneDNN takes all 8 bits at once; else None."""
        if levels.dtype != torch.uint8 or self._onednn_bits != 8 or not self._takes_onednn(levels):
            return None
        if plus_bias and self.bias is not None and int(self.bias.abs().max()) >= EXACT_FLOAT32:
            return None   # float32(b) would round before the sum does
        return self._onednn_float(levels, self.bias if plus_bias else None)

    def _onednn_conv(self, digit: Tensor) -> Tensor:
        """The accumulator of one uint8 digit plane by oneDNN's u8 x s8 convolution, exact (see __init__)."""
        return self._onednn_float(digit).to(torch.int32)

    def _onednn_float(self, digit: Tensor, bias: Tensor | None = None) -> Tensor:
        """_onednn_conv in oneDNN's float32 output, plus a bias (int32, added in float32) if given."""
        ops = torch.ops.onednn
        out_channels = self.weight.shape[0]
        ones = torch.ones(out_channels)
        if self._packed is None:
            self._packed = ops.qconv_prepack(self.weight, ones, 1.0, 0, list(self.stride), list(self.padding),
                                             list(self.dilation), self.groups, None)
            self._float_bias = None if self.bias is None else self.bias.to(torch.float32)
        accumulator = ops.qconv2d_pointwise(
            digit.contiguous(memory_format=torch.channels_last), 1.0, 0, self._packed, ones,
            torch.zeros(out_channels, dtype=torch.long), None if bias is None else self._float_bias,
            list(self.stride), list(self.padding), list(self.dilation), self.groups, 1.0, 0, torch.float32,
            "none", [], "")
        return accumulator

    def _im2col_conv(self, digit: Tensor, shape: dict) -> Tensor:
        """The accumulator of one uint8 digit plane by im2col and one int8 GEMM per group, [N H' W', O]."""
        kernel = tuple(self.weight.shape[2:])
        columns, shape["out"] = _im2col(digit, kernel, self.stride, self.padding, self.dilation, self.groups)
        gemms = [int8_gemm(columns[g], self._columns[g]) for g in range(self.groups)]
        return torch.cat(gemms, dim=1) + self._correction

    def __call__(self, levels: Tensor) -> Tensor:
        """The int32 accumulator [N, O, H', W'] (channels-last memory) of levels [N, C, H, W]
        (uint8, or int16/int32 >= 0)."""
        bits = self._onednn_bits
        if self._takes_onednn(levels):
            return _plus_bias(_combine(self._onednn_conv, _level_digits(levels, bits), bits), self.bias)
        shape: dict = {}
        accumulator = _combine(lambda digit: self._im2col_conv(digit, shape), _level_digits(levels, 8), 8)
        out_h, out_w = shape["out"]
        return _plus_bias(accumulator.reshape(levels.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2), self.bias)


def int_conv2d(levels: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
               groups: int = 1) -> Tensor:
    """The int32 accumulator of nn.Conv2d(levels, weight) with zero padding: levels [N, C, H, W]
    (uint8, or int16/int32 >= 0), int8 weight [O, C/groups, kh, kw], int32 bias [O] or None.
    A layer run many times should build its `IntConv2d` once (it packs the weights)."""
    return IntConv2d(weight, bias, stride, padding, dilation, groups)(levels)
