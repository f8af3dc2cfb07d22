"""The integer SNN (issue 27): int8 QDQ files run on integers, simulate and evaluate bit for bit equal,
the integer artifact, and the CLI."""
from __future__ import annotations

import json
import os
from typing import Callable

import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import ann2snn
from ann2snn.errors import ArtifactError, UnsupportedModelError
from ann2snn.kernels import levels_fused
from ann2snn.runtime.integer import round_clamp, site_thresholds
from ann2snn.runtime.integer_values import window_count
from ann2snn.runtime.quant import QuantDequant
from hostile import invoke
from test_int8_training import integer_layers
from test_onnx_import import QuantNet, export, quantize, randomize_batch_norms

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


class ResidualNet(nn.Module):
    """conv-BN-relu, a residual block (the add before its ReLU), max pool, a 1x1 downsampling branch,
    global average pool, linear: the shapes an integer SNN must lower."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.down = nn.Conv2d(channels, 2 * channels, 1, stride=2)
        self.fc = nn.Linear(2 * channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)) + a)
        b = F.max_pool2d(b, 2)
        c = F.relu(self.conv3(b) + self.down(b))
        return self.fc(F.adaptive_avg_pool2d(c, 1).flatten(1))


def int8_file(folder, T: int, seed: int = 0) -> str:
    """ResidualNet prepared with int8 weights (per output channel) at T (untrained: calibrated on
    noise), exported as full QDQ. (Per-channel activation scales have no integer form: a layer's
    sum over its input channels would mix grids.)"""
    torch.manual_seed(seed)
    model = ResidualNet()
    for norm in (model.bn1, model.bn2):
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    x = torch.rand(32, 1, 8, 8)
    qat = ann2snn.prepare(model, T=T, example_input=x, weight_bits=8).eval()
    return str(ann2snn.export_onnx(qat, os.path.join(folder, f"int8_T{T}.onnx"), x[:2]))


def assert_bit_exact(snn: ann2snn.SNN, x: torch.Tensor) -> None:
    evaluated, simulated = snn.evaluate(x), snn.simulate(x)
    assert torch.equal(evaluated.logits, simulated.logits)
    assert evaluated.spikes.keys() == simulated.spikes.keys() and evaluated.spikes
    for name in evaluated.spikes:
        assert torch.equal(evaluated.spikes[name], simulated.spikes[name]), name


@pytest.mark.parametrize("T", [1, 2, 3, 4, 6, 8])
def test_simulate_and_evaluate_are_bit_exact_on_integer_nets(tmp_path, T):
    snn = ann2snn.convert_onnx(int8_file(tmp_path, T, seed=T), verify=False)
    # every layer but the encoder, on the image; the head reads F.adaptive_avg_pool2d, trained on its grid
    assert snn.backend == "integer" and sorted(snn.integer_layers) == ["conv2_Conv", "conv3_Conv", "down_Conv",
                                                                       "fc_Gemm"]
    x = torch.rand(6, 1, 8, 8)
    assert_bit_exact(snn, x)
    # the same spikes as the float SNN of the same graph, whose exactness the gate proves
    evaluated = snn.evaluate(x)
    with snn.using_backend("float"):
        floating = snn.evaluate(x)
    assert all(torch.equal(evaluated.spikes[k], floating.spikes[k]) for k in floating.spikes)
    assert torch.equal(evaluated.logits.argmax(1), floating.logits.argmax(1))


@pytest.fixture(scope="module")
def float_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return export(randomize_batch_norms(QuantNet()), (3, 8, 8), str(tmp_path_factory.mktemp("qn") / "float.onnx"),
                  "torchscript-17")


# quantize_static with its defaults, per-channel weights, symmetric activations (QDQ pairs with negative
# levels inside the net: a residual add of a quantized conv output and a site)
STATIC = {"defaults": {}, "per-channel": {"per_channel": True},
          "symmetric": {"extra_options": {"ActivationSymmetric": True}},
          # weights with zero points: the integer layer subtracts z times its inputs' sum
          "asymmetric weights": {"extra_options": {"WeightSymmetric": False}},
          "uint8 weights": {"weight_type": "QUInt8", "activation_type": "QUInt8"}}


@pytest.mark.parametrize("flavour", sorted(STATIC))
def test_quantize_static_files_run_on_integers(float_file, tmp_path, flavour):
    path = quantize(float_file, tmp_path / "qdq.onnx", **STATIC[flavour])
    snn = ann2snn.convert_onnx(path, verify=False)
    assert snn.backend == "integer" and sorted(snn.integer_layers) == ["conv1_Conv", "conv2_Conv", "fc_Gemm"]
    asymmetric = [name for name, layer in snn.integer_layers.items() if layer.zero_point is not None]
    assert bool(asymmetric) == flavour.startswith(("asymmetric", "uint8")), asymmetric
    x = torch.rand(32, 3, 8, 8)
    assert_bit_exact(snn, x)
    with snn.using_backend("float"):
        floating = snn.evaluate(x).logits
    logits = snn.evaluate(x).logits
    if not asymmetric:
        assert torch.equal(logits, floating)   # the file's QDQ pairs quantize both the same
    else:   # weights up to 255 from zero: the float SNN's float32 conv may round a row one output level apart
        step = [m for m in snn.graph_module.modules() if isinstance(m, QuantDequant)][-1].scale.max()
        assert float((logits - floating).abs().max()) <= float(step) * (1 + 1e-6)
        assert torch.equal(logits.argmax(1), floating.argmax(1))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])   # its int8 kernels
    reference = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert torch.equal(logits.argmax(1), reference.argmax(1))


class PoolNet(nn.Module):
    """Windowed average pools between int8 layers: 2x2 stride 2, and 3x3 stride 1 with counted padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.avg_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        b = F.avg_pool2d(F.relu(self.conv2(a)), 3, stride=1, padding=1)
        return self.fc(F.relu(self.conv3(b)).flatten(1))


def test_windowed_average_pools_sum_on_integers(tmp_path):
    torch.manual_seed(0)
    float_path = export(randomize_batch_norms(PoolNet()), (3, 8, 8), str(tmp_path / "pools.onnx"), "torchscript-17")
    path = quantize(float_path, tmp_path / "pools_qdq.onnx")
    snn = ann2snn.convert_onnx(path)   # verified: the gate, and the integer SNN's checks
    assert snn.backend == "integer" and sorted(snn.integer_layers) == ["conv1_Conv", "conv2_Conv", "conv3_Conv",
                                                                       "fc_Gemm"]
    assert snn.report.verification.integer["passed"]
    assert snn.report.verification.integer["onnxruntime_default"]["explained"]
    assert_bit_exact(snn, torch.rand(16, 3, 8, 8))


class PooledHiddenNet(nn.Module):
    """VGG's shape: conv sites, an average pool module, a hidden linear layer with a neuron after it,
    the linear head."""

    def __init__(self, pool: Callable, features: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.pool = nn.Conv2d(8, 8, 3, padding=1), pool
        self.fc1, self.fc2 = nn.Linear(features, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def bias_grid_in_file(path: str, layer: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(the int32 bias's scale, the weight's scale, theta of the last QDQ site before `layer`) in the file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    tensors = [*graph.initializer, *(node.attribute[0].t for node in graph.node if node.op_type == "Constant")]
    names = [*(t.name for t in graph.initializer), *(n.output[0] for n in graph.node if n.op_type == "Constant")]
    values = {name: torch.from_numpy(numpy_helper.to_array(t).copy()) for name, t in zip(names, tensors)}
    scales = {node.output[0]: values[node.input[1]] for node in graph.node if node.op_type == "DequantizeLinear"
              and node.input[1] in values}
    gemm = next(node for node in graph.node if node.name == layer)
    theta = [values[node.input[1]] for node in graph.node[:list(graph.node).index(gemm)]
             if node.op_type == "QuantizeLinear"][-1]
    return scales[gemm.input[2]], scales[gemm.input[1]], float(theta)


# (pool, the features it leaves of 8 x 8 x 8, the count each window divides by at 8 x 8)
POOLED = {"adaptive to 2x2": (lambda: nn.AdaptiveAvgPool2d(2), 32, 16),
          # a function call: prepare makes it its module
          "adaptive to 2x2, functional": (lambda: lambda x: F.adaptive_avg_pool2d(x, 2), 32, 16),
          "global": (lambda: nn.AdaptiveAvgPool2d(1), 8, 64), "2x2 windows": (lambda: nn.AvgPool2d(2), 128, 4),
          "2x2 windows, functional": (lambda: lambda x: F.avg_pool2d(x, 2, stride=2), 128, 4)}


@pytest.mark.parametrize("pool", sorted(POOLED))
def test_a_hidden_layer_after_an_average_pool_trains_its_bias_on_the_pooled_grid_and_lowers(tmp_path, pool):
    make, features, count = POOLED[pool]
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    qat = ann2snn.prepare(PooledHiddenNet(make(), features), T=2, example_input=x, weight_bits=8).eval()
    path = str(ann2snn.export_onnx(qat, tmp_path / "pooled.onnx", x[:2]))
    bias_scale, weight_scale, theta = bias_grid_in_file(path, "/fc1/Gemm")
    # the integer SNN's grid: the pool's sums, 1 / count in the scale (float64), times the weight's
    assert torch.equal(bias_scale, (torch.tensor(theta, dtype=torch.float64) / count * weight_scale.double()).float())
    snn = ann2snn.convert_onnx(path, calib=x)   # verified: the gate, and the integer SNN's checks
    assert snn.backend == "integer" and sorted(snn.integer_layers) == ["conv2_Conv", "fc1_Gemm", "fc2_Gemm"]
    assert snn.report.verification.integer["passed"]
    assert snn.report.verification.integer["onnxruntime_default"]["explained"]
    assert_bit_exact(snn, torch.rand(16, 1, 8, 8))
    if pool.startswith("adaptive"):   # the export's input size sets an adaptive pool's windows, and the grid
        wider = str(ann2snn.export_onnx(qat, tmp_path / "wider.onnx", torch.rand(2, 1, 16, 16)))
        bias_scale, weight_scale, theta = bias_grid_in_file(wider, "/fc1/Gemm")
        assert torch.equal(bias_scale, (torch.tensor(theta, dtype=torch.float64) / (4 * count)
                                        * weight_scale.double()).float())
        assert ann2snn.convert_onnx(wider, calib=torch.rand(16, 1, 16, 16), verify=False).backend == "integer"


def test_a_hidden_layer_after_uneven_pool_windows_keeps_a_float_bias_and_the_float_snn(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    # 3x3 windows at stride 2 with ceil_mode: the last window in each row and column counts 6 or 4, not 9
    model = PooledHiddenNet(nn.AvgPool2d(3, stride=2, ceil_mode=True), 8 * 4 * 4)
    qat = ann2snn.prepare(model, T=2, example_input=x, weight_bits=8).eval()
    path = str(ann2snn.export_onnx(qat, tmp_path / "uneven.onnx", x[:2]))
    assert integer_layers(path)["/fc1/Gemm"] == (onnx.TensorProto.INT8, None)
    snn = ann2snn.convert_onnx(path, calib=x)
    assert snn.backend == "float" and snn.report.verification.passed
    kept = [r for r in snn.report.rewrites if r.get("pass") == "integer"]
    assert kept and "fires from values that pool_average_pool" in kept[0]["kept_float"], kept


@pytest.mark.parametrize("pool, shape, count", [
    (nn.AvgPool2d(3, stride=1, padding=1), (1, 2, 8, 8), 9),
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), (1, 2, 8, 8), None),
    (nn.AvgPool2d(2, ceil_mode=True), (1, 2, 7, 7), None),
    (nn.AvgPool2d(2, divisor_override=3), (1, 2, 8, 8), 3),
    (nn.AvgPool1d(4, stride=2), (1, 2, 10), 4),
    (nn.AdaptiveAvgPool2d(1), (1, 2, 6, 4), 24),
    (nn.AdaptiveAvgPool2d((None, 2)), (1, 2, 6, 4), 2),
    (nn.AdaptiveAvgPool2d(4), (1, 2, 6, 4), None),
    (nn.AdaptiveAvgPool1d(2), (2, 6), 3),
])
def test_window_count_is_the_divisor_of_every_window(pool, shape, count):
    assert window_count(pool, shape) == count
    if count is not None:   # the pool's mean of integers, times the count, is the window's integer sum
        x = torch.randint(0, 16, shape).double()
        sums = pool(x) * count
        assert torch.equal(sums, sums.round())
        assert float(sums.sum()) > 0


def test_thresholds_reproduce_the_requantization_on_its_boundaries():
    torch.manual_seed(1)
    channels, product, theta = 5, torch.rand(5, dtype=torch.float64) * 1e-3 + 1e-4, torch.tensor(0.0137)
    thresholds = site_thresholds(product, -3, theta, 0, 0, 15, channels)
    reachable = thresholds < 2 ** 31
    boundary = torch.cat([thresholds - 1, thresholds, thresholds + 1], 1).clamp(-2 ** 31, 2 ** 31 - 1)
    accumulator = boundary.t().contiguous().to(torch.int32)   # [samples, channels]

    def direct(a: torch.Tensor) -> torch.Tensor:
        value = (a.long() + -3).to(torch.int32).to(torch.float32) * product.to(torch.float32)
        return round_clamp(value, theta, 0, 0, 15)

    assert reachable.any()
    assert torch.equal(levels_fused(accumulator, thresholds, 0).levels.long(), direct(accumulator))
    broken = thresholds.clone()
    broken[2, 4] += 1   # one threshold off by one
    assert not torch.equal(levels_fused(accumulator, broken, 0).levels.long(), direct(accumulator))


def test_the_integer_artifact_stores_int8_weights_and_loads_bit_exact(tmp_path):
    snn = ann2snn.convert_onnx(int8_file(tmp_path, 3), verify=False)
    x = torch.rand(4, 1, 8, 8)
    logits = snn.evaluate(x).logits
    snn.save(tmp_path / "int.snn")
    with safe_open(str(tmp_path / "int.snn"), framework="pt") as f:
        assert f.get_tensor("conv2_Conv.weight").dtype == torch.int8
        assert f.get_tensor("conv2_Conv.bias_integers").dtype == torch.int32
        assert json.loads(f.metadata()["ann2snn"])["format_version"] == 2
    loaded = ann2snn.load_snn(tmp_path / "int.snn")
    assert loaded.backend == "integer" and torch.equal(loaded.evaluate(x).logits, logits)
    assert_bit_exact(loaded, x)
    for name, tensor in snn.graph_module.state_dict().items():   # the float graph comes back bit for bit
        assert torch.equal(tensor, loaded.graph_module.state_dict()[name]), name
    snn.integer_layers.clear()
    snn.backend = "float"
    snn.save(tmp_path / "float.snn")
    def tensor_bytes(name: str) -> int:
        with safe_open(str(tmp_path / name), framework="pt") as f:
            return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())

    assert tensor_bytes("int.snn") < 0.6 * tensor_bytes("float.snn")   # int8 for most of its weights


def test_a_tampered_integer_artifact_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    snn = ann2snn.convert_onnx(int8_file(tmp_path, 2), verify=False)
    snn.save(tmp_path / "int.snn")
    with safe_open(str(tmp_path / "int.snn"), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(tmp_path / "int.snn")
    tensors["conv2_Conv.weight"] = tensors["conv2_Conv.weight"].float()
    save_file(tensors, tmp_path / "float_weight.snn", metadata=metadata)
    with pytest.raises(ArtifactError, match="tensor conv2_Conv.weight should be int8, the file holds float32"):
        ann2snn.load_snn(tmp_path / "float_weight.snn")
    del tensors["conv2_Conv.weight_scale"]
    tensors["conv2_Conv.weight"] = tensors["conv2_Conv.weight"].to(torch.int8)
    save_file(tensors, tmp_path / "no_scale.snn", metadata=metadata)
    with pytest.raises(ArtifactError, match="lacks tensor conv2_Conv.weight_scale"):
        ann2snn.load_snn(tmp_path / "no_scale.snn")


def test_an_asymmetric_integer_artifact_keeps_its_zero_points(float_file, tmp_path):
    from safetensors.torch import load_file, save_file

    path = quantize(float_file, tmp_path / "asym.onnx", **STATIC["asymmetric weights"])
    snn = ann2snn.convert_onnx(path, verify=False)
    x = torch.rand(8, 3, 8, 8)
    snn.save(tmp_path / "asym.snn")
    tensors = load_file(tmp_path / "asym.snn")
    zero = [name for name in tensors if name.endswith(".weight_zero_point")]
    assert zero and all(tensors[name].dtype == torch.int32 for name in zero)
    loaded = ann2snn.load_snn(tmp_path / "asym.snn")
    assert torch.equal(loaded.evaluate(x).logits, snn.evaluate(x).logits)
    for name, tensor in snn.graph_module.state_dict().items():   # float32(I - z) * scale, bit for bit
        assert torch.equal(tensor, loaded.graph_module.state_dict()[name]), name
    with safe_open(str(tmp_path / "asym.snn"), framework="pt") as f:
        metadata = f.metadata()
    tensors[zero[0]] = torch.full_like(tensors[zero[0]], 300)
    save_file(tensors, tmp_path / "wide.snn", metadata=metadata)
    with pytest.raises(ArtifactError, match="must hold one zero point in -128..127"):
        ann2snn.load_snn(tmp_path / "wide.snn")


def test_convert_cli_verifies_the_integer_snn(tmp_path):
    path = int8_file(tmp_path, 2)
    result = invoke("convert", path, "--json", "-o", str(tmp_path / "out.snn"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "integer" and report["integer_layers"] == 4
    integer = report["verify"]["integer"]
    assert integer["passed"] and integer["simulate_equals_evaluate"] and integer["float_snn"]["agreement"] == 1.0
    assert 0 <= integer["onnxruntime_default"]["agreement"] <= 1
    text = invoke("convert", path, "--no-integer", "-o", str(tmp_path / "float.snn"))
    assert text.exit_code == 0 and "integer SNN" not in text.stdout
    assert ann2snn.load_snn(tmp_path / "float.snn").backend == "float"


def test_a_file_that_does_not_lower_keeps_the_float_snn_or_is_refused(float_file, tmp_path):
    path = quantize(float_file, tmp_path / "float_conv.onnx", nodes_to_exclude=["/conv2/Conv"])   # float weights
    snn = ann2snn.convert_onnx(path, verify=False)
    assert snn.backend == "float" and not snn.integer_layers
    kept = [r for r in snn.report.rewrites if r.get("pass") == "integer"]
    assert kept and "fires from values that" in kept[0]["kept_float"]
    with pytest.raises(UnsupportedModelError, match="no integer SNN"):
        ann2snn.convert_onnx(path, verify=False, integer=True)
    x = torch.rand(8, 1, 8, 8)
    float_weights = ann2snn.export_onnx(ann2snn.prepare(ResidualNet(), T=2, example_input=x).eval(),
                                        tmp_path / "float_weights.onnx", x[:2])   # activation QDQ pairs only
    refused = invoke("convert", str(float_weights), "--integer", "--no-verify", "-o", str(tmp_path / "x.snn"))
    assert refused.exit_code == 2 and "no integer SNN: no layer has int8 weights" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.snn").exists()


def test_a_broken_integer_layer_fails_verification(tmp_path):
    from ann2snn.verify.integer_check import verify_integer
    from ann2snn.data.inputs import noise_samples

    path = int8_file(tmp_path, 3)
    snn = ann2snn.convert_onnx(path, verify=False)
    inputs = noise_samples((1, 8, 8), 16)
    assert verify_integer(path, snn, inputs, 8)["passed"]
    layer = snn.integer_layers["conv2_Conv"]
    layer.weight.copy_((layer.weight.long() * -1).clamp(-127, 127).to(torch.int8))   # not the file's weights
    snn._integer.clear()
    check = verify_integer(path, snn, inputs, 8)
    assert check["simulate_equals_evaluate"] and not check["passed"] and check["float_snn"]["agreement"] < 1


def test_the_triton_kernels_compute_the_same_integers(tmp_path, monkeypatch):
    """Under TRITON_INTERPRET=1, the CUDA path (Triton int8 GEMM, integer levels, the encoder's neuron)
    on CPU tensors: the same logits and spikes as the CPU kernels, bit for bit."""
    snn = ann2snn.convert_onnx(int8_file(tmp_path, 2), verify=False)
    x = torch.rand(2, 1, 8, 8)
    on_cpu = snn.evaluate(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    snn._integer.clear()
    assert_bit_exact(snn, x)
    triton = snn.evaluate(x)
    assert torch.equal(triton.logits, on_cpu.logits)
    assert all(torch.equal(triton.spikes[k], on_cpu.spikes[k]) for k in on_cpu.spikes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_the_same_integers(tmp_path):
    snn = ann2snn.convert_onnx(int8_file(tmp_path, 4), verify=False)
    x = torch.rand(16, 1, 8, 8)
    on_cpu = snn.evaluate(x)
    snn = snn.cuda()
    assert_bit_exact(snn, x.cuda())
    on_cuda = snn.evaluate(x.cuda())
    assert torch.equal(on_cuda.logits.cpu(), on_cpu.logits)
    assert all(torch.equal(on_cuda.spikes[k].cpu(), on_cpu.spikes[k]) for k in on_cpu.spikes)


def test_inspect_and_energy_see_the_integer_layers(tmp_path):
    snn = ann2snn.convert_onnx(int8_file(tmp_path, 2), verify=False)
    snn.save(tmp_path / "int.snn")
    shown = invoke("inspect", str(tmp_path / "int.snn"), "--json")
    assert shown.exit_code == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["format_version"] == 2 and info["file_bytes"] == os.path.getsize(tmp_path / "int.snn")
    assert "int8 in 4 layers" in info["weights"], info["weights"]
    np_path = tmp_path / "x.npz"
    import numpy as np
    np.savez(np_path, x=np.random.rand(8, 1, 8, 8).astype(np.float32), y=np.zeros(8, dtype=np.int64))
    energy = invoke("energy", str(tmp_path / "int.snn"), "--data", str(np_path))
    assert energy.exit_code == 0, energy.stderr
    assert "int8 weights: int8 operation costs (table int8-45nm)" in energy.stdout


def test_verify_and_eval_commands_run_an_integer_artifact(tmp_path):
    import numpy as np

    path = int8_file(tmp_path, 2)
    assert invoke("convert", path, "-o", str(tmp_path / "int.snn")).exit_code == 0
    checked = invoke("verify", str(tmp_path / "int.snn"), "--against", path, "--samples", "16", "--json")
    assert checked.exit_code == 0, checked.stderr
    report = json.loads(checked.stdout)
    integer = report.get("verify", report)["integer"]
    assert integer["passed"] and integer["samples"] == 16
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.rand(16, 1, 8, 8).astype(np.float32), y=np.arange(16) % 10)
    scores = []
    for mode in ("evaluate", "simulate"):
        scored = invoke("eval", str(tmp_path / "int.snn"), "--data", str(data), "--mode", mode, "--json")
        assert scored.exit_code == 0, scored.stderr
        scores.append(json.loads(scored.stdout))
    assert scores[0]["images"] == 16
    assert scores[0]["top1"] == scores[1]["top1"] and scores[0]["spikes_per_image"] == scores[1]["spikes_per_image"]
