"""How the kernels walk an activation tensor: as [N, C, S] with strides, in tiles.

An activation of shape [N, C, *spatial] is stored either NCHW-contiguous (spatial stride 1) or
channels-last (channel stride 1). Both are a 3-D view [N, C, S] once the spatial dimensions are
merged, so one kernel serves both and writes its outputs in the input's own memory format.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

# Elements per program: large enough to hide memory latency, small enough for registers.
TILE_ELEMENTS = 4096
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


def _non_overlapping_and_dense(x: Tensor) -> bool:
    """Every element has its own address and the addresses fill one block (no expand, no gaps)."""
    expected = 1
    for size, stride in sorted((p for p in zip(x.shape, x.stride()) if p[0] != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _merged_spatial_stride(x: Tensor) -> int | None:
    """The stride of the merged spatial dimension, or None when the spatial dims do not merge."""
    dims = [(x.shape[d], x.stride(d)) for d in range(2, x.dim()) if x.shape[d] != 1]
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
    stride_s = _merged_spatial_stride(x) if _non_overlapping_and_dense(x) else None
    if stride_s is None:
        x = x.contiguous()
        stride_s = 1
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    return ChannelLayout(x, x.shape[0], x.shape[1], spatial, x.stride(0), x.stride(1), stride_s)


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


def tile_shape(layout: ChannelLayout, tile: int = TILE_ELEMENTS) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_S): the unit-stride axis first, so loads coalesce, then the other
    of channel and space, then the batch with what is left of the budget."""
    spatial_first = layout.s > 1 and layout.stride_s == 1
    first, second = (layout.s, layout.c) if spatial_first else (layout.c, layout.s)
    block_first = _block(first, tile, smallest=UNIT_STRIDE_RUN)
    block_second = _block(second, tile // block_first)
    block_n = _block(layout.n, tile // (block_first * block_second))
    if spatial_first:
        return block_n, block_second, block_first
    return block_n, block_first, block_second


def num_warps(block: tuple[int, int, int]) -> int:
    """Warps per program: about 16 elements per thread."""
    elements = block[0] * block[1] * block[2]
    return max(1, min(8, elements // 512))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_size(layout: ChannelLayout, block: tuple[int, int, int]) -> int:
    """Programs of a flat 1-D grid (no 65535 limit on any axis); spatial blocks vary fastest."""
    block_n, block_c, block_s = block
    return cdiv(layout.n, block_n) * cdiv(layout.c, block_c) * cdiv(layout.s, block_s)
