"""The requantization of a neuron site (kernels/requantize.py): the C pass against its reference and
against the integer thresholds of runtime/integer.py.

The C pass evaluates V = sum_i float32(A_i + add_i) * scale_i, then clamp(round_half_even(V /
theta)), in float32 as written. Accumulators placed on the thresholds of site_thresholds, and one
below each, are where any other rounding order (a combined multiplier S / theta, a reciprocal of
theta) gives another level: the test shows such an order fails there. Residual sums of two and
three terms, uint8 / int32 / float32 values, NCHW and channels-last (also mixed), ties, int16
levels, spike counts, and adds too large for float32.
"""
from __future__ import annotations

import pytest
import torch

from ann2snn.kernels import IntegerLayer, Requantization, Requantizer, requantize_levels, requantize_levels_reference
from ann2snn.kernels.int_layers_reference import int_conv2d_reference
from ann2snn.kernels.int_levels_reference import UNREACHABLE, levels_from_thresholds
from ann2snn.kernels.requantize import requantize_levels_native
from ann2snn.kernels.requantize_reference import Term, quantize_
from ann2snn.runtime.integer import site_thresholds

from test_int_layers import random_levels, random_weight


def _values(dtype: str, shape: tuple, gen: torch.Generator, channels_last: bool) -> torch.Tensor:
    if dtype == "uint8":
        values = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
    else:
        values = torch.randint(-40000, 40000, shape, generator=gen, dtype=torch.int32)
        values = values.float() if dtype == "float32" else values
    return values.contiguous(memory_format=torch.channels_last) if channels_last and len(shape) == 4 else values


def _terms(dtypes: list[str], shape: tuple, seed: int, layouts: list[bool]) -> list[Term]:
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    return [Term(_values(dtype, shape, gen, channels_last),
                 torch.rand(channels if i % 2 == 0 else 1, generator=gen) * 1e-3 + 1e-4,
                 torch.randint(-500, 500, (channels,), generator=gen, dtype=torch.int32) if i != 1 else None)
            for i, (dtype, channels_last) in enumerate(zip(dtypes, layouts))]


def _equal(a, b) -> bool:
    return torch.equal(a.levels, b.levels) and (a.sample_spikes is None) == (b.sample_spikes is None) and (
        a.sample_spikes is None or torch.equal(a.sample_spikes, b.sample_spikes))


@pytest.mark.parametrize("shape", [(4, 16, 9, 7), (3, 40, 5, 5), (2, 7, 1, 1), (5, 33)])
@pytest.mark.parametrize("dtypes", [["float32"], ["int32"], ["uint8"], ["float32", "uint8"],
                                    ["float32", "float32", "int32"]])
@pytest.mark.parametrize("layouts", [(False, False, False), (True, True, True), (True, False, True)])
@pytest.mark.parametrize("sample_spikes", [False, True])
def test_the_c_pass_equals_the_reference(shape, dtypes, layouts, sample_spikes) -> None:
    terms = _terms(dtypes, shape, len(dtypes) * 7 + shape[1], list(layouts))
    requantization = Requantization(torch.tensor([0.05]), -3, 12)
    native = requantize_levels_native(terms, requantization, sample_spikes=sample_spikes)
    reference = requantize_levels_reference(terms, requantization, sample_spikes=sample_spikes)
    assert _equal(native, type(native)(*reference))
    assert native.levels.stride() == terms[0].values.stride()   # the first term's memory format
    assert int(native.levels.max()) <= 15 and int(native.levels.min()) >= 0


def _on_the_thresholds(seed: int):
    """One accumulator term whose values are each level's threshold and the value one below it."""
    gen = torch.Generator().manual_seed(seed)
    zero, qmin, qmax = 3, 0, 15
    theta = torch.rand(1, generator=gen) * 0.05 + 0.01
    # scales at simple ratios to theta put exact ties near many thresholds, where each float32
    # rounding on the way decides the level; two channels of random scales
    product = torch.cat([theta * torch.tensor([0.5, 1.5, 0.25, 0.125, 2.5, 0.75, 0.3, 0.1]),
                         torch.rand(2, generator=gen) * 1e-3 + 1e-5])
    channels = product.numel()
    add = torch.randint(-300, 300, (channels,), generator=gen, dtype=torch.int32)
    thresholds = site_thresholds(product, 0, theta, zero, qmin, qmax, channels)
    assert bool((thresholds < UNREACHABLE).all())
    at = torch.cat([thresholds, thresholds - 1], 1) - add[:, None]   # before the add
    values = at.t().reshape(2, -1, channels).permute(0, 2, 1).reshape(2, channels, -1).to(torch.int32)
    levels = levels_from_thresholds(values.to(torch.int64) + add[None, :, None], thresholds, 0)
    return Term(values, product, add), Requantization(theta, qmin - zero, qmax - zero), levels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_the_c_pass_gives_the_thresholds_levels_on_their_boundaries(seed: int, dtype: torch.dtype) -> None:
    term, requantization, expected = _on_the_thresholds(seed)
    term = term._replace(values=term.values.to(dtype))
    assert torch.equal(requantize_levels_native([term], requantization).levels.to(torch.int64), expected)
    assert torch.equal(requantize_levels_reference([term], requantization)[0].to(torch.int64), expected)


@pytest.mark.parametrize("order", ["combined multiplier", "reciprocal of theta"])
def test_another_rounding_order_misses_the_boundaries(order: str) -> None:
    """The boundary test fails a requantization that multiplies by float32(S / theta), or by S
    and then 1 / theta, instead of dividing float32(A) * S by theta."""
    misses = 0
    for seed in range(4):
        term, requantization, expected = _on_the_thresholds(seed)
        value = (term.values.to(torch.int64) + term.add[None, :, None]).to(torch.float32)
        theta = requantization.theta
        value = value * (term.scale / theta)[None, :, None] if order == "combined multiplier" else \
            value * term.scale[None, :, None] * (1 / theta)
        wrong = quantize_(value, torch.ones(1), requantization.low, requantization.high)
        misses += int((wrong.to(torch.int64) != expected).sum())
    assert misses > 0


def test_ties_round_half_to_even_and_levels_clamp() -> None:
    values = torch.tensor([[1, 3, 5, 7, -9, 99, -99]], dtype=torch.int32).reshape(1, 1, 7)
    requantization = Requantization(torch.tensor([1.0]), -2, 40)   # level = clamp(round(v / 2), -2, 40) + 2
    levels = requantize_levels_native([Term(values, torch.tensor([0.5]))], requantization).levels
    assert levels.reshape(-1).tolist() == [0 + 2, 2 + 2, 2 + 2, 4 + 2, -2 + 2, 40 + 2, -2 + 2]


def test_wide_levels_and_large_adds() -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.randint(-2 ** 23, 2 ** 23, (3, 4, 5, 5), generator=gen).float()
    add = torch.tensor([2 ** 24 + 1, -(2 ** 25) - 3, 7, 0], dtype=torch.int32)   # not float32-exact
    terms = [Term(values, torch.full((4,), 1e-4), add)]
    requantization = Requantization(torch.tensor([0.001]), 0, 4000)   # int16 levels
    native = requantize_levels_native(terms, requantization, sample_spikes=True)
    assert native.levels.dtype == torch.int16
    exact = (values.to(torch.int64) + add[None, :, None, None]).to(torch.float32)
    assert torch.equal(native.levels, requantize_levels_reference([Term(exact, terms[0].scale)], requantization,
                                                                  sample_spikes=True)[0])


def test_the_integer_layer_step_by_the_expression_equals_it_by_thresholds() -> None:
    gen = torch.Generator().manual_seed(2)
    levels = random_levels((2, 8, 9, 9), torch.uint8, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = random_weight((12, 8, 3, 3), generator=gen)
    bias = torch.randint(-2000, 2000, (12,), generator=gen, dtype=torch.int32)
    product, theta = torch.rand(12, generator=gen) * 1e-4 + 1e-6, torch.tensor([0.02])
    thresholds = site_thresholds(product, 0, theta, 0, 0, 15, 12)
    by_thresholds = IntegerLayer(weight, bias, thresholds, 0, 1, 1)
    by_expression = IntegerLayer(weight, bias, thresholds, 0, 1, 1, requantize=(product, Requantization(theta, 0, 15)))
    accumulator = int_conv2d_reference(levels, weight, bias, 1, 1)
    expected = levels_from_thresholds(accumulator, thresholds, 0)
    for step in (by_thresholds, by_expression):
        out = step(levels, sample_spikes=True)
        assert torch.equal(out.levels.to(torch.int64), expected)
    assert _equal(by_thresholds(levels, sample_spikes=True), by_expression(levels, sample_spikes=True))
    with pytest.raises(ValueError, match="levels from 0"):
        IntegerLayer(weight, bias, thresholds, 1, requantize=(product, Requantization(theta, 0, 15)))


def test_refusals_and_where_the_reference_runs(monkeypatch) -> None:
    term = Term(torch.zeros(2, 3, 4, dtype=torch.int32), torch.ones(1))
    with pytest.raises(ValueError, match="one \\[N, C, \\*spatial\\] shape"):
        requantize_levels([term, Term(torch.zeros(2, 3, 5, dtype=torch.int32), torch.ones(1))],
                          Requantization(torch.ones(1), 0, 3))
    wide = Requantizer([torch.ones(1)], [None], Requantization(torch.ones(1), 0, 2 ** 22))
    assert not wide.native_supports([term.values])   # beyond the magic-number rounding: the reference
    assert int(wide([term.values]).levels.max()) == 0
    monkeypatch.setenv("ANN2SNN_NATIVE", "0")
    assert not Requantizer([torch.ones(1)], [None], Requantization(torch.ones(1), 0, 3)).native_supports([term.values])
