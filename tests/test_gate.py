"""The exactness gate (ann2snn/verify/gate.py) holds on correct conversions and fails on every broken one.

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
import ann2snn.compile.compiler as compiler_module
import ann2snn.runtime.neuron as neuron_module
from ann2snn import models
import ann2snn.verify.gate as gate_module
from ann2snn.verify.gate import _exact_tie, check_exact
from ann2snn.runtime.neuron import BitSerialIFNode
from ann2snn.runtime.quant import QuantClippedActivation
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
    from ann2snn.compile.compiler import compile_source
    from ann2snn.frontend.source import quantized_onnx

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


# ------------------------------------------------------------------ exact ties


def _same_scale_average_pools() -> tuple[nn.Module, torch.Tensor]:
    """Sites requantized at their own scale after an average pool, as PT2E and onnxruntime write
    them: the mean of 4 levels is a half-integer a quarter of the time (an exact tie)."""
    torch.manual_seed(0)

    def site(clip: float) -> QuantClippedActivation:
        return QuantClippedActivation(levels=15, channels=0, clip=clip)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), site(1.3), nn.AvgPool2d(2), site(1.3),
                          nn.Conv2d(8, 8, 3, padding=1), site(2.1), nn.AdaptiveAvgPool2d(1), site(2.1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    return model, torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_exact_ties_are_counted_and_everything_else_still_checked(monkeypatch):
    model, x = _same_scale_average_pools()
    snn = ann2snn.convert(model, T=4)
    gate = check_exact(model, snn, x)
    assert gate.passed, gate.problems
    assert gate.ties > 0 and gate.sites["3"].ties == gate.ties   # all at the site after the 2x2 pool
    assert gate.sites["3"].equal + gate.ties == gate.sites["3"].compared
    assert gate.to_json()["ties"] == gate.ties
    # without the tie rule the same conversion fails: the ties are real differences of float64 sums
    monkeypatch.setattr(gate_module, "TIE_TOLERANCE", 0.0)
    strict = check_exact(model, snn, x)
    assert not strict.passed and any("site 3" in p for p in strict.problems)


_SHIFT_BIAS = compiler_module.shift_bias


def _shift_a_hair_short(gm: fx.GraphModule) -> fx.GraphModule:
    """A compiler whose membrane offsets are theta / 2 less one part in 10^7: every level is right
    but those whose z / theta lies within 10^-7 of a rounding boundary, exact ties included."""
    gm = _SHIFT_BIAS(gm)
    for node in gm.graph.nodes:
        if "membrane_offset" in node.meta:
            node.meta["membrane_offset"] = node.meta["membrane_offset"] * (1 - 1e-7)
    return gm


def test_exact_ties_do_not_hide_a_broken_conversion(monkeypatch):
    """A neuron that fires one level low at a tie because its potential is off (not because float64
    rounded the same value either way) is not a tie: its own V / theta is not on the boundary."""
    model, x = _same_scale_average_pools()
    monkeypatch.setattr(compiler_module, "shift_bias", _shift_a_hair_short)
    gate = check_exact(model, ann2snn.convert(model, T=4), x)
    assert not gate.passed and any("levels differ" in p for p in gate.problems), gate.problems


def test_exact_tie_needs_both_sides_on_the_boundary_and_a_difference_of_one():
    def float64(*values: float) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    level, got = float64(3, 3, 3, 3, 3), float64(4, 4, 5, 4, 4)
    ratio = float64(3.5 + 1e-13, 3.5 - 1e-13, 3.5, 3.5 + 1e-6, 3.5)
    fired = float64(4, 4 - 1e-14, 5, 4, 4 - 1e-7)
    assert _exact_tie(got, level, ratio, torch.floor(ratio) + 0.5, fired).tolist() == [True, True, False, False, False]
