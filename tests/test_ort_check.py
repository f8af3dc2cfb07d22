"""The SNN against onnxruntime level by level (ann2snn/verify/ort_check.py): every difference explained.

Real files: onnxruntime's quantize_static output (a QDQ input kept as a fake quantization,
residual add, MaxPool) and the digits network's QDQ export, on real and random inputs: no
unexplained level. A hand-written file whose inputs put every ratio exactly on a tie: onnxruntime
rounds half to even, the SNN half up; the comparison counts ties and passes. A broken SNN (a
bias shift removed): unexplained levels, and it fails.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import helper

from ann2snn.compile.compiler import compile_source
from ann2snn.frontend.source import quantized_onnx
from ann2snn.data.sets import load_dataset
from ann2snn.train.export import export_onnx
from ann2snn.verify.ort_check import compare_with_onnxruntime
from test_cli import digits_model
from test_onnx_import import _model, qdq_model  # noqa: F401 (a fixture)


def _converted(path):
    source_graph, source = quantized_onnx(path)
    return compile_source(path, source_graph, source), source_graph


def test_quantize_static_file_has_no_unexplained_level(qdq_model):
    snn, source_graph = _converted(qdq_model)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result, _ = compare_with_onnxruntime(qdq_model, snn, source_graph, x)
    totals = result.totals()
    assert result.passed and totals["unexplained"] == 0, result.sites
    assert totals["compared"] > 20_000 and len(result.sites) >= 4   # sites and the kept input pair


def test_digits_export_on_real_images_is_level_for_level_equal(tmp_path):
    path = tmp_path / "digits.onnx"
    export_onnx(digits_model(quantize=True), (1, 8, 8), path, qdq=True)
    snn, source_graph = _converted(str(path))
    test = load_dataset("digits", split="test")
    x = torch.stack([test[i][0] for i in range(200)])
    result, _ = compare_with_onnxruntime(str(path), snn, source_graph, x)
    assert result.passed and result.predictions_equal == 200
    assert result.totals()["equal"] == result.totals()["compared"] > 100_000


def _tie_file(path) -> str:
    """x -> Conv 1x1 (weight 1, bias 0) -> Relu -> Q(scale 0.5) -> DQ -> Flatten -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["z"], name="conv1"),
             helper.make_node("Relu", ["z"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dequant"),
             helper.make_node("Flatten", ["d"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    initializers = {"w1": np.ones((1, 1, 1, 1), np.float32), "b1": np.zeros(1, np.float32),
                    "s": np.float32(0.5), "zp": np.uint8(0),
                    "w2": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
                    "b2": np.zeros(3, np.float32)}
    onnx.save(_model(nodes, (1, 2, 2), initializers.items(), opset=13), str(path))
    return str(path)


def test_exact_ties_are_explained(tmp_path):
    path = _tie_file(tmp_path / "ties.onnx")
    snn, source_graph = _converted(path)
    x = torch.tensor([0.25, 0.75, 1.25, 0.5]).repeat(8, 1).reshape(8, 1, 2, 2)   # ratios 0.5, 1.5, 2.5, 1
    result, _ = compare_with_onnxruntime(path, snn, source_graph, x)
    site = next(iter(result.sites.values()))
    assert site.ties == 16 and site.unexplained == 0 and result.passed   # 0.5 -> 0 and 2.5 -> 2 in ONNX


def test_a_broken_snn_has_unexplained_levels(qdq_model):
    snn, source_graph = _converted(qdq_model)
    broken = copy.deepcopy(snn)
    entry = next(e for e in broken.report["sites"].values() if e["bias_shift"]["kind"] == "bias")
    layer = broken.graph_module.get_submodule(entry["bias_shift"]["target"])
    layer.bias.data -= torch.as_tensor(entry["bias_shift"]["amount"], dtype=layer.bias.dtype)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result, _ = compare_with_onnxruntime(qdq_model, broken, source_graph, x)
    assert not result.passed and result.totals()["unexplained"] > 0
