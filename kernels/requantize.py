"""The requantization of a neuron site in one pass: its terms' accumulators to its levels (issue 27).

A neuron of the integer SNN reads one accumulator, or the terms of a residual sum, and computes
its level as the file's QDQ graph does (kernels/requantize_reference.py):
    V = sum_i float32(A_i + add_i) * scale_i   (float32, in order)
    level = clamp(round_half_even(V / theta), low, high) - low
On the CPU that is one C pass (kernels/requantize_cpu.c) which also counts the spikes per sample,
popcount(level); it evaluates the expression itself, in float32 as written, so it gives what the
integer thresholds of a single accumulator give (runtime/integer.py: site_thresholds) with a
handful of vector operations per element instead of a comparison per level. Elsewhere the
reference runs.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from .int_layers import EXACT_FLOAT32
from .int_levels import IntLevels, level_dtype
from .native import channel_run, native_function, native_neuron_enabled, row_walk_by_channel
from .requantize_reference import Requantization, Term, potential_of, quantize_, requantize_levels_reference

__all__ = ["Requantization", "Requantizer", "Term", "requantize_levels", "requantize_levels_native",
           "requantize_levels_reference"]

SOURCE = Path(__file__).with_name("requantize_cpu.c")
MAX_TERMS = 8   # requantize_cpu.c's MAX_TERMS
_DTYPES = {torch.uint8: 0, torch.int32: 1, torch.float32: 2}
_BOUND = 2 ** 22   # the C pass rounds by the float32 magic number, exact below this


@functools.lru_cache(maxsize=None)
def _kernel() -> ctypes._CFuncPtr | None:
    """The C kernel, ann2snn_requantize, or None."""
    return native_function(SOURCE, "the integer requantization", "ann2snn_requantize",
                           [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                                                    ctypes.c_void_p, ctypes.c_void_p]
                           + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int])


class Requantizer:
    """A site's requantization with its terms' constants prepared once for every call:
    `Requantizer(scales, adds, requantization)(values, sample_spikes=False) -> IntLevels` is
    `requantize_levels([Term(v, s, a) for ...], requantization)`."""

    def __init__(self, scales: list[Tensor], adds: list[Tensor | None], requantization: Requantization) -> None:
        if not scales or len(scales) != len(adds):
            raise ValueError(f"Requantizer: one scale and one add (or None) per term, got {len(scales)} and "
                             f"{len(adds)}")
        self.scales, self.adds, self.requantization = scales, adds, requantization
        self.top = requantization.high - requantization.low
        self.level_dtype = level_dtype(0, self.top)
        self._large_add = [a is not None and int(a.abs().max()) >= EXACT_FLOAT32 for a in adds]
        self._native_constants: dict[tuple[int, int], tuple] = {}   # (C, copies) -> ctypes arrays

    def __call__(self, values: list[Tensor], *, sample_spikes: bool = False) -> IntLevels:
        shape = values[0].shape
        if len(values) != len(self.scales) or values[0].dim() < 2 or any(v.shape != shape for v in values):
            raise ValueError(f"requantize_levels: {len(self.scales)} terms of one [N, C, *spatial] shape, got "
                             f"{[tuple(v.shape) for v in values]}")
        if self.native_supports(values):
            return self.native(values, sample_spikes)
        terms = [Term(v, s, a) for v, s, a in zip(values, self.scales, self.adds)]
        return IntLevels(*requantize_levels_reference(terms, self.requantization, sample_spikes=sample_spikes))

    def float_levels(self, values: list[Tensor]) -> Tensor:
        """The levels in float32 by the reference's arithmetic, for a max pool after the site (it
        commutes with the monotone requantization and then takes each window's largest)."""
        terms = [Term(v, s, a) for v, s, a in zip(values, self.scales, self.adds)]
        return quantize_(potential_of(terms), self.requantization.theta, self.requantization.low,
                         self.requantization.high)

    def native_supports(self, values: list[Tensor]) -> bool:
        """Whether the C kernel takes these values (CPU, uint8 / int32 / float32, built and enabled)."""
        return (native_neuron_enabled() and len(values) <= MAX_TERMS
                and all(v.device.type == "cpu" and v.dtype in _DTYPES for v in values)
                and -_BOUND < self.requantization.low <= self.requantization.high < _BOUND and _kernel() is not None)

    def _constants(self, channels: int, copies: int) -> tuple:
        """(adds, scales, theta) for the C kernel: per-channel arrays `copies` times end to end (rows
        over C requantize runs of that many positions), and ctypes arrays of their pointers."""
        key = (channels, copies)
        if key not in self._native_constants:
            adds = [None if a is None else channel_run(a, channels, copies, torch.int32) for a in self.adds]
            scales = [channel_run(s, channels, copies, torch.float32) for s in self.scales]
            theta = channel_run(self.requantization.theta, channels, copies, torch.float32)
            pointers = ctypes.c_void_p * len(scales)
            self._native_constants[key] = (
                (adds, scales, theta), pointers(*(a.data_ptr() if a is not None else None for a in adds)),
                pointers(*(s.data_ptr() for s in scales)), theta.data_ptr())
        return self._native_constants[key]

    def native(self, values: list[Tensor], sample_spikes: bool) -> IntLevels:
        """On the C kernel (CPU values of the dtypes it reads)."""
        kernel = _kernel()
        if kernel is None:
            raise RuntimeError("the native requantization could not be built (see the warning when it was first tried)")
        layout, rows_over_c, rows_per_item = row_walk_by_channel(values[0])
        stride = layout.tensor.stride()
        values = [layout.tensor, *values[1:]]
        for i, v in enumerate(values):
            if v.is_floating_point() and self._large_add[i]:
                v = v.to(torch.int32)   # exact: the C pass adds a large int to an int in int64
            if v.stride() != stride:
                v = torch.empty_strided(layout.tensor.shape, stride, dtype=v.dtype).copy_(v)
            values[i] = v
        _, adds, scales, theta = self._constants(layout.c, rows_per_item if rows_over_c else 1)
        levels = layout.empty_like(self.level_dtype)
        threads = max(1, torch.get_num_threads())
        scratch = torch.zeros(threads, layout.n, dtype=torch.int64) if sample_spikes else None
        if levels.numel():
            status = kernel((ctypes.c_void_p * len(values))(*(v.data_ptr() for v in values)), adds, scales,
                            (ctypes.c_int32 * len(values))(*(_DTYPES[v.dtype] for v in values)), len(values),
                            theta, self.requantization.low, self.requantization.high, levels.data_ptr(),
                            scratch.data_ptr() if scratch is not None else None, layout.n, layout.c, layout.s,
                            layout.stride_n, int(rows_over_c), rows_per_item, levels.element_size(), threads)
            if status != 0:
                raise ValueError(f"kernels/requantize_cpu.c refused {len(values)} terms or levels "
                                 f"{self.requantization.low}..{self.requantization.high}")
        return IntLevels(levels, scratch.sum(0) if scratch is not None else None)


def requantize_levels(terms: list[Term], requantization: Requantization, *, sample_spikes: bool = False) -> IntLevels:
    """The levels of a site (module docstring) in the first term's memory format, in `level_dtype`,
    and with `sample_spikes` the spikes per sample: the C pass on CPU tensors where it is built,
    else the reference. Every term has the first's shape; float32 values must hold integers of
    magnitude < 2^24, which the caller vouches for (checking would take a pass). A site run many
    times should build its `Requantizer` once."""
    return Requantizer([t.scale for t in terms], [t.add for t in terms], requantization)(
        [t.values for t in terms], sample_spikes=sample_spikes)


def requantize_levels_native(terms: list[Term], requantization: Requantization, *,
                             sample_spikes: bool = False) -> IntLevels:
    """`requantize_levels` on the C kernel (CPU values of the dtypes it reads)."""
    return Requantizer([t.scale for t in terms], [t.add for t in terms], requantization).native(
        [t.values for t in terms], sample_spikes)

