"""Triton device functions shared by the kernels.

The kernels call only Triton builtins and these functions, never triton.language's own jit-ted
library (tl.sum, tl.cdiv, tl.zeros): those are decorated when triton is imported, in the mode
of that moment, so a process that imported triton compiled (torch.export does) could not run
them in the interpreter. See kernels/dispatch.py.
"""
from __future__ import annotations

from .dispatch import SumCombine, lazy_jit

# triton.language, bound when a kernel is first launched (kernels/dispatch.py: LazyKernel)
tl = None


@SumCombine
def sum_combine(a, b):
    return a + b


@lazy_jit
def tile_sum(x, axis: tl.constexpr):
    """x summed over one axis of a tile: tl.sum without its dtype promotion (kernels/dispatch.py:
    SumCombine says which combine function each mode gets)."""
    return tl.reduce(x, axis, sum_combine)


@lazy_jit
def round_to(x, dtype: tl.constexpr):
    """x (float32 or float64) rounded to nearest even in `dtype`, returned in x's dtype: the
    rounding of a torch op computed in that dtype.

    bfloat16 is rounded by hand on the bits: Triton's interpreter truncates a float32 -> bfloat16
    cast (the GPU rounds to nearest even), and the tests run the interpreter.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(x.dtype)


@lazy_jit
def channel_tile(N, C, S, stride_n, stride_c, stride_s,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, WIDE: tl.constexpr):
    """This program's tile of an [N, C, S] view (kernels/layout.py): the sample and channel indices,
    their masks, the tile's mask and its element offsets.

    Programs run S fastest, then C, then N. The batch offset is int64 when the tensor has 2^31
    elements or more (WIDE), else int32: 64-bit address arithmetic per element costs bandwidth.
    """
    pid = tl.program_id(0)
    blocks_s = (S + BLOCK_S - 1) // BLOCK_S
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    n = (pid // (blocks_s * blocks_c)) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = ((pid // blocks_s) % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = (pid % blocks_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_n = n < N
    mask_c = c < C
    mask = mask_n[:, None, None] & mask_c[None, :, None] & (s < S)[None, None, :]
    if WIDE:
        n_offsets = n.to(tl.int64) * stride_n
    else:
        n_offsets = n * stride_n
    offsets = n_offsets[:, None, None] + (c * stride_c)[None, :, None] + (s * stride_s)[None, None, :]
    return n, c, mask_n, mask_c, mask, offsets


@lazy_jit
def load_per_channel(ptr, c, mask_c, PER_CHANNEL: tl.constexpr, compute: tl.constexpr, other: tl.constexpr):
    """A scalar, or the per-channel values at channels `c` (any shape); loaded in the `compute`
    dtype (masked-off channels read `other`)."""
    if PER_CHANNEL:
        return tl.load(ptr + c, mask=mask_c, other=other).to(compute)
    else:
        return tl.load(ptr).to(compute)


@lazy_jit
def fire_levels(v, theta, LEVELS: tl.constexpr, FP64: tl.constexpr):
    """The level q of bit-serial neurons of potential v and step theta (float32, or float64 with
    FP64), as a float and as int32: what MSB-first compare-and-subtract firing decodes to, the exact floor(v / theta) of the
    real quotient clamped to [0, L] (ann2snn.levels.fire_levels).

    The quotient through the reciprocal (a few ulps off: far less than half a level, as L < 2^16),
    clamped and rounded to the nearest integer, is the level or one above it; fma rounds v - q theta
    once, so its sign says exactly which. A dozen arithmetic instructions whatever T, and none on
    the conversion unit: T steps of compare-and-subtract and a floor left the kernel bound by
    those instead of memory."""
    # adding 2^23 (2^52 in float64) to x in [0, L] rounds x to the integer held in the low bits of
    # the sum: no conversion unit, which runs a few instructions per clock per multiprocessor
    if FP64:
        nearest = tl.minimum(tl.maximum(v * (1.0 / theta), 0.0), LEVELS) + 4503599627370496.0
        q = nearest - 4503599627370496.0
        code = (nearest.to(tl.int64, bitcast=True) - 0x4330000000000000).to(tl.int32)
    else:
        nearest = tl.minimum(tl.maximum(v * (1.0 / theta), 0.0), LEVELS) + 8388608.0
        q = nearest - 8388608.0
        code = nearest.to(tl.int32, bitcast=True) - 0x4B000000
    over = (tl.math.fma(-q, theta, v) < 0.0) & (q > 0.0)
    return tl.where(over, q - 1.0, q), tl.where(over, code - 1, code)


@lazy_jit
def popcount(x):
    """Set bits of each int32 x >= 0: the spikes of level x (SWAR, no loop over bits)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@lazy_jit
def ratio_and_level(z, theta, work: tl.constexpr, FP64: tl.constexpr):
    """z / theta and floor(z / theta + 1/2) (not yet clamped), each rounded like torch computes them
    in `work`; IEEE division, as triton's `/` is approximate in float32."""
    if FP64:
        ratio = z / theta
    else:
        ratio = round_to(tl.math.div_rn(z, theta), work)
    return ratio, tl.floor(round_to(ratio + 0.5, work))
