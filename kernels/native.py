"""The fused neuron on the CPU: kernels/neuron_cpu.c, compiled at first use and called via ctypes.

On a CPU the reference's torch ops take a dozen passes over a layer's potentials; the C kernel
takes one (and OpenMP's threads), which is what brings time-folded evaluation near the float
ANN's speed. It is built with the machine's C compiler (`$CC`, else cc) into a cache folder
(`$ANN2SNN_CACHE`, else ~/.cache/ann2snn), keyed by the source, the flags, the compiler and the
CPU, and written atomically, so concurrent first uses are safe. Without a compiler, or with
ANN2SNN_NATIVE=0, `native_neuron_available()` is False and fire_fused takes the reference.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..levels import spike_code_dtype

from .layout import ChannelLayout, channel_layout
from .neuron_reference import NeuronOutput, as_channel_tensor, check_neuron_args

SOURCE = Path(__file__).with_name("neuron_cpu.c")
HEADER = Path(__file__).with_name("cpu_kernel.h")   # included by every C kernel here
# Compiler flags, tried in order. -march=native: the cache key carries the CPU's identity, so a
# shared cache never hands a build to a CPU that lacks its instructions. -ffp-contract=off: no
# fused multiply-add (exactness). The second set (one thread, generic instructions) is for
# compilers without OpenMP or -march=native, such as Apple's clang.
FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c11"),
    ("-O3", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"),
)
# Neurons per work item of the C kernel: enough to amortize a dispatch and fill the vector lanes,
# few enough to give every thread many items.
ITEM_NEURONS = 4096


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its feature flags (Linux), else the arch."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _cache_dir() -> Path:
    root = os.environ.get("ANN2SNN_CACHE") or Path.home() / ".cache" / "ann2snn"
    return Path(root) / "kernels"


def _build(source: Path, compiler: str, flags: tuple[str, ...]) -> Path:
    """The shared library for this source, flags, compiler and CPU: from the cache, else compiled."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    text = source.read_text() + HEADER.read_text()
    key = hashlib.sha256("\0".join([text, " ".join(flags), version, _cpu_identity()]).encode())
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".building-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, str(source), "-o", partial], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
        os.replace(partial, target)   # atomic: a concurrent build loses nothing but time
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.lru_cache(maxsize=None)
def load_native(source: Path, user: str) -> ctypes.CDLL | None:
    """The compiled `source` (a C file of kernels/), or None: no compiler, or the build failed,
    warned once, naming `user` (what then runs its slower PyTorch reference)."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn(f"no C compiler (set CC): {user} runs its slower PyTorch reference", RuntimeWarning,
                      stacklevel=3)
        return None
    errors = []
    for flags in FLAG_SETS:
        try:
            return ctypes.CDLL(str(_build(source, compiler, flags)))
        except (OSError, RuntimeError) as error:
            errors.append(error)
    warnings.warn(f"building kernels/{source.name} failed ({errors[0]}): {user} runs its slower "
                  "PyTorch reference", RuntimeWarning, stacklevel=3)
    return None


def native_function(source: Path, user: str, symbol: str, argtypes: list) -> ctypes._CFuncPtr | None:
    """The int-returning C function `symbol` of the compiled `source`, or None (see load_native)."""
    library = load_native(source, user)
    if library is None:
        return None
    function = getattr(library, symbol)
    function.restype = ctypes.c_int
    function.argtypes = argtypes
    return function


@functools.lru_cache(maxsize=None)
def _kernel() -> ctypes._CFuncPtr | None:
    """The neuron kernel, ann2snn_fire_f32, or None."""
    return native_function(SOURCE, "the CPU neuron", "ann2snn_fire_f32",
                           [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_int, ctypes.c_int64]
                           + [ctypes.c_int] * 3)


def row_walk(x: Tensor) -> tuple[ChannelLayout, bool, int]:
    """How the C kernels walk an [N, C, *spatial] tensor: its dense layout (NCHW or channels-last,
    copied to NCHW if neither), whether rows run over C (channels-last) rather than S, and the rows
    of a work item (about ITEM_NEURONS elements)."""
    layout = channel_layout(x)
    # rows along the unit-stride axis; with both unit-stride (S = 1), along the longer one
    rows_over_c = layout.stride_c == 1 and (layout.stride_s != 1 or layout.c > layout.s)
    if layout.stride_s != 1 and not (rows_over_c and layout.stride_s == layout.c):
        layout = channel_layout(x.contiguous())   # dense, but neither NCHW nor channels-last
        rows_over_c = False
    run = layout.c if rows_over_c else layout.s    # elements per row
    return layout, rows_over_c, max(1, ITEM_NEURONS // run)


def row_walk_by_channel(x: Tensor) -> tuple[ChannelLayout, bool, int]:
    """`row_walk` for kernels that take no channel stride and find row r of a sample at r * S (or
    its channels adjacent): a dense layout with N inside C (a permuted [C, N, S]) is copied first."""
    layout, rows_over_c, rows_per_item = row_walk(x)
    if not rows_over_c and layout.c > 1 and layout.stride_c != layout.s:
        layout, rows_over_c, rows_per_item = row_walk(x.contiguous())
    return layout, rows_over_c, rows_per_item


def channel_run(values: Tensor, channels: int, copies: int, dtype: torch.dtype) -> Tensor:
    """A per-channel constant (one value, or [C]) as a contiguous CPU array of `copies` x C values:
    rows over S read one per row; rows over C walk runs of `copies` positions with per-element
    values, so they get that many copies end to end."""
    return values.to(torch.device("cpu"), dtype).reshape(-1).expand(channels).repeat(copies)


def native_neuron_enabled() -> bool:
    """False when ANN2SNN_NATIVE is 0 / false / no / off (read at every call)."""
    return os.environ.get("ANN2SNN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def native_neuron_available() -> bool:
    """Whether the C kernel is enabled and built (building it at the first call)."""
    return native_neuron_enabled() and _kernel() is not None


def native_neuron_supports(potential: Tensor) -> bool:
    """Whether `fire_fused` can send this potential to the C kernel: float32 on the CPU, no autograd."""
    return (potential.device.type == "cpu" and potential.dtype == torch.float32
            and not (torch.is_grad_enabled() and potential.requires_grad) and native_neuron_available())


def fire_fused_native(potential: Tensor, theta: Tensor | float, membrane_offset: Tensor | float | None,
                      levels: int, timesteps: int, *, want_levels: bool = False,
                      per_sample_counts: bool = True, per_channel_counts: bool = True) -> NeuronOutput:
    """`fire_fused` on the C kernel (float32 CPU potentials; see native_neuron_supports)."""
    check_neuron_args(potential, levels, timesteps)
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the native CPU neuron could not be built (see the warning when it was first tried)")
    if potential.device.type != "cpu" or potential.dtype != torch.float32:
        raise TypeError(f"the native neuron takes float32 CPU potentials, got {potential.dtype} on {potential.device}")
    layout, rows_over_c, rows_per_item = row_walk(potential)
    copies = rows_per_item if rows_over_c else 1
    theta_c = channel_run(as_channel_tensor(theta, layout.tensor, "theta"), layout.c, copies, torch.float32)
    offset_c = channel_run(as_channel_tensor(membrane_offset, layout.tensor, "membrane_offset"), layout.c, copies,
                           torch.float32)
    tile = copies * layout.c
    value = layout.empty_like(torch.float32)
    codes = layout.empty_like(spike_code_dtype(timesteps)) if want_levels else None
    threads = max(1, torch.get_num_threads())
    scratch = torch.zeros(threads, layout.n + tile, dtype=torch.int64)
    if potential.numel():
        with torch.profiler.record_function("ann2snn::fire_fused_native"):   # ctypes calls are no aten ops
            status = kernel(
                layout.tensor.data_ptr(), theta_c.data_ptr(), offset_c.data_ptr(), value.data_ptr(),
                codes.data_ptr() if codes is not None else None, scratch.data_ptr(),
                layout.n, layout.c, layout.s, layout.stride_n, layout.stride_c, layout.stride_s,
                int(rows_over_c), rows_per_item, timesteps, levels, threads)
        if status != 0:
            raise ValueError(f"kernels/neuron_cpu.c refused T={timesteps}")
    counts = scratch.sum(0)
    return NeuronOutput(value=value, levels=codes,
                        channel_spikes=counts[layout.n:].view(copies, layout.c).sum(0) if per_channel_counts else None,
                        sample_spikes=counts[:layout.n] if per_sample_counts else None)
