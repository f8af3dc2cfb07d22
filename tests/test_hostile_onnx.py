"""Hostile ONNX files against `ann2snn convert` and `ann2snn inspect` (issue 13: bad input still
reached tracebacks).

Every file is built here (onnx.helper, numpy, raw protobuf bytes); none is checked in. Each must be
refused as tests/hostile.py checks: exit code 2, one `ann2snn: error: <path>: ...` line that names
the problem (node, op, opset, expected against found), no traceback, no "internal error", no file
created or changed. A few files that used to crash are valid and must now convert or inspect.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ann2snn import convert_onnx
from ann2snn.frontend.source import quantized_onnx
from ann2snn.errors import UnsupportedModelError
from ann2snn.verify.verification import verification_inputs
from hostile import assert_refused, invoke, snapshot

REPO = Path(__file__).resolve().parent.parent
F32 = TensorProto.FLOAT


# --- building models ------------------------------------------------------------------------------

def make(nodes: list, initializers: dict, x_shape=("N", 1, 8, 8), y_shape=("N", 10), *, opset: int = 13,
         dtype: int = F32, outputs: list | None = None, inputs: list | None = None,
         opsets: list | None = None) -> onnx.ModelProto:
    """A model over input x with output y; nothing is checked (the files are meant to be bad)."""
    graph = helper.make_graph(
        nodes, "hostile",
        inputs if inputs is not None else [helper.make_tensor_value_info("x", dtype, list(x_shape))],
        outputs if outputs is not None else [helper.make_tensor_value_info("y", dtype, list(y_shape))],
        [v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(np.asarray(v), k)
         for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", opset)])


def weights(channels: int = 1, dtype=np.float32) -> dict:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(4, channels, 3, 3)).astype(dtype), "fc_w": rng.normal(size=(10, 4)).astype(dtype),
            "fc_b": rng.normal(size=(10,)).astype(dtype)}


def head(source: str) -> list:
    """GlobalAveragePool -> Flatten -> Gemm: 10 logits whatever the spatial size."""
    return [helper.make_node("GlobalAveragePool", [source], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]


def qdq(source: str, output: str, scale: str = "s", zero: str = "z", **attributes) -> list:
    return [helper.make_node("QuantizeLinear", [source, scale, zero], ["q"], name="quant", **attributes),
            helper.make_node("DequantizeLinear", ["q", scale, zero], [output], name="dequant")]


def qdq_net(scale: str = "s", *, extra: dict | None = None, channels: int = 1, pre: list | None = None,
            conv: dict | None = None, between: list | None = None, **kwargs) -> onnx.ModelProto:
    """[pre] -> Conv -> [between] -> Relu -> QuantizeLinear -> DequantizeLinear -> head: one uint8 site."""
    initializers = {**weights(channels), "s": np.float32(0.05), "z": np.uint8(0), **(extra or {})}
    conv_out = "c0" if between else "c"
    nodes = [*(pre or []), helper.make_node("Conv", ["x", "w"], [conv_out], name="conv", **(conv or {})),
             *(between or []), helper.make_node("Relu", ["c"], ["r"], name="relu"), *qdq("r", "d", scale),
             *head("d")]
    return make(nodes, initializers, **kwargs)


def float_net(*, conv: dict | None = None, dtype=np.float32, **kwargs) -> onnx.ModelProto:
    """Conv -> Relu -> head: a float model, which needs -T and --calib."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **(conv or {})),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), *head("r")]
    return make(nodes, weights(dtype=dtype), dtype=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), **kwargs)


def vector_net(nodes: list, initializers: dict, shape=("N", 4), **kwargs) -> onnx.ModelProto:
    """[nodes] producing `a` -> Relu -> QuantizeLinear -> DequantizeLinear -> y, over x of `shape`."""
    tail = [helper.make_node("Relu", ["a"], ["r"], name="relu"), *qdq("r", "y")]
    return make([*nodes, *tail], {"s": np.float32(0.05), "z": np.uint8(0), **initializers}, x_shape=shape,
                y_shape=kwargs.pop("y_shape", shape), **kwargs)


def constant(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(np.asarray(value), name))


def int32_stored(name: str, data_type: int, values: list[int], dims=()) -> onnx.TensorProto:
    """A small-integer tensor as protobuf stores it (widened to int32_data), its values unchecked."""
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
    tensor.int32_data.extend(values)
    return tensor


def corrupt_w(edit: Callable[[onnx.TensorProto], None]) -> onnx.ModelProto:
    model = qdq_net()
    edit(next(t for t in model.graph.initializer if t.name == "w"))
    return model


def float_data(tensor: onnx.TensorProto, count: int) -> None:
    tensor.ClearField("raw_data")
    tensor.float_data.extend([0.5] * count)


def reshape(target: list[int]) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape")]
    return make(nodes, {"shape": np.array(target, np.int64)}, x_shape=("N", 16), y_shape=("N", "M"))


def computed_reshape(tail: list[int]) -> onnx.ModelProto:
    """Reshape to Concat(Shape(x)[0], tail): a target shape inference cannot see, only the importer."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Shape", ["r"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["y"], name="reshape")]
    constants = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "tail": np.array(tail, np.int64)}
    return make(nodes, constants, x_shape=("N", 16), y_shape=("N", "M"))


def cyclic() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Identity", ["b"], ["y"], name="out")]
    return make(nodes, {}, x_shape=("N", 4), y_shape=("N", 4))


def identity_chain(count: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [f"v{i}" if i else "x"], [f"v{i + 1}" if i + 1 < count else "y"],
                              name=f"id{i}") for i in range(count)]
    return make(nodes, {}, x_shape=("N", 4), y_shape=("N", 4))


def batch_norm(var: float) -> onnx.ModelProto:
    bn = helper.make_node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["c"], name="bn")
    ones = np.ones(4, np.float32)
    return qdq_net(between=[bn], extra={"bn_s": ones, "bn_b": 0 * ones, "bn_m": 0 * ones, "bn_v": var * ones})


def with_ir_version(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    model.ir_version = version
    return model


def save(model: onnx.ModelProto | bytes, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def truncated(folder: Path) -> Path:
    data = qdq_net().SerializeToString()
    return save(data[: len(data) // 2], folder)


def non_utf8_name(folder: Path) -> Path:
    """The node name "relu" as invalid UTF-8 (same length, so the protobuf stays well formed)."""
    return save(qdq_net().SerializeToString().replace(b"relu", b"r\xffl\xfe", 1), folder)


def external(folder: Path, **entries: str) -> Path:
    """qdq_net with its tensors in weights.bin beside it, then the external_data entries overwritten."""
    path = folder / "model.onnx"
    onnx.save_model(qdq_net(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        entry.value = entries.get(entry.key, entry.value)
    return save(model, folder)


def npz(folder: Path, x: np.ndarray, name: str = "calib.npz") -> Path:
    path = folder / name
    np.savez(path, x=x, y=np.arange(len(x)) % 10)
    return path


# --- the cases --------------------------------------------------------------------------------------

@dataclass
class Case:
    build: Callable[[Path], Path]       # writes the file(s) into a folder and returns the model's path
    fragments: tuple[str, ...]          # what the error line must name besides the path
    args: tuple[str, ...] = ()          # convert's options
    commands: tuple[str, ...] = ("convert",)


def model_case(model: Callable[[], onnx.ModelProto], *fragments: str, **kwargs) -> Case:
    return Case(lambda folder: save(model(), folder), fragments, **kwargs)


BOTH = ("convert", "inspect")
CALIB = ("-T", "3", "--calib", "digits")
HUGE_PADS = [0, 0, 10**6, 10**6, 0, 0, 10**6, 10**6]

CASES: dict[str, Case] = {
    # 1. tensors that cannot be allocated: refused before the importer's probe allocates them
    "huge-input": model_case(lambda: qdq_net(x_shape=(1, 3, 100000, 100000), channels=3),
                             "input 'x'", "[1, 3, 100000, 100000]", "too large"),
    "huge-fixed-batch": model_case(lambda: qdq_net(x_shape=(10**7, 1, 8, 8)), "input 'x'", "[10000000, 1, 8, 8]",
                                   "too large"),
    "astronomic-input": model_case(lambda: qdq_net(x_shape=("N", 1, 2**40, 2**40)), "input 'x'", "too large"),
    "huge-pad": model_case(
        lambda: qdq_net(pre=[helper.make_node("Pad", ["x0", "pads"], ["x"], name="pad")], extra={
            "pads": np.array(HUGE_PADS, np.int64)}, inputs=[helper.make_tensor_value_info("x0", F32, ["N", 1, 8, 8])]),
        "'pad'", "Pad", "padding", "more than"),
    "huge-conv-pads": model_case(lambda: qdq_net(conv={"pads": [10**5] * 4}), "'conv'", "Conv", "padding", "more than"),
    # 2. QuantizeLinear parameters
    "scale-zero": model_case(lambda: qdq_net(extra={"s": np.float32(0.0)}), "'quant'", "QuantizeLinear",
                             "opset 13", "scale is 0", "positive"),
    "scale-negative": model_case(lambda: qdq_net(extra={"s": np.float32(-0.1)}), "'quant'", "scale is -0.1"),
    "scale-nan-constant": model_case(lambda: qdq_net("cs", pre=[constant("cs", np.float32(np.nan))]),
                                     "'quant'", "scale is nan"),
    "scale-inf-constant": model_case(lambda: qdq_net("cs", pre=[constant("cs", np.float32(np.inf))]),
                                     "'quant'", "scale is inf"),
    "per-channel-scale-zero": model_case(
        lambda: qdq_net(extra={"s": np.array([0.1, 0.1, 0.0, 0.1], np.float32), "z": np.zeros(4, np.uint8)}),
        "'quant'", "scale[2] is 0"),
    "zero-point-count": model_case(
        lambda: qdq_net(extra={"s": np.full(4, 0.1, np.float32), "z": np.zeros(3, np.uint8)}),
        "'quant'", "3 zero points for 4 scales"),
    "scale-empty": model_case(lambda: qdq_net(extra={"s": np.zeros(0, np.float32)}), "'quant'", "scale is empty"),
    "scale-matrix": model_case(lambda: qdq_net(extra={"s": np.full((2, 2), 0.1, np.float32)}), "'quant'",
                               "scale has shape [2, 2]"),
    "scale-overflows": model_case(lambda: qdq_net(extra={"s": np.float32(3e38)}), "'quant'", "overflows"),
    "uint8-zero-point-300": model_case(lambda: qdq_net(extra={"z": int32_stored("z", TensorProto.UINT8, [300])}),
                                       "tensor 'z'", "UINT8", "300", "0..255", commands=BOTH),
    "int8-zero-point-minus-200": model_case(
        lambda: qdq_net(extra={"z": int32_stored("z", TensorProto.INT8, [-200])}), "tensor 'z'", "-200", "-128..127",
        commands=BOTH),
    "precision-not-a-type": model_case(
        lambda: make([helper.make_node("Relu", ["x"], ["r"]), *qdq("r", "y", precision=99)],
                     {"s": np.float32(0.05), "z": np.uint8(0)}, ("N", 4), ("N", 4), opset=25),
        "'quant'", "precision=99", "not an ONNX data type"),
    # 3. files onnxruntime cannot run, or whose verification crashed
    "float16-qdq-opset-13": model_case(
        lambda: make(qdq_net().graph.node, {**weights(dtype=np.float16), "s": np.float16(0.05), "z": np.uint8(0)},
                     dtype=TensorProto.FLOAT16),
        "shape inference", "QuantizeLinear", "quant", "float16"),
    "same-upper-with-dilations": model_case(lambda: float_net(conv={"auto_pad": "SAME_UPPER", "dilations": [2, 2]}),
                                            "onnxruntime cannot run it", "Dilation", args=CALIB),
    "no-output": model_case(lambda: make([helper.make_node("Relu", ["x"], ["y"])], {}, ("N", 4), outputs=[]),
                            "0 outputs (none)"),
    "two-outputs": model_case(lambda: qdq_net(outputs=[helper.make_tensor_value_info("y", F32, ["N", 10]),
                                                       helper.make_tensor_value_info("c", F32, ["N", 4, 6, 6])]),
                              "2 outputs", "'y', 'c'"),
    "constant-of-fixed-batch": model_case(
        lambda: vector_net([helper.make_node("Add", ["x", "k"], ["a"], name="add")], {"k": np.ones((7, 4), np.float32)},
                           shape=(7, 4)), "'add'", "[7, 4]", "fixed batch size 7"),
    "constant-across-batch": model_case(
        lambda: vector_net([helper.make_node("Mul", ["x", "k"], ["a"], name="mul")],
                           {"k": np.ones((7, 4), np.float32)}),
        "'mul'", "[7, 4]", "broadcasts across the batch"),
    "gemm-c-across-batch": model_case(
        lambda: vector_net([helper.make_node("Gemm", ["x", "b", "k"], ["a"], name="fc")],
                           {"b": np.ones((4, 3), np.float32), "k": np.ones((7, 3), np.float32)}, y_shape=("N", 3)),
        "'fc'", "Gemm", "[7, 3]", "broadcasts across the batch"),
    # 4. float64
    "float64-conv-calibrated": model_case(lambda: float_net(dtype=np.float64), "onnxruntime cannot run it",
                                          "Conv", args=CALIB),
    # 6. messages that did not name the file, or called a size of zero "dynamic"
    "no-activation-site": model_case(lambda: make([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                                                   *head("c")], weights()), "no quantized activation site"),
    "levels-beyond-T": model_case(qdq_net, "has 255 levels, more than T=2 steps carry", args=("-T", "2")),
    "zero-size-dimension": model_case(lambda: qdq_net(x_shape=("N", 1, 0, 8)), "input 'x'", "[N, 1, 0, 8]",
                                      "size 0 in dimension 2"),
    "negative-dimension": model_case(lambda: qdq_net(x_shape=("N", 1, -3, 8)), "input 'x'",
                                     "size -3 in dimension 2"),
    # 8. everything else
    "truncated": Case(truncated, ("truncated or corrupt",), commands=BOTH),
    "empty-file": Case(lambda f: save(b"", f), ("not an ONNX model",), commands=BOTH),
    "random-bytes": Case(lambda f: save(np.random.default_rng(0).bytes(4096), f), ("ONNX",), commands=BOTH),
    "no-default-opset": model_case(lambda: qdq_net(opsets=[helper.make_opsetid("com.example", 1)]),
                                   "imports no default-domain", commands=BOTH),
    "opset-99": model_case(lambda: qdq_net(opset=99), "opset 99 is not supported", commands=BOTH),
    "two-default-opsets": model_case(lambda: qdq_net(opsets=[helper.make_opsetid("", 13),
                                                             helper.make_opsetid("", 17)]),
                                     "imports the default domain (ai.onnx) 2 times", "13, 17", commands=BOTH),
    "ir-version-99": model_case(lambda: with_ir_version(qdq_net(), 99), "ir_version 99", commands=BOTH),
    "empty-graph": model_case(lambda: make([], {}, inputs=[], outputs=[]), "found 0: none"),
    "no-nodes": model_case(lambda: make([], {}, ("N", 4), outputs=[helper.make_tensor_value_info("x", F32, ["N", 4])]),
                           "no quantized activation site"),
    "short-raw-data": model_case(lambda: corrupt_w(lambda w: setattr(w, "raw_data", w.raw_data[:-8])),
                                 "tensor name: w", "too small", commands=BOTH),
    "long-raw-data": model_case(lambda: corrupt_w(lambda w: setattr(w, "raw_data", w.raw_data + b"\0" * 6)),
                                "tensor 'w'", "[4, 1, 3, 3]", "corrupt", commands=BOTH),
    "long-float-data": model_case(lambda: corrupt_w(lambda w: float_data(w, 40)), "tensor 'w'", "corrupt",
                                  commands=BOTH),
    "undefined-input": model_case(lambda: make([helper.make_node("Relu", ["ghost"], ["y"], name="relu")], {},
                                               ("N", 4), ("N", 4)), "ghost", commands=BOTH),
    "output-not-produced": model_case(lambda: make([helper.make_node("Relu", ["x"], ["y"])], {}, ("N", 4), outputs=[
        helper.make_tensor_value_info("phantom", F32, ["N", 4])]), "phantom", commands=BOTH),
    "cyclic": model_case(cyclic, "checker", commands=BOTH),
    "unknown-domain": model_case(
        lambda: make([helper.make_node("Fancy", ["x"], ["y"], name="fancy", domain="com.example")], {}, ("N", 4),
                     ("N", 4), opsets=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)]),
        "'fancy'", "com.example::Fancy", "not supported"),
    "unknown-op": model_case(lambda: make([helper.make_node("Frobnicate", ["x"], ["y"], name="frob")], {},
                                          ("N", 4), ("N", 4)), "Frobnicate"),
    "many-nodes": model_case(lambda: identity_chain(20000), "no quantized activation site"),
    "non-utf8-name": Case(non_utf8_name, ("graph.node[", ".name is not valid UTF-8"), commands=BOTH),
    "newline-in-names": model_case(
        lambda: make([helper.make_node("LeakyRelu", ["x"], ["y"], name="evil\nname")], {}, ("N", 4), ("N", 4)),
        "'evil\\nname'", "LeakyRelu"),
    "sequence-input": model_case(lambda: make([helper.make_node("Relu", ["x"], ["y"])], {}, inputs=[
        helper.make_tensor_sequence_value_info("x", F32, ["N", 4])], y_shape=("N", 4)), "seq(tensor(float))"),
    "external-data-outside": Case(lambda f: external(f, location="../weights.bin"), ("outside the model's folder",),
                                  commands=BOTH),
    "external-data-absolute": Case(lambda f: external(f, location="/etc/passwd"), ("outside the model's folder",),
                                   commands=BOTH),
    "external-data-past-end": Case(lambda f: external(f, offset=str(10**9)), ("external data",), commands=BOTH),
    **{f"reshape-to-{','.join(map(str, target))}": model_case(lambda target=target: reshape(target), "reshape")
       for target in ([-1, -2], [-3, 16], [-1, -1], [2, -5, 4], [-(2**62), 2])},
    "computed-reshape-to-minus-two": model_case(lambda: computed_reshape([-2]), "'reshape'", "holds -2",
                                                "only negative size allowed is -1"),
    "computed-reshape-to-two-minus-ones": model_case(lambda: computed_reshape([-1, -1]), "'reshape'",
                                                     "holds -1 2 times"),
    "gemm-transA": model_case(lambda: make([helper.make_node("Gemm", ["x", "b"], ["y"], name="fc", transA=1)],
                                           {"b": np.ones((50, 3), np.float32)}, (50, 4), (4, 3)), "'fc'", "transA=1"),
    "batch-norm-negative-variance": model_case(lambda: batch_norm(-1.0), "'bn'", "BatchNormalization",
                                               "var + epsilon must be positive"),
    "kernel-larger-than-input": model_case(lambda: qdq_net(x_shape=("N", 1, 2, 2)), "'conv'", "cannot run"),
}

RUNS = [pytest.param(name, command, id=f"{name}-{command}") for name, case in CASES.items()
        for command in case.commands]


@pytest.mark.parametrize("name, command", RUNS)
def test_hostile_file_is_refused_in_one_line(name, command, tmp_path):
    case = CASES[name]
    path = case.build(tmp_path)
    args = case.args if command == "convert" else ()
    before = snapshot(tmp_path)
    line = assert_refused(invoke(command, path, *args), str(path), *case.fragments, before=before,
                          folders=(tmp_path,))
    assert line.startswith(f"ann2snn: error: {path}: "), line


# 7. calibration data the model cannot take: refused naming a file (the .npz where the data loader
# checks it, else the model), where NaN used to calibrate every lambda to NaN and report PASSED
@pytest.mark.parametrize("x, fragments", [
    pytest.param(np.where(np.arange(16 * 64).reshape(16, 1, 8, 8) == 200, np.nan, 0.5), ("nan",), id="nan"),
    pytest.param(np.full((16, 3, 8, 8), 0.5), ("3, 8, 8", "1, 8, 8"), id="wrong-shape"),
])
def test_bad_calibration_data_is_refused(x, fragments, tmp_path):
    path = save(float_net(), tmp_path)
    calib = npz(tmp_path, x.astype(np.float32))
    before = snapshot(tmp_path)
    line = assert_refused(invoke("convert", path, "-T", "3", "--calib", calib), before=before, folders=(tmp_path,))
    assert line.startswith((f"ann2snn: error: {path}: ", f"ann2snn: error: {calib}: ")), line
    assert all(fragment in line.lower() for fragment in fragments), line


def test_convert_onnx_refuses_calibration_inputs_of_another_shape(tmp_path):
    path = save(float_net(), tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        convert_onnx(path, 3, torch.rand(8, 3, 8, 8), verify=False)
    assert str(info.value) == (f"{path}: the calibration samples have shape [3, 8, 8]; the model's input 'x' "
                               "takes [1, 8, 8] per sample")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_convert_onnx_refuses_non_finite_calibration_inputs(bad, tmp_path):
    path = save(float_net(), tmp_path)
    calib = torch.full((8, 1, 8, 8), 0.5)
    calib[5, 0, 1, 1] = bad
    kind = "NaN" if np.isnan(bad) else "Inf"
    with pytest.raises(UnsupportedModelError) as info:
        convert_onnx(path, 3, calib, verify=False)
    assert str(info.value) == f"{path}: the calibration inputs x hold {kind} (first in sample 5)"


def test_a_billion_noise_inputs_are_drawn_batch_by_batch(tmp_path):
    """Verification streams its inputs: a count of 10**9 allocates one batch, not 10**9 samples."""
    path = save(qdq_net(), tmp_path)
    source_graph, _ = quantized_onnx(path)
    inputs = verification_inputs(source_graph, None, None, None, 10**9)
    assert len(inputs) == 10**9 and inputs.description.startswith("1000000000 inputs of uniform noise")
    first = next(inputs.batches(32))
    assert first.shape == (32, 1, 8, 8) and 0 <= float(first.min()) and float(first.max()) < 1
    # the same noise whatever the batch size
    assert torch.equal(next(inputs.head(64).batches(64))[:32], first)


# --- files that used to crash and are valid -------------------------------------------------------

@pytest.mark.parametrize("model, args", [
    pytest.param(lambda: qdq_net(x_shape=(1, 1, 8, 8), y_shape=(1, 10)), (), id="batch-fixed-at-1"),
    pytest.param(lambda: float_net(dtype=np.float16), CALIB, id="float16-calibrated"),
    pytest.param(lambda: float_net(dtype=np.float64), (*CALIB, "--no-verify"), id="float64-calibrated-unverified"),
])
def test_file_that_used_to_crash_converts(model, args, tmp_path):
    path = save(model(), tmp_path)
    result = invoke("convert", path, *args, "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert Path(report["output"]).is_file() and report.get("verify", {"passed": True})["passed"]


@pytest.mark.parametrize("model", [
    pytest.param(qdq_net, id="qdq-pairs-table"),
    pytest.param(lambda: make([helper.make_node("Relu", ["x"], ["y"])], {}, y_shape=("N", 4), inputs=[
        helper.make_tensor_sequence_value_info("x", F32, ["N", 4])]), id="sequence-input"),
])
def test_inspect_summarizes_what_it_can_read(model, tmp_path):
    result = invoke("inspect", save(model(), tmp_path))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "qdq_pairs" in result.stdout


# --- the real command: exactly one line on stderr (onnxruntime's own log included) -----------------

@pytest.mark.parametrize("name", ["same-upper-with-dilations", "scale-zero", "huge-input"])
def test_cli_subprocess_prints_one_line(name, tmp_path):
    case = CASES[name]
    path = case.build(tmp_path)
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "ann2snn", "convert", str(path), *case.args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"ann2snn: error: {path}: "), done.stderr
    assert all(fragment in done.stderr for fragment in case.fragments), done.stderr
    assert snapshot(tmp_path) == before
