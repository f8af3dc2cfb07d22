"""How the kernels walk an activation tensor: as [N, C, S] with strides, in tiles.

An activation of shape [N, C, *spatial] is stored either NCHW-contiguous (spatial stride 1) or
channels-last (channel stride 1). Both are a 3-D view [N, C, S] once the spatial dimensions are
merged, so one kernel serves both and writes its outputs in the input's own memory format.
"""
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

# Elements per program: large enough to hide memory latency, small enough for registers.
TILE_ELEMENTS = 4096
# Elements per thread, which sets the warps per program: fewer keep registers free for more
# programs in flight per multiprocessor, which hides memory latency.
ELEMENTS_PER_THREAD = 16
# The most padding a tile dimension may add before a smaller block is preferred.
MAX_PADDING = 0.125
# Shortest run of the unit-stride axis in a tile: 32 elements fill a 128-byte line in float32.
UNIT_STRIDE_RUN = 32


@dataclass(frozen=True)
class ChannelLayout:
    """A dense tensor seen as [N, C, S] (S = product of the spatial sizes) with its strides."""

    tensor: Tensor
    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int

    def empty_like(self, dtype: torch.dtype) -> Tensor:
        """An output with exactly the input's strides, so the kernel indexes both alike."""
        return torch.empty_strided(self.tensor.shape, self.tensor.stride(), dtype=dtype, device=self.tensor.device)


def _non_overlapping_and_dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Every element has its own address and the addresses fill one block (no expand, no gaps)."""
    expected = 1
    for size, step in sorted((p for p in zip(shape, stride) if p[0] != 1), key=lambda p: p[1]):
        if step != expected:
            return False
        expected *= size
    return True


@lru_cache(maxsize=1024)
def _merged_spatial_stride(shape: tuple[int, ...], stride: tuple[int, ...]) -> int | None:
    """The stride of the merged spatial dimension, or None when the tensor is not dense or its
    spatial dims do not merge. Cached: a network calls it with the same few layouts every batch."""
    if not _non_overlapping_and_dense(shape, stride):
        return None
    dims = [(size, step) for size, step in zip(shape[2:], stride[2:]) if size != 1]
    if not dims:
        return 1
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_size * inner_stride:
            return None
    return dims[-1][1]


def channel_layout(x: Tensor) -> ChannelLayout:
    """The [N, C, S] view of an [N, C, *spatial] tensor; copies only layouts that are not dense."""
    if x.dim() < 2:
        raise ValueError(f"expected an [N, C, *spatial] tensor, got shape {tuple(x.shape)}")
    stride_s = _merged_spatial_stride(tuple(x.shape), x.stride())
    if stride_s is None:
        x = x.contiguous()
        stride_s = 1
    return ChannelLayout(x, x.shape[0], x.shape[1], math.prod(x.shape[2:]), x.stride(0), x.stride(1), stride_s)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _block(size: int, budget: int, smallest: int = 1) -> int:
    """A power-of-two block for an axis of `size`: the largest within budget that pads the axis by
    at most MAX_PADDING, else the one with the least padding. `smallest` keeps unit-stride runs
    long enough to fill a memory transaction."""
    top = min(_next_power_of_2(size), budget)
    candidates = []
    block = min(smallest, top)
    while block <= top:
        candidates.append(block)
        block *= 2
    padding = {b: (-size % b) / size for b in candidates}
    fitting = [b for b in candidates if padding[b] <= MAX_PADDING]
    return max(fitting) if fitting else min(candidates, key=lambda b: (padding[b], -b))


def tile_shape(layout: ChannelLayout, tile: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_S) of about `tile` (default TILE_ELEMENTS) elements: the unit-stride
    axis first, so loads coalesce, then the other of channel and space, then the batch with what
    is left of the budget."""
    return _tile_shape(layout.n, layout.c, layout.s, layout.stride_s == 1, tile or TILE_ELEMENTS)


@lru_cache(maxsize=1024)
def _tile_shape(n: int, c: int, s: int, unit_spatial_stride: bool, tile: int) -> tuple[int, int, int]:
    spatial_first = s > 1 and unit_spatial_stride
    first, second = (s, c) if spatial_first else (c, s)
    block_first = _block(first, tile, smallest=UNIT_STRIDE_RUN)
    block_second = _block(second, tile // block_first)
    block_n = _block(n, tile // (block_first * block_second))
    if spatial_first:
        return block_n, block_second, block_first
    return block_n, block_first, block_second


def num_warps(block: tuple[int, int, int]) -> int:
    """Warps per program: about ELEMENTS_PER_THREAD elements per thread, 1 to 8 warps."""
    elements = block[0] * block[1] * block[2]
    return max(1, min(8, elements // (32 * ELEMENTS_PER_THREAD)))


def wide_offsets(layout: ChannelLayout) -> bool:
    """Whether element offsets need int64 (the WIDE flag of kernels/device_functions.channel_tile)."""
    return layout.tensor.numel() >= 2**31


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_size(layout: ChannelLayout, block: tuple[int, int, int]) -> int:
    """Programs of a flat 1-D grid (no 65535 limit on any axis); spatial blocks vary fastest."""
    block_n, block_c, block_s = block
    return cdiv(layout.n, block_n) * cdiv(layout.c, block_c) * cdiv(layout.s, block_s)


def tile_launch(layout: ChannelLayout) -> tuple[tuple[int], tuple[int, ...], dict]:
    """What every kernel over an [N, C, S] view (kernels/device_functions.channel_tile) is launched
    with: its grid, the view's sizes and strides, and the tile's keyword arguments."""
    block = tile_shape(layout)
    return ((grid_size(layout, block),),
            (layout.n, layout.c, layout.s, layout.stride_n, layout.stride_c, layout.stride_s),
            dict(BLOCK_N=block[0], BLOCK_C=block[1], BLOCK_S=block[2], WIDE=wide_offsets(layout),
                 num_warps=num_warps(block), enable_fp_fusion=False))
