"""levels_fused (kernels/int_levels.py): the C and Triton kernels give the reference's levels and spikes.

The reference is levels_from_thresholds (kernels/int_levels_reference.py), the integer neuron
ann2snn.runtime.integer's thresholds are checked with against onnxruntime. Accumulators sit on,
one below and one above every threshold, and at the ends of int32, so a kernel off by one at any
comparison differs; the Triton kernel runs in Triton's interpreter on a CPU (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ann2snn.kernels import levels_fused, levels_from_thresholds
from ann2snn.kernels.int_levels import (int_levels_native_available, levels_fused_native, levels_fused_reference,
                                        levels_fused_triton)
from ann2snn.kernels.int_levels_reference import UNREACHABLE
from ann2snn.levels import popcount_sum_

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
TRITON = importlib.util.find_spec("triton") is not None
HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None


def _thresholds(channels: int, per_channel: int, gen: torch.Generator) -> torch.Tensor:
    """Ascending int64 [C, K] with repeats; channel 0 starts at INT32_MIN (reached by every A), the
    last channel ends unreachable (UNREACHABLE), as integer_thresholds gives at the ends of int32."""
    t = torch.randint(-3000, 3000, (channels, per_channel), generator=gen)
    t[:, per_channel // 2:] -= torch.randint(0, 2, (channels, 1), generator=gen) * 5000   # runs of repeats
    t = torch.sort(t, 1).values
    t[0, 0] = INT32_MIN
    t[-1, -1] = UNREACHABLE
    return t


def _accumulators(shape: tuple[int, ...], thresholds: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """int32 accumulators [N, C, *spatial]: each a channel's threshold minus 1, itself or plus 1,
    else a random value, INT32_MIN or INT32_MAX."""
    channels, per_channel = thresholds.shape
    numel_per_channel = shape[0] * int(torch.tensor(shape[2:]).prod())
    picks = torch.randint(0, per_channel, (channels, numel_per_channel), generator=gen)
    near = thresholds.gather(1, picks) + torch.randint(-1, 2, picks.shape, generator=gen)
    kind = torch.randint(0, 8, picks.shape, generator=gen)
    near = torch.where(kind == 5, torch.randint(-9000, 9000, picks.shape, generator=gen), near)
    near = torch.where(kind == 6, INT32_MIN, torch.where(kind == 7, INT32_MAX, near))
    near = near.clamp(INT32_MIN, INT32_MAX).to(torch.int32)
    per_sample = near.reshape(channels, shape[0], *shape[2:])
    return per_sample.movedim(0, 1).contiguous()


LAYOUTS = ["nchw", "channels_last", "linear", "batch1", "sliced", "transposed"]


def _case(layout: str, per_channel: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = {"linear": (6, 40), "batch1": (1, 12, 5, 4)}.get(layout, (3, 12, 5, 4))
    if layout == "sliced":
        shape = (3, 12, 10, 4)
    t = _thresholds(shape[1], per_channel, gen)
    a = _accumulators(shape, t, gen)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        a = a[:, :, ::2]
    elif layout == "transposed":
        a = a.transpose(2, 3)
    return a, t


@pytest.fixture(params=[
    pytest.param("native", marks=pytest.mark.skipif(not HAS_CC, reason="no C compiler")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="triton is not installed")),
    "dispatch",
])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Each kernel, called directly (the Triton one in its interpreter), and the public dispatch."""
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return levels_fused_triton
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if request.param == "native":
        assert int_levels_native_available()
        return levels_fused_native
    return levels_fused


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_channel", [1, 3, 15, 255])
def test_levels_equal_the_reference(path, layout: str, per_channel: int) -> None:
    a, t = _case(layout, per_channel, seed=per_channel)
    lo = 0 if per_channel == 255 else 7
    want = levels_from_thresholds(a, t, lo)
    got = path(a, t, lo, sample_spikes=True)
    assert got.levels.dtype == torch.uint8 and got.levels.shape == a.shape
    assert torch.equal(got.levels, want.to(torch.uint8))
    assert got.levels.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    dims = tuple(range(1, a.dim()))
    assert torch.equal(got.sample_spikes, popcount_sum_(want.double(), lo + per_channel, dims))
    # every level of lo..lo+K occurs, so the check sees each comparison
    assert set(want.unique().tolist()) >= {lo, lo + per_channel - 1}


@pytest.mark.parametrize("lo, hi, dtype", [(-128, 127, torch.int16), (0, 300, torch.int16),
                                            (-40000, -39990, torch.int32)])
def test_wider_levels(path, lo: int, hi: int, dtype: torch.dtype) -> None:
    a, t = _case("channels_last", hi - lo, seed=hi)
    got = path(a, t, lo)
    assert got.levels.dtype == dtype and got.sample_spikes is None
    assert torch.equal(got.levels, levels_from_thresholds(a, t, lo).to(dtype))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_an_off_by_one_kernel_fails_the_comparison(path, layout: str) -> None:
    """A kernel comparing t < A (thresholds one higher), t <= A + 1 or counting from lo + 1
    differs from the reference on these accumulators."""
    a, t = _case(layout, 15, seed=3)
    want = levels_from_thresholds(a, t, 0)
    assert torch.equal(path(a, t, 0).levels.long(), want)
    higher, lower = (t + 1).clamp(max=UNREACHABLE), (t - 1).clamp(min=INT32_MIN)
    for broken in (path(a, higher, 0).levels, path(a, lower, 0).levels, path(a, t, 1).levels):
        assert not torch.equal(broken.long(), want)


def test_no_native_build_takes_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANN2SNN_NATIVE", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not int_levels_native_available()
    a, t = _case("nchw", 15, seed=5)
    got, want = levels_fused(a, t, 0, sample_spikes=True), levels_fused_reference(a, t, 0, sample_spikes=True)
    assert torch.equal(got.levels, want.levels) and torch.equal(got.sample_spikes, want.sample_spikes)


def test_empty_batch(path) -> None:
    t = torch.tensor([[0, 5]])
    got = path(torch.zeros(0, 1, 3, dtype=torch.int32), t, 0, sample_spikes=True)
    assert got.levels.shape == (0, 1, 3) and got.sample_spikes.shape == (0,)


@pytest.mark.parametrize("accumulator, thresholds, lo, spikes, message", [
    (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), 0, False, "int32"),
    (torch.zeros(2, 3, dtype=torch.int32), torch.tensor([[0, 1], [1, 0], [0, 0]]), 0, False, "ascending"),
    (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int64), 0, False, "C=3"),
    (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, 2), 0, False, "integers"),
    (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64), -1, True, "levels >= 0"),
])
def test_refusals(path, accumulator, thresholds, lo: int, spikes: bool, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        path(accumulator, thresholds, lo, sample_spikes=spikes)


_FAILED_BUILD = """
import warnings, torch
from ann2snn.kernels import levels_fused, levels_from_thresholds
a = torch.tensor([[-5, 0, 5, 9]], dtype=torch.int32).reshape(1, 1, 4)
t = torch.tensor([[0, 5, 6]])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = levels_fused(a, t, 0).levels
print(torch.equal(got.long(), levels_from_thresholds(a, t, 0)), got.tolist(), *(str(w.message) for w in caught))
"""


@pytest.mark.parametrize("compiler, message", [("false", "building kernels/int_levels_cpu.c failed"),
                                               ("no-such-compiler", "no C compiler (set CC)")])
def test_a_failed_build_warns_once_and_takes_the_reference(tmp_path, compiler: str, message: str) -> None:
    env = {**os.environ, "ANN2SNN_CACHE": str(tmp_path), "CC": compiler}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _FAILED_BUILD], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True [[[0, 1, 2, 3]]] ") and message in done.stdout
    assert "the integer neuron runs its slower PyTorch reference" in done.stdout
