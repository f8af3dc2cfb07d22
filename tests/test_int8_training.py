"""Training with int8 weights (issue 27): the fake quantization, BN folding, full-QDQ export, onnxruntime,
`ann2snn convert`, checkpoints and refusals."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

import ann2snn
from ann2snn import models
from ann2snn.data.sets import load_dataset
from ann2snn.errors import Ann2SnnError
from ann2snn.frontend.reader import onnxruntime_session
from ann2snn.train import TrainConfig, train
from ann2snn.train.qdq_weights import dequantize_weights
from ann2snn.train.weight_quant import WeightFakeQuant, fold_batch_norms, weight_integers
from ann2snn.verify.gate import check_exact
from hostile import invoke
from random_nets import randomize_batch_norm

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


class UserNet(nn.Module):
    """A user's CNN for 8x8 digits: conv-BN-relu twice, max pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A UserNet whose BN has statistics, prepared at T = 2 with int8 weights, 60 SGD steps, and its export."""
    train_set, _ = digits
    torch.manual_seed(0)
    model = UserNet()
    generator = torch.Generator().manual_seed(0)
    for norm in (model.bn1, model.bn2):
        randomize_batch_norm(norm, generator)
    before = copy.deepcopy(model.state_dict())
    qat = ann2snn.prepare(model, T=2, example_input=train_set.x[:256], weight_bits=8)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    for _ in range(60):
        index = torch.randint(len(train_set), (64,), generator=generator)
        loss = F.cross_entropy(qat(train_set.x[index]), train_set.y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    path = ann2snn.export_onnx(qat, tmp_path_factory.mktemp("int8") / "int8.onnx", train_set.x[:2])
    return model, before, qat, path


def integer_layers(path) -> dict[str, tuple[int, int | None]]:
    """Per Conv / Gemm of the file: (the weight's initializer type, the bias's), each read behind a
    DequantizeLinear with axis 0, None for a float initializer or no bias; AssertionError otherwise."""
    graph = onnx.load(str(path)).graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    layers = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        types: list[int | None] = []
        for name in node.input[1:3]:
            dq = producers.get(name)
            if dq is None:
                assert name in initializers and initializers[name].data_type == TensorProto.FLOAT, (node.name, name)
                types.append(None)
                continue
            assert dq.op_type == "DequantizeLinear", (node.name, name)
            assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0}
            stored = initializers[dq.input[0]]
            scale = numpy_helper.to_array(initializers[dq.input[1]])
            assert scale.shape == (stored.dims[0],) and (scale > 0).all()
            assert not numpy_helper.to_array(initializers[dq.input[2]]).any()   # zero point 0
            types.append(stored.data_type)
        layers[node.name] = tuple((types + [None])[:2])
    return layers


def test_the_straight_through_gradient_is_the_identity():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    upstream = torch.randn(4, 3, 3, 3)
    quantized = WeightFakeQuant(8)(weight)
    (quantized * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)
    assert not torch.equal(quantized, weight)   # the forward pass does quantize
    # torch.round alone has no gradient: what the straight-through estimator replaces
    plain = weight.detach().clone().requires_grad_()
    (torch.round(plain * 100) * upstream).sum().backward()
    assert not plain.grad.any()


def test_weights_take_at_most_255_symmetric_levels_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(6, 16, 5, 5) * torch.logspace(-3, 1, 6).reshape(-1, 1, 1, 1)
    weight[5] = 0.0   # an all-zero channel keeps scale 1 and levels 0
    quantized = WeightFakeQuant(8)(weight)
    levels, scale = weight_integers(weight, 8)
    assert levels.dtype == torch.int8 and int(levels.abs().max()) == 127 and int(levels.min()) >= -127
    for c in range(6):
        assert quantized[c].unique().numel() <= 255
        assert torch.equal(quantized[c], levels[c].float() * scale[c])
        assert float((quantized[c] - weight[c]).abs().max()) <= float(scale[c]) / 2 * (1 + 1e-6)
    assert torch.allclose(scale[:5], weight[:5].abs().amax(dim=(1, 2, 3)) / 127) and float(scale[5]) == 1.0
    assert (levels[:5] != 0).sum(dim=(1, 2, 3)).min() > 40   # a channel of small weights keeps its own grid


def test_folded_batch_norm_equals_conv_and_batch_norm_in_eval():
    torch.manual_seed(0)
    model = UserNet()
    generator = torch.Generator().manual_seed(1)
    for norm in (model.bn1, model.bn2):
        randomize_batch_norm(norm, generator)
    model.eval()
    folded = copy.deepcopy(model)
    assert fold_batch_norms(folded) == ["bn1", "bn2"]
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None and folded.conv1.bias.requires_grad
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
        assert not torch.allclose(folded.conv1.weight, model.conv1.weight)


def test_a_batch_norm_whose_input_is_used_elsewhere_stays():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.relu(self.bn(y)) + y

    model = Branching()
    assert fold_batch_norms(model) == [] and isinstance(model.bn, nn.BatchNorm2d)


def test_prepare_with_int8_weights_leaves_the_user_model_and_converts_exactly(trained, digits):
    model, before, qat, _ = trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(qat.bn1, nn.Identity)
    for layer in (qat.conv1, qat.conv2, qat.fc):
        levels, scale = weight_integers(layer.parametrizations.weight.original, 8)
        assert torch.equal(layer.weight, levels.float() * scale.reshape(-1, *[1] * (layer.weight.dim() - 1)))
    x = digits[1].x[:128]
    assert check_exact(qat, ann2snn.convert(qat), x).passed
    # convert froze the weights of its own copy: the QAT model keeps its quantizers and weights
    assert parametrize.is_parametrized(qat.conv1, "weight") and qat.conv1.weight.shape == (8, 1, 3, 3)


def test_export_is_full_qdq_and_onnxruntime_runs_it(trained, digits):
    _, _, qat, path = trained
    # conv1 reads the float image: float bias; conv2 (after a site) and fc (after pool and flatten): int32
    assert integer_layers(path) == {"/conv1/Conv": (TensorProto.INT8, None),
                                    "/conv2/Conv": (TensorProto.INT8, TensorProto.INT32),
                                    "/fc/Gemm": (TensorProto.INT8, TensorProto.INT32)}
    x = digits[1].x.numpy()
    default = onnxruntime.InferenceSession(str(path)).run(None, {"input": x})[0]   # its integer kernels
    as_written = onnxruntime_session(path).run(None, {"input": x})[0]
    assert (default.argmax(1) == as_written.argmax(1)).all()
    with torch.no_grad():
        trained_logits = qat(digits[1].x).numpy()
    assert (as_written.argmax(1) == trained_logits.argmax(1)).mean() >= 0.99   # float sums may round apart
    assert (as_written.argmax(1) == digits[1].y.numpy()).mean() > 0.5   # it learned: chance is 0.1


def test_the_structure_check_fails_on_float_weights(digits, tmp_path):
    qat = ann2snn.prepare(UserNet(), T=2, example_input=digits[0].x[:64])
    path = ann2snn.export_onnx(qat, tmp_path / "float_weights.onnx", digits[0].x[:2])
    with pytest.raises(AssertionError):
        assert set(integer_layers(path).values()) == {(TensorProto.INT8, TensorProto.INT32)}
    assert set(integer_layers(path).values()) == {(None, None)}


def test_the_export_converts_and_verifies_with_the_cli(trained, tmp_path):
    _, _, _, path = trained
    result = invoke("convert", path, "--json", "--verify-data", "digits", "-o", tmp_path / "int8.snn")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verify"]["passed"] and report["timesteps"] == 2


@pytest.mark.parametrize("args, fragment", [
    (["--weight-bits", "4"], "weight_bits 4: only 8-bit weights"),
    (["--weight-bits", "8", "--float"], "cannot be combined with float_only"),
])
def test_train_refusals_are_one_line(args, fragment, tmp_path):
    result = invoke("train", *args, "--epochs", "1", "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_prepare_refuses_other_widths(digits):
    with pytest.raises(Ann2SnnError, match="weight_bits 16: only 8-bit"):
        ann2snn.prepare(UserNet(), T=2, example_input=digits[0].x[:8], weight_bits=16)


RUN = {"epochs": 1, "timesteps": 2, "train_limit": 320}


def test_a_weight_bits_checkpoint_resumes_and_an_old_one_too(tmp_path):
    output = tmp_path / "int8.safetensors"
    first = train(TrainConfig(**RUN, weight_bits=8, output=str(output)), progress=False)
    again = train(TrainConfig(**RUN, weight_bits=8, output=str(output), resume=True), progress=False)
    assert again.test_accuracy == first.test_accuracy and len(again.history) == 1
    with pytest.raises(Ann2SnnError, match="changed: weight_bits"):
        train(TrainConfig(**RUN, output=str(output), resume=True), progress=False)
    # a checkpoint written before weight_bits existed: its config has no such field
    old = tmp_path / "old.safetensors"
    float_weights = train(TrainConfig(**RUN, output=str(old)), progress=False)
    ckpt = f"{old}.ckpt"
    with safe_open(ckpt, framework="pt") as f:
        meta = json.loads(f.metadata()["ann2snn"])
    del meta["config"]["weight_bits"]
    save_file(load_file(ckpt), ckpt, metadata={"ann2snn": json.dumps(meta)})
    resumed = train(TrainConfig(**RUN, output=str(old), resume=True), progress=False)
    assert resumed.test_accuracy == float_weights.test_accuracy


def test_the_cli_trains_int8_weights_that_convert(tmp_path):
    """The real command in a subprocess: one epoch on digits at T = 2, then `convert` of its export."""
    output = tmp_path / "digits_int8.onnx"
    run = subprocess.run([sys.executable, "-m", "ann2snn", "train", "--weight-bits", "8", "-T", "2", "--epochs", "1",
                          "-o", str(output), "--json"], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["test_accuracy"] > 0.3 and summary["onnx"] == str(output)
    assert set(integer_layers(output).values()) == {(TensorProto.INT8, None), (TensorProto.INT8, TensorProto.INT32)}
    result = invoke("convert", output, "--json", "--verify-data", "digits", "-o", tmp_path / "digits_int8.snn")
    assert result.exit_code == 0, result.stderr
    snn = ann2snn.load_snn(tmp_path / "digits_int8.snn")
    test = load_dataset("digits", "test")
    default = onnxruntime.InferenceSession(str(output)).run(None, {"input": test.x.numpy()})[0]
    with torch.no_grad():
        predictions = snn.simulate(test.x).logits.argmax(1).numpy()
    assert (predictions == np.argmax(default, 1)).mean() >= 0.99


def test_a_float_onnx_file_fine_tunes_to_int8_weights(tmp_path):
    """`train --model FILE.onnx --weight-bits 8`: the importer's layers are folded and quantized alike."""
    source = tmp_path / "float.onnx"
    torch.manual_seed(0)
    torch.onnx.export(models.build_model("digits-cnn", 10).eval(), (torch.zeros(1, 1, 8, 8),), str(source),
                      dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    output = tmp_path / "tuned.onnx"
    train(TrainConfig(**RUN, model=str(source), weight_bits=8, fine_tune=True, onnx=str(output)), progress=False)
    assert set(integer_layers(output).values()) == {(TensorProto.INT8, None), (TensorProto.INT8, TensorProto.INT32)}
    assert len(integer_layers(output)) == 4


def gemm_graph(trans_b: int, op: str = "Gemm") -> onnx.GraphProto:
    """x [1, 4] times a weight stored [in, out] = [4, 3] (transB = 0) or [out, in] = [3, 4] (transB = 1)."""
    weight = np.arange(12, dtype=np.float32).reshape((3, 4) if trans_b else (4, 3))
    attributes = {"transB": trans_b} if op == "Gemm" else {}
    node = onnx.helper.make_node(op, ["x", "w"], ["y"], name="layer", **attributes)
    return onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                                  [numpy_helper.from_array(weight, "w")])


def test_the_onnx_rewrite_puts_output_channels_on_axis_0_or_refuses():
    levels = (torch.arange(12, dtype=torch.int8).reshape(3, 4), torch.ones(3))
    graph = gemm_graph(trans_b=1)
    assert dequantize_weights(graph, {"w": levels}) == ["w"]
    assert [n.op_type for n in graph.node] == ["DequantizeLinear", "Gemm"]
    # stored [in, out]: axis 0 is not the output channel, so the rewrite refuses, naming the node
    with pytest.raises(Ann2SnnError, match=r"node layer \(Gemm\): w has shape \(4, 3\)"):
        dequantize_weights(gemm_graph(trans_b=0), {"w": levels})
    # a weight outside a Conv / Gemm is left as it is: export_onnx refuses the model it came from
    assert dequantize_weights(gemm_graph(trans_b=1, op="MatMul"), {"w": levels}) == []
