"""QCDQ files from Brevitas (issue 27): int8 weights behind QuantizeLinear, Clip and DequantizeLinear, int32
biases, uint8 activations, exported by brevitas.export.export_onnx_qcdq. Such a file converts to an integer
SNN through the real command, and its verification (the gate, onnxruntime's levels, the integer checks and
every difference from onnxruntime's int8 kernels explained) passes."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from hostile import invoke

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


class BrevitasNet(nn.Module):
    """Quantized input, two int8 convolutions with int32 biases and uint8 ReLUs, a max pool, an int8
    linear head."""

    def __init__(self, per_channel: bool) -> None:
        import brevitas.nn as qnn
        from brevitas.quant import (Int8WeightPerChannelFloat, Int8WeightPerTensorFloat, Int32Bias,
                                    Uint8ActPerTensorFloat)

        super().__init__()
        weights = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
        self.input = qnn.QuantIdentity(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=weights, bias_quant=Int32Bias,
                                     return_quant_tensor=True)
        self.relu1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_quant=weights, bias_quant=Int32Bias,
                                     return_quant_tensor=True)
        self.relu2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(8 * 4 * 4, 10, weight_quant=weights, bias_quant=Int32Bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.conv1(self.input(x)))
        b = self.relu2(self.conv2(a))
        return self.fc(torch.flatten(nn.functional.max_pool2d(b, 2), 1))


def brevitas_file(path, per_channel: bool) -> str:
    from brevitas.export import export_onnx_qcdq

    torch.manual_seed(0)
    model = BrevitasNet(per_channel).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train()
        for _ in range(4):   # calibrates the activation scales
            model(torch.rand(16, 3, 8, 8))
        model.eval()
        export_onnx_qcdq(model, torch.rand(1, 3, 8, 8), export_path=str(path), dynamo=False)
    return str(path)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_a_brevitas_qcdq_file_converts_to_a_verified_integer_snn(tmp_path, per_channel):
    path = brevitas_file(tmp_path / "brevitas.onnx", per_channel)
    result = invoke("convert", path, "--json", "-o", str(tmp_path / "brevitas.snn"))
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    report = json.loads(result.stdout)
    assert report["backend"] == "integer" and report["integer_layers"] == 3
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0
    assert check["integer"]["passed"] and check["integer"]["simulate_equals_evaluate"]
    assert check["integer"]["onnxruntime_default"]["explained"], check["integer"]["onnxruntime_default"]
    inspected = invoke("inspect", str(tmp_path / "brevitas.snn"), "--json")
    assert inspected.exit_code == 0 and "int8" in inspected.stdout
