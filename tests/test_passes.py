"""Each compiler pass alone on tiny graphs, then both lowerings (docs/method.md sections 2, 3, 7).

trace, fold_batch_norm, shift_bias, move_max_pool_before_sites, place_neurons; and
lower_to_simulator / lower_to_evaluator on a net with every structural element of section 3.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.errors import UnsupportedModelError
from ann2snn.runtime import lower_to_evaluator, lower_to_simulator
from ann2snn.runtime.signal import Signal
from ann2snn.runtime.neuron import BitSerialIFNode
from ann2snn.compile import fold_batch_norm, move_max_pool_before_sites, place_neurons, shift_bias, trace
from ann2snn.runtime.graph import conversion_report, neuron_nodes, site_nodes
from ann2snn.runtime.quant import QuantClippedActivation

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def site(levels: int = 15, clip=2.0, channels: int = 0) -> QuantClippedActivation:
    s = QuantClippedActivation(levels=levels, clip=2.0, channels=channels)
    if isinstance(clip, (list, tuple)):
        s.clip.data = torch.tensor(clip)
    else:
        s.clip.data.fill_(clip)
    return s


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = gen(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(0.4 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            m.weight.data = 0.5 + torch.rand(c, generator=g)
            m.bias.data = 0.3 * torch.randn(c, generator=g)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5
            if m.bias is not None:
                m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
    return model.eval()


def image(n=3, c=3, h=6, seed=1, dtype=F64) -> torch.Tensor:
    return torch.rand(n, c, h, h, generator=gen(seed), dtype=dtype) * 2


def modules_of_type(gm, types) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types)]


# --- trace ----------------------------------------------------------------------------------

class SharedSite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = site(levels=7, clip=1.5)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def test_trace_unshares_a_site_used_twice():
    model = randomize(SharedSite()).double()
    before = copy.deepcopy(model.state_dict())
    gm = trace(model)
    nodes = site_nodes(gm)
    assert len(nodes) == 2
    targets = [n.target for n in nodes]
    assert len(set(targets)) == 2
    mods = [gm.get_submodule(t) for t in targets]
    assert mods[0] is not mods[1]
    assert all(torch.equal(m.clip, model.act.clip) for m in mods)
    x = torch.randn(5, 4, generator=gen(), dtype=F64)
    assert torch.equal(gm(x), model(x))
    # the model is not modified
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert [n for n, _ in model.named_modules()].count("act") == 1
    # converted: two neuron layers, both in the report
    snn = ann2snn.convert(model)
    assert sorted(snn.site_names) == sorted(targets)
    assert set(targets) <= set(snn.report["sites"])
    out = snn.simulate(x)
    assert set(out.spikes) == set(targets)
    assert torch.allclose(out.logits, model(x), rtol=0, atol=1e-9)


# --- fold_batch_norm ----------------------------------------------------------------------------

class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = site(levels=15, clip=[1.0, 2.0, 1.5, 0.8], channels=4)
        self.fc = nn.Linear(4 * 36, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.act2 = site(levels=7, clip=1.2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.flatten(self.act(self.bn(self.conv(x))), 1)
        return self.head(self.act2(self.bn1d(self.fc(h))))


def test_fold_batch_norm_preserves_function_and_removes_bn():
    model = randomize(ConvBN()).double()
    gm = trace(model)
    x = image()
    before = gm(x)
    assert len(modules_of_type(gm, (nn.BatchNorm1d, nn.BatchNorm2d))) == 2
    gm = fold_batch_norm(gm)
    assert modules_of_type(gm, (nn.BatchNorm1d, nn.BatchNorm2d)) == []
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in gm.modules())
    assert torch.allclose(gm(x), before, rtol=0, atol=1e-12)
    assert torch.allclose(gm(x), model(x), rtol=0, atol=1e-12)
    # the conv without bias got the folded one
    assert gm.conv.bias is not None
    rewrites = [r for r in conversion_report(gm)["rewrites"] if r["pass"] == "fold_batch_norm"]
    assert {(r["batch_norm"], r["into"]) for r in rewrites} == {("bn", "conv"), ("bn1d", "fc")}


def test_fold_batch_norm_preserves_pre_activations():
    """The folded conv computes BN(conv(x)) to 1e-12, site or no site."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5))).double()
    gm = fold_batch_norm(trace(model))
    x = image()
    assert modules_of_type(gm, (nn.BatchNorm2d,)) == []
    assert torch.allclose(gm(x), model(x), rtol=0, atol=1e-12)


class SharedConvOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = site(levels=15, clip=2.0)
        self.act_b = site(levels=15, clip=1.0)

    def forward(self, x):
        c = self.conv(x)
        return self.act(self.bn(c)) + self.act_b(c)


def test_fold_batch_norm_keeps_bn_when_conv_output_has_two_users():
    model = randomize(SharedConvOutput()).double()
    gm = trace(model)
    conv_weight = gm.conv.weight.clone()
    x = image()
    gm = fold_batch_norm(gm)
    assert modules_of_type(gm, (nn.BatchNorm2d,)) == ["bn"]
    assert torch.equal(gm.conv.weight, conv_weight)
    assert torch.equal(gm(x), model(x))
    assert not [r for r in conversion_report(gm)["rewrites"] if r["pass"] == "fold_batch_norm"]


# --- shift_bias ----------------------------------------------------------------------------------

def shift_entry(gm, target: str) -> dict:
    return conversion_report(gm)["sites"][target]["bias_shift"]


@pytest.mark.parametrize("per_channel", [False, True])
def test_shift_bias_adds_half_step_to_conv_bias(per_channel):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), site(levels=15, clip=[1.0, 2.0, 1.5, 0.8] if per_channel else 1.7,
                                                    channels=4 if per_channel else 0))
    model = randomize(model).double()
    gm = trace(model)
    bias = gm.get_submodule("0").bias.detach().clone()
    theta = gm.get_submodule("1").theta().detach()
    gm = shift_bias(gm)
    new = gm.get_submodule("0").bias.detach()
    assert torch.equal(new, bias + (theta / 2).expand(4))
    assert torch.allclose(new - bias, (model[1].clip.detach() / 15 / 2).expand(4), rtol=0, atol=1e-15)
    entry = shift_entry(gm, "1")
    assert entry["kind"] == "bias" and entry["target"] == "0"
    assert entry["amount"] == (theta / 2).tolist()
    assert "membrane_offset" not in site_nodes(gm)[0].meta


def test_shift_bias_creates_conv_bias_when_absent():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), site(levels=7, clip=[1.0, 2.0, 1.5, 0.5],
                                                                        channels=4))).double()
    gm = shift_bias(trace(model))
    bias = gm.get_submodule("0").bias
    assert bias is not None and bias.dtype == F64
    assert torch.equal(bias.detach(), model[1].theta().detach() / 2)
    assert shift_entry(gm, "1")["kind"] == "bias"


def test_shift_bias_adds_to_linear_bias():
    model = randomize(nn.Sequential(nn.Linear(5, 3), site(levels=3, clip=0.9))).double()
    gm = trace(model)
    bias = gm.get_submodule("0").bias.detach().clone()
    gm = shift_bias(gm)
    half = model[1].clip.detach() / 3 / 2
    assert abs(half.item() - 0.15) < 1e-7  # lambda 0.9 (as stored in float32), L = 3
    assert torch.equal(gm.get_submodule("0").bias.detach(), bias + half.expand(3))
    assert shift_entry(gm, "1") == {"kind": "bias", "target": "0", "amount": half.item()}


def test_shift_bias_goes_into_an_unfolded_batch_norm_bias():
    model = randomize(SharedConvOutput()).double()
    gm = fold_batch_norm(trace(model))
    bn_bias = gm.bn.bias.detach().clone()
    conv_bias = gm.conv.bias.detach().clone()
    gm = shift_bias(gm)
    assert torch.equal(gm.bn.bias.detach(), bn_bias + model.act.theta().detach() / 2)
    assert torch.equal(gm.conv.bias.detach(), conv_bias)  # the conv has two users: not shifted
    assert shift_entry(gm, "act")["target"] == "bn"
    # act_b sits on the shared conv output: no carrier, membrane offset
    node_b = next(n for n in site_nodes(gm) if n.target == "act_b")
    assert torch.equal(node_b.meta["membrane_offset"], model.act_b.theta().detach() / 2)
    assert shift_entry(gm, "act_b")["kind"] == "membrane"


class TwoBranchAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.act = site(levels=15, clip=[1.0, 2.0, 1.5, 0.8], channels=4)

    def forward(self, x):
        return self.act(self.a(x) + self.b(x))


def test_shift_bias_shifts_exactly_one_branch_of_an_add():
    model = randomize(TwoBranchAdd()).double()
    gm = trace(model)
    biases = {k: gm.get_submodule(k).bias.detach().clone() for k in "ab"}
    gm = shift_bias(gm)
    half = model.act.theta().detach() / 2
    changed = [k for k in "ab" if not torch.equal(gm.get_submodule(k).bias.detach(), biases[k])]
    assert len(changed) == 1
    (k,) = changed
    assert torch.equal(gm.get_submodule(k).bias.detach(), biases[k] + half)
    assert shift_entry(gm, "act") == {"kind": "bias", "target": k, "amount": half.tolist()}
    # the whole pipeline: the site's input moved by exactly theta / 2 once
    x = image()
    snn = ann2snn.convert(model)
    assert torch.allclose(snn.simulate(x).logits, model(x), rtol=0, atol=1e-9)


class Residual(nn.Module):
    """site1 -> conv -> BN -> (+ identity from site1) -> site2 -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = site(levels=15, clip=[1.0, 2.0, 1.5, 0.8], channels=4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act2 = site(levels=15, clip=[1.2, 0.6, 1.8, 1.0], channels=4)
        self.head = nn.Linear(4 * 36, 3)

    def forward(self, x):
        h = self.act1(self.stem(x))
        return self.head(torch.flatten(self.act2(self.bn(self.conv(h)) + h), 1))


def test_shift_bias_residual_add_shifts_the_conv_branch_once():
    model = randomize(Residual()).double()
    gm = fold_batch_norm(trace(model))
    conv_bias = gm.conv.bias.detach().clone()
    gm = shift_bias(gm)
    assert torch.equal(gm.conv.bias.detach(), conv_bias + model.act2.theta().detach() / 2)
    assert shift_entry(gm, "act2") == {"kind": "bias", "target": "conv",
                                       "amount": (model.act2.theta().detach() / 2).tolist()}
    assert all("membrane_offset" not in n.meta for n in site_nodes(gm))


class SiteOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = site(levels=7, clip=[1.0, 0.5, 1.5], channels=3)
        self.conv = nn.Conv2d(3, 2, 3)
        self.head = nn.Linear(2 * 16, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.conv(self.act(x)), 1))


def test_shift_bias_falls_back_to_membrane_offset_for_a_site_on_the_input():
    model = randomize(SiteOnInput()).double()
    gm = shift_bias(trace(model))
    (node,) = site_nodes(gm)
    half = model.act.theta().detach() / 2
    assert torch.equal(node.meta["membrane_offset"], half)
    assert shift_entry(gm, "act") == {"kind": "membrane", "target": "act", "amount": half.tolist()}
    gm = place_neurons(gm)
    assert torch.equal(gm.act.membrane_offset, half)
    x = image(h=6)
    snn = ann2snn.convert(model)
    assert torch.equal(snn.graph_module.act.membrane_offset, half)
    for out in (snn.simulate(x), snn.evaluate(x)):
        assert torch.allclose(out.logits, model(x), rtol=0, atol=1e-9)


class SiteBehindConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 3, 1)
        self.act = site(levels=15, clip=[1.0, 2.0, 1.5, 0.8, 1.1], channels=5)
        self.head = nn.Linear(5 * 36, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.act(torch.cat([self.a(x), self.b(x)], 1)), 1))


def test_shift_bias_falls_back_to_membrane_offset_behind_a_concat():
    model = randomize(SiteBehindConcat()).double()
    gm = trace(model)
    biases = {k: gm.get_submodule(k).bias.detach().clone() for k in "ab"}
    gm = shift_bias(gm)
    assert all(torch.equal(gm.get_submodule(k).bias.detach(), biases[k]) for k in "ab")
    (node,) = site_nodes(gm)
    half = model.act.theta().detach() / 2
    assert torch.equal(node.meta["membrane_offset"], half)
    assert shift_entry(gm, "act")["kind"] == "membrane"
    x = image()
    snn = ann2snn.convert(model)
    for out in (snn.simulate(x), snn.evaluate(x)):
        assert torch.allclose(out.logits, model(x), rtol=0, atol=1e-9)


class SelfAdd(nn.Module):
    """z = c + c: the conv's bias enters the sum twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = site(levels=15, clip=2.0)
        self.head = nn.Linear(4 * 36, 3)

    def forward(self, x):
        c = self.conv(x)
        return self.head(torch.flatten(self.act(c + c), 1))


def test_shift_bias_add_of_a_node_with_itself_shifts_the_sum_by_half_a_step():
    """docs/method.md section 2: the site's input moves by theta / 2 exactly once. A bias shift of c in c + c moves
    it by theta, so the carrier must not be c (membrane offset instead, or a shift of theta / 4)."""
    model = randomize(SelfAdd()).double()
    gm = trace(model)
    x = image(n=4)
    (node,) = site_nodes(gm)
    z_before = {}
    gm.get_submodule("act").register_forward_pre_hook(lambda m, i: z_before.setdefault("z", i[0]))
    gm(x)
    gm = shift_bias(gm)
    z_after = {}
    gm.get_submodule("act").register_forward_pre_hook(lambda m, i: z_after.setdefault("z", i[0]))
    gm(x)
    offset = node.meta.get("membrane_offset", torch.zeros((), dtype=F64))
    half = model.act.theta().detach() / 2
    assert torch.allclose(z_after["z"] + offset - z_before["z"], half.expand_as(z_before["z"]), rtol=0, atol=1e-12)
    snn = ann2snn.convert(model)
    assert torch.allclose(snn.simulate(x).logits, model(x), rtol=0, atol=1e-9)


class SharedConv(nn.Module):
    """One conv module called at two places (weight sharing), once followed by BN."""

    def __init__(self, with_bn: bool) -> None:
        super().__init__()
        self.with_bn = with_bn
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = site(levels=15, clip=2.0)
        self.act2 = site(levels=15, clip=1.0)
        self.head = nn.Linear(3 * 36, 3)

    def forward(self, x):
        c = self.conv(x)
        h = self.act(self.bn(c) if self.with_bn else c)
        return self.head(torch.flatten(self.act2(self.conv(h)), 1))


def test_fold_batch_norm_preserves_function_with_a_shared_conv_module():
    model = randomize(SharedConv(with_bn=True)).double()
    gm = trace(model)
    x = image()
    before = gm(x)
    gm = fold_batch_norm(gm)
    assert torch.allclose(gm(x), before, rtol=0, atol=1e-12)


def test_shift_bias_with_a_shared_conv_module_shifts_each_site_by_its_own_half_step():
    model = randomize(SharedConv(with_bn=False)).double()
    x = image()
    snn = ann2snn.convert(model)
    assert torch.allclose(snn.simulate(x).logits, model(x), rtol=0, atol=1e-9)
    assert torch.allclose(snn.evaluate(x).logits, model(x), rtol=0, atol=1e-9)


# --- move_max_pool_before_sites ------------------------------------------------------------------

class SitePool(nn.Module):
    def __init__(self, second_user: bool = False) -> None:
        super().__init__()
        self.second_user = second_user
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = site(levels=7, clip=[1.0, 2.0, 1.5, 0.8], channels=4)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 9, 3)
        self.head2 = nn.Linear(4 * 36, 3)

    def forward(self, x):
        s = self.act(self.conv(x))
        out = self.head(torch.flatten(self.pool(s), 1))
        return out + self.head2(torch.flatten(s, 1)) if self.second_user else out


def test_move_max_pool_swaps_site_and_pool_and_keeps_the_function():
    model = randomize(SitePool()).double()
    gm = trace(model)
    x = image(n=8)
    before = gm(x)
    gm = move_max_pool_before_sites(gm)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert nodes["pool"].args[0] is nodes["conv"]
    assert nodes["act"].args[0] is nodes["pool"]
    assert list(nodes["act"].users) and all(u is not nodes["pool"] for u in nodes["act"].users)
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert order.index("pool") < order.index("act")
    assert torch.equal(gm(x), before)  # max commutes with q exactly
    assert {"pass": "move_max_pool_before_sites", "max_pool": "pool", "site": "act"} in \
        conversion_report(gm)["rewrites"]


def test_move_max_pool_leaves_a_site_with_a_second_user():
    model = randomize(SitePool(second_user=True)).double()
    gm = trace(model)
    x = image()
    before = gm(x)
    gm = move_max_pool_before_sites(gm)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert nodes["pool"].args[0] is nodes["act"]
    assert nodes["act"].args[0] is nodes["conv"]
    assert torch.equal(gm(x), before)
    assert conversion_report(gm)["rewrites"] == [{"pass": "move_max_pool_before_sites", "max_pool_kept": "pool",
                                                  "reason": "its site feeds other nodes too"}]
    snn = ann2snn.convert(model)
    assert torch.allclose(snn.simulate(x).logits, model(x), rtol=0, atol=1e-9)


# --- place_neurons --------------------------------------------------------------------------------

def test_place_neurons_replaces_every_site_with_theta_lambda_over_L():
    model = randomize(ConvBN()).double()
    gm = place_neurons(trace(model))
    assert site_nodes(gm) == []
    assert not any(isinstance(m, QuantClippedActivation) for m in gm.modules())
    assert [n.target for n in neuron_nodes(gm)] == ["act", "act2"]
    for name, steps in (("act", 4), ("act2", 3)):
        neuron, original = gm.get_submodule(name), model.get_submodule(name)
        assert isinstance(neuron, BitSerialIFNode)
        assert torch.equal(neuron.theta, original.clip.detach() / original.levels)
        assert neuron.levels == original.levels and neuron.timesteps == steps
        assert torch.equal(neuron.membrane_offset, torch.zeros((), dtype=F64))
        entry = conversion_report(gm)["sites"][name]
        assert entry["levels"] == original.levels and entry["timesteps"] == steps
        assert entry["theta"] == (original.clip.detach() / original.levels).tolist()
    # an explicit T above the sites' own
    gm = place_neurons(trace(model), timesteps=6)
    assert all(gm.get_submodule(n.target).timesteps == 6 for n in neuron_nodes(gm))


def test_place_neurons_refuses_a_site_with_more_levels_than_T():
    model = randomize(ConvBN()).double()
    with pytest.raises(UnsupportedModelError, match=r"\bact\b"):
        place_neurons(trace(model), timesteps=3)  # act has 15 levels
    with pytest.raises(UnsupportedModelError, match=r"act"):
        ann2snn.convert(model, T=3)


def test_place_neurons_refuses_a_float_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), site(levels=7), nn.Conv2d(4, 4, 3), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="ReLU"):
        place_neurons(trace(model))
    with pytest.raises(UnsupportedModelError):
        ann2snn.convert(model)


def test_convert_refuses_a_model_without_sites():
    with pytest.raises(UnsupportedModelError):
        ann2snn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 2)))


# --- lowering: simulator and evaluator agree with the quantized ANN --------------------------------

class Everything(nn.Module):
    """conv, depthwise conv, avgpool, concat of two sites with different per-channel theta (and
    different T), a residual add with an identity shortcut from a spiking layer, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.act0 = site(levels=15, clip=[1.0, 1.6, 0.7, 1.3], channels=4)
        self.dw, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
        self.act1 = site(levels=15, clip=[0.9, 1.4, 2.0, 1.1], channels=4)
        self.pool = nn.AvgPool2d(2)
        self.left = nn.Conv2d(4, 3, 1)
        self.act_left = site(levels=7, clip=[1.2, 0.5, 0.9], channels=3)
        self.right, self.bn_right = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.act_right = site(levels=15, clip=[0.6, 1.7, 1.0], channels=3)
        self.res, self.bn_res = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.act_res = site(levels=15, clip=[1.0, 1.3, 0.8, 1.5, 0.9, 1.1], channels=6)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 9, 8)
        self.act_fc = site(levels=31, clip=1.9)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.act0(self.bn0(self.stem(x)))
        h = self.pool(self.act1(self.bn1(self.dw(h))))
        h = torch.cat([self.act_left(self.left(h)), self.act_right(self.bn_right(self.right(h)))], 1)
        h = self.act_res(self.bn_res(self.res(h)) + h)
        return self.head(self.act_fc(self.fc(self.flatten(h))))


def test_simulator_and_evaluator_agree_with_the_quantized_ann():
    model = randomize(Everything(), seed=3).double()
    x = image(n=6, seed=4)
    snn = ann2snn.convert(model)
    assert snn.timesteps == 5
    expected_sites = {"act0", "act1", "act_left", "act_right", "act_res", "act_fc"}
    assert set(snn.site_names) == expected_sites
    gm = snn.graph_module
    assert not torch.equal(gm.act_left.theta, gm.act_right.theta)
    sim, ev = snn.simulate(x), snn.evaluate(x)
    ann = model(x)
    assert sim.logits.dtype == F64 and sim.logits.shape == (6, 5)
    assert torch.allclose(sim.logits, ev.logits, rtol=0, atol=1e-9)
    assert torch.allclose(sim.logits, ann, rtol=0, atol=1e-9)
    assert torch.allclose(ev.logits, ann, rtol=0, atol=1e-9)
    assert set(sim.spikes) == set(ev.spikes) == expected_sites
    for name in expected_sites:
        assert sim.spikes[name].dtype == ev.spikes[name].dtype == torch.int64
        assert sim.spikes[name].shape == (6,)
        assert torch.equal(sim.spikes[name], ev.spikes[name]), name
        assert sim.spikes[name].sum() > 0, name
    # the same through the lowering functions called directly
    sim_logits, sim_counts = lower_to_simulator(gm)(x)
    ev_logits, ev_counts = lower_to_evaluator(gm)(x)
    assert torch.allclose(sim_logits, ann, rtol=0, atol=1e-9)
    assert torch.allclose(ev_logits, ann, rtol=0, atol=1e-9)
    assert all(torch.equal(sim_counts[k], ev_counts[k]) for k in expected_sites)


def test_spike_counts_are_popcounts_of_the_ann_levels():
    from ann2snn.levels import channel_view, popcount_levels

    model = randomize(Everything(), seed=7).double()
    x = image(n=4, seed=8)
    levels = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: levels.__setitem__(
        name, torch.round(o / channel_view(mod.theta().detach(), o.dim()))))
        for name, m in model.named_modules() if isinstance(m, QuantClippedActivation)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = ann2snn.convert(model).simulate(x)
    for name, q in levels.items():
        count = popcount_levels(q, model.get_submodule(name).levels).flatten(1).sum(1)
        assert torch.equal(out.spikes[name], count), name


def test_the_simulator_uses_spike_planes_not_levels():
    """A spiking layer's output Signal carries binary planes [T, N, ...] times theta, and no const."""
    model = randomize(Everything(), seed=3).double()
    snn = ann2snn.convert(model)
    sim = lower_to_simulator(snn.graph_module)
    captured = {}
    sim.get_submodule("act_left").register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    sim(image(n=2))
    out = captured["out"]
    assert isinstance(out, Signal) and out.const is None
    assert out.spikes.shape[0] == 3 and set(out.spikes.unique().tolist()) <= {0.0, 1.0}


class WithSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = site(levels=7, clip=1.0)
        self.head = nn.Linear(4 * 16, 2)

    def forward(self, x):
        return self.head(torch.flatten(torch.sigmoid(self.act(self.conv(x))), 1))


def test_unsupported_function_raises_from_the_simulator():
    model = randomize(WithSigmoid()).double()
    snn = ann2snn.convert(model)
    with pytest.raises(UnsupportedModelError, match="sigmoid"):
        snn.simulate(image())


@pytest.mark.parametrize("broken", ["not_quantizing", "lambda_inf", "lambda_nan", "lambda_zero"])
def test_convert_refuses_sites_that_cannot_convert_exactly(broken):
    """A site that does not quantize would make the SNN differ from the model, and lambda = inf
    (an uncalibrated site) gives non-finite logits: both are refused with the site's name."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), QuantClippedActivation(levels=7, clip=1.0), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 3))
    site = model[1]
    if broken == "not_quantizing":
        site.quantize = False
    else:
        site.clip.data.fill_({"lambda_inf": float("inf"), "lambda_nan": float("nan"), "lambda_zero": 0.0}[broken])
    with pytest.raises(UnsupportedModelError, match="site 1 "):
        ann2snn.convert(model)
    site.quantize, site.clip.data = True, torch.tensor(1.0)
    ann2snn.convert(model)   # the same model, repaired, converts
