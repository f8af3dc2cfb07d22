"""The exactness gate (ann2snn/gate.py) holds on correct conversions and fails on every broken one.

Correct: the test network of test_artifact (input site with a membrane offset, conv + BN,
per-channel sites, a MaxPool moved before its site, concat, residual add, linear sites) and the
zoo models, in float32 and float64. Broken: a correct SNN mutated (a bias shift removed, a site's
cap or T off by one, a MaxPool after its neuron, a theta off by one part in a million, one weight
changed), or a compiler pass broken (bit order reversed, no bias shift): each must fail the gate.
(A compiler that left a MaxPool after its site would still be exact: the simulator pools the
integrated potential. The gate then fails the SNN only for not being the compiler's.)
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import ann2snn
import ann2snn.compiler as compiler_module
import ann2snn.neuron as neuron_module
import models
from ann2snn.gate import check_exact
from ann2snn.neuron import BitSerialIFNode
from ann2snn.quant import QuantClippedActivation
from test_artifact import make_snn
from test_onnx_import import qdq_model  # noqa: F401,F811 (a fixture)


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def correct(request):
    snn, model, x = make_snn(request.param)
    x = torch.cat([x, (torch.rand(60, 3, 6, 6, generator=torch.Generator().manual_seed(3)) * 1.5).to(x.dtype)])
    return snn, model, x


def test_a_correct_conversion_passes(correct):
    snn, model, x = correct
    gate = check_exact(model, snn, x)
    assert gate.passed, gate.problems
    assert gate.levels_compared > 10_000 and all(s.compared == s.equal for s in gate.sites.values())
    assert set(gate.sites) == set(snn.site_names) and gate.tensors_compared == len(snn.graph_module.state_dict())
    assert gate.max_relative_logit_difference <= 1e-9 and gate.evaluation_matches_simulation


@pytest.mark.parametrize("name", ["digits-cnn", "resnet20", "vgg16", "mobilenetv2", "resnet18"])
def test_zoo_conversions_pass(name):
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=10, activation=lambda c: QuantClippedActivation(
        levels=7, channels=c, clip=1.0)).eval()
    shape = models.default_input_shape(name) if name == "digits-cnn" else (3, 32, 32)
    gate = check_exact(model, ann2snn.convert(model), torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)))
    assert gate.passed, gate.problems[:3]


def _neurons(snn) -> list[tuple[str, BitSerialIFNode]]:
    return [(n, m) for n, m in snn.graph_module.named_modules() if isinstance(m, BitSerialIFNode)]


def remove_one_bias_shift(snn):
    site, entry = next((s, e) for s, e in snn.report["sites"].items() if e["bias_shift"]["kind"] == "bias")
    layer = snn.graph_module.get_submodule(entry["bias_shift"]["target"])
    layer.bias.data -= torch.as_tensor(entry["bias_shift"]["amount"], dtype=layer.bias.dtype)


def cap_one_level_lower(snn):
    _neurons(snn)[1][1].levels -= 1


def one_more_step(snn):
    neuron = _neurons(snn)[1][1]
    neuron.timesteps += 1


def max_pool_after_its_neuron(snn):
    gm = snn.graph_module
    rewrite = next(r for r in snn.report["rewrites"] if r["pass"] == "move_max_pool_before_sites")
    pool = next(n for n in gm.graph.nodes if n.target == rewrite["max_pool"])
    site = next(n for n in gm.graph.nodes if n.target == rewrite["site"])
    potential = pool.args[0]
    site.replace_all_uses_with(pool)
    pool.replace_input_with(potential, site)
    site.replace_input_with(pool, potential)
    pool.prepend(site)
    gm.graph.lint()
    gm.recompile()
    snn._lowered.clear()


def theta_off_by_a_millionth(snn):
    neuron = _neurons(snn)[2][1]
    neuron.theta.data *= 1 + 1e-6


def one_weight_changed(snn):
    conv = snn.graph_module.get_submodule("res")
    conv.weight.data[0, 0, 0, 0] += 1e-3


def membrane_offset_dropped(snn):
    neuron = snn.graph_module.get_submodule("act_in")
    neuron.membrane_offset.data.zero_()


MUTATIONS = [remove_one_bias_shift, cap_one_level_lower, one_more_step, max_pool_after_its_neuron,
             theta_off_by_a_millionth, one_weight_changed, membrane_offset_dropped]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=[m.__name__ for m in MUTATIONS])
def test_a_mutated_snn_fails(correct, mutate):
    snn, model, x = correct
    broken = copy.deepcopy(snn)
    mutate(broken)
    gate = check_exact(model, broken, x)
    assert not gate.passed and gate.problems


def _reversed_thresholds(theta, timesteps):
    return [theta * float(2 ** t) for t in range(timesteps)]


def _no_shift(gm: fx.GraphModule) -> fx.GraphModule:
    return gm


BROKEN_COMPILERS = {
    "bit_order_reversed": (neuron_module, "step_thresholds", _reversed_thresholds),
    "no_bias_shift": (compiler_module, "shift_bias", _no_shift),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_COMPILERS))
def test_a_broken_compiler_fails(correct, broken, monkeypatch):
    """The SNN is made by the broken compiler, and so is the gate's own float64 conversion: the
    comparison with the source's levels must still catch it."""
    snn, model, x = correct
    target, name, replacement = BROKEN_COMPILERS[broken]
    monkeypatch.setattr(target, name, replacement)
    made = ann2snn.convert(model)
    gate = check_exact(model, made, x)
    assert not gate.passed and gate.problems


def test_quantize_static_file_passes(qdq_model):
    """onnxruntime's quantize_static output (uint8 activations, int8 weights, a QDQ input)."""
    from ann2snn.compiler import compile_source, quantized_onnx

    source_graph, source = quantized_onnx(qdq_model)
    snn = compile_source(qdq_model, source_graph, source)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gate = check_exact(source_graph, snn, x)
    assert gate.passed, gate.problems
    assert gate.levels_compared > 1000


class FunctionalPools(nn.Module):
    """F.max_pool2d straight on a site (moved before it), and a MaxPool whose site also feeds a
    residual branch (kept after the neuron, and recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), QuantClippedActivation(levels=7, clip=1.0)
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=1), QuantClippedActivation(levels=7, clip=1.0)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 2 * 2 * 2, 3)

    def forward(self, x):
        h = F.max_pool2d(self.act1(self.conv1(x)), 2)
        a = self.act2(self.conv2(h))
        return self.head(torch.cat([self.pool(a), self.pool(a + h)], 1).flatten(1))


def test_functional_and_kept_max_pools():
    torch.manual_seed(0)
    model = FunctionalPools().eval()
    snn = ann2snn.convert(model)
    rewrites = snn.report["rewrites"]
    assert any(r.get("site") == "act1" and r.get("max_pool") == "max_pool2d" for r in rewrites), rewrites
    assert any(r.get("max_pool_kept") == "pool" and "feeds other nodes" in r["reason"] for r in rewrites), rewrites
    gate = check_exact(model, snn, torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert gate.passed, gate.problems
