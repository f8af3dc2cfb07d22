"""load_onnx refuses what it cannot convert with one UnsupportedModelError line that begins with the path.

One test per kind of refusal: not an ONNX file, truncated file, checker failure, unsupported op,
unsupported attribute value, opset out of range, external data outside the model's folder, input
of unsupported rank, NaN/Inf weights; and a few more the brief implies (QuantizeLinear without
DequantizeLinear, several inputs, a dynamic spatial dimension).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ann2snn.errors import Ann2SnnError, UnsupportedModelError
from ann2snn.frontend.importer import inspect_onnx, load_onnx


def make_model(nodes, x_shape=("N", 2, 5, 5), initializers=None, opset=13, inputs=None,
               y_shape=None) -> onnx.ModelProto:
    """A model over input x; y's shape is left to shape inference (the checker wants one)."""
    initializers = initializers if initializers is not None else {"w": np.ones((3, 2, 3, 3), np.float32)}
    graph = helper.make_graph(
        nodes, "g", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # a deliberately broken model
        return model


def conv_relu(**conv_attributes) -> list:
    return [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **conv_attributes),
            helper.make_node("Relu", ["c"], ["y"], name="relu")]


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def refusal(path: str, *fragments: str, loader=load_onnx) -> str:
    """Load `path`, expect one UnsupportedModelError line starting with the path and naming `fragments`."""
    with pytest.raises(UnsupportedModelError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_a_valid_model_loads(tmp_path):
    load_onnx(save(make_model(conv_relu()), tmp_path / "ok.onnx"))


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are my notes, not a model\n" * 20)
    refusal(str(path), "not an ONNX file")
    refusal(str(path), "not an ONNX file", loader=inspect_onnx)


def test_missing_file(tmp_path):
    refusal(str(tmp_path / "nothing.onnx"), "no such file")


def test_truncated_file(tmp_path):
    path = save(make_model(conv_relu(), initializers={"w": np.ones((3, 2, 3, 3), np.float32)}),
                tmp_path / "full.onnx")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    refusal(str(truncated), "truncated or corrupt")


def test_checker_failure(tmp_path):
    nodes = [helper.make_node("Relu", ["undefined_value"], ["y"], name="relu")]
    model = make_model(nodes, y_shape=["N", 2, 5, 5])
    refusal(save(model, tmp_path / "broken.onnx"), "ONNX checker rejects the model", "undefined_value")


@pytest.mark.parametrize("name, b_shape, y_type, fragments", [
    ("add", (1, 3, 4, 4), TensorProto.FLOAT, ["at node 'add' (Add, number 2 of 3)", "Incompatible dimensions"]),
    ("", (1, 3, 4, 4), TensorProto.FLOAT, ["at node <unnamed> (Add, number 2 of 3)", "Incompatible dimensions"]),
    ("", (1, 2, 5, 5), TensorProto.INT64, ["at node <unnamed> (Add, number 2 of 3)", "elem type differs"]),
])
def test_a_shape_inference_failure_names_the_node_at_fault(name, b_shape, y_type, fragments, tmp_path):
    """onnx's message names a node by its op type alone (and its name where it has one): the line
    says which node it is, found by inferring ever longer prefixes of the graph."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["s"]),
             helper.make_node("Add", ["s", "b"], ["y"], name=name)]
    model = make_model(nodes, initializers={"b": np.ones(b_shape, np.float32)}, y_shape=["N", 2, 5, 5])
    model.graph.output[0].type.tensor_type.elem_type = y_type
    refusal(save(model, tmp_path / "broken.onnx"), "ONNX shape inference fails", *fragments)


def test_unsupported_op(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("LeakyRelu", ["c"], ["y"], name="gate")]
    message = refusal(save(make_model(nodes), tmp_path / "leaky.onnx"),
                      "'gate'", "LeakyRelu", "opset 13", "retrain it with ReLU", "supported op types:")
    listed = message.split("supported op types:")[1]
    for op in ("Conv", "Relu", "MaxPool", "Gemm", "QuantizeLinear", "DequantizeLinear"):
        assert op in listed


CONST = {"w": np.ones((3, 2, 3, 3), np.float32), "pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64),
         "flat": np.array([-1], np.int64), "b": np.ones((50, 4), np.float32)}


@pytest.mark.parametrize("nodes, x_shape, fragments", [
    ([helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode="reflect")], ("N", 2, 5, 5),
     ["'pad'", "Pad", "opset 13", "mode='reflect'", "widen the dimensions after the channels"]),
    (conv_relu(auto_pad="SAME_SIDEWAYS"), ("N", 2, 5, 5), ["'conv'", "Conv", "auto_pad='SAME_SIDEWAYS'"]),
    ([helper.make_node("Gemm", ["x", "b"], ["y"], name="fc", transA=1)], (50, 3), ["'fc'", "Gemm", "transA=1"]),
    ([helper.make_node("Reshape", ["x", "flat"], ["y"], name="to_vector")], ("N", 2, 5, 5),
     ["'to_vector'", "Reshape", "moves the batch dimension"]),
    ([helper.make_node("Transpose", ["x"], ["y"], name="swap", perm=[1, 0, 2, 3])], ("N", 2, 5, 5),
     ["'swap'", "perm=[1, 0, 2, 3]"]),
    ([helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2], storage_order=1),
      helper.make_node("Identity", ["idx"], ["unused"])], ("N", 2, 5, 5), ["'pool'", "Indices"]),
])
def test_unsupported_attribute_value(nodes, x_shape, fragments, tmp_path):
    model = make_model(nodes, x_shape, CONST)
    refusal(save(model, tmp_path / "attribute.onnx"), *fragments)


@pytest.mark.parametrize("opset", [6, onnx.defs.onnx_opset_version() + 1])
def test_opset_out_of_range(opset, tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], opset=opset, initializers={})
    refusal(save(model, tmp_path / f"opset{opset}.onnx"), f"opset {opset} is not supported",
            f"7..{onnx.defs.onnx_opset_version()}")


def _external_model(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    model = make_model(conv_relu(), initializers={"w": np.ones((3, 2, 3, 3), np.float32)})
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


def test_external_data_inside_the_folder_is_read(tmp_path):
    gm = load_onnx(_external_model(tmp_path / "model"))
    assert float(gm.get_submodule("conv").weight.detach().sum()) == 3 * 2 * 3 * 3


def test_external_data_outside_the_model_folder(tmp_path):
    path = _external_model(tmp_path / "model")
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "weights.bin")
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../weights.bin"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    refusal(path, "'w'", "'../weights.bin'", "outside the model's folder")


@pytest.mark.parametrize("shape", [("N", 2, 3, 4, 5), ("N",)])
def test_input_of_unsupported_rank(shape, tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], x_shape=shape, initializers={})
    refusal(save(model, tmp_path / "rank.onnx"), "input 'x'", f"rank {len(shape)}")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weights(bad, tmp_path):
    weights = np.ones((3, 2, 3, 3), np.float32)
    weights[1, 0, 2, 2] = bad
    model = make_model(conv_relu(), initializers={"w": weights})
    refusal(save(model, tmp_path / "nan.onnx"), "initializer 'w'", "NaN" if np.isnan(bad) else "Inf")


def test_quantize_without_dequantize(tmp_path):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("q", TensorProto.UINT8, ["N", 4])],
                              [numpy_helper.from_array(np.float32(0.1), "s"),
                               numpy_helper.from_array(np.uint8(0), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    refusal(save(model, tmp_path / "q.onnx"), "QuantizeLinear 'quant' is not followed by DequantizeLinear")


def test_several_inputs(tmp_path):
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("x", "x2")]
    model = make_model([helper.make_node("Add", ["x", "x2"], ["y"])], inputs=inputs, initializers={})
    refusal(save(model, tmp_path / "two.onnx"), "exactly one graph input", "'x', 'x2'")


def test_dynamic_spatial_dimension(tmp_path):
    model = make_model(conv_relu(), x_shape=("N", 2, "height", 5))
    refusal(save(model, tmp_path / "dynamic.onnx"), "dynamic dimension 2", "'height'")


def test_in_memory_model_errors_name_the_graph():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], x_shape=("N", 2, 3, 4, 5), initializers={})
    with pytest.raises(Ann2SnnError, match=r"^<ModelProto g>: input 'x' has rank 5"):
        load_onnx(model)
