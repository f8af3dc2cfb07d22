"""Float ONNX files as they are exported in the wild (issue 16, part 2): a Softmax, LogSoftmax or
Sigmoid after the last layer, opsets 7 to 10, a PyTorch export with its batch fixed at 1.

Each file is built here (onnx.helper at the opset it declares, torch.onnx.export) and converted
by the real command with calibration data; the conversion is verified against onnxruntime.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import ann2snn
from hostile import assert_refused, invoke, snapshot
from test_cli import digits_model
from test_onnx_import import _model, _weights


def cnn(tail: list, opset: int = 13, last: str = "g", classes: int = 10) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> MaxPool -> Flatten -> Gemm on 1x8x8 digits, then `tail` (reading `last`)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["z"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], [last], name="fc", transB=1), *tail]
    initializers = {"w1": _weights(4, 1, 3, 3), "b1": _weights(4, seed=1), "gamma": np.abs(_weights(4, seed=4)) + 0.5,
                    "beta": _weights(4, seed=5), "mean": _weights(4, seed=6) * 0.1,
                    "var": np.abs(_weights(4, seed=7)) + 0.5, "w2": _weights(classes, 64, seed=2) * 0.1,
                    "b2": _weights(classes, seed=3)}
    return _model(nodes, (1, 8, 8), initializers.items(), opset=opset)


def convert(path, *extra) -> dict:
    result = invoke("convert", path, "-T", "4", "--calib", "digits", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("op, opset", [("Softmax", 13), ("Softmax", 11), ("LogSoftmax", 13), ("LogSoftmax", 11),
                                       ("Sigmoid", 13)])
def test_an_output_operation_after_the_last_layer_converts(tmp_path, op, opset):
    attributes = {"axis": 1} if op != "Sigmoid" else {}
    path = tmp_path / f"{op}.onnx"
    onnx.save(cnn([helper.make_node(op, ["g"], ["y"], name="out", **attributes)], opset), str(path))
    report = convert(path)
    assert report["verify"]["passed"] and report["verify"]["exact"]["passed"]
    assert report["verify"]["agreement"] >= 0.9
    assert {"pass": "place_neurons", "output_op": "out", "op": op, "note": "applied to the output potentials"} \
        in report["rewrites"]
    snn = ann2snn.load_snn(tmp_path / f"{op}.snn")   # the artifact holds the output operation
    logits = snn.evaluate(torch.rand(3, 1, 8, 8)).logits
    if op == "Softmax":
        torch.testing.assert_close(logits.sum(1), torch.ones(3))
    energy = invoke("energy", tmp_path / f"{op}.snn", "--data", "digits", "--samples", "8", "--json")
    assert energy.exit_code == 0, energy.stderr
    assert "out" not in {layer["name"] for layer in json.loads(energy.stdout)["layers"]}


@pytest.mark.parametrize("op", ["Softmax", "Sigmoid", "LogSoftmax"])
def test_an_output_operation_in_the_middle_is_refused(tmp_path, op):
    attributes = {"axis": 1} if op != "Sigmoid" else {}
    tail = [helper.make_node(op, ["g"], ["s"], name="middle", **attributes),
            helper.make_node("Gemm", ["s", "w3"], ["y"], name="fc2", transB=1)]
    model = cnn(tail)
    model.graph.initializer.append(onnx.numpy_helper.from_array(_weights(10, 10, seed=9), "w3"))
    path = tmp_path / "middle.onnx"
    onnx.save(model, str(path))
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", path, "-T", "4", "--calib", "digits"), str(path), "middle", op,
                   "not after the last layer", before=before, folders=(tmp_path,))


def test_an_opset_11_softmax_over_flattened_dimensions_is_refused(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["z"], name="conv1"),
             helper.make_node("Softmax", ["z"], ["y"], name="spatial_softmax", axis=1)]
    path = tmp_path / "spatial.onnx"
    onnx.save(_model(nodes, (1, 8, 8), [("w1", _weights(4, 1, 3, 3))], opset=11), str(path))
    assert_refused(invoke("convert", path, "-T", "4", "--calib", "digits"), str(path), "spatial_softmax",
                   "flattened trailing dimensions")


@pytest.mark.parametrize("opset", [7, 8, 9, 10])
def test_old_opsets_are_upgraded_and_recorded(tmp_path, opset):
    path = tmp_path / f"opset{opset}.onnx"
    onnx.save(cnn([helper.make_node("Softmax", ["g"], ["y"], name="out", axis=1)], opset), str(path))
    report = convert(path)
    assert {"pass": "upgrade_opset", "from": opset, "to": 13} in report["rewrites"]
    assert report["verify"]["passed"] and report["verify"]["agreement"] >= 0.9
    inspected = json.loads(invoke("inspect", path, "--json").stdout)
    assert inspected["opset"] == opset and inspected["upgraded_to_opset"] == 13 and inspected["all_ops_supported"]


def test_an_opset_older_than_7_is_refused(tmp_path):
    path = tmp_path / "opset6.onnx"
    onnx.save(cnn([], 6, last="y"), str(path))
    assert_refused(invoke("inspect", path), str(path), "opset 6 is not supported")


def test_a_pytorch_export_with_batch_1_and_a_final_softmax_converts(tmp_path):
    model = torch.nn.Sequential(digits_model(quantize=False), torch.nn.Softmax(dim=1)).eval()
    path = tmp_path / "batch1.onnx"
    torch.onnx.export(model, (torch.rand(1, 1, 8, 8),), str(path), input_names=["x"], dynamo=False)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    report = convert(path)
    assert report["verify"]["passed"] and report["verify"]["agreement"] >= 0.9
    assert any(r.get("op") == "Softmax" for r in report["rewrites"])
