"""Constant folding at import (ann2snn/frontend/fold_constants.py) and Pad with modes edge and
reflect, as a Caffe-converted PyTorch export writes them: pads computed by Shape -> Gather -> Div ->
Concat -> ... -> Cast, and a Reshape whose target keeps the batch dynamic (Shape -> Gather(0) ->
Unsqueeze -> Concat with -1).

The files are real exports (torch.onnx.export, and onnxruntime's quantize_static with default
arguments for the QDQ form), converted by the real command, which verifies the SNN against
onnxruntime; the pass alone runs on small onnx.helper graphs; synaptic operations through an
edge- or reflect-padded convolution are checked against a brute-force count.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import ann2snn
from ann2snn.energy import OperationCounter
from ann2snn.errors import UnsupportedModelError
from ann2snn.frontend.importer import inspect_onnx, load_onnx
from ann2snn.frontend.fold_constants import fold_constants
from ann2snn.frontend.inference import infer_shapes
from ann2snn.frontend.registry import find_converter
from ann2snn.ops import PAD_MODES
from ann2snn.runtime.graph import conversion_report
from hostile import invoke
from test_energy import _reach, simulator_planes, site
from test_onnx_import import quantize


class CaffeStyle(nn.Module):
    """Conv -> ReLU -> edge padding by a width computed from the tensor's shape -> Conv -> reflect
    padding (between the conv and its ReLU: the bias shift passes through it) -> ReLU -> reshape to
    [batch, -1] -> Linear; on 3 x 8 x 8."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4 * 9 * 9, 5)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        width = y.shape[-1]   # traced: Shape -> Gather -> Div -> ... -> Concat -> Pad's pads
        y = F.pad(y, (width // 6, width // 6, 1, 1), mode="replicate")
        y = F.relu(F.pad(self.conv2(y), (2, 1, 1, 2), mode="reflect"))
        return self.fc(y.reshape(y.shape[0], -1))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ann2snn", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caffe")
    float_file = str(folder / "caffe.onnx")
    torch.onnx.export(CaffeStyle().eval(), (torch.zeros(1, 3, 8, 8),), float_file, input_names=["x"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=13, dynamo=False)
    rng = np.random.default_rng(0)
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.random((64, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 5, 64))
    return {"float": float_file, "qdq": quantize(float_file, folder / "caffe_qdq.onnx"), "calib": str(calib)}


def computed_pads(path: str) -> list[str]:
    """The Pad nodes whose pads input is neither an initializer nor a Constant."""
    graph = onnx.load(path).graph
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return [n.name for n in graph.node if n.op_type == "Pad" and n.input[1] not in constants]


@pytest.mark.parametrize("kind", ["float", "qdq"])
def test_a_caffe_style_export_converts_and_verifies(files, kind):
    path = files[kind]
    assert computed_pads(path) == ["/Pad", "/Pad_1"]   # the exporter computes both pads
    modes = {n.name: helper.get_attribute_value(n.attribute[0]).decode() for n in onnx.load(path).graph.node
             if n.op_type == "Pad"}
    assert modes == {"/Pad": "edge", "/Pad_1": "reflect"}
    steps = ["-T", "4"] if kind == "float" else []   # QDQ: T from its 255 levels
    done = run_cli("convert", path, *steps, "--calib", files["calib"], "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verify"]["passed"] and report["verify"]["exact"]["passed"], report["verify"]
    assert report["verify"]["agreement"] == 1.0
    folded = next(r["nodes"] for r in report["rewrites"] if r["pass"] == "fold_constants")
    assert {"/Shape", "/Gather", "/Div", "/Concat", "/Cast_3", "/Cast_4"} <= set(folded)
    # the Reshape's batch entry stays dynamic: its Shape -> Gather(0) is not folded
    assert not {"/Shape_2", "/Gather_2", "/Unsqueeze_4", "/Concat_4"} & set(folded)
    if kind == "qdq":   # quantize_static's weights: int8 initializers behind a DequantizeLinear, folded too
        assert "conv1.weight_DequantizeLinear" in folded
    if kind == "float":   # the shift of the second site passes through the reflect padding into conv2's bias
        assert report["sites"][1]["bias_shift"] | {"amount": None} == {"kind": "bias", "target": "conv2_Conv",
                                                                        "amount": None}
    inspected = run_cli("inspect", path, "--json")
    assert inspected.returncode == 0, inspected.stderr
    summary = json.loads(inspected.stdout)
    assert summary["all_ops_supported"] and summary["ops"]["Pad"]["supported"]
    assert summary["folded_nodes"] == folded
    text = run_cli("inspect", path).stdout
    assert "folded_nodes:" in text and "'/Gather'" in text
    # the artifact saves F.pad's mode: loaded, both executors fire the same spikes (float32 logits,
    # summed in different orders, to rounding)
    snn = ann2snn.load_snn(path.removesuffix(".onnx") + ".snn")
    x = torch.from_numpy(np.load(files["calib"])["x"][:4])
    simulated, evaluated = snn.simulate(x), snn.evaluate(x)
    assert simulated.spikes.keys() == evaluated.spikes.keys()
    assert all(torch.equal(simulated.spikes[k], evaluated.spikes[k]) for k in simulated.spikes)
    torch.testing.assert_close(simulated.logits, evaluated.logits, rtol=1e-5, atol=1e-6)


def test_the_snn_takes_any_batch_size(files):
    gm = load_onnx(files["float"])
    session = ort.InferenceSession(files["float"], providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(batch).random((batch, 3, 8, 8), dtype=np.float32)
        with torch.no_grad():
            got = gm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(PAD_MODES))
def test_the_pad_modes_of_the_table_are_onnx_s(mode):
    """ops.PAD_MODES: F.pad in the torch mode computes onnxruntime's Pad in the ONNX mode; a mode
    that copies values pads a spike plane to a spike plane."""
    nodes = [helper.make_node("Pad", ["x", "pads", "fill"], ["y"], name="pad", mode=mode)]
    pads = [0, 0, 2, 1, 0, 0, 1, 2]
    m = model(nodes, {"pads": np.array(pads, np.int64), "fill": np.array(0.0, np.float32)}, x_shape=(2, 2, 4, 5))
    x = (np.random.default_rng(1).random((2, 2, 4, 5)) < 0.3).astype(np.float32)   # a spike plane
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    how = {"mode": PAD_MODES[mode].torch_mode} if PAD_MODES[mode].copies_values else {}
    got = F.pad(torch.from_numpy(x), (1, 2, 2, 1), **how).numpy()
    np.testing.assert_array_equal(got, expected)
    assert PAD_MODES[mode].copies_values == (expected[:, :, 0].sum() > 0)   # the border holds copies of spikes


# --- the pass alone ---------------------------------------------------------------------------

def model(nodes: list, initializers: dict, x_shape=("N", 2, 6, 6), y_shape=None, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def spatial_pads(source: str = "x") -> list:
    """pads = [0, 0, H // 3, W // 3, 0, 0, H // 3, W // 3] from Shape(source)."""
    return [helper.make_node("Shape", [source], ["shape"], name="shape"),
            helper.make_node("Gather", ["shape", "spatial"], ["hw"], name="gather", axis=0),
            helper.make_node("Div", ["hw", "three"], ["third"], name="div"),
            helper.make_node("Concat", ["zeros", "third", "zeros", "third"], ["pads"], name="concat", axis=0)]


PAD_INITS = {"spatial": np.array([2, 3], np.int64), "three": np.array(3, np.int64), "zeros": np.zeros(2, np.int64)}


def test_the_pass_folds_shape_arithmetic_into_an_initializer():
    m = model(spatial_pads() + [helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode="edge")], PAD_INITS)
    folding = fold_constants(infer_shapes(m, "m"), "m", 13)
    assert folding.names == ["shape", "gather", "div", "concat"]
    assert [n.name for n in folding.model.graph.node] == ["pad"]
    pads = {t.name: numpy_helper.to_array(t) for t in folding.model.graph.initializer}["pads"]
    assert pads.tolist() == [0, 0, 2, 2, 0, 0, 2, 2]
    assert folding.rewrite() == [{"pass": "fold_constants", "nodes": ["shape", "gather", "div", "concat"]}]


@pytest.mark.parametrize("declared_batch", ["N", 1])
def test_the_batch_entry_of_a_shape_is_never_folded(declared_batch):
    """Shape -> Gather(0) -> Unsqueeze -> Concat(-1) -> Reshape: even where the file declares a
    batch of 1, the target's first entry must stay the (dynamic) batch size."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch", axis=0),
             helper.make_node("Unsqueeze", ["n", "zero_axis"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="flatten")]
    m = model(nodes, {"zero": np.array(0, np.int64), "zero_axis": np.array([0], np.int64),
                      "minus_one": np.array([-1], np.int64)}, x_shape=(declared_batch, 2, 6, 6),
              y_shape=(declared_batch, 72))
    folding = fold_constants(infer_shapes(m, "m"), "m", 13)
    assert folding.names == [] and [n.name for n in folding.model.graph.node] == [n.name for n in nodes]
    gm = load_onnx(m)
    assert tuple(gm(torch.zeros(3, 2, 6, 6)).shape) == (3, 72)


def test_what_depends_on_the_data_is_not_folded():
    """pads computed from the data's values (ReduceMax): a fold that ran them on a stand-in
    would make a constant; the pass leaves them, and convert refuses the first of them."""
    nodes = [helper.make_node("ReduceMax", ["x"], ["peak"], name="peak", keepdims=0),
             helper.make_node("Cast", ["peak"], ["peak_int"], name="cast", to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["peak_int", "axis"], ["width"], name="width"),
             helper.make_node("Concat", ["zeros3", "width", "zeros3", "width"], ["pads"], name="pads", axis=0),
             helper.make_node("Mul", ["x", "half"], ["scaled"], name="scale"),
             helper.make_node("Pad", ["scaled", "pads"], ["y"], name="pad", mode="edge")]
    m = model(nodes, {"axis": np.array([0], np.int64), "zeros3": np.zeros(3, np.int64),
                      "half": np.array(0.5, np.float32)})
    folding = fold_constants(infer_shapes(m, "m"), "m", 13)
    assert folding.names == [] and len(folding.model.graph.node) == len(nodes)
    with pytest.raises(UnsupportedModelError, match="node 'peak': op ReduceMax"):
        load_onnx(m)


def test_a_fold_that_fails_names_the_node():
    nodes = [helper.make_node("Gather", ["table", "index"], ["pads"], name="lookup", axis=0),
             helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode="edge")]
    m = model(nodes, {"table": np.zeros((2, 8), np.int64), "index": np.array(5, np.int64)})
    with pytest.raises(UnsupportedModelError, match="node 'lookup' \\(Gather, opset 13\\): cannot fold constant"):
        fold_constants(m, "m", 13)


def test_load_onnx_reports_the_folded_nodes():
    m = model(spatial_pads() + [helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode="reflect")], PAD_INITS)
    gm = load_onnx(m)
    rewrites = conversion_report(gm)["rewrites"]
    assert {"pass": "fold_constants", "nodes": ["shape", "gather", "div", "concat"]} in rewrites
    x = np.random.default_rng(0).random((2, 2, 6, 6), dtype=np.float32)
    expected = np.pad(x, [(0, 0), (0, 0), (2, 2), (2, 2)], mode="reflect")
    np.testing.assert_array_equal(gm(torch.from_numpy(x)).numpy(), expected)


# --- energy: synaptic operations through edge and reflect padding --------------------------------

class PaddedConvs(nn.Module):
    """Sites -> edge padding (asymmetric) -> a strided conv; -> reflect padding -> a conv."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1, self.act1 = nn.Conv2d(2, 3, 3, padding=1), site(3, g)
        self.conv2, self.act2 = nn.Conv2d(3, 4, 3, stride=2), site(4, g)
        self.conv3, self.act3 = nn.Conv2d(4, 2, 2, padding=1), site(2, g)
        self.fc = nn.Linear(2 * 7 * 7, 3)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (3.0 / m.weight[0].numel()) ** 0.5
        self.eval()

    def forward(self, x):
        a1 = self.act1(self.conv1(x))
        a2 = self.act2(self.conv2(F.pad(a1, (1, 2, 0, 1), mode="replicate")))
        a3 = self.act3(self.conv3(F.pad(a2, (1, 1, 2, 1), mode="reflect")))
        return self.fc(torch.flatten(a3, 1))


def source_index(j: int, size: int, begin: int, mode: str) -> int:
    """The input position whose value padded position `j` holds."""
    i = j - begin
    if mode == "constant":   # the border holds no copy
        return i if 0 <= i < size else -1
    if mode == "replicate":
        return min(max(i, 0), size - 1)
    return -i if i < 0 else (2 * (size - 1) - i if i >= size else i)


def brute_padded_conv(spikes: torch.Tensor, pad: tuple, mode: str, conv: nn.Conv2d) -> int:
    """Every spike of the neuron before the padding, times every copy of it in the padded plane,
    times every (output position, output channel) that copy reaches: by loops."""
    (left, right, top, bottom), (height, width) = pad, spikes.shape[3:]
    padded = (height + top + bottom, width + left + right)
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out = [(padded[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    total = 0
    for _t, _n, _c, y, x in spikes.nonzero().tolist():
        rows = [j for j in range(padded[0]) if source_index(j, height, top, mode) == y]
        cols = [j for j in range(padded[1]) if source_index(j, width, left, mode) == x]
        for row in rows:
            for col in cols:
                total += len(_reach(row, out[0], k[0], s[0], p[0], d[0])) * \
                         len(_reach(col, out[1], k[1], s[1], p[1], d[1])) * conv.out_channels
    return total


def test_synaptic_ops_through_edge_and_reflect_padding_equal_a_brute_force_count():
    model = PaddedConvs().double()
    x = torch.rand((2, 2, 7, 7), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    snn = ann2snn.convert(model, T=3)
    _, spikes = simulator_planes(snn, x)
    neurons = sorted(spikes)   # the neurons of act1, act2 (and act3)
    expected = {"conv2": brute_padded_conv(spikes[neurons[0]], (1, 2, 0, 1), "replicate", model.conv2),
                "conv3": brute_padded_conv(spikes[neurons[1]], (1, 1, 2, 1), "reflect", model.conv3)}
    for mode in ("simulate", "evaluate"):
        counter = OperationCounter(snn, mode)
        assert torch.equal(counter(x), (snn.simulate(x) if mode == "simulate" else snn.evaluate(x)).logits)
        got = {layer.name: layer.synaptic_ops for layer in counter.result().layers if layer.name in expected}
        assert got == expected and all(v > 0 for v in got.values())
    # the copies count: a border spike reaches more synapses than through constant padding
    assert expected["conv2"] > brute_padded_conv(spikes[neurons[0]], (1, 2, 0, 1), "constant", model.conv2)


# --- the bias shift and a Pad between a conv and its site ------------------------------------------

STEP = 0.05   # the site's quantization step


def padded_site_net(path, mode: str, where: str, value: float) -> str:
    """Conv -> [Pad] -> Relu -> QDQ (step STEP) -> [Pad] -> Conv -> Flatten -> Gemm on 1 x 8 x 8, the
    Pad before the site or after it. A constant of 2.7 steps rounds to 3 levels and floors to 2: the
    border shows whether the shift reached it."""
    pad = lambda source, target: helper.make_node("Pad", [source, "pads", "fill"], [target], name="pad", mode=mode)
    before, after = where == "before-site", where == "after-site"
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["z"], name="conv1", pads=[1, 1, 1, 1]),
             *([pad("z", "zp")] if before else []),
             helper.make_node("Relu", ["zp" if before else "z"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "zero"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "zero"], ["a"], name="dequant"),
             *([pad("a", "ap")] if after else []),
             helper.make_node("Conv", ["ap" if after else "a", "w2", "b2"], ["c"], name="conv2"),
             helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    rng = np.random.default_rng(5)
    initializers = {"w1": rng.normal(size=(3, 1, 3, 3)).astype(np.float32) * 0.5,
                    "b1": rng.normal(size=3).astype(np.float32) * 0.1,
                    "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "fill": np.array(value, np.float32),
                    "s": np.array(STEP, np.float32), "zero": np.array(0, np.uint8),
                    "w2": rng.normal(size=(2, 3, 3, 3)).astype(np.float32) * 0.3,
                    "b2": rng.normal(size=2).astype(np.float32) * 0.1,
                    "w3": rng.normal(size=(4, 2 * 9 * 9)).astype(np.float32) * 0.1, "b3": np.zeros(4, np.float32)}
    onnx.save(model(nodes, initializers, x_shape=("N", 1, 8, 8)), str(path))
    return str(path)


@pytest.mark.parametrize("mode, where, value, shift", [
    ("edge", "before-site", 0.0, "bias"), ("reflect", "before-site", 0.0, "bias"),
    ("constant", "before-site", 2.7 * STEP, "membrane"), ("constant", "after-site", 2.7 * STEP, None),
    ("edge", "after-site", 0.0, None)])
def test_a_pad_next_to_a_site_converts_exactly(tmp_path, mode, where, value, shift):
    """Edge and reflect padding copy z, shift included, so conv1's bias carries the shift; constant
    padding does not carry it into the border, so the membrane does. After the site the padding acts
    on spike planes (its constant entering once). onnxruntime's run of the QDQ file is the reference."""
    path = padded_site_net(tmp_path / "m.onnx", mode, where, value)
    done = invoke("convert", path, "--calib", "digits", "--json")   # the real command, in this process
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verify"]["passed"] and report["verify"]["exact"]["passed"], report["verify"]
    assert report["verify"]["max_abs_logit_diff"] < 1e-4, report["verify"]
    if shift is not None:
        assert report["sites"][0]["bias_shift"]["kind"] == shift


def test_an_op_with_no_converter_folds_and_inspect_calls_it_supported(tmp_path):
    """Floor has no converter: in shape arithmetic it is computed at import, and `inspect` says so."""
    nodes = [*spatial_pads()[:2],
             helper.make_node("Cast", ["hw"], ["hw_float"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("Div", ["hw_float", "two_and_a_half"], ["ratio"], name="ratio"),
             helper.make_node("Floor", ["ratio"], ["floor"], name="floor"),
             helper.make_node("Cast", ["floor"], ["third"], name="to_int", to=TensorProto.INT64),
             spatial_pads()[3], helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode="edge")]
    path = str(tmp_path / "floor.onnx")
    onnx.save(model(nodes, {**PAD_INITS, "two_and_a_half": np.array(2.5, np.float32)}), path)
    assert find_converter("Floor", 13) is None
    summary = inspect_onnx(path)
    assert summary["ops"]["Floor"] == {"count": 1, "supported": True} and summary["all_ops_supported"]
    assert summary["folded_nodes"] == ["shape", "gather", "to_float", "ratio", "floor", "to_int", "concat"]
    x = np.random.default_rng(0).random((2, 2, 6, 6), dtype=np.float32)
    expected = np.pad(x, [(0, 0), (0, 0), (2, 2), (2, 2)], mode="edge")   # floor(6 / 2.5) = 2
    np.testing.assert_array_equal(load_onnx(path)(torch.from_numpy(x)).numpy(), expected)
