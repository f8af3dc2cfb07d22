"""QDQ files from PyTorch's PT2E quantization (issue 16, part 1), exported by the dynamo exporter.

PT2E now lives in torchao: `prepare_pt2e` with a quantizer, calibration, `convert_pt2e`, then
`torch.onnx.export(dynamo=True)` writes QuantizeLinear / DequantizeLinear pairs. Two quantizers a
user would pick on a CPU: X86InductorQuantizer (uint8 activations, per-channel int8 weights) and
the XNNPACK quantizer (int8 activations with zero point -128 after a ReLU, per-channel symmetric
weights). Zoo networks in float (ReLU sites) go through both and through the real command; each
must pass the exactness gate and onnxruntime's comparison with no unexplained level. ResNet-20
requantizes its global average pool at the last ReLU's scale, which gives exact ties (the gate's
tie rule; ann2snn/verify/gate.py).
"""
from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from onnx import numpy_helper

from ann2snn import models
from hostile import invoke


def pt2e_onnx(name: str, quantizer_name: str, path) -> str:
    """A zoo network in float, quantized by PT2E with `quantizer_name` on random images, in ONNX."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    if quantizer_name == "x86":
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    elif quantizer_name == "xnnpack 4-bit":   # activations in [-8, 7]: the export keeps zero point -8 only
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
            is_per_channel=True, act_qmin=-8, act_qmax=7, weight_qmin=-7, weight_qmax=7))
    else:
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=10).eval()
    shape = models.default_input_shape(name) if name == "digits-cnn" else (3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *shape, generator=gen)
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    for _ in range(4):
        prepared(torch.rand(4, *shape, generator=gen))   # the batch size it was exported with
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(convert_pt2e(prepared), (x,), str(path), dynamo=True, verbose=False)
    return str(path)


@pytest.mark.parametrize("name, quantizer_name", [("digits-cnn", "x86"), ("digits-cnn", "xnnpack"),
                                                  ("resnet20", "x86")])
def test_pt2e_export_converts_exactly(tmp_path, name, quantizer_name):
    path = pt2e_onnx(name, quantizer_name, tmp_path / "pt2e.onnx")
    result = invoke("convert", path, "--json")
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    report = json.loads(result.stdout)
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0
    assert report["source"]["kind"] == "qdq" and report["timesteps"] == 8
    # int8 weights: an integer SNN, whose every difference from onnxruntime's int8 kernels is explained
    assert report["backend"] == "integer" and check["integer"]["passed"]
    assert check["integer"]["onnxruntime_default"]["explained"], check["integer"]["onnxruntime_default"]
    relus = sum(1 for module in models.build_model(name, num_classes=10).modules() if isinstance(module, torch.nn.ReLU))
    assert len(report["sites"]) >= min(relus, 2)


def test_a_zero_point_inside_the_range_behind_a_relu_is_a_site(tmp_path):
    """XNNPACK with activations in [-8, 7]: torch.onnx writes int8 QuantizeLinear with zero point -8 and
    drops the narrower range, so onnxruntime computes integers -8 .. 127. Behind the ReLU they start at
    the zero point: levels 0 .. 135, a site at L = 135, T = 8, exact against onnxruntime."""
    path = pt2e_onnx("digits-cnn", "xnnpack 4-bit", tmp_path / "pt2e.onnx")
    zero_points = {int(numpy_helper.to_array(t)) for t in onnx.load(path).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and t.dims == []}
    assert -8 in zero_points
    report = json.loads(invoke("convert", path, "--json").stdout)
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0
    assert report["timesteps"] == 8 and {site["levels"] for site in report["sites"]} == {135}
    assert len(report["sites"]) == 3 and all(site["source"]["zero_point"] == -8 for site in report["sites"])
