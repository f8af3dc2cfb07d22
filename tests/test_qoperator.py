"""onnxruntime's QOperator format (issue 16, part 1), converted exactly through its QDQ meaning.

`quantize_static(..., quant_format=QuantFormat.QOperator)` writes QLinearConv, QGemm, QLinearAdd,
QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool and MaxPool / Flatten on uint8 or int8
tensors. Each file converts through the real command with the exactness gate and onnxruntime's
levels of the original file (no unexplained difference), the report records the rewrite, and
`inspect` agrees. The rewrite means what the ops mean (a moved zero point moves onnxruntime's and
the expansion's levels alike); a genuinely wrong level is still unexplained; onnxruntime's
QLinearAdd kernel stays within the error bound that ort_check allows it, which the QDQ bound alone
would not cover; what has no QDQ meaning here is refused in one line.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hostile import assert_refused, invoke, snapshot
from test_onnx_import import QuantNet, export, randomize_batch_norms
from test_onnx_import import quantize as quantize_file  # the QDQ helper, given QOperator below

UNIT_ROUNDOFF = 2.0**-24


class CatNet(nn.Module):
    """Concat of two branches, an AvgPool, a global average pool: QLinearConcat, QLinearAveragePool,
    QLinearGlobalAveragePool in the QOperator format."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(10, 16, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.left(y)), F.relu(self.right(y))], 1)
        y = F.relu(self.conv(self.pool(y)))
        return self.fc(self.gap(y).flatten(1))


NETS = {"QuantNet": lambda: randomize_batch_norms(QuantNet()), "CatNet": lambda: CatNet().eval()}
EXPANDED = {
    "QuantNet": {"Flatten": 1, "MaxPool": 1, "QLinearConv": 2, "com.microsoft::QGemm": 1, "com.microsoft::QLinearAdd": 1},
    "CatNet": {"Flatten": 1, "QLinearConv": 4, "com.microsoft::QGemm": 1, "com.microsoft::QLinearAveragePool": 1,
               "com.microsoft::QLinearConcat": 1, "com.microsoft::QLinearGlobalAveragePool": 1},
}
FLAVOURS = {
    "residual add, uint8 activations": ("QuantNet", dict(activation_type="QUInt8")),
    "residual add, int8 activations (the defaults)": ("QuantNet", dict()),
    "residual add, per-channel weights": ("QuantNet", dict(activation_type="QUInt8", per_channel=True)),
    "concat and global average pool, uint8 activations": ("CatNet", dict(activation_type="QUInt8")),
    "concat and global average pool, int8 activations, per-channel weights": ("CatNet", dict(per_channel=True)),
    # the Relu stays, with MaxPool and Flatten between it and its QuantizeLinear (zero point 0: L = 127)
    "residual add, symmetric int8 activations": ("QuantNet", dict(extra_options={"ActivationSymmetric": True})),
}
SYMMETRIC = "residual add, symmetric int8 activations"


@pytest.fixture(scope="module")
def float_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("qoperator")
    files = {}
    for name, build in NETS.items():
        torch.manual_seed(0)
        files[name] = export(build(), (3, 8, 8), str(folder / f"{name}.onnx"), "torchscript-17")
    return files


def quantize(float_file: str, path, **options) -> str:
    """`float_file` quantized by onnxruntime's quantize_static in the QOperator format."""
    return quantize_file(float_file, path, "QOperator", **options)


def _ops(path: str) -> list[str]:
    return [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in onnx.load(path).graph.node]


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_quantize_static_qoperator_converts_exactly(float_files, tmp_path, flavour):
    net, options = FLAVOURS[flavour]
    path = quantize(float_files[net], tmp_path / "qoperator.onnx", **dict(options))
    ops = _ops(path)
    assert "QLinearConv" in ops
    if flavour != SYMMETRIC:   # QuantizeLinear / DequantizeLinear at the edges only
        assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 1
    if options.get("per_channel"):
        model = onnx.load(path)
        scales = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert any(scales[n.input[4]].size > 1 for n in model.graph.node if n.op_type == "QLinearConv")

    result = invoke("convert", path, "--json", "-o", tmp_path / "qoperator.snn")
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    report = json.loads(result.stdout)
    check = report["verify"]
    totals = check["levels"]["totals"]
    assert check["passed"] and check["exact"]["passed"] and totals["unexplained"] == 0 and totals["compared"] > 0
    assert report["source"]["kind"] == "qdq" and report["timesteps"] == (7 if flavour == SYMMETRIC else 8)
    # the rewrite is recorded; every QOperator output with a ReLU folded in is a site named after its node,
    # and a kept Relu makes the site, through the MaxPool and Flatten after it
    sources = {site["source"]["sources"][0] for site in report["sites"]}
    if flavour == SYMMETRIC:
        assert sources == {"/Relu", "/Relu_1"}
    else:
        assert {"pass": "qoperator_to_qdq", "nodes": EXPANDED[net]} in report["rewrites"]
        assert {"/conv1/Conv_quant", "/Add_quant"} <= sources if net == "QuantNet" else \
            {"/stem/Conv_quant", "/Concat_quant", "/gap/GlobalAveragePool_quant"} <= sources
    # onnxruntime's level was read back at every site of the original file
    assert set(check["levels"]["sites"]) >= {site["site"] for site in report["sites"]}

    inspected = json.loads(invoke("inspect", path, "--json").stdout)
    assert inspected["all_ops_supported"] and inspected["refused_nodes"] == {}


def test_a_relu_behind_an_average_pool_is_named_in_one_line(float_files, tmp_path):
    """Symmetric activations keep the Relus; CatNet's last one feeds a GlobalAveragePool before any
    QuantizeLinear, which does not commute with it: a float activation, refused by name."""
    path = quantize(float_files["CatNet"], tmp_path / "symmetric.onnx", extra_options={"ActivationSymmetric": True})
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", path), str(path), "'/Relu_3'", before=before, folders=(tmp_path,))


def test_dynamic_quantization_is_refused_in_one_line(float_files, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    path = tmp_path / "dynamic.onnx"
    quantize_dynamic(float_files["QuantNet"], str(path))
    assert "DynamicQuantizeLinear" in _ops(str(path))
    before = snapshot(tmp_path)
    line = assert_refused(invoke("convert", path), str(path), "DynamicQuantizeLinear, opset", "quantize_static",
                          before=before, folders=(tmp_path,))
    inspected = json.loads(invoke("inspect", path, "--json").stdout)
    assert not inspected["all_ops_supported"]
    name, reason = next(iter(inspected["refused_nodes"].items()))
    assert f"node {name!r}" in line and reason in line


def test_a_qoperator_op_it_cannot_express_is_refused_in_one_line(float_files, tmp_path):
    model = onnx.load(quantize(float_files["QuantNet"], tmp_path / "qoperator.onnx", activation_type="QUInt8"))
    add = next(n for n in model.graph.node if n.op_type == "QLinearAdd")
    add.op_type = "QLinearMul"   # same inputs, a product of two activations
    path = tmp_path / "mul.onnx"
    onnx.save(model, path)
    before = snapshot(tmp_path)
    line = assert_refused(invoke("convert", path), str(path), f"node {add.name!r}", "com.microsoft::QLinearMul",
                          "QLinearAdd", before=before, folders=(tmp_path,))
    inspected = json.loads(invoke("inspect", path, "--json").stdout)
    assert not inspected["ops"]["com.microsoft::QLinearMul"]["supported"] and inspected["ops"]["QLinearConv"]["supported"]
    assert inspected["refused_nodes"][add.name] in line


def _integer_outputs(path: str, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    from ann2snn.verify.ort_run import onnxruntime_outputs

    return dict(zip(names, (t.numpy().astype(np.int64) for t in onnxruntime_outputs(path, x, names)[1:])))


def test_the_expansion_means_what_each_op_means(float_files, tmp_path):
    """conv2's output gets a zero point 3 higher than the one QLinearAdd reads it with (legal in the
    QOperator format: the Add reinterprets it). onnxruntime's run of the file then changes, and the
    expansion, run by onnxruntime as float QDQ, follows it level for level."""
    from ann2snn.frontend.qoperator import expand_qoperator

    model = onnx.load(quantize(float_files["QuantNet"], tmp_path / "qoperator.onnx", activation_type="QUInt8"))
    unchanged = tmp_path / "qoperator.onnx"
    conv2 = next(n for n in model.graph.node if n.name == "/conv2/Conv_quant")
    zero = next(t for t in model.graph.initializer if t.name == conv2.input[7])
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(zero) + np.uint8(3), "moved_zero"))
    conv2.input[7] = "moved_zero"
    moved = tmp_path / "moved.onnx"
    onnx.save(model, moved)
    expanded_model, entry = expand_qoperator(model, str(moved))
    assert entry["nodes"]["QLinearConv"] == 2 and not any(n.domain for n in expanded_model.graph.node)
    expanded = tmp_path / "expanded.onnx"
    onnx.save(expanded_model, expanded)

    x = torch.rand((64, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    names = [n.output[0] for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    before, after, meaning = (_integer_outputs(str(p), x, names) for p in (unchanged, moved, expanded))
    conv2_out, add_out = conv2.output[0], next(n.output[0] for n in model.graph.node if n.op_type == "QLinearAdd")
    inside = (before[conv2_out] > 0) & (before[conv2_out] <= 252)   # not clamped, before or after
    assert np.array_equal(after[conv2_out][inside], before[conv2_out][inside] + 3)   # the file changed
    assert np.mean(after[add_out] != before[add_out]) > 0.3
    for name in names:   # the expansion computes what the moved file computes, up to float32 rounding flips
        difference = np.abs(meaning[name] - after[name])
        assert difference.max() <= 1 and np.mean(difference == 0) >= 0.999, (name, np.mean(difference == 0))
    # convert refuses such a reinterpretation in one line: a QDQ pair must undo itself
    assert_refused(invoke("convert", moved), str(moved), "/conv2/Conv_quant", "zero point")


def test_a_genuinely_wrong_level_stays_unexplained(float_files, tmp_path):
    """The SNN of the file against onnxruntime's run of a copy whose conv1 bias (one channel) is
    0.05 of a level higher: the levels it flips lie far outside the kernel's error bound."""
    from ann2snn.compile.compiler import compile_source
    from ann2snn.frontend.source import quantized_onnx
    from ann2snn.verify.ort_check import compare_with_onnxruntime

    path = quantize(float_files["QuantNet"], tmp_path / "qoperator.onnx", activation_type="QUInt8")
    source_graph, source = quantized_onnx(path)
    snn = compile_source(path, source_graph, source)
    x = torch.rand((64, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    right, _ = compare_with_onnxruntime(path, snn, source_graph, x)
    assert right.passed and right.totals()["unexplained"] == 0

    model = onnx.load(path)
    conv1 = next(n for n in model.graph.node if n.name == "/conv1/Conv_quant")
    tensors = {t.name: t for t in model.graph.initializer}
    x_scale, w_scale, y_scale = (float(numpy_helper.to_array(tensors[conv1.input[k]]).reshape(-1)[0]) for k in (1, 4, 6))
    bias = numpy_helper.to_array(tensors[conv1.input[8]]).copy()
    bias[np.argmax(bias)] += round(0.05 * y_scale / (x_scale * w_scale))   # a channel that is mostly above 0
    tensors[conv1.input[8]].CopyFrom(numpy_helper.from_array(bias, conv1.input[8]))
    wrong_path = tmp_path / "wrong.onnx"
    onnx.save(model, wrong_path)
    wrong, _ = compare_with_onnxruntime(str(wrong_path), snn, source_graph, x)
    site = next(name for name, entry in snn.report["sites"].items()
                if entry["source"]["sources"][0] == "/conv1/Conv_quant")
    assert not wrong.passed and wrong.sites[site].unexplained > 10


def _qlinear_add(scales: np.ndarray, zeros: np.ndarray) -> onnx.ModelProto:
    values = {"As": scales[0], "Bs": scales[1], "Cs": scales[2]}
    initializers = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in values.items()]
    initializers += [numpy_helper.from_array(np.array(z, np.uint8), k) for k, z in zip(("Az", "Bz", "Cz"), zeros)]
    node = helper.make_node("QLinearAdd", ["A", "As", "Az", "B", "Bs", "Bz", "Cs", "Cz"], ["C"], "add",
                            domain="com.microsoft")
    graph = helper.make_graph([node], "add", [helper.make_tensor_value_info(n, TensorProto.UINT8, [65536]) for n in "AB"],
                              [helper.make_tensor_value_info("C", TensorProto.UINT8, [65536])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_onnxruntime_qlinear_add_stays_within_its_kernel_error():
    """Every pair of uint8 inputs, 300 draws of scales and zero points: where onnxruntime's level
    differs from the exact rounding of QLinearAdd's value v, v lies within the kernel's error bound
    (qoperator.KernelError, which ort_check adds) of the rounding boundary; some lie beyond the bound
    of the QDQ graph alone, which therefore would not do."""
    import onnxruntime

    from ann2snn.frontend.qoperator import kernel_errors

    rng = np.random.default_rng(1)
    a, b = np.arange(256).repeat(256), np.tile(np.arange(256), 256)
    differing = beyond_qdq = beyond_kernel = 0
    for _ in range(300):
        scales, zeros = rng.uniform(0.005, 0.05, 3).astype(np.float32), rng.integers(0, 256, 3)
        model = _qlinear_add(scales, zeros)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        levels = session.run(None, {"A": a.astype(np.uint8), "B": b.astype(np.uint8)})[0].astype(np.int64)
        a_value, b_value = (a - zeros[0]) * float(scales[0]), (b - zeros[1]) * float(scales[1])
        v = (a_value + b_value) / float(scales[2]) + zeros[2]
        differ = (levels != np.clip(np.round(v), 0, 255)) & (v > -0.5) & (v < 255.5)
        distance = np.abs(v - (np.floor(v) + 0.5))[differ]
        # ort_check's bound without the kernel's part: input levels exact to u, the sum's rounding, 4 u |ratio|
        qdq = (UNIT_ROUNDOFF * (np.abs(a_value) + np.abs(b_value) + np.abs(a_value + b_value)) / float(scales[2])
               + 4 * UNIT_ROUNDOFF * np.abs(v - zeros[2]))[differ]
        kernel = kernel_errors(model)["C"]
        magnitude = (np.abs(a_value) + np.abs(b_value)) / float(scales[2])
        bound = qdq + UNIT_ROUNDOFF * (kernel.per_magnitude * magnitude[differ] + kernel.constant)
        differing += int(differ.sum())
        beyond_qdq += int((distance > qdq).sum())
        beyond_kernel += int((distance > bound).sum())
    assert differing > 0 and beyond_kernel == 0
    assert beyond_qdq > 0
