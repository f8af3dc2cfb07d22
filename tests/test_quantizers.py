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

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from hostile import assert_refused, invoke
from test_onnx_import import QuantNet, export, quantize, randomize_batch_norms

FLAVOURS = {
    "defaults (QInt8 activations)": dict(),
    "uint8 activations": dict(activation_type="QUInt8"),
    "symmetric int8 activations": dict(extra_options={"ActivationSymmetric": True}),
    "per-channel weights": dict(activation_type="QUInt8", per_channel=True),
    "uint8 weights, reduced range": dict(activation_type="QUInt8", weight_type="QUInt8", reduce_range=True),
    "asymmetric weights": dict(extra_options={"WeightSymmetric": False}),
    "QDQ pairs on the float weights": dict(extra_options={"AddQDQPairToWeight": True}),
    # Relu kept behind a pair whose zero point is -128: the pair after it changes nothing and goes
    "kept removable activations": dict(extra_options={"QDQKeepRemovableActivations": True}),
    # a pair of its own for each consumer: one site each would fire the same spikes twice
    "a dedicated pair per consumer": dict(extra_options={"DedicatedQDQPair": True}),
    "entropy calibration": dict(calibrate_method="Entropy"),
    "percentile calibration": dict(calibrate_method="Percentile"),
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
    # int8 or uint8 weights: an integer SNN, every difference from onnxruntime's int8 kernels explained
    assert report["backend"] == "integer" and check["integer"]["passed"], report.get("rewrites")
    assert check["integer"]["onnxruntime_default"]["explained"], check["integer"]["onnxruntime_default"]
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


# --- QCDQ: a Clip of the integers between QuantizeLinear and DequantizeLinear (Brevitas' low-bit export) ---

def qcdq(path: str, out, low: int, high: int, weights: tuple[int, int] | None = None) -> str:
    """`path` (a QDQ file) as Brevitas writes fewer bits than the integer type holds: a Clip of the
    integers to [low, high] between every activation QuantizeLinear and its DequantizeLinear, and
    with `weights` one of the int8 weights before their DequantizeLinear."""
    model = onnx.load(path)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []

    def clip(value: str, dtype, bounds: tuple[int, int], name: str) -> str:
        low_high = [numpy_helper.from_array(np.array(b, dtype), f"{name}_{k}") for k, b in zip(("min", "max"), bounds)]
        model.graph.initializer.extend(low_high)
        nodes.append(helper.make_node("Clip", [value, *(t.name for t in low_high)], [f"{value}_clipped"], name=name))
        return f"{value}_clipped"

    for node in model.graph.node:
        if weights and node.op_type == "DequantizeLinear" and constants.get(node.input[0], np.zeros(0)).dtype == np.int8:
            node.input[0] = clip(node.input[0], np.int8, weights, f"{node.name}_weight_clip")
        nodes.append(node)
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            clipped = clip(node.output[0], constants[node.input[2]].dtype, (low, high), f"{node.name}_clip")
            for user in model.graph.node:
                user.input[:] = [clipped if v == node.output[0] and user.op_type == "DequantizeLinear" else v
                                 for v in user.input]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return str(out)


QCDQ = {  # name: (quantize_static options, the activations' Clip, the weights' Clip, T, L)
    "uint8 clipped to 4 bits": (dict(activation_type="QUInt8"), (0, 15), None, 4, 15),
    "uint8 clipped to 2 bits": (dict(activation_type="QUInt8"), (0, 3), None, 2, 3),
    "symmetric int8 clipped to 4 bits, 4-bit weights": (dict(extra_options={"ActivationSymmetric": True}),
                                                        (-8, 7), (-7, 7), 3, 7),
}


@pytest.mark.parametrize("name", sorted(QCDQ))
def test_qcdq_converts_exactly_at_its_own_bit_width(float_file, tmp_path, name):
    options, activations, weights, timesteps, levels = QCDQ[name]
    path = qcdq(quantize(float_file, tmp_path / "qdq.onnx", **dict(options)), tmp_path / "qcdq.onnx",
                *activations, weights)
    result = invoke("convert", path, "--json")
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    report = json.loads(result.stdout)
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0
    assert check["levels"]["totals"]["compared"] > 0 and check["agreement"] == 1.0
    assert report["timesteps"] == timesteps and {site["levels"] for site in report["sites"]} == {levels}
    # the sites are read back from the Clip's output: the clipped integers onnxruntime computes
    assert all(site["source"]["sources"][-2].endswith("_clip") for site in report["sites"])
    pairs = json.loads(invoke("inspect", path, "--json").stdout)["qdq_pairs"]
    assert pairs and {pair["clip"] for pair in pairs.values()} == {"{}..{}".format(*activations)}


def test_a_clip_that_leaves_one_level_is_refused(float_file, tmp_path):
    path = qcdq(quantize(float_file, tmp_path / "qdq.onnx", activation_type="QUInt8"), tmp_path / "qcdq.onnx", 3, 3)
    assert_refused(invoke("convert", path), path, "x_QuantizeLinear_clip", "Clip", "fewer than two levels")


def test_clipped_integers_that_feed_another_op_are_refused(float_file, tmp_path):
    path = qcdq(quantize(float_file, tmp_path / "qdq.onnx", activation_type="QUInt8"), tmp_path / "qcdq.onnx", 0, 15)
    model = onnx.load(path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dequantize = next(n for n in model.graph.node if n.output[0] == conv.input[0])
    conv.input[0] = dequantize.input[0]   # the Conv reads the clipped integers themselves
    onnx.save(model, path)
    assert_refused(invoke("convert", path), path, "/conv1/Conv", "x_QuantizeLinear_Output_clipped",
                   "quantized (integer) tensor")


def test_onnxruntimes_own_4_bit_types_are_refused_by_name(float_file, tmp_path):
    """quantize_static's QUInt4 activations: com.microsoft QuantizeLinear / DequantizeLinear (uint4)."""
    path = quantize(float_file, tmp_path / "uint4.onnx", activation_type="QUInt4", weight_type="QInt8")
    assert {n.domain for n in onnx.load(path).graph.node if n.op_type.endswith("QuantizeLinear")} == {"com.microsoft"}
    assert_refused(invoke("convert", path), path, "com.microsoft::", "QuantizeLinear", "opset 17", "not supported")
