"""The output head: what follows a classifier's last layer and computes on its output alone (Softmax,
LogSoftmax, QDQ pairs before and after them, Flatten / Reshape / Squeeze), run in float after the SNN.

onnxruntime's quantize_static with its default arguments puts a QDQ pair after a final Softmax; such
files convert through the real command, verify against onnxruntime through the head (its pair's levels
compared too), save and load the head, and evaluate and count energy as without the head. A head op
with a spiking layer after it is refused in one line naming node, op and opset. A network whose output
is a map (N, C, H, W) converts and verifies; eval refuses it in one line.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import ann2snn
from ann2snn.compile.compiler import compile_source
from ann2snn.frontend.source import quantized_onnx
from ann2snn.errors import UnsupportedModelError
from ann2snn.runtime.scoring import score_snn
from ann2snn.verify.ort_check import compare_with_onnxruntime
from ann2snn.verify.ort_run import onnxruntime_logits
from ann2snn.runtime.quant import QuantClippedActivation, QuantDequant
from hostile import assert_refused, invoke, snapshot
from test_cli import run_cli
from test_onnx_import import QuantNet, _model, _weights, export, quantize, randomize_batch_norms

SOFTMAX_STEP = 1 / 255   # onnxruntime's default pair on a Softmax: int8, zero point -128, scale 1/255


def images(count: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, 8, 8), dtype=np.float32)


def onnxruntime_run(path: str, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output for `x`, the QDQ graph computed as written (its int8 fusions, QLinearSoftmax
    among them, off: they compute other numbers)."""
    return onnxruntime_logits(path, torch.from_numpy(x)).numpy()


def with_head(*head: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(randomize_batch_norms(QuantNet()), *head).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """QuantNet quantized by quantize_static's defaults with and without a final Softmax (the same
    weights and calibration data), and an .npz of images labelled by the float network."""
    folder = tmp_path_factory.mktemp("head")
    paths = {}
    for name, head in (("softmax", (nn.Softmax(1),)), ("plain", ())):
        float_file = export(with_head(*head), (3, 8, 8), str(folder / f"{name}_float.onnx"), "torchscript-17")
        paths[name] = quantize(float_file, folder / f"{name}.onnx")
    x = images()
    np.savez(folder / "data.npz", x=x, y=onnxruntime_run(str(folder / "plain_float.onnx"), x).argmax(1))
    paths["data"] = str(folder / "data.npz")
    return paths


def convert(path, *extra) -> dict:
    result = invoke("convert", path, "--json", *extra)
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    return json.loads(result.stdout)


def assert_verified(report: dict) -> None:
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"], check
    if check["levels"] is not None:   # a QDQ file: onnxruntime's levels, every difference explained
        assert check["levels"]["passed"] and check["levels"]["totals"]["unexplained"] == 0, check["levels"]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --- quantize_static's defaults on a classifier ending in Softmax ----------------------------------

def test_the_default_quantized_softmax_converts_verifies_and_reloads_in_a_fresh_interpreter(files, tmp_path):
    assert ops(onnx.load(files["softmax"]))[-5:] == ["QuantizeLinear", "DequantizeLinear", "Softmax",
                                                     "QuantizeLinear", "DequantizeLinear"]   # a pair around it
    target = tmp_path / "softmax.snn"
    done = run_cli("convert", files["softmax"], "-o", str(target), "--verify-data", files["data"], "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert_verified(report)
    head_pair = report["verify"]["levels"]["sites"]["y_QuantizeLinear"]   # the pair after the Softmax
    assert head_pair["compared"] == 64 * 10 and head_pair["unexplained"] == 0
    assert head_pair["equal"] >= 0.99 * head_pair["compared"], head_pair
    assert not any("y_QuantizeLinear" in site["site"] for site in report["sites"])   # kept as a pair, no neuron

    np.save(tmp_path / "x.npy", images())
    script = ("import sys, numpy as np, torch, ann2snn\n"
              "snn = ann2snn.load_snn(sys.argv[1])\n"
              "np.save(sys.argv[3], snn.evaluate(torch.from_numpy(np.load(sys.argv[2]))).logits.numpy())\n")
    fresh = subprocess.run([sys.executable, "-c", script, str(target), str(tmp_path / "x.npy"),
                            str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    reloaded = np.load(tmp_path / "y.npy")
    expected = onnxruntime_run(files["softmax"], images())
    assert np.array_equal(reloaded, ann2snn.load_snn(target).evaluate(torch.from_numpy(images())).logits.numpy())
    # quantized probabilities as the file computes them: on its grid, as onnxruntime gives them
    np.testing.assert_allclose(reloaded.sum(1), 1.0, atol=10 * SOFTMAX_STEP)
    np.testing.assert_allclose(reloaded / SOFTMAX_STEP, np.round(reloaded / SOFTMAX_STEP), atol=1e-3)
    assert np.abs(reloaded - expected).max() <= SOFTMAX_STEP * 1.001
    assert (reloaded == expected).mean() >= 0.99


def test_a_broken_head_pair_fails_the_comparison_with_onnxruntime(files):
    """The head pair's levels are compared with a bound that explains only rounding: one level off
    at the pair (its zero point moved) is unexplained, while the network before it still agrees."""
    source_graph, source = quantized_onnx(files["softmax"])
    snn = compile_source(files["softmax"], source_graph, source)
    x = torch.from_numpy(images(32))
    assert compare_with_onnxruntime(files["softmax"], snn, source_graph, x)[0].passed
    head_pair = [m for m in snn.graph_module.modules() if isinstance(m, QuantDequant)][-1]
    head_pair.zero_point += 1
    broken = compare_with_onnxruntime(files["softmax"], snn, source_graph, x)[0]
    assert not broken.passed
    assert broken.sites["y_QuantizeLinear"].unexplained > 0
    assert broken.sites["n_0_fc_Gemm_output_0_QuantizeLinear"].unexplained == 0


def test_eval_and_energy_give_the_same_top1_and_counts_as_without_the_head(files, tmp_path):
    results = {}
    for name in ("softmax", "plain"):
        convert(files[name], "-o", tmp_path / f"{name}.snn", "--no-verify")
        evaluated = invoke("eval", tmp_path / f"{name}.snn", "--data", files["data"], "--json")
        energy = invoke("energy", tmp_path / f"{name}.snn", "--data", files["data"], "--json")
        assert evaluated.exit_code == 0 and energy.exit_code == 0, (evaluated.stderr, energy.stderr)
        results[name] = json.loads(evaluated.stdout), json.loads(energy.stdout)
    (softmax_eval, softmax_energy), (plain_eval, plain_energy) = results["softmax"], results["plain"]
    assert softmax_eval["top1"] == plain_eval["top1"] >= 0.5 and softmax_eval["top5"] == plain_eval["top5"]
    assert softmax_eval["layer_spikes_per_image"] == plain_eval["layer_spikes_per_image"]
    assert softmax_energy["total"] == plain_energy["total"] and softmax_energy["layers"] == plain_energy["layers"]
    assert softmax_energy["output_head"]["ops"] == ["QuantDequant", "Softmax", "QuantDequant"]
    assert plain_energy["output_head"]["ops"] == ["QuantDequant"] and not softmax_energy["output_head"]["counted"]
    # the head's rounding puts some samples' two top classes at one level (about 1 in 100 here); the
    # potentials before the head still rank them, as without the head
    snns = {name: ann2snn.load_snn(tmp_path / f"{name}.snn") for name in ("softmax", "plain")}
    x = torch.from_numpy(images(1024, seed=0))
    top2 = snns["softmax"].evaluate(x).logits.topk(2, dim=1).values
    assert int((top2[:, 0] == top2[:, 1]).sum()) >= 5
    assert torch.equal(snns["softmax"].before_head().evaluate(x).logits, snns["plain"].before_head().evaluate(x).logits)
    labels = snns["plain"].before_head().evaluate(x).logits.argmax(1)
    assert score_snn(snns["softmax"], [(x, labels)], progress=False).top1 == 1.0
    text = invoke("energy", tmp_path / "softmax.snn", "--data", files["data"]).stdout
    assert "output head (QuantDequant, Softmax, QuantDequant): float work on the SNN's output" in text


# --- other heads, each against onnxruntime ---------------------------------------------------------

class PooledClassifier(nn.Module):
    """conv -> BN -> ReLU -> global average pool -> 1x1 conv (the last layer, output (N, 10, 1, 1))."""

    def __init__(self, *head: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(8, 10, 1))
        self.head = nn.Sequential(*head)

    def forward(self, x):
        return self.head(self.body(x))


class Reshaped(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


def helper_head(tail: list, opset: int = 13) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Conv 1x1 (logits "g", (N, 10, 1, 1)), then `tail` to "y"."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["z"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Conv", ["p", "w2", "b2"], ["g"], name="fc"), *tail]
    initializers = {"w1": _weights(8, 3, 3, 3) * 0.5, "b1": _weights(8, seed=1) * 0.1,
                    "w2": _weights(10, 8, 1, 1, seed=2),
                    "b2": _weights(10, seed=3) * 0.1, "shape": np.array([-1, 10], dtype=np.int64),
                    "axes": np.array([2, 3], dtype=np.int64)}
    used = {i for n in nodes for i in n.input}
    return _model(nodes, (3, 8, 8), [(k, v) for k, v in initializers.items() if k in used], opset=opset)


HEADS = {
    "torch LogSoftmax": lambda: with_head(nn.LogSoftmax(1)),
    "torch Sigmoid": lambda: with_head(nn.Sigmoid()),
    "torch Flatten, Softmax": lambda: PooledClassifier(nn.Flatten(), nn.Softmax(1)),
    "torch reshape, Softmax": lambda: PooledClassifier(Reshaped(), nn.Softmax(1)),
    "helper Reshape, Softmax": lambda: helper_head([helper.make_node("Reshape", ["g", "shape"], ["f"], name="reshape"),
                                                    helper.make_node("Softmax", ["f"], ["y"], name="out", axis=1)]),
    "helper Squeeze, LogSoftmax": lambda: helper_head([
        helper.make_node("Squeeze", ["g", "axes"], ["f"], name="squeeze"),
        helper.make_node("LogSoftmax", ["f"], ["y"], name="out", axis=1)]),
    "helper Flatten, Identity, Softmax": lambda: helper_head([
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"), helper.make_node("Identity", ["f"], ["i"]),
        helper.make_node("Softmax", ["i"], ["y"], name="out", axis=1)]),
}


def float_file(case: str, folder) -> str:
    model = HEADS[case]()
    path = str(folder / "float.onnx")
    if isinstance(model, onnx.ModelProto):
        onnx.save(model, path)
        return path
    torch.manual_seed(0)
    return export(randomize_batch_norms(model.eval()), (3, 8, 8), path, "torchscript-17")


@pytest.mark.parametrize("case", sorted(HEADS))
def test_a_head_converts_and_matches_onnxruntime(case, tmp_path, files):
    path = quantize(float_file(case, tmp_path), tmp_path / "qdq.onnx")
    report = convert(path, "-o", tmp_path / "head.snn", "--verify-data", files["data"])
    assert_verified(report)
    head = next(op for op in ("LogSoftmax", "Softmax", "Sigmoid") if op in case)
    assert any(r.get("op") == head for r in report["rewrites"])
    expected = onnxruntime_run(path, images())
    got = ann2snn.load_snn(tmp_path / "head.snn").evaluate(torch.from_numpy(images())).logits.numpy()
    assert got.shape == expected.shape == (64, 10)
    if ops(onnx.load(path))[-1] == "DequantizeLinear":   # the head ends in a pair: its levels, one step apart at most
        pairs = ann2snn.load_snn(tmp_path / "head.snn").graph_module.modules()
        kept = [m for m in pairs if isinstance(m, QuantDequant)]
        assert np.abs(got - expected).max() <= kept[-1].scale.item() * 1.001 and (got == expected).mean() >= 0.99
    else:   # onnxruntime leaves it in float: float32 rounding apart
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_pair_written_after_a_log_softmax_is_compared_with_onnxruntime(tmp_path, files):
    """quantize_static leaves a LogSoftmax in float; a pair written after it (int8, [-12.7, 0]) is part
    of the head: kept, run after the SNN, and its levels compared with onnxruntime's."""
    model = onnx.load(quantize(float_file("torch LogSoftmax", tmp_path), tmp_path / "q.onnx"))
    output = model.graph.output[0].name
    model.graph.node[-1].output[0] = "log_probabilities"
    model.graph.node.extend([helper.make_node("QuantizeLinear", ["log_probabilities", "s", "z"], ["q"], name="head_q"),
                             helper.make_node("DequantizeLinear", ["q", "s", "z"], [output], name="head_dq")])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                                    numpy_helper.from_array(np.array(127, np.int8), "z")])
    path = str(tmp_path / "pair.onnx")
    onnx.save(model, path)
    report = convert(path, "-o", tmp_path / "pair.snn", "--verify-data", files["data"])
    assert_verified(report)
    assert report["verify"]["levels"]["sites"]["head_q"]["compared"] == 64 * 10
    got = ann2snn.load_snn(tmp_path / "pair.snn").evaluate(torch.from_numpy(images())).logits.numpy()
    expected = onnxruntime_run(path, images())
    assert (got == expected).mean() >= 0.99 and np.abs(got - expected).max() <= 0.05 * 1.001


def test_a_float_softmax_head_converts_with_calibration_and_ranks_as_the_logits(files, tmp_path):
    folder = tmp_path
    paths = {name: export(with_head(*head), (3, 8, 8), str(folder / f"{name}.onnx"), "torchscript-17")
             for name, head in (("softmax", (nn.Softmax(1),)), ("plain", ()))}
    top1 = {}
    for name, path in paths.items():
        assert_verified(convert(path, "-T", "4", "--calib", files["data"], "-o", folder / f"{name}.snn"))
        evaluated = invoke("eval", folder / f"{name}.snn", "--data", files["data"], "--json")
        top1[name] = json.loads(evaluated.stdout)["top1"]
    assert top1["softmax"] == top1["plain"]


# --- refusals -------------------------------------------------------------------------------------

def test_a_spiking_layer_after_the_softmax_is_refused_naming_node_op_and_opset(tmp_path, files):
    tail = [helper.make_node("Softmax", ["g"], ["s"], name="middle", axis=1),
            helper.make_node("Flatten", ["s"], ["f"], name="flatten2"),
            helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc2", transB=1)]
    model = helper_head(tail, opset=13)
    model.graph.initializer.append(numpy_helper.from_array(_weights(10, 10, seed=9), "w3"))
    float_path = str(tmp_path / "middle.onnx")
    onnx.save(model, float_path)
    path = quantize(float_path, tmp_path / "middle_qdq.onnx")
    before = snapshot(tmp_path)
    for refused in (float_path, path):
        extra = ("-T", "4", "--calib", files["data"]) if refused == float_path else ()
        line = assert_refused(invoke("convert", refused, *extra, "-o", tmp_path / "out.snn"), refused,
                              "node 'middle' (Softmax, opset 13) is not after the last layer",
                              "node 'fc2' (Gemm, opset 13) follows it", before=before, folders=(tmp_path,))
        assert "internal error" not in line


def test_a_zoo_model_refusal_names_no_opset():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), QuantClippedActivation(levels=7), nn.Flatten(), nn.Linear(144, 10),
                          nn.Softmax(1), nn.Linear(10, 10)).eval()
    with pytest.raises(UnsupportedModelError, match=r"^node '_4' \(Softmax\) is not after the last layer: node '_5' "
                                                     r"\(Linear\) follows it"):
        ann2snn.convert(model, T=3)


# --- an output that is a map, (N, C, H, W) -------------------------------------------------------

@pytest.fixture(scope="module")
def map_output(tmp_path_factory) -> tuple[str, str]:
    """A fully convolutional network whose last op is a Conv: output (N, 4, 8, 8); and an .npz."""
    folder = tmp_path_factory.mktemp("map")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    path = export(model, (3, 8, 8), str(folder / "fcn.onnx"), "torchscript-17")
    x = images()
    np.savez(folder / "data.npz", x=x, y=np.random.default_rng(0).integers(0, 4, len(x)))
    return path, str(folder / "data.npz")


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantize_static"])
def test_a_map_output_converts_and_verifies(map_output, tmp_path, quantized):
    path, data = map_output
    if quantized:
        path = quantize(path, tmp_path / "fcn_qdq.onnx")
    report = convert(path, "--calib", data, "-o", tmp_path / "fcn.snn", *(() if quantized else ("-T", "4")))
    assert_verified(report)
    if quantized:
        assert report["verify"]["agreement"] == 1.0
    snn = ann2snn.load_snn(tmp_path / "fcn.snn")
    got = snn.evaluate(torch.from_numpy(images())).logits.numpy()
    expected = onnxruntime_run(path, images())
    assert got.shape == expected.shape == (64, 4, 8, 8)
    if quantized:
        step = [m for m in snn.graph_module.modules() if isinstance(m, QuantDequant)][-1].scale.item()
        assert np.abs(got - expected).max() <= step * 1.001
    energy = invoke("energy", tmp_path / "fcn.snn", "--data", data, "--json")
    assert energy.exit_code == 0 and json.loads(energy.stdout)["total"]["synaptic_ops"] > 0, energy.stderr
    assert_refused(invoke("eval", tmp_path / "fcn.snn", "--data", data), "fcn",
                   "its output per sample has shape (4, 8, 8), not one score per class")


def test_a_classifier_output_with_trailing_ones_evaluates(tmp_path, files):
    """(N, 10, 1, 1), as a convolutional classifier may end: one row of class scores per sample, ranked
    as onnxruntime's output of the last layer ranks them."""
    model = onnx.load(quantize(float_file("torch Flatten, Softmax", tmp_path), tmp_path / "q.onnx"))
    nodes = list(model.graph.node)
    last = max(i for i, n in enumerate(nodes) if n.op_type == "Conv")   # end the graph at the last layer
    graph = helper.make_graph(nodes[:last + 1], "g", list(model.graph.input),
                              [helper.make_tensor_value_info(nodes[last].output[0], TensorProto.FLOAT, None)],
                              list(model.graph.initializer))
    path = str(tmp_path / "cut.onnx")
    onnx.save(onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=model.opset_import)), path)
    assert_verified(convert(path, "-o", tmp_path / "cut.snn", "--verify-data", files["data"]))
    result = invoke("eval", tmp_path / "cut.snn", "--data", files["data"], "--json")
    assert result.exit_code == 0, result.stderr
    output = onnxruntime_run(path, images())
    assert output.shape == (64, 10, 1, 1)
    labels = np.load(files["data"])["y"]
    assert json.loads(result.stdout)["top1"] == (output.reshape(64, 10).argmax(1) == labels).mean()
