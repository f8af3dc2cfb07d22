"""The integer SNN against onnxruntime's default session (int8 kernels), every difference explained per op
(ann2snn/verify/integer_check.py): quantize_static files, the classification itself, and files whose
onnxruntime integers or logits were tampered with, which must come out unexplained."""
from __future__ import annotations

import json

import pytest
import torch

import ann2snn
from ann2snn.verify.integer_check import IntegerComparison, classify
from ann2snn.verify.ort_run import OnnxruntimeRunner
from hostile import invoke
from test_onnx_import import QuantNet, export, quantize, randomize_batch_norms

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def static_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("static")
    torch.manual_seed(0)
    float_file = export(randomize_batch_norms(QuantNet()), (3, 8, 8), str(folder / "float.onnx"), "torchscript-17")
    return {"defaults": quantize(float_file, folder / "defaults.onnx"),
            "per-channel": quantize(float_file, folder / "per_channel.onnx", per_channel=True)}


def _explained(path: str, batches: int = 4, against: str = "onnxruntime") -> dict:
    snn = ann2snn.convert_onnx(path, verify=False, integer=True)
    comparison = IntegerComparison(path, snn)
    gen = torch.Generator().manual_seed(1)
    for _ in range(batches):
        comparison.add(torch.rand(64, 3, 8, 8, generator=gen))
    return getattr(comparison, against).result()


@pytest.mark.parametrize("flavour", ["defaults", "per-channel"])
@pytest.mark.parametrize("against", ["onnxruntime", "float_snn"])
def test_every_difference_from_onnxruntime_and_the_float_snn_is_explained_per_op(static_files, flavour, against):
    result = _explained(static_files[flavour], against=against)
    assert result["explained"]
    assert {c["op"] for c in result["sites"].values()} == {"input", "Conv", "Add", "Gemm"}
    for counts in result["sites"].values():
        assert counts["compared"] == counts["equal"] + counts["rounding"] + counts["downstream"] + counts["unexplained"]
    assert sum(result["logits"].values()) == 256


def test_the_classification_of_one_site():
    mine = torch.tensor([[3, 4, 5, 6], [1, 1, 1, 1]])
    theirs = torch.tensor([[3, 5, 7, 7], [1, 2, 1, 1]])
    real = torch.tensor([[3.0, 4.5 + 1e-7, 6.0, 6.9], [1.0, 1.5, 1.0, 1.0]], dtype=torch.float64)
    bound = torch.full_like(real, 1e-6)
    counts, differ = classify(mine, theirs, (real, bound), torch.tensor([False, True]))
    # 4 vs 5 at 4.5 + 1e-7: rounding; 5 vs 7: two apart; 6 vs 7 at 6.9: far from 6.5; row 1 differed earlier
    assert counts == {"compared": 8, "equal": 4, "rounding": 1, "downstream": 1, "unexplained": 2}
    assert differ.sum() == 4
    # without a value nothing is explained
    assert classify(mine, theirs, None, torch.tensor([False, False]))[0]["unexplained"] == 4


def test_a_wrong_integer_or_logit_from_onnxruntime_is_unexplained(static_files, monkeypatch):
    run = OnnxruntimeRunner.__call__

    def tampered(site_offset: int, logit_offset: float):
        def call(self, x):
            logits, *tensors = run(self, x)
            if tensors:
                tensors[1] = tensors[1].clone()
                tensors[1].view(-1)[0] += site_offset   # the first conv's site, sample 0
            return (logits + logit_offset, *tensors)
        return call

    monkeypatch.setattr(OnnxruntimeRunner, "__call__", tampered(2, 0.0))
    result = _explained(static_files["defaults"], batches=1)
    assert not result["explained"] and sum(c["unexplained"] for c in result["sites"].values()) == 1
    monkeypatch.setattr(OnnxruntimeRunner, "__call__", tampered(0, 1.0))
    result = _explained(static_files["defaults"], batches=1)
    logits = result["logits"]
    assert not result["explained"] and logits["unexplained"] + logits["after_level_difference"] == 64


def test_convert_reports_the_explanation(static_files, tmp_path):
    result = invoke("convert", static_files["defaults"], "--json", "-o", str(tmp_path / "out.snn"))
    assert result.exit_code == 0, result.stderr
    ort = json.loads(result.stdout)["verify"]["integer"]["onnxruntime_default"]
    assert ort["explained"] and set(ort["logits"]) == {"equal", "after_level_difference", "output_rounding",
                                                       "unexplained"}
    text = invoke("convert", static_files["defaults"], "-o", str(tmp_path / "text.snn"))
    assert text.exit_code == 0 and "every difference explained" in text.stdout
    # a loaded artifact, whose graph lost the import's node meta: its kept QDQ pairs are found in the file
    checked = invoke("verify", str(tmp_path / "out.snn"), "--against", static_files["defaults"], "--samples", "16",
                     "--json")
    assert checked.exit_code == 0, checked.stderr
    integer = json.loads(checked.stdout).get("verify", json.loads(checked.stdout))["integer"]
    assert integer["passed"] and integer["onnxruntime_default"]["explained"]
    assert "y_QuantizeLinear" in integer["onnxruntime_default"]["sites"]   # a kept QDQ pair, compared


def test_the_encoders_bound_covers_its_float_conv_in_any_order(tmp_path):
    """ann2snn's own export: the first layer reads the float image and runs in float32, in onnxruntime
    in its own order. The encoding site's value is the z / theta its level rounds (the bias shift
    taken back), and its bound the conv's error in any order, not only the requantization's."""
    import torch.nn.functional as F

    from ann2snn.runtime.integer_snn import IntegerProgram
    from test_integer_snn import int8_file

    snn = ann2snn.convert_onnx(int8_file(tmp_path, 2), verify=False)
    observed = {}
    program = IntegerProgram(snn.graph_module, snn.integer_layers, "evaluate",
                             observe=lambda site, integers, value: observed.setdefault(site, (integers, value)))
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program.run(x)
        site = next(iter(observed))   # the encoder's, observed first
        levels, (value, bound) = observed[site]
        modules = dict(snn.graph_module.named_modules())
        neuron, conv = modules[site], modules["conv1_Conv"]
        theta = neuron.theta.double().reshape(1, -1, 1, 1)
        # the same conv in float32 in another order: im2col, the products summed in reverse
        weight = torch.flip(conv.weight.reshape(conv.weight.shape[0], -1), [1])
        other = (weight @ torch.flip(F.unfold(x, 3, padding=1), [1])).reshape(64, -1, 8, 8) + \
            conv.bias.reshape(1, -1, 1, 1)
    clear = ((value - value.floor() - 0.5).abs() > bound) & (value > -0.5) & (value < neuron.levels + 0.5)
    assert bool(clear.any()) and torch.equal(levels[clear], (value[clear] + 0.5).floor().long())
    moved = (other.double() / theta - 0.5 - value).abs()   # the graph's bias holds the shift theta / 2
    assert bool((moved <= bound).all()) and float(bound.max()) < 1e-4
    # the requantization's roundoffs alone do not cover it
    assert not bool((moved <= 2 ** -24 * 16 * value.abs()).all())
