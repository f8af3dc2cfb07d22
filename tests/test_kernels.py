"""The Triton kernels of kernels/ against their pure-PyTorch references.

On the CPU the kernels run in Triton's interpreter: the `device` fixture sets TRITON_INTERPRET=1
for the one test only, and kernels/dispatch.py decorates each kernel at launch in the mode asked
for then, so this works whatever imported triton or kernels before (alone, in the full suite,
under pytest-xdist) while every other test keeps the reference path. With CUDA the same tests
run the compiled kernels; without, the kernels are still compiled for sm_90 (in a fresh process).

- fire_fused: levels bit for bit, values and spike counts exactly equal to the reference (the
  evaluator's fire_levels / popcount_levels) and to the simulator's spike trains, for T = 1..8,
  per-layer and per-channel theta, full and capped L, potentials on and next to thresholds,
  2-D and 4-D, channels-last, sizes off the block sizes, every float dtype.
- the C kernel of kernels/native.py (float32 on the CPU) passes the same fused-neuron tests, over
  many work items and threads too; fire_fused takes it on the CPU; its build is cached, and a
  failing or missing compiler falls back to the reference with a warning.
- quant_act_fused: value and spikes exactly equal, gradients of z and lambda within 1e-6
  (relative) of the autograd of QuantClippedActivation with and without the spike surrogate.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

from ann2snn import kernels
from ann2snn.levels import channel_view, fire_msb_first
from ann2snn.kernels import (fire_fused, fire_fused_reference, fire_fused_triton, pack_spikes, quant_act_fused,
                     quant_act_fused_reference, quant_act_fused_triton, unpack_spikes, use_triton)
from ann2snn.kernels.dispatch import lazy_jit
from ann2snn.kernels.native import fire_fused_native, native_neuron_available

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None


TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not TRITON, reason="triton is not installed")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA or not TRITON, reason="no CUDA device")),
]
NATIVE = pytest.param("native", marks=pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                                          reason="no C compiler"))


def _triton_device(name: str, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The device a Triton kernel test runs on; the CPU runs the kernels in Triton's interpreter."""
    if name == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device(name)
    assert use_triton(torch.empty(0, device=dev)), "the kernel path must be the one under test"
    return dev


@pytest.fixture(params=TRITON_DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    return _triton_device(request.param, monkeypatch)


# triton.language, bound when _fma_probe is first launched (kernels/dispatch.py: LazyKernel)
tl = None


@lazy_jit
def _fma_probe(x_ptr, out_ptr):
    x = tl.load(x_ptr)
    tl.store(out_ptr, tl.math.fma(x, x, -(x + x - 1.0)))


def _interpreter_rounds_fma_once() -> bool:
    """Whether Triton's interpreter rounds fma once, as the GPU does: Triton 3.6's multiplies, rounds
    and adds. (1 + 2^-12)^2 - (1 + 2^-11) is 2^-24 exactly; rounding the product first gives 0."""
    x = torch.tensor([1.0 + 2.0**-12])
    out = torch.zeros(1)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _fma_probe[(1,)](x, out)
    finally:
        del os.environ["TRITON_INTERPRET"]
    return out.item() == 2.0**-24


def _fire_device(name: str, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """A Triton device for the fused neuron, whose exactness rests on fma's single rounding
    (kernels/device_functions.fire_levels): an interpreter that rounds twice cannot check it."""
    if name == "cpu" and not _interpreter_rounds_fma_once():
        pytest.skip(f"Triton {importlib.metadata.version('triton')}'s interpreter rounds fma twice")
    return _triton_device(name, monkeypatch)


@pytest.fixture(params=TRITON_DEVICES)
def fire_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    return _fire_device(request.param, monkeypatch)


class FireBackend(NamedTuple):
    device: torch.device
    fire: Callable[..., kernels.NeuronOutput]


@pytest.fixture(params=TRITON_DEVICES + [NATIVE])
def fire_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> FireBackend:
    """A fused-neuron kernel under test: Triton (interpreted on the CPU, compiled on CUDA) or the
    C kernel of kernels/native.py on the CPU."""
    if request.param == "native":
        assert native_neuron_available(), "kernels/neuron_cpu.c must build where a C compiler is"
        return FireBackend(torch.device("cpu"), fire_fused_native)
    return FireBackend(_fire_device(request.param, monkeypatch), fire_fused_triton)


def _shape_for(layout: str) -> tuple[int, ...]:
    # sizes that are no multiple of any block size
    return {"2d": (37, 11), "nchw": (3, 5, 7, 9), "channels_last": (3, 6, 5, 7)}[layout]


def _in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _step(x: torch.Tensor, direction: int) -> torch.Tensor:
    """The float next to x, away from zero for +1 and towards it for -1, in x's own dtype."""
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[x.dtype]
    stepped = ((x.abs().view(ints) + direction).view(x.dtype)) * x.sign()
    return torch.where(x == 0, x, stepped)


def _potentials(shape: tuple[int, ...], theta: torch.Tensor, timesteps: int, dtype: torch.dtype,
                gen: torch.Generator) -> torch.Tensor:
    """Random potentials over [-0.3, 1.2] 2^T theta, a third of them on a threshold k theta or
    one float away from it (where a floor can go wrong)."""
    theta_c = channel_view(theta.to(dtype), len(shape))
    top = 2**timesteps
    v = ((torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 - 0.3) * top).to(dtype) * theta_c
    k = torch.randint(-2, top + 2, shape, generator=gen).to(dtype)
    on = (k * theta_c).to(dtype)
    pick = torch.randint(0, 9, shape, generator=gen)
    v = torch.where(pick == 0, on, v)
    v = torch.where(pick == 1, _step(on, 1), v)
    v = torch.where(pick == 2, _step(on, -1), v)
    return v


def _theta(per_channel: bool, channels: int, gen: torch.Generator) -> torch.Tensor:
    if per_channel:
        return torch.rand(channels, generator=gen, dtype=torch.float64).float() * 0.9 + 0.05
    return torch.tensor(0.3125)


def _offset(kind: str, channels: int, theta: torch.Tensor) -> torch.Tensor | float | None:
    if kind == "none":
        return None
    if kind == "scalar":
        return 0.1
    return (theta.expand(channels) / 2).clone()   # theta / 2: the shift of docs/method.md section 2


def _assert_same_neuron_output(got: kernels.NeuronOutput, want: kernels.NeuronOutput) -> None:
    assert torch.equal(got.levels.cpu(), want.levels.cpu()), "levels differ"
    assert got.value.dtype == want.value.dtype
    assert torch.equal(got.value.cpu(), want.value.cpu()), "values differ"
    assert torch.equal(got.channel_spikes.cpu(), want.channel_spikes.cpu()), "channel spike counts differ"
    assert torch.equal(got.sample_spikes.cpu(), want.sample_spikes.cpu()), "sample spike counts differ"


# ----------------------------------------------------------------------------- fused neuron


@pytest.mark.parametrize("capped", [False, True], ids=["L=2^T-1", "L<2^T-1"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["layer", "channel"])
@pytest.mark.parametrize("timesteps", range(1, 9))
def test_fire_fused_equals_reference(fire_backend: FireBackend, timesteps: int, per_channel: bool,
                                     capped: bool) -> None:
    device = fire_backend.device
    if capped and timesteps == 1:
        pytest.skip("T = 1 has no level count below 2^T - 1")
    levels = 2**timesteps - 3 if capped else 2**timesteps - 1   # odd: what a QDQ source gives
    gen = torch.Generator().manual_seed(timesteps * 4 + per_channel * 2 + capped)
    for layout, offset_kind in [("nchw", "none"), ("2d", "scalar"), ("channels_last", "channel")]:
        shape = _shape_for(layout)
        theta = _theta(per_channel, shape[1], gen)
        v = _in_layout(_potentials(shape, theta, timesteps, torch.float32, gen), layout).to(device)
        offset = _offset(offset_kind, shape[1], theta)
        if isinstance(offset, torch.Tensor):
            offset = offset.to(device)
        got = fire_backend.fire(v, theta.to(device), offset, levels, timesteps, want_levels=True)
        want = fire_fused_reference(v, theta.to(device), offset, levels, timesteps, want_levels=True)
        _assert_same_neuron_output(got, want)
        assert int(got.levels.max()) <= levels
        # spikes per sample only: the evaluator's call
        samples_only = fire_backend.fire(v, theta.to(device), offset, levels, timesteps, want_levels=True,
                                         per_channel_counts=False)
        assert samples_only.channel_spikes is None
        _assert_same_neuron_output(samples_only._replace(channel_spikes=want.channel_spikes), want)
        if layout == "channels_last":
            assert got.value.is_contiguous(memory_format=torch.channels_last)
            assert got.levels.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fire_fused_other_dtypes(fire_device: torch.device, dtype: torch.dtype) -> None:
    device = fire_device
    gen = torch.Generator().manual_seed(7)
    for timesteps, per_channel, capped in [(3, True, True), (8, False, False), (8, True, True)]:
        levels = 2**timesteps - 3 if capped else 2**timesteps - 1
        theta = _theta(per_channel, 6, gen)
        v = _potentials((4, 6, 5, 5), theta, timesteps, dtype, gen).to(device)
        for offset in (None, (theta / 2).to(device)):
            got = fire_fused_triton(v, theta.to(device), offset, levels, timesteps, want_levels=True)
            want = fire_fused_reference(v, theta.to(device), offset, levels, timesteps, want_levels=True)
            _assert_same_neuron_output(got, want)


def test_fire_fused_spikes_are_the_simulators(fire_backend: FireBackend) -> None:
    """The uint8 levels unpack to the spike trains of compare-and-subtract firing, step by step."""
    device = fire_backend.device
    gen = torch.Generator().manual_seed(3)
    timesteps, levels = 5, 29
    theta = _theta(True, 6, gen)
    v = _potentials((4, 6, 3, 5), theta, timesteps, torch.float32, gen)
    offset = theta / 2
    out = fire_backend.fire(v.to(device), theta.to(device), offset.to(device), levels, timesteps, want_levels=True)
    spikes = fire_msb_first(v + channel_view(offset, 4), channel_view(theta, 4), levels, timesteps)
    assert torch.equal(unpack_spikes(out.levels.cpu(), timesteps), spikes.to(torch.uint8))
    per_step = spikes.to(torch.int64)
    assert torch.equal(out.channel_spikes.cpu(), per_step.sum((0, 1, 3, 4)))
    assert torch.equal(out.sample_spikes.cpu(), per_step.sum((0, 2, 3, 4)))


def test_fire_fused_optional_outputs(fire_backend: FireBackend) -> None:
    device, fire = fire_backend
    gen = torch.Generator().manual_seed(5)
    theta = _theta(False, 4, gen)
    v = _potentials((2, 4, 3, 3), theta, 4, torch.float32, gen).to(device)
    want = fire_fused_reference(v, theta, None, 15, 4, want_levels=True)
    bare = fire(v, theta, None, 15, 4, per_sample_counts=False, per_channel_counts=False)
    assert bare.levels is None and bare.channel_spikes is None and bare.sample_spikes is None
    assert torch.equal(bare.value.cpu(), want.value.cpu())
    only_samples = fire(v, theta, None, 15, 4, per_channel_counts=False)
    assert only_samples.channel_spikes is None
    assert torch.equal(only_samples.sample_spikes.cpu(), want.sample_spikes.cpu())
    # a layout that is neither NCHW nor channels-last is copied, never misread
    strided = v.transpose(2, 3)
    _assert_same_neuron_output(fire(strided, theta, 0.05, 15, 4, want_levels=True),
                               fire_fused_reference(strided, theta, 0.05, 15, 4, want_levels=True))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_fire_fused_wide_offsets(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int64 offsets of tensors of 2^31 elements or more, forced on a small one."""
    dev = _fire_device(device, monkeypatch)
    monkeypatch.setattr(kernels.layout, "wide_offsets", lambda layout: True)
    gen = torch.Generator().manual_seed(8)
    theta = _theta(True, 6, gen)
    v = _potentials((3, 6, 5, 7), theta, 5, torch.float32, gen)
    want = fire_fused_reference(v, theta, theta / 2, 31, 5, want_levels=True)
    _assert_same_neuron_output(fire_fused_triton(v.to(dev), theta.to(dev), theta.to(dev) / 2, 31, 5, want_levels=True),
                               want)
    samples_only = fire_fused_triton(v.to(dev), theta.to(dev), theta.to(dev) / 2, 31, 5, want_levels=True,
                                     per_channel_counts=False)
    _assert_same_neuron_output(samples_only._replace(channel_spikes=want.channel_spikes), want)


def test_fire_fused_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ANN2SNN_NATIVE", "0")
    v = torch.randn(2, 3, 4, 4)
    assert not use_triton(v) and not native_neuron_available()
    got = fire_fused(v, torch.tensor(0.25), None, 7, 3, want_levels=True)
    _assert_same_neuron_output(got, fire_fused_reference(v, torch.tensor(0.25), None, 7, 3, want_levels=True))
    with pytest.raises(ValueError, match="timesteps"):
        fire_fused(v, 0.25, None, 7, 17)
    with pytest.raises(ValueError, match="levels"):
        fire_fused(v, 0.25, None, 8, 3)


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_neuron_on_layers_of_many_work_items(threads: int) -> None:
    """The C kernel splits a layer into work items over threads, rows over S (NCHW) or flat runs
    of channel rows (channels-last, [N, C]); every split gives the reference's outputs."""
    gen = torch.Generator().manual_seed(17 + threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, layout in [((5, 7, 40, 40), "nchw"), ((3, 16, 30, 30), "channels_last"),
                              ((3, 70, 9, 11), "channels_last"), ((300, 37), "2d"), ((4, 1, 50, 50), "nchw"),
                              ((4, 5, 1, 1), "channels_last"), ((0, 5, 3, 3), "nchw")]:
            theta = _theta(True, shape[1], gen)
            v = _in_layout(_potentials(shape, theta, 4, torch.float32, gen), layout)
            for offset in (None, theta / 2):
                got = fire_fused_native(v, theta, offset, 13, 4, want_levels=True)
                _assert_same_neuron_output(got, fire_fused_reference(v, theta, offset, 13, 4, want_levels=True))
                assert got.value.stride() == v.stride() and got.levels.stride() == v.stride()
        # dense, but neither NCHW nor channels-last (C, N outermost): fired from a copy
        permuted = _potentials((6, 4, 5, 5), _theta(False, 4, gen), 4, torch.float32, gen).transpose(0, 1)
        _assert_same_neuron_output(fire_fused_native(permuted, 0.3125, None, 15, 4, want_levels=True),
                                   fire_fused_reference(permuted, 0.3125, None, 15, 4, want_levels=True))
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_fire_fused_takes_the_native_kernel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On float32 CPU potentials fire_fused runs the C kernel (the reference, made to fail, is
    never called); other dtypes, autograd and ANN2SNN_NATIVE=0 take the reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []

    def reference(*args, **kwargs):
        calls.append(args[0].dtype)
        return fire_fused_reference(*args, **kwargs)

    monkeypatch.setattr(kernels.neuron, "fire_fused_reference", reference)
    v = torch.randn(2, 3, 4, 4)
    _assert_same_neuron_output(fire_fused(v, 0.25, None, 7, 3, want_levels=True),
                               fire_fused_reference(v, 0.25, None, 7, 3, want_levels=True))
    assert calls == []
    fire_fused(v.double(), 0.25, None, 7, 3)
    fire_fused(v.clone().requires_grad_(), 0.25, None, 7, 3)
    monkeypatch.setenv("ANN2SNN_NATIVE", "0")
    fire_fused(v, 0.25, None, 7, 3)
    assert calls == [torch.float64, torch.float32, torch.float32]
    with pytest.raises(TypeError, match="float32"):
        fire_fused_native(v.half(), 0.25, None, 7, 3)


_NATIVE_SCRIPT = """
import warnings, torch
from ann2snn.kernels import fire_fused, fire_fused_reference
from ann2snn.kernels.native import native_neuron_available
v = torch.randn(3, 4, 5, 5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fire_fused(v, 0.25, None, 15, 4, want_levels=True)
want = fire_fused_reference(v, 0.25, None, 15, 4, want_levels=True)
assert all(torch.equal(a, b) for a, b in zip(out, want))
print(native_neuron_available(), "|".join(str(w.message) for w in caught))
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_native_neuron_build_cache_and_fallbacks(tmp_path: Path) -> None:
    """In fresh processes: the first use builds the library into the cache, the next reuses it;
    a compiler without OpenMP builds it single-threaded; a failing or missing compiler gives one
    warning and the reference's results."""
    def run(**env: str) -> str:
        full = {**os.environ, "ANN2SNN_CACHE": str(tmp_path / "cache"), **env}
        full.pop("TRITON_INTERPRET", None)
        done = subprocess.run([sys.executable, "-c", _NATIVE_SCRIPT], capture_output=True, text=True, env=full,
                              cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(CC="cc") == "True"
    built = sorted((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"   # no partial build left beside it
    stamp = built[0].stat().st_mtime_ns
    assert run(CC="cc") == "True" and built[0].stat().st_mtime_ns == stamp
    # a compiler without OpenMP (Apple's clang): the single-threaded build
    no_openmp = tmp_path / "cc-without-openmp"
    no_openmp.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    no_openmp.chmod(0o755)
    assert run(CC=str(no_openmp), ANN2SNN_CACHE=str(tmp_path / "serial")) == "True"
    failed = run(CC="false", ANN2SNN_CACHE=str(tmp_path / "other"))
    assert failed.startswith("False building kernels/neuron_cpu.c failed")
    assert run(CC="no-such-compiler") == "False no C compiler (set CC): the CPU neuron runs its slower PyTorch reference"


@pytest.mark.parametrize("timesteps", [1, 3, 8])
def test_pack_unpack_round_trip(timesteps: int) -> None:
    gen = torch.Generator().manual_seed(timesteps)
    codes = torch.randint(0, 2**timesteps, (3, 4, 5), generator=gen).to(torch.uint8)
    planes = unpack_spikes(codes, timesteps)
    assert planes.shape == (timesteps, 3, 4, 5) and set(planes.unique().tolist()) <= {0, 1}
    weights = torch.tensor([2 ** (timesteps - 1 - t) for t in range(timesteps)]).reshape(-1, 1, 1, 1)
    assert torch.equal((planes.to(torch.int64) * weights).sum(0), codes.to(torch.int64))   # MSB first
    assert torch.equal(pack_spikes(planes), codes)
    assert torch.equal(unpack_spikes(pack_spikes(planes.float()), timesteps, dtype=torch.float32), planes.float())


# ------------------------------------------------------------------ quantized clipped activation


def _activations(shape: tuple[int, ...], clip: torch.Tensor, levels: int, gen: torch.Generator) -> torch.Tensor:
    """z over [-0.25, 1.25] lambda, a quarter of them on the ties (k + 1/2) theta, on 0 or on lambda."""
    clip_c = channel_view(clip, len(shape))
    theta_c = clip_c / levels
    z = (torch.rand(shape, generator=gen) * 1.5 - 0.25) * clip_c
    k = torch.randint(-1, levels + 1, shape, generator=gen).float()
    pick = torch.randint(0, 8, shape, generator=gen)
    z = torch.where(pick == 0, (k + 0.5) * theta_c, z)
    z = torch.where(pick == 1, torch.zeros_like(z), z)
    return torch.where(pick == 2, clip_c.expand(shape), z)


def _clip(per_channel: bool, channels: int, gen: torch.Generator) -> torch.Tensor:
    if per_channel:
        return torch.rand(channels, generator=gen) * 3 + 0.5
    return torch.tensor(2.5)


def _run_quant_act(fn, z: torch.Tensor, clip: torch.Tensor, levels: int, with_spikes: bool,
                   weights: torch.Tensor, spike_weights: torch.Tensor | None):
    z = z.detach().clone().requires_grad_()
    clip = clip.detach().clone().requires_grad_()
    value, spikes = fn(z, clip, levels, with_spikes=with_spikes)
    loss = (value * weights).sum()
    if spike_weights is not None:
        loss = loss + (spikes * spike_weights).sum()   # the regularizer's term, beta folded in
    loss.backward()
    return value.detach(), None if spikes is None else spikes.detach(), z.grad, clip.grad


def _clip_grad_scale(z: torch.Tensor, clip: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An upper bound of sum |term| of lambda's gradient, |g| (1 + |z| / lambda) per element: the
    float32 reference's own summation error scales with it (its terms cancel)."""
    bound = weights.abs() * (1 + z.abs() / channel_view(clip, z.dim()))
    return bound.sum(tuple(d for d in range(z.dim()) if d != 1)) if clip.dim() else bound.sum()


@pytest.mark.parametrize("with_spikes", [False, True], ids=["value", "value+spikes"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["layer", "channel"])
@pytest.mark.parametrize("levels", [1, 10, 15, 255])
def test_quant_act_fused_equals_reference_autograd(device: torch.device, levels: int, per_channel: bool,
                                                   with_spikes: bool) -> None:
    gen = torch.Generator().manual_seed(levels * 4 + per_channel * 2 + with_spikes)
    for layout in ("nchw", "2d", "channels_last"):
        shape = _shape_for(layout)
        clip = _clip(per_channel, shape[1], gen)
        z = _in_layout(_activations(shape, clip, levels, gen), layout)
        weights = torch.randn(shape, generator=gen)
        spike_weights = torch.rand(shape[0], generator=gen) * 0.1 if with_spikes else None
        args = [t.to(device) if isinstance(t, torch.Tensor) else t
                for t in (z, clip, levels, with_spikes, weights, spike_weights)]
        got = _run_quant_act(quant_act_fused_triton, *args)
        want = _run_quant_act(quant_act_fused_reference, *args)
        value, spikes, grad_z, grad_clip = (None if t is None else t.cpu() for t in got)
        assert torch.equal(value, want[0].cpu()), "values differ"
        if with_spikes:
            assert spikes.dtype == want[1].dtype and torch.equal(spikes, want[1].cpu()), "spike counts differ"
        else:
            assert spikes is None
        torch.testing.assert_close(grad_z, want[2].cpu(), rtol=1e-6, atol=0)
        scale = _clip_grad_scale(z, clip, weights)
        assert grad_clip.shape == clip.shape
        error = (grad_clip - want[3].cpu()).abs()
        assert (error <= 1e-6 * (want[3].cpu().abs() + scale)).all(), "clip gradients differ"
        if layout == "channels_last":
            assert value.is_contiguous(memory_format=torch.channels_last)


def test_quant_act_fused_spike_gradient_alone(device: torch.device) -> None:
    """A loss on the spike count alone: the surrogate's gradients to z (up: more spikes) and to
    lambda (down: a coarser step fires less), and scaling z and lambda together is neutral."""
    gen = torch.Generator().manual_seed(11)
    clip = _clip(True, 5, gen).to(device)
    z = _activations((3, 5, 7, 9), clip.cpu(), 15, gen).to(device)
    grads = []
    for fn in (quant_act_fused_triton, quant_act_fused_reference):
        zz = z.clone().requires_grad_()
        cc = clip.clone().requires_grad_()
        _, spikes = fn(zz, cc, 15, with_spikes=True)
        spikes.sum().backward()
        grads.append((zz.grad.cpu(), cc.grad.cpu()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
    grad_z, grad_clip = grads[1]
    assert (grad_z >= 0).all() and grad_z.sum() > 0 and (grad_clip <= 0).all() and grad_clip.sum() < 0
    # d/ds count(s z, s lambda) at s = 1 is sum(z grad_z) + sum(lambda grad_lambda) = 0
    scale_derivative = (z.cpu() * grad_z).sum() + (clip.cpu() * grad_clip).sum()
    assert abs(scale_derivative.item()) <= 1e-4 * (z.cpu() * grad_z).abs().sum().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quant_act_fused_other_dtypes(device: torch.device, dtype: torch.dtype) -> None:
    """Forward exactly as the reference. (A float16/bfloat16 z with a float32 per-layer lambda is
    left out: torch's CPU kernels then divide by the unrounded float32 theta, its CUDA kernels
    and this kernel by theta rounded to z's dtype.)"""
    gen = torch.Generator().manual_seed(13)
    for per_channel, clip_dtype in [(False, dtype), (True, dtype), (True, torch.float32)]:
        clip = _clip(per_channel, 6, gen).to(clip_dtype)
        z = _activations((4, 6, 5, 5), clip.float(), 15, gen).to(dtype)
        got = quant_act_fused_triton(z.to(device), clip.to(device), 15, with_spikes=True)
        want = quant_act_fused_reference(z.to(device), clip.to(device), 15, with_spikes=True)
        assert got[0].dtype == want[0].dtype and torch.equal(got[0].cpu(), want[0].cpu())
        assert got[1].dtype == want[1].dtype and torch.equal(got[1].cpu(), want[1].cpu())
    if dtype == torch.float64:
        clip = _clip(True, 6, gen).double()
        z = _activations((4, 6, 5, 5), clip, 15, gen)
        weights = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        got = _run_quant_act(quant_act_fused_triton, z.to(device), clip.to(device), 15, True, weights.to(device),
                             torch.ones(4, dtype=torch.float64, device=device))
        want = _run_quant_act(quant_act_fused_reference, z.to(device), clip.to(device), 15, True, weights.to(device),
                              torch.ones(4, dtype=torch.float64, device=device))
        for g, w in zip(got[2:], want[2:]):
            torch.testing.assert_close(g.cpu(), w.cpu(), rtol=1e-12, atol=1e-12)


def test_quant_act_fused_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z = torch.randn(2, 3, 4)
    clip = torch.tensor(2.0, requires_grad=True)
    value, spikes = quant_act_fused(z, clip, 7, with_spikes=False)
    assert spikes is None and value.grad_fn is not None
    assert torch.equal(value, quant_act_fused_reference(z, clip, 7, with_spikes=False)[0])


# ------------------------------------------------------------- compiled for a GPU without one


def _ptxas_available() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


# In a fresh process whose first kernel ran in the interpreter, as in a test process that runs the
# CPU tests before the CUDA ones: the kernels must still compile there.
_COMPILE_FOR_SM90 = textwrap.dedent("""
    import os
    import torch
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    from ann2snn.kernels import fire_fused_triton
    fire_fused_triton(torch.rand(2, 3, 4), 0.25, 0.125, 7, 3, want_levels=True)   # in the interpreter
    del os.environ["TRITON_INTERPRET"]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ann2snn.kernels.neuron import _fire_kernel
    from ann2snn.kernels.quant_act import _quant_act_backward_kernel, _quant_act_forward_kernel

    view = {name: "i32" for name in ("N", "C", "S", "stride_n", "stride_c", "stride_s")}
    blocks = dict(BLOCK_N=1, BLOCK_C=16, BLOCK_S=256, WIDE=False)

    def compile_for_gpu(kernel, pointers, constants):
        signature = {**pointers, **view, **{name: "constexpr" for name in constants}}
        source = ASTSource(fn=kernel.in_mode(False), signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 8, "enable_fp_fusion": False})
        assert compiled.asm["cubin"]

    for io, fp64 in (("fp32", False), ("bf16", False), ("fp64", True)):
        compile_for_gpu(_fire_kernel,
                        {"v_ptr": f"*{io}", "theta_ptr": f"*{io}", "offset_ptr": f"*{io}", "value_ptr": f"*{io}",
                         "levels_ptr": "*u8", "channel_ptr": "*i64", "sample_ptr": "*i64"},
                        dict(LEVELS=253, THETA_PER_CHANNEL=True, HAS_OFFSET=True,
                             OFFSET_PER_CHANNEL=True, WANT_LEVELS=True, WANT_CHANNEL=True, WANT_SAMPLE=True,
                             FP64=fp64, **{**blocks, "WIDE": fp64}))
    for per_channel in (False, True):
        compile_for_gpu(_quant_act_forward_kernel,
                        {"z_ptr": "*fp32", "theta_ptr": "*fp32", "value_ptr": "*fp32", "spikes_ptr": "*i64"},
                        dict(LEVELS=15, THETA_PER_CHANNEL=per_channel, WITH_SPIKES=True, FP64=False,
                             **blocks))
        for has_value, has_spikes in ((True, True), (True, False), (False, True)):
            compile_for_gpu(_quant_act_backward_kernel,
                            {"z_ptr": "*fp32", "theta_ptr": "*fp32", "grad_value_ptr": "*fp32",
                             "grad_spikes_ptr": "*fp32", "grad_z_ptr": "*fp32", "grad_theta_ptr": "*fp64"},
                            dict(LEVELS=15, THETA_PER_CHANNEL=per_channel, HAS_GRAD_VALUE=has_value,
                                 HAS_GRAD_SPIKES=has_spikes, WANT_GRAD_Z=True, WANT_GRAD_THETA=True, FP64=False,
                                 **blocks))
    print("compiled")
""")


@pytest.mark.skipif(CUDA, reason="the CUDA tests above compile and run the kernels")
@pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas is not installed")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter does not compile: build the kernels to an H100 cubin, as a GPU run would."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
