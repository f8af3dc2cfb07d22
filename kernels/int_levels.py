"""The integer neuron of the time-folded evaluator: int32 accumulators to levels, in one pass.

A quantized layer's requantization is, per channel c, K ascending integer thresholds
(ann2snn.runtime.integer.integer_thresholds), and the level of an accumulator A is
lo + #{k : t[c, k] <= A} (the reference, kernels/int_levels_reference.py, takes it by one
torch.searchsorted over all channels, which costs more than the integer conv before it). Here
each channel's thresholds are padded with UNREACHABLE to 2^STEPS - 1, STEPS = bit length of K,
and the count is a branch-free binary search of STEPS probes per element: in C on the CPU
(kernels/int_levels_cpu.c, built by kernels/native.py) and in Triton on CUDA. The same pass can
count the spikes per sample, popcount(level) summed, which evaluate reports. (Up to 32
thresholds the C kernel compares with each instead, see COUNT_MAX_THRESHOLDS.)

API for a layer run many times (the integer SNN):
- `IntegerLevels(thresholds, lo, offset=None)` checks the thresholds and lays them out once for
  every kernel; `neuron(A, sample_spikes=False) -> IntLevels` then does no Python-side conversion.
  `offset` [C] is added to A exactly, by taking it from the thresholds (a bias the layer left out).
- `levels_fused(A, thresholds, lo, sample_spikes=False)` is the one-call form (it builds one).
- kernels/int_layer_levels.py's `IntegerLayer` is the whole step, int8 layer and neuron.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..levels import popcount_sum_
from .device_functions import channel_tile, popcount, tile_sum
from .dispatch import lazy_jit, use_triton
from .int_levels_reference import UNREACHABLE, levels_from_thresholds
from .layout import channel_layout, tile_launch
from .native import native_function, native_neuron_enabled, row_walk_by_channel

# triton.language, bound when a kernel is first launched (kernels/dispatch.py: LazyKernel)
tl = None

__all__ = ["IntLevels", "int_levels_native_available", "levels_fused", "levels_fused_native",
           "levels_fused_reference", "levels_fused_triton"]

SOURCE = Path(__file__).with_name("int_levels_cpu.c")
# Up to this many thresholds the C kernel compares an accumulator with each, vectorized over the
# row, which measures faster than the search's gathers (bench/int_kernels.py, K = 15).
COUNT_MAX_THRESHOLDS = 32
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class IntLevels(NamedTuple):
    """levels: the accumulator's levels in its shape and memory format, in `level_dtype`.
    sample_spikes: int64 [N], popcount(level) summed per sample, or None."""

    levels: Tensor
    sample_spikes: Tensor | None


def level_dtype(lo: int, hi: int) -> torch.dtype:
    """The narrowest of uint8, int16, int32 holding every level of lo..hi."""
    for dtype in (torch.uint8, torch.int16):
        if torch.iinfo(dtype).min <= lo and hi <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def _check_thresholds(thresholds: Tensor, channels: int | None = None) -> None:
    """Refuse thresholds that are not [C, K] ascending integers in INT32_MIN..UNREACHABLE (C =
    `channels` where given), which the paths would not compute alike."""
    if (thresholds.dim() != 2 or (channels is not None and thresholds.shape[0] != channels)
            or thresholds.is_floating_point()
            or not bool((thresholds[:, 1:] >= thresholds[:, :-1]).all())
            or (thresholds.numel() and not INT32_MIN <= int(thresholds.min()) <= int(thresholds.max()) <= UNREACHABLE)):
        expected = "C" if channels is None else f"C={channels}"
        raise ValueError(f"levels_fused: thresholds must be ascending integers in -2^31..2^31 [{expected}, K], got "
                         f"{thresholds.dtype} {tuple(thresholds.shape)}")


def _check_accumulator(accumulator: Tensor) -> None:
    if accumulator.dtype != torch.int32 or accumulator.dim() < 2:
        raise TypeError(f"levels_fused takes an int32 [N, C, *spatial] accumulator, got {accumulator.dtype} "
                        f"{tuple(accumulator.shape)}")


def _padded(thresholds: Tensor, device: torch.device) -> tuple[Tensor, int]:
    """The thresholds as int64 [C, 2^steps] padded with UNREACHABLE, and steps (K's bit length)."""
    channels, per_channel = thresholds.shape
    steps = per_channel.bit_length()
    padded = torch.full((channels, 1 << steps), UNREACHABLE, dtype=torch.int64, device=device)
    padded[:, :per_channel] = thresholds
    return padded, steps


@functools.lru_cache(maxsize=None)
def _kernel() -> ctypes._CFuncPtr | None:
    """The C kernel, ann2snn_int_levels, or None."""
    return native_function(SOURCE, "the integer neuron", "ann2snn_int_levels",
                           [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
                           + [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int32]
                           + [ctypes.c_int] * 3)


def int_levels_native_available() -> bool:
    """Whether the C kernel is enabled (ANN2SNN_NATIVE) and built (building it at the first call)."""
    return native_neuron_enabled() and _kernel() is not None


class IntegerLevels:
    """The integer neuron of one layer, its thresholds checked and laid out once for every kernel.

    `IntegerLevels(thresholds, lo, offset=None)(A, sample_spikes=False) -> IntLevels` gives the
    levels lo + #{k : thresholds[c, k] <= A + offset[c]} of an int32 accumulator [N, C, *spatial],
    i.e. `levels_fused(A + offset, thresholds, lo)`. `offset` (int [C]) is what the layer left out
    of A, such as its bias: it is taken from the thresholds here, exactly in int64, so no pass adds
    it to A. Wherever A + offset fits int32 the levels are those of the sum.
    """

    def __init__(self, thresholds: Tensor, lo: int, offset: Tensor | None = None) -> None:
        _check_thresholds(thresholds)
        thresholds = thresholds.to(torch.int64)
        if offset is not None:
            # below INT32_MIN every int32 reaches a threshold, at 2^31 none: the clamp keeps both
            thresholds = (thresholds - offset.to(torch.int64).reshape(-1, 1)).clamp(INT32_MIN, UNREACHABLE)
        self.thresholds, self.lo = thresholds, lo
        self.channels, self.per_channel = thresholds.shape
        self.level_dtype = level_dtype(lo, lo + self.per_channel)
        self._native_layouts: dict[int, tuple] = {}   # copies -> _native_thresholds
        self._padded: dict[torch.device, tuple[Tensor, int]] = {}

    def __call__(self, accumulator: Tensor, *, sample_spikes: bool = False) -> IntLevels:
        return self.run(accumulator, sample_spikes)

    def check(self, accumulator: Tensor, sample_spikes: bool, exact_float: bool = False) -> None:
        """Refuse an accumulator that is not [N, C, ...] int32 (or float32 with exact_float, see
        run), or spike counts of negative levels."""
        dtypes = (torch.int32, torch.float32) if exact_float else (torch.int32,)
        if accumulator.dtype not in dtypes or accumulator.dim() < 2 or accumulator.shape[1] != self.channels:
            _check_accumulator(accumulator)
            _check_thresholds(self.thresholds, accumulator.shape[1])
        if sample_spikes and self.lo < 0:
            raise ValueError(f"levels_fused: spike counts need levels >= 0, got lo = {self.lo}")

    def run(self, accumulator: Tensor, sample_spikes: bool, exact_float: bool = False) -> IntLevels:
        """The levels by Triton, the C kernel or the reference (see levels_fused). exact_float: the
        accumulator may be float32 holding integers of magnitude < 2^24 (IntConv2d's oneDNN output),
        which the C kernel reads as it is; the caller vouches for it, as checking would take a pass."""
        self.check(accumulator, sample_spikes, exact_float)
        if use_triton(accumulator):
            return self.triton(accumulator.to(torch.int32), sample_spikes)
        if accumulator.device.type == "cpu" and int_levels_native_available():
            return self.native(accumulator, sample_spikes)
        return self.reference(accumulator.to(torch.int32), sample_spikes)

    def reference(self, accumulator: Tensor, sample_spikes: bool) -> IntLevels:
        """By the reference's torch.searchsorted (and popcount_sum_ for the spikes)."""
        levels = levels_from_thresholds(accumulator, self.thresholds, self.lo)
        spikes = None
        if sample_spikes:
            spikes = popcount_sum_(levels.to(torch.float64), self.lo + self.per_channel, tuple(range(1, levels.dim())))
        return IntLevels(levels.to(self.level_dtype), spikes)

    def _native_thresholds(self, copies: int) -> tuple:
        """(search, steps, by_level, unreached) for the C kernel: up to COUNT_MAX_THRESHOLDS the
        level-major int32 thresholds (2^31 clamped, counted per channel), `copies` times end to end
        (rows over C count runs of that many positions), else the padded search rows."""
        if copies not in self._native_layouts:
            if self.per_channel <= COUNT_MAX_THRESHOLDS:
                by_level = self.thresholds.clamp(max=INT32_MAX).to(torch.int32).t().repeat(1, copies).contiguous()
                unreached = (self.thresholds == UNREACHABLE).sum(1, dtype=torch.int32).repeat(copies)
                self._native_layouts[copies] = (None, 0, by_level, unreached)
            else:
                self._native_layouts[copies] = (*_padded(self.thresholds, torch.device("cpu")), None, None)
        return self._native_layouts[copies]

    def native(self, accumulator: Tensor, sample_spikes: bool) -> IntLevels:
        """On the C kernel: CPU accumulators, int32 or float32 (checked by `run`)."""
        kernel = _kernel()
        if kernel is None:
            raise RuntimeError("the native integer neuron could not be built (see the warning when it was first tried)")
        if accumulator.device.type != "cpu":
            raise TypeError(f"the native integer neuron takes CPU accumulators, got {accumulator.device}")
        layout, rows_over_c, rows_per_item = row_walk_by_channel(accumulator)
        search, steps, by_level, unreached = self._native_thresholds(rows_per_item if rows_over_c else 1)
        levels = layout.empty_like(self.level_dtype)
        threads = max(1, torch.get_num_threads())
        scratch = torch.zeros(threads, layout.n, dtype=torch.int64) if sample_spikes else None
        if accumulator.numel():
            with torch.profiler.record_function("ann2snn::levels_fused_native"):   # ctypes calls are no aten ops
                kernel(layout.tensor.data_ptr(),
                       *(x.data_ptr() if x is not None else None for x in (search, by_level, unreached)),
                       levels.data_ptr(), scratch.data_ptr() if scratch is not None else None, layout.n, layout.c,
                       layout.s, layout.stride_n, int(rows_over_c), rows_per_item, steps, self.per_channel, self.lo,
                       levels.element_size(), int(accumulator.dtype == torch.float32), threads)
        return IntLevels(levels, scratch.sum(0) if scratch is not None else None)

    def triton(self, accumulator: Tensor, sample_spikes: bool) -> IntLevels:
        """On the Triton kernel, whatever the device (CPU needs TRITON_INTERPRET=1)."""
        if accumulator.device not in self._padded:
            self._padded[accumulator.device] = _padded(self.thresholds, accumulator.device)
        padded, steps = self._padded[accumulator.device]
        layout = channel_layout(accumulator)
        levels = layout.empty_like(self.level_dtype)
        sample = torch.zeros(layout.n, dtype=torch.int64, device=accumulator.device) if sample_spikes else None
        if accumulator.numel():
            grid, view, tile = tile_launch(layout)
            # an unused count gets a harmless pointer: WANT_SAMPLE compiles its add away
            _levels_kernel[grid](layout.tensor, padded, levels, levels if sample is None else sample, *view,
                                 LO=self.lo, STEPS=steps, WANT_SAMPLE=sample_spikes, **tile)
        return IntLevels(levels, sample)


@lazy_jit
def _levels_kernel(
    acc_ptr, thresholds_ptr, levels_ptr, sample_ptr,
    N, C, S, stride_n, stride_c, stride_s,        # the [N, C, S] view shared by the accumulator and levels
    LO: tl.constexpr,
    STEPS: tl.constexpr,                          # probes of the binary search; rows of 2^STEPS thresholds
    WANT_SAMPLE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WIDE: tl.constexpr,
):
    n, c, mask_n, mask_c, mask, offsets = channel_tile(N, C, S, stride_n, stride_c, stride_s,
                                                       BLOCK_N, BLOCK_C, BLOCK_S, WIDE)
    a = tl.load(acc_ptr + offsets, mask=mask, other=0).to(tl.int64)
    row = c[None, :, None].to(tl.int64) * (1 << STEPS)
    position = tl.where(mask, 0, 0)
    for step in tl.static_range(STEPS):
        half = 1 << (STEPS - 1 - step)
        t = tl.load(thresholds_ptr + row + position + (half - 1), mask=mask, other=0)
        position += tl.where(t <= a, half, 0)
    level = position + LO
    tl.store(levels_ptr + offsets, level.to(levels_ptr.dtype.element_ty), mask=mask)
    if WANT_SAMPLE:
        count = tl.where(mask, popcount(level), 0)
        per_sample = tile_sum(tile_sum(count, 2), 1)
        tl.atomic_add(sample_ptr + n, per_sample.to(tl.int64), mask=mask_n, sem="relaxed")




def levels_fused_reference(accumulator: Tensor, thresholds: Tensor, lo: int, *,
                           sample_spikes: bool = False) -> IntLevels:
    """`levels_fused` by the reference's torch.searchsorted (and popcount_sum_ for the spikes)."""
    neuron = IntegerLevels(thresholds, lo)
    neuron.check(accumulator, sample_spikes)
    return neuron.reference(accumulator, sample_spikes)


def levels_fused_native(accumulator: Tensor, thresholds: Tensor, lo: int, *,
                        sample_spikes: bool = False) -> IntLevels:
    """`levels_fused` on the C kernel (int32 CPU accumulators)."""
    neuron = IntegerLevels(thresholds, lo)
    neuron.check(accumulator, sample_spikes)
    return neuron.native(accumulator, sample_spikes)


def levels_fused_triton(accumulator: Tensor, thresholds: Tensor, lo: int, *,
                        sample_spikes: bool = False) -> IntLevels:
    """`levels_fused` on the Triton kernel, whatever the device (CPU needs TRITON_INTERPRET=1)."""
    neuron = IntegerLevels(thresholds, lo)
    neuron.check(accumulator, sample_spikes)
    return neuron.triton(accumulator, sample_spikes)


def levels_fused(accumulator: Tensor, thresholds: Tensor, lo: int, *, sample_spikes: bool = False) -> IntLevels:
    """The levels lo + #{k : thresholds[c, k] <= A} of an int32 accumulator [N, C, *spatial] (NCHW,
    channels-last or [N, C]; other layouts are copied first), thresholds [C, K] ascending integers
    (ann2snn.runtime.integer.integer_thresholds). Returns IntLevels: the levels in the input's
    memory format as uint8, int16 or int32 (`level_dtype`), and with `sample_spikes` the spikes
    per sample. Runs Triton where `use_triton` says so, the C kernel on the CPU where it is built,
    else the reference; all give the same integers. A layer run many times should build its
    `IntegerLevels` once (it checks and lays out the thresholds)."""
    return IntegerLevels(thresholds, lo)(accumulator, sample_spikes=sample_spikes)
