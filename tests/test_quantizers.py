"""QDQ files of onnxruntime's quantizer in its common flavours (issue 16, part 1), converted exactly.

The same float network (conv, BN, residual add, MaxPool, Gemm: test_onnx_import.QuantNet) is
quantized by `quantize_static` as a user would: its defaults (int8 activations, zero point -128,
the Relu folded into the QDQ pair), uint8 activations, symmetric int8 activations (zero point 0,
L = 127, T = 7), per-channel weights. Each converts through the real command and passes the
verification: the exactness gate and onnxruntime's levels with no unexplained difference. 16-bit
activations (A16W8) convert at T = 16 (tests/test_t16.py checks more of them).
"""
from __future__ import annotations

import json

import pytest
import torch

from hostile import invoke
from test_onnx_import import QuantNet, export, quantize, randomize_batch_norms

FLAVOURS = {
    "defaults (QInt8 activations)": dict(),
    "uint8 activations": dict(activation_type="QUInt8"),
    "symmetric int8 activations": dict(extra_options={"ActivationSymmetric": True}),
    "per-channel weights": dict(activation_type="QUInt8", per_channel=True),
}
EXPECTED_T = {"symmetric int8 activations": 7}


@pytest.fixture(scope="module")
def float_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("quantizers")
    return export(randomize_batch_norms(QuantNet()), (3, 8, 8), str(folder / "float.onnx"), "torchscript-17")


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_quantize_static_flavour_converts_exactly(float_file, tmp_path, flavour):
    path = quantize(float_file, tmp_path / "qdq.onnx", **dict(FLAVOURS[flavour]))
    result = invoke("convert", path, "--json")
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    report = json.loads(result.stdout)
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0
    assert report["source"]["kind"] == "qdq" and len(report["sites"]) >= 2   # the two ReLUs (and the input)
    assert report["timesteps"] == EXPECTED_T.get(flavour, 8)
    # QuantNet's sites: the input (unless symmetric: its pair has negative levels), conv1's ReLU and the
    # residual add's; a QDQ pair that only repeats a site's grid after MaxPool and Flatten (int8, zero point
    # -128 over levels 0..L) is no site of its own
    assert len(report["sites"]) == (2 if flavour == "symmetric int8 activations" else 3), \
        [s["source"]["sources"] for s in report["sites"]]


def test_16_bit_activations_convert_exactly_at_T_16(float_file, tmp_path):
    path = quantize(float_file, tmp_path / "a16w8.onnx", activation_type="QUInt16", weight_type="QInt8",
                    per_channel=True)
    result = invoke("convert", path, "--json")
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    report = json.loads(result.stdout)
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0
    assert report["timesteps"] == 16 and {site["levels"] for site in report["sites"]} == {65535}
