"""IntegerLayer and IntegerLevels (kernels/int_layer_levels.py, kernels/int_levels.py) against the references.

The whole step, int8 layer then integer neuron, must give levels_from_thresholds of the int64
reference accumulator (kernels/int_layers_reference.py) bit for bit: the thresholds are drawn
from the accumulator's own values, one below and one above, so a bias left out of the folded
thresholds, a shift correction forgotten or a float32 accumulator read off by one differs. Conv2d
and Gemm, uint8 levels (the folded fast path) and int16 levels (accumulator, then neuron), on the
C kernel, the reference and Triton's interpreter.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from ann2snn.kernels import IntegerLayer, IntegerLevels, levels_fused, levels_from_thresholds
from ann2snn.kernels.int_layers_reference import int_conv2d_reference, int_linear_reference
from ann2snn.kernels.int_levels_reference import UNREACHABLE
from ann2snn.levels import popcount_sum_

from test_int_layers import random_bias, random_levels, random_weight

INT32_MIN = -(2 ** 31)
TRITON = importlib.util.find_spec("triton") is not None

# (levels shape, weight shape, stride, padding, dilation, groups); weight.dim() 2 is a Gemm
LAYERS = [((3, 6, 7, 5), (8, 6, 3, 3), 1, 1, 1, 1), ((2, 8, 9, 9), (8, 2, 3, 3), 2, 0, 1, 4),
          ((2, 4, 6, 6), (5, 4, 1, 1), 1, 0, 1, 1), ((5, 37), (11, 37), 1, 0, 1, 1)]


def _reference(levels, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    if weight.dim() == 2:
        return int_linear_reference(levels, weight, bias)
    return int_conv2d_reference(levels, weight, bias, stride, padding, dilation, groups)


def _thresholds_near(accumulator: torch.Tensor, per_channel: int, gen: torch.Generator) -> torch.Tensor:
    """Per channel, K ascending thresholds at the channel's own accumulator values, minus 1, or plus 1."""
    by_channel = accumulator.movedim(1, 0).reshape(accumulator.shape[1], -1)
    picks = torch.randint(0, by_channel.shape[1], (by_channel.shape[0], per_channel), generator=gen)
    near = by_channel.gather(1, picks) + torch.randint(-1, 2, picks.shape, generator=gen)
    return torch.sort(near, 1).values


def _case(layer: tuple, dtype: torch.dtype, with_bias: bool, seed: int):
    shape, weight_shape, stride, padding, dilation, groups = layer
    gen = torch.Generator().manual_seed(seed)
    levels = random_levels(shape, dtype, 16 if dtype == torch.uint8 else 300, generator=gen)
    if levels.dim() == 4:
        levels = levels.contiguous(memory_format=torch.channels_last)
    weight = random_weight(weight_shape, generator=gen)
    bias = random_bias(weight_shape[0], gen) if with_bias else None
    accumulator = _reference(levels, weight, bias, stride, padding, dilation, groups)
    thresholds = _thresholds_near(accumulator, 15, gen)
    return levels, weight, bias, (stride, padding, dilation, groups), accumulator, thresholds


@pytest.fixture(params=["native", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON, reason="triton is not installed"))])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C kernel (and oneDNN), the reference (ANN2SNN_NATIVE=0) or Triton's interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if request.param == "reference":
        monkeypatch.setenv("ANN2SNN_NATIVE", "0")
    elif request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.mark.parametrize("layer", LAYERS, ids=["conv", "grouped-strided", "1x1", "gemm"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_step_equals_the_reference(kernel: str, layer: tuple, dtype: torch.dtype, with_bias: bool) -> None:
    levels, weight, bias, options, accumulator, thresholds = _case(layer, dtype, with_bias, seed=len(layer[0]))
    lo = 2
    step = IntegerLayer(weight, bias, thresholds, lo, *options)
    want = levels_from_thresholds(accumulator, thresholds, lo)
    got = step(levels, sample_spikes=True)
    assert got.levels.dtype == torch.uint8 and torch.equal(got.levels.long(), want)
    assert torch.equal(got.sample_spikes, popcount_sum_(want.double(), lo + 15, tuple(range(1, want.dim()))))
    assert torch.equal(step.accumulator(levels).long(), accumulator)
    assert len(want.unique()) > 8   # the thresholds split the accumulators into many levels


@pytest.mark.parametrize("layer", LAYERS, ids=["conv", "grouped-strided", "1x1", "gemm"])
def test_an_unfolded_bias_or_an_off_by_one_threshold_fails(layer: tuple) -> None:
    """The same step whose neuron misses the bias, or whose thresholds are one higher, differs."""
    levels, weight, bias, options, accumulator, thresholds = _case(layer, torch.uint8, True, seed=7)
    want = levels_from_thresholds(accumulator, thresholds, 0)
    assert torch.equal(IntegerLayer(weight, bias, thresholds, 0, *options)(levels).levels.long(), want)
    without_bias = levels_from_thresholds(accumulator - bias.long().reshape(-1, *[1] * (accumulator.dim() - 2)),
                                          thresholds, 0)
    assert not torch.equal(IntegerLayer(weight, None, thresholds, 0, *options)(levels).levels.long(), want)
    assert torch.equal(IntegerLayer(weight, None, thresholds, 0, *options)(levels).levels.long(), without_bias)
    assert not torch.equal(IntegerLayer(weight, bias, thresholds + 1, 0, *options)(levels).levels.long(), want)


def test_an_offset_moves_the_thresholds_exactly_past_the_ends_of_int32(kernel: str) -> None:
    """IntegerLevels(t, lo, offset)(A) == levels_fused(A + offset, t, lo) where A + offset fits
    int32, with thresholds that the offset pushes below INT32_MIN or up to 2^31."""
    gen = torch.Generator().manual_seed(11)
    thresholds = torch.sort(torch.randint(-5000, 5000, (4, 7), generator=gen), 1).values
    thresholds[0, 0], thresholds[1, -1], thresholds[2, -1] = INT32_MIN, UNREACHABLE, 2 ** 31 - 1
    offset = torch.tensor([1000, -1000, -3, 2 ** 30], dtype=torch.int32)
    summed = (thresholds.gather(1, torch.randint(0, 7, (4, 60), generator=gen)) + torch.randint(-1, 2, (4, 60),
                                                                                                 generator=gen))
    summed[:, :2] = torch.tensor([INT32_MIN, 2 ** 31 - 1])
    summed = summed.clamp(INT32_MIN + 2 ** 30 + 1000, 2 ** 31 - 1001).to(torch.int32).t().reshape(6, 10, 4)
    summed = summed.permute(0, 2, 1)   # [N, C, S], channels-last memory
    accumulator = summed - offset.reshape(1, 4, 1)
    got = IntegerLevels(thresholds, 1, offset)(accumulator, sample_spikes=True)
    want = levels_fused(summed, thresholds, 1, sample_spikes=True)
    assert torch.equal(got.levels, want.levels) and torch.equal(got.sample_spikes, want.sample_spikes)
    assert not torch.equal(IntegerLevels(thresholds, 1)(accumulator).levels, want.levels)


def test_a_layout_with_the_batch_inside_the_channels(kernel: str) -> None:
    """A dense [N, C, S] whose memory is [C, N, S] (a permuted tensor): the C kernel walks rows at
    channel * S, so it must copy first (it once read other samples' accumulators)."""
    gen = torch.Generator().manual_seed(2)
    thresholds = torch.sort(torch.randint(-50, 50, (4, 7), generator=gen), 1).values
    accumulator = torch.randint(-60, 60, (4, 6, 10), generator=gen, dtype=torch.int32).transpose(0, 1)
    got = IntegerLevels(thresholds, 1)(accumulator, sample_spikes=True)
    want = levels_from_thresholds(accumulator, thresholds, 1)
    assert torch.equal(got.levels.long(), want)
    assert torch.equal(got.sample_spikes, popcount_sum_(want.double(), 8, (1, 2)))


def test_a_float32_accumulator_is_read_exactly_and_only_when_vouched_for() -> None:
    """The C kernel reads float32 integers below 2^24 as the int32 they hold; the public call refuses them."""
    gen = torch.Generator().manual_seed(5)
    thresholds = torch.sort(torch.randint(-2 ** 24 + 1, 2 ** 24, (3, 15), generator=gen), 1).values
    accumulator = (thresholds.gather(1, torch.randint(0, 15, (3, 200), generator=gen))
                   + torch.randint(-1, 2, (3, 200), generator=gen)).clamp(-2 ** 24 + 1, 2 ** 24 - 1)
    accumulator = accumulator.to(torch.int32).t().reshape(8, 25, 3).transpose(1, 2)
    neuron = IntegerLevels(thresholds, 0)
    want = neuron(accumulator, sample_spikes=True)
    got = neuron.run(accumulator.float(), True, exact_float=True)
    assert torch.equal(got.levels, want.levels) and torch.equal(got.sample_spikes, want.sample_spikes)
    with pytest.raises(TypeError, match="int32"):
        neuron(accumulator.float())


@pytest.mark.parametrize("weight, thresholds, message", [
    (torch.zeros(4, 3, 3, 3), torch.zeros(4, 3, dtype=torch.int64), "int8 weight"),
    (torch.zeros(4, 3, 3, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.int64), "int8 weight"),
    (torch.zeros(4, 3, 3, 3, dtype=torch.int8), torch.tensor([[2, 1]] * 4), "ascending"),
])
def test_refusals(weight: torch.Tensor, thresholds: torch.Tensor, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        IntegerLayer(weight, None, thresholds, 0)


def test_thresholds_of_another_layer_width_are_refused() -> None:
    with pytest.raises(ValueError, match=r"thresholds must be \[O=4, K\].*got \(5, 3\)"):
        IntegerLayer(torch.ones(4, 3, 1, 1, dtype=torch.int8), None, torch.zeros(5, 3, dtype=torch.int64), 0)
