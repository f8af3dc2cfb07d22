"""Asymmetric int8 layers (weights with zero points: quantize_static's WeightSymmetric=False, uint8 weights):
runtime/integer_values.py's integer_layer runs W = I8 - z8 as I8 u - z8 sum(u), and
compile/integer_weights.py stores a file's I and z so. Both against int64 references."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ann2snn.compile.integer_weights import _int8_storage
from ann2snn.kernels.int_layers_reference import int_conv2d_reference, int_linear_reference
from ann2snn.runtime.integer_values import IntegerWeights, integer_layer


@pytest.mark.parametrize("module", [nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, groups=2),
                                    nn.Linear(12, 5)], ids=["conv", "grouped conv", "linear"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("offset", [0, -3])
def test_an_asymmetric_layer_is_exact(module, per_channel, offset):
    gen = torch.Generator().manual_seed(3)
    out_channels = module.weight.shape[0]
    weight = torch.randint(-128, 128, module.weight.shape, generator=gen, dtype=torch.int8)
    zero = torch.randint(-128, 128, (out_channels if per_channel else 1,), generator=gen, dtype=torch.int32)
    bias = torch.randint(-5000, 5000, (out_channels,), generator=gen, dtype=torch.int32)
    layer = IntegerWeights(weight, torch.ones(1), bias, torch.ones(1), zero)
    shape = (3, 12) if isinstance(module, nn.Linear) else (3, 4, 7, 7)
    if offset and isinstance(module, nn.Conv2d) and any(module.padding):
        offset = 0   # refused: zero padding would read the offset's value (test_integer_snn)
    levels = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
    run, run_without_bias, folded = integer_layer("layer", module, layer, offset, torch.device("cpu"))
    offsets = layer.offsets()
    assert int(offsets.abs().max()) > 128 or not zero.any()   # beyond int8: the correction is needed
    inputs = levels.long() + offset
    if isinstance(module, nn.Linear):
        expected = int_linear_reference(inputs, offsets, bias)
    else:
        expected = int_conv2d_reference(inputs, offsets, bias, module.stride, module.padding, module.dilation,
                                        module.groups)
    assert torch.equal(run(levels).long(), expected)
    assert torch.equal(run_without_bias(levels).long() + folded.long().reshape(1, -1, *[1] * (len(shape) - 2)),
                       expected)


def test_a_files_zero_points_are_stored_as_int8_and_a_zero_point():
    offsets = torch.tensor([[-200.0, 55.0], [0.0, 100.0]])   # J = I - z of a uint8 file with z = 200, 0
    integers, zero = _int8_storage(offsets, torch.tensor([200, 0]))
    assert integers.dtype == torch.int8 and torch.equal(integers.long() - zero.long()[:, None], offsets.long())
    integers, zero = _int8_storage(torch.tensor([[-3.0, 4.0]]), torch.tensor([0]))   # symmetric: no zero point
    assert zero is None and integers.tolist() == [[-3, 4]]
    assert _int8_storage(torch.tensor([[-250.0, 250.0]]), torch.tensor([0])) is None   # no int8 or uint8 I fits
