"""load_onnx against the ONNX spec (onnx's own node tests) and onnxruntime (exported CNNs, QDQ models).

Node tests: every case the installed onnx package carries, from its data/node folder when the
wheel ships it, else generated in memory by onnx.backend.test.case.node.collect_testcases (the
generator of that folder); plus the shipped data/pytorch-converted and data/pytorch-operator
folders. Which cases run is decided by one documented rule, `node_case_filter`:
- models older than opset 11 are first upgraded to opset 13 with onnx.version_converter;
- every op must have a converter at the model's opset;
- input 0 is the network's data: float, rank 2..4; every other input is a weight in a CNN, so it is
  baked into an initializer from the case's data;
- every expected output is a float tensor (the importer emits float graphs).
Of the cases that pass the rule, the ones the emitted-graph contract cannot express (they move
the batch dimension, train, slice the data, ...) are listed in REFUSED with the reason the
importer must give; every other case must match the expected outputs.
"""
from __future__ import annotations

import functools
import glob
import os
import warnings
from typing import NamedTuple

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from ann2snn.errors import UnsupportedModelError
from ann2snn.frontend.importer import CONTRACT_FUNCTIONS, CONTRACT_MODULES, inspect_onnx, load_onnx
from ann2snn.runtime.quant import QuantDequant
from ann2snn.frontend.registry import find_converter, get_converter
from ann2snn.compile.qdq_to_sites import qdq_to_sites
from ann2snn.runtime.quant import QuantClippedActivation

ONNX_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


# --- the emitted-graph contract ---------------------------------------------------------------

def assert_contract(gm: fx.GraphModule) -> None:
    """Only the modules and functions the compiler's passes and serializer understand."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert type(gm.get_submodule(node.target)) in CONTRACT_MODULES, (node.name, node.target)
        elif node.op == "call_function":
            assert node.target in CONTRACT_FUNCTIONS, (node.name, node.target)
        else:
            assert node.op in ("placeholder", "get_attr", "output"), (node.name, node.op)
        if node.op == "get_attr":
            assert node.target in dict(gm.named_buffers()), node.target  # so .double() converts it


# --- onnx's node tests ------------------------------------------------------------------------

class NodeCase(NamedTuple):
    name: str
    model: onnx.ModelProto
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    rtol: float
    atol: float


def _read_tensors(folder: str, prefix: str) -> list[np.ndarray]:
    tensors = []
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}_*.pb")),
                       key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0])):
        tensor = onnx.TensorProto()
        with open(path, "rb") as f:
            tensor.ParseFromString(f.read())
        tensors.append(numpy_helper.to_array(tensor))
    return tensors


def _folder_cases(pattern: str) -> list[NodeCase]:
    cases = []
    for folder in sorted(glob.glob(os.path.join(ONNX_DATA, pattern))):
        if os.path.isfile(os.path.join(folder, "model.onnx")):
            data = os.path.join(folder, "test_data_set_0")
            cases.append(NodeCase(os.path.basename(folder), onnx.load(os.path.join(folder, "model.onnx")),
                                  _read_tensors(data, "input"), _read_tensors(data, "output"), 1e-3, 1e-7))
    return cases


def _as_array(value):
    """Cases of exotic types (float8, int4) hold TensorProtos; sequences and maps stay as they are."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value) if isinstance(value, np.generic) else value


@functools.lru_cache(maxsize=1)
def all_node_cases() -> list[NodeCase]:
    if os.path.isdir(os.path.join(ONNX_DATA, "node")):
        cases = _folder_cases("node/test_*")
    else:
        from onnx.backend.test.case.node import collect_testcases

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases = [NodeCase(c.name, c.model, [_as_array(v) for v in c.data_sets[0][0]],
                              [_as_array(v) for v in c.data_sets[0][1]], c.rtol, c.atol)
                     for c in collect_testcases() if c.kind == "node" and c.data_sets]
    return cases + _folder_cases("pytorch-converted/test_*") + _folder_cases("pytorch-operator/test_*")


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def node_case_filter(case: NodeCase) -> NodeCase | None:
    """The case as load_onnx gets it, or None when the documented rule (module docstring) drops it."""
    if not case.inputs or not all(isinstance(v, np.ndarray) for v in case.inputs + case.outputs):
        return None  # sequences, optionals, maps
    data = case.inputs[0]
    if data.dtype not in (np.float16, np.float32, np.float64) or not 2 <= data.ndim <= 4:
        return None
    if any(o.dtype.kind != "f" for o in case.outputs):
        return None
    model, opset = case.model, _opset(case.model)
    if opset is None:
        return None
    if opset < 11:
        try:
            model = onnx.version_converter.convert_version(model, 13)
        except Exception:  # the converter cannot upgrade every old op
            return None
        model.ir_version = max(model.ir_version, 7)  # initializers need not be graph inputs
        opset = 13
    if any(find_converter(n.op_type, opset, n.domain) is None for n in model.graph.node):
        return None
    baked = onnx.ModelProto()
    baked.CopyFrom(model)
    initializers = {t.name for t in baked.graph.initializer}
    inputs = [v for v in baked.graph.input if v.name not in initializers]
    for value, array in zip(inputs[1:], case.inputs[1:]):  # weights are constants in a CNN
        baked.graph.initializer.append(numpy_helper.from_array(np.asarray(array), value.name))
    del baked.graph.input[:]
    baked.graph.input.extend(inputs[:1])
    return case._replace(model=baked)


# Cases the contract cannot express, with the reason the importer must give (measured with
# onnx 1.23; a new onnx may add cases: each new refusal must be looked at and listed here).
_BATCH = "batch dimension"
REFUSED = {
    "test_averagepool_2d_dilations": "dilations",
    "test_batchnorm_example_training_mode": "training_mode",
    "test_batchnorm_epsilon_training_mode": "training_mode",
    "test_training_dropout_default": "training_mode",
    "test_training_dropout": "training_mode",
    "test_training_dropout_zero_ratio": "training_mode",
    "test_causal_conv_with_state_with_past_state_expanded": "Slice of the network's data",
    "test_causal_conv_with_state_decode_step_expanded": "Slice of the network's data",
    "test_causal_conv_with_state_with_bias_and_past_state_expanded": "Slice of the network's data",
    "test_center_crop_pad_crop_axes_chw_expanded": "Slice of the network's data",
    "test_center_crop_pad_crop_expanded": "depends on the batch size",
    "test_center_crop_pad_pad_expanded": "depends on the batch size",
    "test_center_crop_pad_crop_and_pad_expanded": "depends on the batch size",
    "test_center_crop_pad_crop_axes_hwc_expanded": "depends on the batch size",
    "test_center_crop_pad_crop_negative_axes_hwc_expanded": "depends on the batch size",
    "test_concat_2d_axis_0": _BATCH,
    "test_concat_2d_axis_negative_2": _BATCH,
    "test_concat_3d_axis_0": _BATCH,
    "test_concat_3d_axis_negative_3": _BATCH,
    "test_flatten_axis0": _BATCH,
    "test_flatten_axis2": _BATCH,
    "test_flatten_axis3": _BATCH,
    "test_flatten_negative_axis1": _BATCH,
    "test_flatten_negative_axis2": _BATCH,
    "test_flatten_negative_axis4": _BATCH,
    "test_gather_0": "Gather of the network's data",
    "test_gather_1": "Gather of the network's data",
    "test_gather_2d_indices": "Gather of the network's data",
    "test_gemm_transposeA": "transA=1",
    "test_gemm_all_attributes": "transA=1",
    "test_reduce_mean_default_axes_keepdims_example": _BATCH,
    "test_reduce_mean_default_axes_keepdims_random": _BATCH,
    "test_reshape_reordered_all_dims": _BATCH,
    "test_reshape_one_dim": _BATCH,
    "test_reshape_negative_extended_dims": _BATCH,
    "test_reshape_allowzero_reordered": "allowzero=1",
    "test_slice": "Slice of the network's data",
    "test_slice_neg": "Slice of the network's data",
    "test_slice_start_out_of_bounds": "Slice of the network's data",
    "test_slice_end_out_of_bounds": "Slice of the network's data",
    "test_slice_default_axes": "Slice of the network's data",
    "test_slice_default_steps": "Slice of the network's data",
    "test_slice_neg_steps": "Slice of the network's data",
    "test_slice_negative_axes": "Slice of the network's data",
    "test_squeeze": _BATCH,
    "test_transpose_default": "batch",
    "test_transpose_all_permutations_2": "batch",
    "test_transpose_all_permutations_3": "batch",
    "test_transpose_all_permutations_4": "batch",
    "test_transpose_all_permutations_5": "batch",
    "test_unsqueeze_axis_0": _BATCH,
    # the old pytorch folders: a bias that is data, a bound that spans the batch
    "test_operator_addmm": "not a constant",
    "test_operator_max": "broadcasts across the batch",
    "test_operator_min": "broadcasts across the batch",
    "test_operator_index": "Slice of the network's data",
    # a softmax over the batch: an output operation acts on a class axis
    "test_softmax_axis_0": "only a class axis after the batch",
    "test_logsoftmax_axis_0": "only a class axis after the batch",
}

NODE_CASES = {c.name: c for c in filter(None, map(node_case_filter, all_node_cases()))}
# Casts of the data to another type: the contract has no cast (a cast of a constant folds).
REFUSED.update({name: "attribute to=" for name in NODE_CASES if name.startswith(("test_cast_", "test_castlike_"))})
# ReduceProd folds in shape arithmetic (tf2onnx's flatten); of the data it is refused
REFUSED.update({name: "ReduceProd of the network's data" for name in NODE_CASES if name.startswith("test_reduce_prod")})
REFUSED["test_reduce_prod_empty_set"] = "has size 0"   # an input with no elements, before any op
# Measured with onnx 1.23.2: 232 cases pass the rule, 78 of them are REFUSED, 154 are compared.
MIN_NODE_CASES_COMPARED = 150


def test_node_case_count():
    compared = [name for name in NODE_CASES if name not in REFUSED]
    assert len(compared) >= MIN_NODE_CASES_COMPARED, len(compared)
    assert set(REFUSED) <= set(NODE_CASES), sorted(set(REFUSED) - set(NODE_CASES))
    # the op families the brief names are all among the compared cases
    for family in ("conv", "batchnorm", "relu", "clip", "maxpool", "averagepool", "globalaveragepool", "gemm",
                   "matmul", "add", "sub", "mul", "div", "flatten", "reshape", "concat", "constant_pad", "squeeze",
                   "unsqueeze", "transpose", "dropout", "identity"):
        assert any(name.lower().startswith(f"test_{family}") for name in compared), family


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_node_case(name):
    case = NODE_CASES[name]
    if name in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[name].replace("(", r"\(")):
            load_onnx(case.model)
        return
    gm = load_onnx(case.model)
    assert_contract(gm)
    with torch.no_grad():
        result = gm(torch.from_numpy(case.inputs[0].copy()))
    results = result if isinstance(result, tuple) else (result,)
    assert len(results) == len(case.outputs)
    for got, expected in zip(results, case.outputs):
        assert tuple(got.shape) == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, rtol=max(1e-4, case.rtol), atol=max(1e-5, case.atol))


# QuantizeLinear node cases as QuantizeLinear -> DequantizeLinear pairs: the expected output is the
# DequantizeLinear (onnx's reference) of the case's expected integers. An input of rank < 4 gets a
# leading batch dimension of size 1 (a non-negative axis shifts by one), so its dimension 0 is not the batch.
def _qdq_pair_cases() -> dict[str, tuple]:
    from onnx.reference import ReferenceEvaluator

    pairs = {}
    for case in all_node_cases():
        quantizers = [n for n in case.model.graph.node if n.op_type == "QuantizeLinear"]
        if (len(case.model.graph.node) != 1 or not quantizers
                or not all(isinstance(v, np.ndarray) for v in case.inputs) or case.inputs[0].dtype.kind != "f"):
            continue
        q, opset = quantizers[0], _opset(case.model)
        scale, zero = case.inputs[1], case.inputs[2] if len(case.inputs) > 2 else None
        attributes = {a.name: helper.get_attribute_value(a) for a in q.attribute}
        dq_attributes = {k: v for k, v in attributes.items() if k in ("axis", "block_size")}
        x = case.inputs[0]
        shifted = dict(attributes)
        if x.ndim < 4:
            x = x[None]
            if ("axis" in shifted or scale.size > 1) and shifted.get("axis", 1) >= 0:
                shifted["axis"] = shifted.get("axis", 1) + 1
        qargs = ["x", "scale"] + (["zero"] if zero is not None else [])
        nodes = [helper.make_node("QuantizeLinear", qargs, ["q"], name="quant", **shifted),
                 helper.make_node("DequantizeLinear", ["q"] + qargs[1:], ["y"], name="dequant",
                                  **{k: v for k, v in shifted.items() if k in dq_attributes})]
        initializers = [numpy_helper.from_array(scale, "scale")] + (
            [numpy_helper.from_array(zero, "zero")] if zero is not None else [])
        graph = helper.make_graph(nodes, case.name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        dq_only = helper.make_node("DequantizeLinear", ["q"] + qargs[1:], ["y"], **dq_attributes)
        feeds = {"q": case.outputs[0], "scale": scale, **({"zero": zero} if zero is not None else {})}
        expected = ReferenceEvaluator(dq_only).run(None, feeds)[0].reshape(x.shape)
        pairs[case.name] = (model, x, expected)
    return pairs


QDQ_PAIR_CASES = _qdq_pair_cases()
QDQ_PAIR_REFUSED = {"test_quantizelinear_blocked_asymmetric": "block_size",
                    "test_quantizelinear_blocked_symmetric": "block_size",
                    "test_quantizelinear_e4m3fn": "FLOAT8E4M3FN", "test_quantizelinear_e5m2": "FLOAT8E5M2",
                    "test_quantizelinear_float4e2m1": "FLOAT4E2M1"}


@pytest.mark.parametrize("name", sorted(QDQ_PAIR_CASES))
def test_quantize_dequantize_pair_case(name):
    model, x, expected = QDQ_PAIR_CASES[name]
    if name in QDQ_PAIR_REFUSED:
        with pytest.raises(UnsupportedModelError, match=QDQ_PAIR_REFUSED[name]):
            load_onnx(model)
        return
    gm = load_onnx(model)
    assert_contract(gm)
    assert [type(m) for m in gm.children()] == [QuantDequant]
    np.testing.assert_array_equal(gm(torch.from_numpy(x)).numpy(), expected)


def test_qdq_pair_case_count():
    assert len(set(QDQ_PAIR_CASES) - set(QDQ_PAIR_REFUSED)) >= 8  # measured: uint8, axis, int/uint 16, 4 and 2


# --- registry ---------------------------------------------------------------------------------

def test_registry_picks_the_schema_in_force():
    # Relu changed at 6, 13, 14: opset 20 means Relu-14, opset 11 means Relu-6; one converter serves all
    assert find_converter("Relu", 20) is find_converter("Relu", 14) is find_converter("Relu", 11)
    assert find_converter("Relu", 20) is not None
    assert find_converter("HardSwish", 14) is None and find_converter("NoSuchOp", 13) is None
    node = helper.make_node("HardSwish", ["x"], ["y"], name="head")
    with pytest.raises(UnsupportedModelError, match=r"'head'.*HardSwish \(opset 13\).*Conv"):
        get_converter(node, 13, "m.onnx")


# --- PyTorch CNNs exported both ways, against onnxruntime ------------------------------------

class SmallCNN(nn.Module):
    """Conv with groups, depthwise conv, BN, ReLU, ReLU6, MaxPool (ceil_mode), AvgPool, residual add,
    concat, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2)
        self.branch = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(8 * 2 * 2 + 4, 5)  # for 16 x 16 inputs

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = y + F.relu6(self.bn2(self.grouped(y)))
        y = self.pool(self.depthwise(y))
        pooled = self.avg(y).flatten(1)
        squeezed = F.adaptive_avg_pool2d(F.relu(self.branch(y)), 1)
        return self.fc(torch.cat([pooled, squeezed.view(squeezed.size(0), -1)], 1))


class SmallCNN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 5, padding=2)
        self.bn = nn.BatchNorm1d(6)
        self.pool = nn.MaxPool1d(2)
        self.avg = nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.avg(self.pool(F.relu(self.bn(self.conv(x)))))
        return self.fc(F.adaptive_avg_pool1d(y, 1).flatten(1))


class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(16, 16), nn.Hardtanh(0, 2), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


SMALL_NETS = {"cnn": (SmallCNN, (3, 16, 16)), "cnn1d": (SmallCNN1d, (2, 16)), "mlp": (SmallMLP, (10,))}


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            m.weight.data = 0.5 + torch.rand(c, generator=generator)
            m.bias.data = 0.2 * torch.randn(c, generator=generator)
    return model.eval()


def export(model: nn.Module, shape: tuple, path: str, exporter: str) -> str:
    """Export with a dynamic batch: TorchScript (exporter 'torchscript-<opset>') or dynamo."""
    x = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            opset = int(exporter.split("-")[1])
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def onnxruntime_run(path: str, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def assert_matches_onnxruntime(path: str, shape: tuple, rtol: float = 1e-4) -> fx.GraphModule:
    gm = load_onnx(path)
    assert_contract(gm)
    for batch in (1, 3):
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        expected = onnxruntime_run(path, x)
        with torch.no_grad():
            got = gm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    return gm


@pytest.mark.parametrize("exporter", ["torchscript-11", "torchscript-17", "dynamo"])
@pytest.mark.parametrize("net", sorted(SMALL_NETS))
def test_exported_small_net_matches_onnxruntime(net, exporter, tmp_path):
    cls, shape = SMALL_NETS[net]
    torch.manual_seed(0)
    model = randomize_batch_norms(cls())
    path = export(model, shape, str(tmp_path / f"{net}.onnx"), exporter)
    gm = assert_matches_onnxruntime(path, shape)
    x = torch.rand((3, *shape))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
        expected = gm(x).double()
        # every constant is a buffer or parameter: after .double() the whole graph runs in float64
        gm = gm.double()
        assert all(t.dtype == torch.float64 for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point())
        got = gm(x.double())
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    names = [n.name for n in gm.graph.nodes]
    assert len(names) == len(set(names))


def test_fixed_batch_export_gets_a_dynamic_batch(tmp_path):
    """A file exported at batch 2 without dynamic axes: its reshape targets [2, ...] become [-1, ...]."""
    torch.manual_seed(0)
    model = randomize_batch_norms(SmallCNN())
    x = torch.rand(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "fixed.onnx"), dynamo=False, input_names=["x"])
    gm = load_onnx(str(tmp_path / "fixed.onnx"))
    np.testing.assert_allclose(gm(x).detach().numpy(), onnxruntime_run(str(tmp_path / "fixed.onnx"), x.numpy()),
                               rtol=1e-4, atol=1e-5)
    x5 = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gm(x5), model(x5), rtol=1e-4, atol=1e-5)


def test_node_and_module_names_come_from_onnx(tmp_path):
    path = export(randomize_batch_norms(SmallCNN()), (3, 16, 16), str(tmp_path / "cnn.onnx"), "torchscript-17")
    gm = load_onnx(path)
    modules = dict(gm.named_children())
    assert "conv1_Conv" in modules and "fc_Gemm" in modules and isinstance(modules["conv1_Conv"], nn.Conv2d)
    reshape = next(n for n in gm.graph.nodes if n.target is torch.reshape)
    assert reshape.args[1] == (-1, 4)  # the batch stays dynamic: a constant target with -1 first
    assert reshape.meta["onnx_op"] == "Reshape"


# The zoo of models/ exported both ways at a small input; the large ones are marked slow.
try:
    from ann2snn import models
    ZOO = models.MODEL_NAMES
except ImportError:  # models/ not there yet
    models, ZOO = None, ()
ZOO_INPUTS = {"digits-cnn": (1, 8, 8), "resnet20": (3, 16, 16)}
ZOO_OPTIONS = {"vgg16": {"small_input": True}, "mobilenetv2": {"small_input": True}}
ZOO_SMALL = {"digits-cnn", "resnet20"}


@pytest.mark.parametrize("exporter", ["torchscript-17", "dynamo"])
@pytest.mark.parametrize("name", [n if n in ZOO_SMALL else pytest.param(n, marks=pytest.mark.slow) for n in ZOO])
def test_zoo_model_matches_onnxruntime(name, exporter, tmp_path):
    torch.manual_seed(0)
    model = randomize_batch_norms(models.build_model(name, num_classes=10, **ZOO_OPTIONS.get(name, {})))
    shape = ZOO_INPUTS.get(name, (3, 32, 32))
    path = export(model, shape, str(tmp_path / f"{name}.onnx"), exporter)
    assert_matches_onnxruntime(path, shape)


# --- hand-written graphs: attributes exporters never emit ---------------------------------------

def _model(nodes, x_shape, initializers=(), opset=17, y_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                              [helper.make_tensor_value_info("y", y_type, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers])
    # shape inference fills in the output's shape, which the checker requires
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _weights(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


HAND_WRITTEN = {
    "conv_asymmetric_pads": ([helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1])],
                             (2, 7, 6), {"w": _weights(3, 2, 3, 3)}),
    "conv_same_lower": ([helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2])],
                        (2, 7, 6), {"w": _weights(3, 2, 4, 3), "b": _weights(3)}),
    "conv1d_same_upper_strided": ([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2])],
                                  (2, 9), {"w": _weights(4, 2, 2)}),
    "conv_dilated_pads": ([helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 1], pads=[2, 1, 1, 0])],
                          (2, 7, 6), {"w": _weights(3, 2, 3, 2)}),
    "maxpool_asymmetric_pads": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], pads=[1, 0, 0, 1])],
                                (2, 5, 5), {}),
    "maxpool_ceil_dilated": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                               dilations=[2, 1], pads=[1, 1, 1, 1], ceil_mode=1)], (1, 8, 7), {}),
    "avgpool_asymmetric_exclude_pad": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                                         pads=[0, 1, 2, 1])], (2, 6, 5), {}),
    "avgpool_asymmetric_include_pad": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                                         pads=[0, 1, 2, 1], count_include_pad=1)], (2, 6, 5), {}),
    "avgpool_same_upper": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 3], strides=[2, 2],
                                             auto_pad="SAME_UPPER")], (2, 5, 7), {}),
    "gemm_alpha_beta": ([helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=1)],
                        (6,), {"w": _weights(4, 6), "c": _weights(1, 4)}),
    "matmul_then_clip_min_max": ([helper.make_node("MatMul", ["x", "w"], ["m"]),
                                  helper.make_node("Max", ["m", "zero"], ["r"]),
                                  helper.make_node("Min", ["r", "six"], ["y"])],
                                 (5,), {"w": _weights(5, 3), "zero": np.float32(0), "six": np.float32(0.5)}),
    "pad_constant_value": ([helper.make_node("Pad", ["x", "pads", "value"], ["y"])], (2, 3, 3),
                           {"pads": np.array([0, 0, 1, 0, 0, 1, 0, 2], np.int64), "value": np.float32(-1.5)}),
    # x.view(x.size(0), C * H) as an exporter writes it: Shape arithmetic folded, the batch kept dynamic
    "shape_chain_reshape": ([helper.make_node("Shape", ["x"], ["s"]),
                             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
                             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
                             helper.make_node("Cast", ["n1"], ["n2"], to=TensorProto.INT64),
                             helper.make_node("Slice", ["s", "one", "two"], ["c"]),
                             helper.make_node("Slice", ["s", "two", "three"], ["h"]),
                             helper.make_node("Mul", ["c", "h"], ["ch"]),
                             helper.make_node("Concat", ["n2", "ch"], ["target"], axis=0),
                             helper.make_node("Reshape", ["x", "target"], ["y"])],
                            (3, 4), {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
                                     "one": np.array([1], np.int64), "two": np.array([2], np.int64),
                                     "three": np.array([3], np.int64)}),
    "squeeze_unsqueeze_transpose": ([helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
                                     helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 1, 3, 4]),
                                     helper.make_node("Squeeze", ["t", "axes2"], ["y"])],
                                    (3, 4), {"axes": np.array([1, -1], np.int64), "axes2": np.array([2, 4], np.int64)}),
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_graph_matches_onnxruntime(name, tmp_path):
    nodes, shape, initializers = HAND_WRITTEN[name]
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(_model(nodes, shape, initializers.items()), path)
    assert_matches_onnxruntime(path, shape)


# --- QDQ models from onnxruntime's quantizer ------------------------------------------------------

class QuantNet(nn.Module):
    """Conv, BN, residual add, MaxPool and Gemm: what quantize_static turns into a QDQ graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(y + self.bn2(self.conv2(y)))
        return self.fc(self.pool(y).flatten(1))


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    float_path = export(randomize_batch_norms(QuantNet()), (3, 8, 8), str(folder / "float.onnx"), "torchscript-17")
    return quantize(float_path, folder / "qdq.onnx", signed=True, activation_type="QUInt8", weight_type="QInt8")


def quantize(float_file: str, path, quant_format: str = "QDQ", signed: bool = False, **options) -> str:
    """`float_file` quantized by onnxruntime's quantize_static in `quant_format` (QDQ or QOperator) on
    random images in [0, 1), or standard normal ones when `signed` (like normalized images: the input
    QDQ gets a nonzero zero point); QuantType and CalibrationMethod options by name."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            draw = "standard_normal" if signed else "random"
            self.batches = iter([{"x": getattr(np.random.default_rng(i), draw)((8, 3, 8, 8), dtype=np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    for key, names in (("activation_type", QuantType), ("weight_type", QuantType), ("calibrate_method", CalibrationMethod)):
        if key in options:
            options[key] = getattr(names, options[key])
    quantize_static(float_file, str(path), Images(), quant_format=getattr(QuantFormat, quant_format), **options)
    return str(path)


def _output_step(gm: fx.GraphModule) -> float:
    """The quantization step of the QDQ on the logits (the last QuantDequant)."""
    last = [m for m in gm.modules() if isinstance(m, QuantDequant)][-1]
    return last.scale.item()


# Measured on 4096 random inputs: no logit differs at all, before or after qdq_to_sites. The bound
# still allows a rare flip by one step of the output quantizer, where a different float summation
# order in a convolution moves a value across a rounding tie.
QDQ_MAX_FLIPPED_FRACTION = 0.002


def _compare_quantized(gm: fx.GraphModule, path: str, step: float) -> None:
    x = np.random.default_rng(7).standard_normal((256, 3, 8, 8), dtype=np.float32)
    expected = onnxruntime_run(path, x)
    with torch.no_grad():
        got = gm(torch.from_numpy(x)).numpy()
    diff = np.abs(got - expected)
    assert diff.max() <= step * 1.001, diff.max() / step
    assert (diff > step / 2).mean() <= QDQ_MAX_FLIPPED_FRACTION


def test_qdq_model_matches_onnxruntime(qdq_model):
    gm = load_onnx(qdq_model)
    assert_contract(gm)
    assert sum(isinstance(m, QuantDequant) for m in gm.modules()) == 7  # input, 2 relus, conv2, pool, flatten, logits
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # quantized weights folded into the layers
    _compare_quantized(gm, qdq_model, _output_step(gm))


def test_qdq_to_sites_finds_the_relu_sites(qdq_model):
    gm = load_onnx(qdq_model)
    step = _output_step(gm)
    gm, sites = qdq_to_sites(gm)
    assert [s["levels"] for s in sites] == [255, 255]
    assert [s["sources"][0] for s in sites] == ["/Relu_output_0_QuantizeLinear", "/Relu_1_output_0_QuantizeLinear"]
    for entry in sites:
        site = gm.get_submodule(entry["site"])
        assert isinstance(site, QuantClippedActivation) and site.levels == 255 and not site.per_channel
        assert site.theta().item() == entry["scale"]  # clip / levels == scale exactly, in float32
    # the QDQ after MaxPool and after Flatten repeat the site's grid: removed as identities
    remaining = [m for m in gm.modules() if isinstance(m, QuantDequant)]
    assert len(remaining) == 3  # input (zero point != 0), conv2 output (signed), logits
    assert sum("removed_identity_qdq" in r for r in gm.meta["conversion_report"]["rewrites"]) == 2
    _compare_quantized(gm, qdq_model, step)


def _qdq_graph(activation: list, scale: float, zero_point: int, dtype=np.uint8, per_channel: bool = False):
    """x -> Conv -> [activation] -> Q -> DQ -> Conv -> y, with a hand-set QDQ."""
    scales = np.full(4, scale, np.float32) * (np.arange(1, 5, dtype=np.float32) if per_channel else 1)
    if not per_channel:
        scales = np.float32(scale)
    zeros = np.full(np.shape(scales), zero_point, dtype)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["z"], pads=[1, 1, 1, 1], name="conv1")]
    last = "z"
    for k, (op, inputs) in enumerate(activation):
        nodes.append(helper.make_node(op, [last, *inputs], [f"a{k}"], name=f"act{k}"))
        last = f"a{k}"
    nodes += [helper.make_node("QuantizeLinear", [last, "s", "zp"], ["q"], name="quant", axis=1),
              helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dequant", axis=1),
              helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2")]
    initializers = {"w1": _weights(4, 2, 3, 3), "b1": _weights(4, seed=1), "w2": _weights(3, 4, 1, 1, seed=2),
                    "s": scales, "zp": zeros, "zero": np.float32(0), "six": np.float32(6), "c": np.float32(1.3)}
    return _model(nodes, (2, 5, 5), initializers.items(), opset=13)


@pytest.mark.parametrize("case, activation, scale, zero, dtype, per_channel, levels, clip_bound", [
    ("relu6", [("Clip", ["zero", "six"])], 0.03, 0, np.uint8, False, 200, 6.0),
    ("relu_min", [("Relu", []), ("Min", ["c"])], 0.01, 0, np.uint8, False, 130, 1.3),
    ("relu_int8", [("Relu", [])], 0.02, 0, np.int8, False, 127, None),
    ("direct_uint8", [], 0.02, 0, np.uint8, False, 255, None),
    ("per_channel", [("Relu", [])], 0.004, 0, np.uint8, True, 255, None),
    ("clip_above_range", [("Clip", ["zero", "six"])], 0.01, 0, np.uint8, False, 255, None),  # 6 > 255 * 0.01
])
def test_qdq_site_patterns(case, activation, scale, zero, dtype, per_channel, levels, clip_bound, tmp_path):
    path = str(tmp_path / f"{case}.onnx")
    onnx.save(_qdq_graph(activation, scale, zero, dtype, per_channel), path)
    gm = assert_matches_onnxruntime(path, (2, 5, 5))
    gm, sites = qdq_to_sites(gm)
    assert len(sites) == 1 and sites[0]["levels"] == levels
    site = gm.get_submodule(sites[0]["site"])
    assert site.per_channel == per_channel
    assert torch.equal(site.theta(), torch.as_tensor(sites[0]["scale"], dtype=torch.float32))  # clip / L == scale
    assert sites[0]["clip_bound"] == (None if clip_bound is None else pytest.approx(clip_bound))
    assert not any(isinstance(m, (QuantDequant, nn.ReLU, nn.Hardtanh)) for m in gm.modules())
    assert not any(n.target is torch.clamp for n in gm.graph.nodes)
    assert sites[0]["sources"][-2:] == ["quant", "dequant"]
    # the site computes what onnxruntime computes (no input here lies on a rounding tie)
    x = np.random.default_rng(3).random((4, 2, 5, 5), dtype=np.float32) * 2 - 0.5
    np.testing.assert_allclose(gm(torch.from_numpy(x)).detach().numpy(), onnxruntime_run(path, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ann2snn_export_round_trip(per_channel, tmp_path):
    """ann2snn's own QDQ export (Clip / Relu -> Min[c] -> QDQ) comes back as the same sites."""
    from ann2snn.train.export import export_onnx
    from ann2snn.frontend.reader import onnxruntime_session

    generator = torch.Generator().manual_seed(0)

    def site(channels: int) -> QuantClippedActivation:
        q = QuantClippedActivation(levels=15, channels=channels if per_channel else 0)
        q.clip.data = 0.5 + 2 * torch.rand(q.clip.shape, generator=generator)
        return q

    torch.manual_seed(0)
    model = randomize_batch_norms(models.build_model("digits-cnn", num_classes=10, activation=site))
    path = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    gm, sites = qdq_to_sites(load_onnx(path))
    originals = [m for m in model.modules() if isinstance(m, QuantClippedActivation)]
    imported = [gm.get_submodule(entry["site"]) for entry in sites]
    assert len(imported) == len(originals) == 3
    for original, site in zip(originals, imported):
        assert site.levels == original.levels and site.per_channel == per_channel
        assert torch.equal(site.theta(), original.theta().detach())
    x = torch.rand(32, 1, 8, 8, generator=generator)
    expected = onnxruntime_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case, zero, dtype", [("asymmetric", 10, np.uint8), ("signed_without_relu", 0, np.int8)])
def test_qdq_that_is_no_site_stays(case, zero, dtype, tmp_path):
    gm = load_onnx(_qdq_graph([], 0.02, zero, dtype))
    gm, sites = qdq_to_sites(gm)
    assert sites == [] and sum(isinstance(m, QuantDequant) for m in gm.modules()) == 1


def test_quant_dequant_rounds_half_to_even():
    qdq = QuantDequant(torch.tensor(0.5), torch.tensor(0.0), 0, 255)
    x = torch.tensor([[0.25, 0.75, 1.25, -0.3, 200.0]])  # x / scale = 0.5, 1.5, 2.5, -0.6, 400
    assert qdq(x).tolist() == [[0.0, 1.0, 1.0, 0.0, 127.5]]


# --- inspect_onnx ---------------------------------------------------------------------------------

def test_inspect_onnx_summarizes_a_qdq_model(qdq_model):
    summary = inspect_onnx(qdq_model)
    assert summary["opset"] >= 11 and summary["ir_version"] >= 7
    assert summary["input"]["name"] == "x" and summary["input"]["shape"][1:] == [3, 8, 8]
    assert summary["ops"]["Conv"] == {"count": 2, "supported": True}
    assert summary["all_ops_supported"]
    assert len(summary["qdq_pairs"]) == 7
    relu = summary["qdq_pairs"]["/Relu_output_0_QuantizeLinear"]
    assert relu["zero_point"] == 0 and relu["dtype"] == "UINT8" and relu["scale"] > 0 and relu["clip"] is None


def test_inspect_onnx_flags_unsupported_ops(tmp_path):
    path = str(tmp_path / "softmax.onnx")
    onnx.save(_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("HardSwish", ["r"], ["y"])], (4,)), path)
    summary = inspect_onnx(path)
    assert summary["ops"]["HardSwish"] == {"count": 1, "supported": False}
    assert summary["ops"]["Relu"]["supported"] and not summary["all_ops_supported"]
