"""Float ONNX files as they are exported in the wild (issue 16, part 3): TensorFlow's SAME padding
written as a Pad, several outputs (--output-name), dynamic height and width (--input-shape or the
calibration data's shape), Keras-style graphs from tf2onnx (an NHWC input, BatchNormalization as
Mul and Add, flatten through Shape / Slice / Concat / Reshape, Shape / Gather / Unsqueeze / Concat, or
Shape / Slice / ReduceProd / Concat).

Each file is built here (onnx.helper, torch.onnx.export) and converted by the real command; the
conversion is verified against onnxruntime.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hostile import assert_refused, invoke, snapshot
from test_onnx_import import _weights

F32 = TensorProto.FLOAT


def save(path, nodes: list, initializers: dict, x_shape=("N", 1, 8, 8), y_shape=None, opset: int = 13) -> str:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, list(x_shape))],
                              [helper.make_tensor_value_info("y", F32, y_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    onnx.save(model, str(path))
    return str(path)


def report_of(result) -> dict:
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verify"]["passed"] and report["verify"]["exact"]["passed"], report["verify"]
    assert report["verify"]["agreement"] >= 0.9, report["verify"]
    return report


def convert(path, *extra) -> dict:
    return report_of(invoke("convert", path, "-T", "4", "--calib", "digits", "--json", *extra))


# --- 1. TensorFlow's SAME padding written as a Pad ------------------------------------------------------------

def pad_node(mode: str, pads: list[int], value: str | None = None, name: str = "pad", source: str = "r",
             target: str = "padded") -> onnx.NodeProto:
    inputs = [source, f"{name}_pads"] + ([value] if value else [])
    return helper.make_node("Pad", inputs, [target], name=name, mode=mode)


def pooled_cnn(path, mode: str = "constant", pads=(0, 0, 0, 0, 0, 0, 1, 1), fill: float | None = None,
               activation_first: bool = True, dilations=None) -> str:
    """Conv -> Relu -> Pad -> MaxPool(3, stride 2) -> Flatten -> Gemm on 1x8x8: TensorFlow's SAME
    pooling of an 8x8 map (one row and column at the end). Without `activation_first`, the Relu
    comes after the MaxPool, so that the padded tensor can be negative."""
    fill_nodes, value = [], None
    if fill is not None:
        fill_nodes = [helper.make_node("Constant", [], ["fill"], name="fill",
                                       value=numpy_helper.from_array(np.array(fill, np.float32)))]
        value = "fill"
    pool = helper.make_node("MaxPool", ["padded"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                            **({"dilations": dilations} if dilations else {}))
    conv = helper.make_node("Conv", ["x", "w1", "b1"], ["z"], name="conv1", pads=[1, 1, 1, 1])
    if activation_first:
        middle = [helper.make_node("Relu", ["z"], ["r"], name="relu"), pad_node(mode, list(pads), value), pool]
        last = "p"
    else:
        middle = [pad_node(mode, list(pads), value, source="z"), pool,
                  helper.make_node("Relu", ["p"], ["a"], name="relu")]
        last = "a"
    nodes = [conv, *fill_nodes, *middle, helper.make_node("Flatten", [last], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    features = 4 * 4 * 4 if not dilations else 4 * 3 * 3
    return save(path, nodes, {"w1": _weights(4, 1, 3, 3), "b1": _weights(4, seed=1), "pad_pads": np.array(pads),
                              "w2": _weights(10, features, seed=2) * 0.1, "b2": _weights(10, seed=3)})


def folded(report: dict) -> list[dict]:
    return [r for r in report["rewrites"] if "folded_into" in r]


@pytest.mark.parametrize("mode, fill", [("constant", None), ("constant", 0.0), ("edge", None),
                                        ("constant", -math.inf)])
def test_a_same_pad_before_a_max_pool_becomes_its_padding(tmp_path, mode, fill):
    report = convert(pooled_cnn(tmp_path / "same.onnx", mode, fill=fill))
    assert folded(report) == [{"pass": "import", "pad": "pad", "folded_into": "pool", "mode": mode,
                               "pads": [[0, 1], [0, 1]]}]
    # the asymmetric padding is torch's padding 0 with ceil_mode: the pool stays on its site and moves
    assert any(r.get("pass") == "move_max_pool_before_sites" and r.get("max_pool") for r in report["rewrites"])


def test_a_zero_pad_before_a_max_pool_on_a_signed_tensor_stays(tmp_path):
    """max(0, window) is not the window's max when it is negative: the Pad stays as it is."""
    report = convert(pooled_cnn(tmp_path / "signed.onnx", activation_first=False))
    assert folded(report) == []


def test_a_symmetric_pad_before_a_max_pool(tmp_path):
    report = convert(pooled_cnn(tmp_path / "sym.onnx", "edge", pads=(0, 0, 1, 1, 0, 0, 1, 1), dilations=None))
    assert folded(report)[0]["pads"] == [[1, 1], [1, 1]]


def conv_padded_cnn(path, pads, mode: str = "constant") -> str:
    """Pad -> Conv (no pads of its own) -> Relu -> Flatten -> Gemm on 1x8x8."""
    nodes = [pad_node(mode, list(pads), source="x"),
             helper.make_node("Conv", ["padded", "w1", "b1"], ["z"], name="conv1"),
             helper.make_node("Relu", ["z"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    height, width = ((8 + pads[k] + pads[k + 4] - 2) // 2 for k in (2, 3))  # after the conv and the pool
    return save(path, nodes, {"w1": _weights(4, 1, 3, 3), "b1": _weights(4, seed=1), "pad_pads": np.array(pads),
                              "w2": _weights(10, 4 * height * width, seed=2) * 0.1, "b2": _weights(10, seed=3)})


@pytest.mark.parametrize("pads", [(0, 0, 1, 1, 0, 0, 1, 1), (0, 0, 0, 0, 0, 0, 1, 1), (0, 0, 1, 0, 0, 0, 2, 1)])
def test_a_zero_pad_before_a_conv_becomes_its_padding(tmp_path, pads):
    report = convert(conv_padded_cnn(tmp_path / "conv.onnx", pads))
    assert folded(report) == [{"pass": "import", "pad": "pad", "folded_into": "conv1", "mode": "constant",
                               "pads": [[pads[2], pads[6]], [pads[3], pads[7]]]}]


MIDDLE_PADS = {"edge-before-conv": lambda p: conv_padded_cnn(p, (0, 0, 1, 1, 0, 0, 1, 1), "edge"),
               "reflect-before-conv": lambda p: conv_padded_cnn(p, (0, 0, 1, 1, 0, 0, 1, 1), "reflect"),
               "reflect-before-max-pool": lambda p: pooled_cnn(p, "reflect"),
               "edge-before-dilated-max-pool": lambda p: pooled_cnn(p, "edge", dilations=[2, 2])}


@pytest.mark.parametrize("build", MIDDLE_PADS.values(), ids=MIDDLE_PADS.keys())
def test_an_edge_or_reflect_pad_in_the_middle_stays_a_pad_and_converts_exactly(tmp_path, build):
    """No Conv or MaxPool can take it as its own padding: it pads the spike planes (or the
    potentials) itself, and the SNN still equals onnxruntime's run (convert's verification)."""
    report = convert(build(tmp_path / "m.onnx"))
    assert folded(report) == []


def test_wrap_padding_is_refused_in_one_line(tmp_path):
    path = conv_padded_cnn(tmp_path / "bad.onnx", (0, 0, 1, 1, 0, 0, 1, 1), "wrap")
    model = onnx.load(path)
    model.opset_import[0].version = 19   # wrap is new in opset 19
    onnx.save(model, path)
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", path, "-T", "4", "--calib", "digits"), path, "'pad'", "mode='wrap'",
                   "supported: constant, edge, reflect", before=before, folders=(tmp_path,))


PAD_CASES = {f"{mode}-before-{where}": (mode, where) for mode in ("constant", "edge", "reflect", "wrap")
             for where in ("max-pool", "conv", "dilated-max-pool")}


@pytest.mark.parametrize("mode, where", PAD_CASES.values(), ids=PAD_CASES.keys())
def test_inspect_and_convert_agree_on_every_pad_mode(tmp_path, mode, where):
    if where == "conv":
        path = conv_padded_cnn(tmp_path / "m.onnx", (0, 0, 1, 1, 0, 0, 1, 1), mode)
    else:
        path = pooled_cnn(tmp_path / "m.onnx", mode, dilations=[2, 2] if where == "dilated-max-pool" else None)
    opset = 19 if mode == "wrap" else 13
    if opset != 13:
        model = onnx.load(path)
        model.opset_import[0].version = opset
        onnx.save(model, path)
    inspected = json.loads(invoke("inspect", path, "--json").stdout)
    converted = invoke("convert", path, "-T", "4", "--calib", "digits", "--json")
    assert inspected["ops"]["Pad"]["supported"] == (converted.exit_code == 0), converted.stderr
    assert inspected["all_ops_supported"] == (converted.exit_code == 0)
    if converted.exit_code != 0:
        assert inspected["refused_nodes"]["pad"] in assert_refused(converted)
    expected = mode != "wrap"
    assert (converted.exit_code == 0) == expected


# --- 2. several outputs ---------------------------------------------------------------------------------------

class TwoHeads(torch.nn.Module):
    """Features first, logits second: the file's first output is not the classifier's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        features = torch.flatten(self.pool(torch.relu(self.conv(x))), 1)
        return features, self.fc(features)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("heads") / "heads.onnx")
    torch.onnx.export(TwoHeads().eval(), (torch.rand(1, 1, 8, 8),), path, input_names=["x"],
                      output_names=["features", "logits"], dynamic_axes={"x": {0: "N"}}, dynamo=False)
    return path


def test_output_picks_the_logits_of_a_model_with_several(two_heads):
    report = convert(two_heads, "--output-name", "logits")
    assert {"pass": "import", "output": "logits", "dropped_outputs": ["features"]} in report["rewrites"]
    assert report["source"]["output"] == "logits"
    # verify reads the choice back from the artifact
    checked = invoke("verify", report["output"], "--against", two_heads, "--data", "digits", "--json")
    assert checked.exit_code == 0 and json.loads(checked.stdout)["passed"], checked.stderr


def test_several_outputs_without_output_are_refused_with_their_names(two_heads):
    assert_refused(invoke("convert", two_heads, "-T", "4", "--calib", "digits"), two_heads, "2 outputs",
                   "'features', 'logits'", "--output-name NAME")
    assert_refused(invoke("convert", two_heads, "-T", "4", "--calib", "digits", "--output-name", "probs"), two_heads,
                   "no output 'probs'", "'features', 'logits'")
    assert json.loads(invoke("inspect", two_heads, "--json").stdout)["outputs"] == ["features", "logits"]


# --- 3. dynamic height and width ------------------------------------------------------------------------------

class AnySize(torch.nn.Module):
    """Conv -> ReLU -> MaxPool -> global average -> Linear on 3 channels of any height and width."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.pool(torch.relu(self.conv(x))), 1),
                                     1))


@pytest.fixture(scope="module")
def any_size(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("dynamic")
    path = str(folder / "any_size.onnx")
    torch.onnx.export(AnySize().eval(), (torch.rand(1, 3, 12, 12),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}}, dynamo=False)
    dims = [d.dim_param or d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    calib = folder / "calib.npz"
    x = np.random.default_rng(0).random((64, 3, 12, 12), dtype=np.float32)
    np.savez(calib, x=x, y=np.arange(64) % 10)
    return path, str(calib)


def test_dynamic_height_and_width_take_the_calibration_datas_shape(any_size):
    path, calib = any_size
    report = report_of(invoke("convert", path, "-T", "4", "--calib", calib, "--json"))
    assert {"pass": "import", "input_sizes": {"H": 12, "W": 12}} in report["rewrites"]
    assert report["source"]["input_shape"] == [3, 12, 12]


def test_dynamic_height_and_width_fixed_by_input_shape(any_size):
    path, calib = any_size
    report = report_of(invoke("convert", path, "-T", "4", "--calib", calib, "--input-shape", "3,12,12", "--json"))
    assert {"pass": "import", "input_sizes": {"H": 12, "W": 12}} in report["rewrites"]


def test_dynamic_height_and_width_without_a_shape_are_refused(any_size, tmp_path):
    path, calib = any_size
    assert_refused(invoke("convert", path, "-T", "4"), path, "input 'x'", "[N, 3, H, W]", "--input-shape")
    assert_refused(invoke("convert", path, "-T", "4", "--calib", calib, "--input-shape", "3,10,10"), path,
                   "calibration samples have shape [3, 12, 12]", "[3, 10, 10]")
    assert_refused(invoke("convert", path, "-T", "4", "--calib", calib, "--input-shape", "1,12,12"), path,
                   "[3, 12, 12]", "not the input shape [1, 12, 12]")


# --- 4. Keras-style graphs (tf2onnx) --------------------------------------------------------------------------

FLATTENS = {  # three ways tf2onnx computes the Reshape target [batch, -1] / [batch, 64] from the shape
    "slice": [helper.make_node("Slice", ["shape", "zero1", "one"], ["first"], name="slice"),
              helper.make_node("Concat", ["first", "minus_one"], ["target"], name="concat", axis=0)],
    "gather": [helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
               helper.make_node("Unsqueeze", ["batch", "zero1"], ["first"], name="unsqueeze"),
               helper.make_node("Concat", ["first", "features"], ["target"], name="concat", axis=0)],
    "reduce_prod": [helper.make_node("Slice", ["shape", "zero1", "one"], ["first"], name="slice_batch"),
                    helper.make_node("Slice", ["shape", "one", "four"], ["rest"], name="slice_rest"),
                    helper.make_node("ReduceProd", ["rest"], ["features_product"], name="prod", keepdims=1),
                    helper.make_node("Concat", ["first", "features_product"], ["target"], name="concat", axis=0)],
}


def keras_cnn(path, flatten: str) -> str:
    """What tf2onnx writes for Conv2D -> ReLU -> BatchNormalization -> MaxPool2D -> Flatten -> Dense
    on an NHWC input: a Transpose to NCHW around the convolution, the BatchNormalization folded to
    a per-channel Mul and Add (in NHWC), a flatten through Shape / Slice / Concat / Reshape, and a
    Dense layer as MatMul and Add."""
    int64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["z"], name="conv2d", pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["z"], ["z_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Relu", ["z_nhwc"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "bn_scale"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "bn_shift"], ["n"], name="bn_add"),
             helper.make_node("Transpose", ["n"], ["n_nchw"], name="pool_in", perm=[0, 3, 1, 2]),
             helper.make_node("MaxPool", ["n_nchw"], ["p"], name="max_pooling2d", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["p_nhwc"], name="pool_out", perm=[0, 2, 3, 1]),
             helper.make_node("Shape", ["p_nhwc"], ["shape"], name="shape"),
             *FLATTENS[flatten],
             helper.make_node("Reshape", ["p_nhwc", "target"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w2"], ["g"], name="dense"),
             helper.make_node("Add", ["g", "b2"], ["y"], name="dense_bias")]
    initializers = {"w1": _weights(4, 1, 3, 3), "b1": _weights(4, seed=1),
                    "bn_scale": np.abs(_weights(4, seed=4)) + 0.5, "bn_shift": _weights(4, seed=5) * 0.1,
                    "zero": np.array(0, np.int64), "zero1": int64(0), "one": int64(1), "four": int64(4),
                    "minus_one": int64(-1),
                    "features": int64(64),
                    "w2": _weights(64, 10, seed=2) * 0.1, "b2": _weights(10, seed=3)}
    return save(path, nodes, initializers, x_shape=("N", 8, 8, 1), y_shape=["N", 10])


@pytest.mark.parametrize("flatten", FLATTENS)
def test_a_keras_style_graph_converts(tmp_path, flatten):
    from ann2snn.data.sets import load_dataset

    path = keras_cnn(tmp_path / "keras.onnx", flatten)
    digits = load_dataset("digits", split="calib")
    x = np.stack([np.asarray(digits[i][0]) for i in range(128)]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    np.savez(tmp_path / "nhwc.npz", x=x.astype(np.float32), y=np.array([int(digits[i][1]) for i in range(128)]))
    report = report_of(invoke("convert", path, "-T", "4", "--calib", tmp_path / "nhwc.npz", "--json"))
    assert len(report["sites"]) == 1
    inspected = json.loads(invoke("inspect", path, "--json").stdout)
    assert inspected["all_ops_supported"] and inspected["input"]["shape"] == ["N", 8, 8, 1]
