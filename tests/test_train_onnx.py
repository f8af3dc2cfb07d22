"""`ann2snn train --model FILE.onnx` (issue 17.1): fine-tune a float ONNX file that is not a zoo
model into the lossless low-T form, keeping its own final Softmax, and convert the export exactly.
"""
from __future__ import annotations

import json

import onnx
import pytest
from onnx import helper

from hostile import assert_refused, assert_usage_error, invoke, snapshot
from test_real_world_onnx import cnn


def _file(tmp_path, tail: list, name: str, last: str = "g") -> str:
    path = tmp_path / f"{name}.onnx"
    onnx.save(cnn(tail, last=last), str(path))
    return str(path)


@pytest.mark.parametrize("ending", ["Softmax", "LogSoftmax", "logits"])
def test_a_float_onnx_file_fine_tunes_and_converts_exactly(tmp_path, ending):
    tail = [] if ending == "logits" else [helper.make_node(ending, ["g"], ["y"], name="out", axis=1)]
    source = _file(tmp_path, tail, "float", last="y" if ending == "logits" else "g")
    out = tmp_path / "qat.onnx"
    # The file's weights are random, not trained: the recipe from scratch, not the fine-tuning default.
    trained = invoke("train", "--model", source, "--data", "digits", "-T", "3", "--epochs", "2", "--beta", "1e-4",
                     "--optimizer", "sgd", "--lr", "0.05", "-o", out, "--json")
    assert trained.exit_code == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["test_accuracy"] > 0.6 and summary["spikes_per_image"] > 0
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert "QuantizeLinear" in ops and (ending == "logits" or ending in ops), ops   # its own output op kept
    converted = invoke("convert", out, "--verify-data", "digits", "--json")
    assert converted.exit_code == 0, converted.stderr
    check = json.loads(converted.stdout)["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0


def test_train_refuses_files_it_cannot_fine_tune(tmp_path):
    cases = {
        "sigmoid": (_file(tmp_path, [helper.make_node("Sigmoid", ["g"], ["y"], name="out")], "sigmoid"),
                    "Sigmoid"),
        "classes": (str(tmp_path / "five.onnx"), "5 outputs, the data set 10 classes"),
    }
    onnx.save(cnn([], last="y", classes=5), cases["classes"][0])
    for name, (path, fragment) in cases.items():
        before = snapshot(tmp_path)
        result = invoke("train", "--model", path, "--data", "digits", "--epochs", "1", "-o", tmp_path / "out.onnx")
        assert_refused(result, fragment, before=before, folders=(tmp_path,))


def test_train_refuses_a_qdq_file_and_names_the_command_that_takes_it(tmp_path):
    from ann2snn.train.export import export_onnx
    from test_cli import digits_model

    qdq = tmp_path / "qdq.onnx"
    export_onnx(digits_model(quantize=True), (1, 8, 8), qdq, qdq=True)
    assert_refused(invoke("train", "--model", qdq, "--data", "digits", "-o", tmp_path / "out.onnx"), str(qdq),
                   "convert takes this one")


def test_train_model_must_be_a_zoo_name_or_an_onnx_file(tmp_path):
    assert_usage_error(invoke("train", "--model", "resnet999", "-o", tmp_path / "out.onnx"), "neither a zoo model")
