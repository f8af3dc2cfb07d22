"""The bit-serial IF neuron of docs/method.md section 3 and its SpikingJelly integration.

fire_msb_first (compare with 2^(T-1-t) theta, subtract), decode_levels, the cap for L < 2^T - 1,
fire_levels (the evaluator's shortcut), and BitSerialIFNode as a multi-step SpikingJelly node:
integration by the doubling rule, the membrane offset, reset_net, OutputMonitor, popcounts.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from spikingjelly.activation_based import functional, monitor, neuron
from torch import nn

import ann2snn
from ann2snn.runtime.neuron import BitSerialIFNode
from ann2snn.levels import (cap_potential, channel_view, decode_levels, fire_levels, fire_msb_first,
                            popcount_levels, popcount_sum_, step_thresholds)
from ann2snn.runtime.quant import QuantClippedActivation

TIMESTEPS = list(range(1, 9))


def exact_levels(potential: torch.Tensor, theta: torch.Tensor, top: int) -> torch.Tensor:
    """clamp(floor(V / theta), 0, top) with the quotient of the real numbers V and theta (no rounding)."""
    v = potential.detach().to(torch.float64)
    t = torch.broadcast_to(theta.detach().to(torch.float64), v.shape)
    out = [max(0, min(top, math.floor(Fraction(a) / Fraction(b)))) for a, b in zip(v.flatten().tolist(),
                                                                                  t.flatten().tolist())]
    return torch.tensor(out, dtype=torch.float64).reshape(v.shape)


def scalar_theta(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(0.3173, dtype=dtype)


def channel_theta(channels: int = 5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return (0.05 + torch.rand(channels, generator=g, dtype=torch.float64)).to(dtype)


def random_potential(timesteps: int, theta: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Potentials [N, C, H] spread over 20% below to 20% above the range of 2^T levels of theta."""
    g = torch.Generator().manual_seed(seed)
    channels = theta.numel() if theta.dim() else 5
    span = 2**timesteps + 2
    ratio = 1.4 * span * torch.rand(7, channels, 6, generator=g, dtype=torch.float64) - 0.2 * span
    return (ratio * channel_view(theta.to(torch.float64), 3)).to(dtype)


# --- fire_msb_first / decode_levels -----------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_fire_decodes_to_floor_of_potential_over_theta_float64(timesteps, per_channel):
    theta = channel_theta() if per_channel else scalar_theta()
    v = random_potential(timesteps, theta, torch.float64, seed=timesteps)
    levels = 2**timesteps - 1
    spikes = fire_msb_first(v, channel_view(theta, v.dim()), levels, timesteps)
    assert spikes.shape == (timesteps,) + v.shape
    assert spikes.dtype == torch.float64
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    decoded = decode_levels(spikes)
    assert torch.equal(decoded, exact_levels(v, channel_view(theta, v.dim()), levels))
    # the random potentials cover the whole range: zeros, saturated and in-between levels
    assert (decoded == 0).any() and (decoded == levels).any()
    if levels > 1:
        assert ((decoded > 0) & (decoded < levels)).any()


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_fire_exactly_at_and_next_to_thresholds(timesteps, per_channel):
    """V = k theta fires level k; the float just below k theta fires k - 1 (floor, not round)."""
    # dyadic thetas: k * theta is exact, so V = k theta is exactly at the boundary
    theta = torch.tensor([0.25, 0.375, 1.5, 0.0625], dtype=torch.float64) if per_channel \
        else torch.tensor(0.375, dtype=torch.float64)
    channels = 4
    k = torch.arange(0, 2**timesteps + 2, dtype=torch.float64)  # 0 .. L + 2
    v = k.view(-1, 1) * theta.expand(channels).view(1, -1)  # [K, C], exact
    levels = 2**timesteps - 1
    t = theta.view(1, -1) if per_channel else theta
    got = decode_levels(fire_msb_first(v, t, levels, timesteps))
    expected = torch.clamp(k, 0, levels).view(-1, 1).expand_as(v)
    assert torch.equal(got, expected)
    below = torch.nextafter(v, torch.full_like(v, -math.inf))
    got_below = decode_levels(fire_msb_first(below, t, levels, timesteps))
    expected_below = torch.clamp(k - 1, 0, levels).view(-1, 1).expand_as(v)
    assert torch.equal(got_below, expected_below)
    assert torch.equal(got_below, exact_levels(below, t, levels))


@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_power_of_two_potential_fires_one_spike_at_its_step(timesteps):
    """V = 2^(T-1-t) theta: exactly one spike, at step t (MSB first, weight 2^(T-1-t))."""
    theta = torch.tensor(0.7, dtype=torch.float64)
    v = torch.tensor([2.0 ** (timesteps - 1 - t) for t in range(timesteps)], dtype=torch.float64) * theta
    spikes = fire_msb_first(v, theta, 2**timesteps - 1, timesteps)  # [T, T]
    assert torch.equal(spikes, torch.eye(timesteps, dtype=torch.float64))


@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_negative_potential_never_fires_and_saturated_fires_every_step(timesteps):
    theta = torch.tensor(0.5, dtype=torch.float64)
    v = torch.tensor([-1e9, -0.4, 0.0, 0.49, 2**timesteps * 0.5, 1e9], dtype=torch.float64)
    spikes = fire_msb_first(v, theta, 2**timesteps - 1, timesteps)
    assert torch.equal(spikes[:, :4], torch.zeros(timesteps, 4, dtype=torch.float64))
    assert torch.equal(spikes[:, 4:], torch.ones(timesteps, 2, dtype=torch.float64))


@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_thresholds_halve_every_step(timesteps):
    theta = torch.tensor([0.3, 1.7, 0.011], dtype=torch.float64)
    thresholds = step_thresholds(theta, timesteps)
    assert len(thresholds) == timesteps
    assert torch.equal(thresholds[0], theta * 2.0 ** (timesteps - 1))
    assert torch.equal(thresholds[-1], theta)
    for a, b in zip(thresholds, thresholds[1:]):
        assert torch.equal(b, a / 2)


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("timesteps,levels", [(2, 2), (3, 5), (4, 9), (4, 14), (5, 20), (8, 200), (8, 254)])
def test_cap_limits_levels_to_L_when_L_below_2T_minus_1(timesteps, levels, per_channel):
    theta = channel_theta() if per_channel else scalar_theta()
    t = channel_view(theta, 3)
    v = random_potential(timesteps, theta, torch.float64, seed=100 + levels)
    decoded = decode_levels(fire_msb_first(v, t, levels, timesteps))
    uncapped = exact_levels(v, t, 2**timesteps - 1)
    assert torch.equal(decoded, torch.minimum(uncapped, torch.tensor(float(levels), dtype=torch.float64)))
    assert decoded.max().item() == levels  # the cap is active for some potentials
    assert (uncapped > levels).any()
    # cap_potential: min(V, (L + 1/2) theta); no cap at L = 2^T - 1
    assert torch.equal(cap_potential(v, t, levels, timesteps), torch.minimum(v, t * (levels + 0.5)))
    assert torch.equal(cap_potential(v, t, 2**timesteps - 1, timesteps), v)
    # the evaluator's level function applies the same cap
    assert torch.equal(fire_levels(v, t, levels, timesteps), decoded)
    assert torch.equal(fire_levels(v.float(), t.float(), levels, timesteps),
                       decode_levels(fire_msb_first(v.float(), t.float(), levels, timesteps)))


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("timesteps", TIMESTEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fire_levels_equals_decoded_fire_bit_for_bit(timesteps, per_channel, dtype):
    theta = (channel_theta() if per_channel else scalar_theta()).to(dtype)
    t = channel_view(theta, 3)
    v = random_potential(timesteps, theta, dtype, seed=200 + timesteps)
    # add potentials at and one ulp either side of every level boundary k theta (computed in dtype)
    k = torch.arange(0, 2**timesteps + 1, dtype=dtype).view(-1, 1, 1)
    at = (k * t).expand(-1, v.shape[1], 1).reshape(-1, v.shape[1], 1)
    edges = torch.cat([at, torch.nextafter(at, torch.full_like(at, math.inf)),
                       torch.nextafter(at, torch.full_like(at, -math.inf))], 0)
    v = torch.cat([v, edges.expand(-1, -1, v.shape[2])], 0)
    levels = 2**timesteps - 1
    reference = decode_levels(fire_msb_first(v, t, levels, timesteps))
    folded = fire_levels(v, t, levels, timesteps)
    assert folded.dtype == dtype
    assert torch.equal(folded, reference)
    # and compare-and-subtract in dtype is the exact floor of the real quotient
    assert torch.equal(reference.to(torch.float64), exact_levels(v, t, levels))


# --- BitSerialIFNode ----------------------------------------------------------------------------

def dyadic_currents(t_in: int, timesteps: int, n: int, c: int, seed: int) -> torch.Tensor:
    """Dyadic currents (every sum below is exact in float64) whose doubled sum spans about
    (-0.5, 1.5) * 2^T * 0.25: below, inside and above the range of a neuron with theta ~ 0.25."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 24, (t_in, n, c), generator=g).to(torch.float64) / 16 * 2.0 ** (timesteps - t_in) * 0.25


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("t_in,timesteps", [(1, 3), (3, 3), (4, 2), (5, 6), (8, 8)])
def test_node_integrates_by_doubling_and_fires_binary_planes(t_in, timesteps, per_channel):
    n, c = 12, 4
    theta = torch.tensor([0.25, 0.5, 0.125, 0.375], dtype=torch.float64) if per_channel \
        else torch.tensor(0.25, dtype=torch.float64)
    offset = theta / 2
    node = BitSerialIFNode(theta, 2**timesteps - 1, timesteps, offset)
    # a SpikingJelly node: its fire (Heaviside of v - v_threshold) and soft reset are SimpleBaseNode's
    assert isinstance(node, neuron.SimpleBaseNode) and node.step_mode == "m" and node.v_reset is None
    assert "neuronal_fire" not in vars(BitSerialIFNode) and "neuronal_reset" not in vars(BitSerialIFNode)
    currents = dyadic_currents(t_in, timesteps, n, c, seed=t_in * 10 + timesteps)
    spikes = node(currents)
    assert spikes.shape == (timesteps, n, c)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    explicit = sum(2.0 ** (t_in - 1 - t) * currents[t] for t in range(t_in))
    potential = explicit + channel_view(offset, 2)
    t = channel_view(theta, 2)
    levels = exact_levels(potential, t, 2**timesteps - 1)
    assert torch.equal(decode_levels(spikes), levels)
    assert torch.equal(spikes, fire_msb_first(potential, t, 2**timesteps - 1, timesteps))
    # reset by subtraction: what is left on the membrane is V - level * theta; the last threshold, theta
    assert torch.equal(node.v, potential - levels * t) and torch.equal(node.v_threshold, t)
    # the spread of the inputs makes both silent and firing neurons
    assert (levels == 0).any() and (levels > 0).any()


@pytest.mark.parametrize("t_in", [1, 2, 4])
def test_membrane_offset_is_added_once_not_per_step(t_in):
    theta = torch.tensor([0.5, 0.25])
    offset = torch.tensor([2.5, 3.5]) * theta  # levels 2 and 3 from the offset alone
    node = BitSerialIFNode(theta, 15, 4, offset)
    spikes = node(torch.zeros(t_in, 3, 2))
    assert torch.equal(decode_levels(spikes), torch.tensor([[2.0, 3.0]]).expand(3, 2))
    # with currents: offset + doubled currents
    functional.reset_net(node)
    currents = torch.zeros(t_in, 1, 2)
    currents[0] = theta  # weight 2^(t_in - 1) theta
    assert torch.equal(decode_levels(node(currents)),
                       torch.tensor([[2.0 + 2 ** (t_in - 1), 3.0 + 2 ** (t_in - 1)]]))


def test_node_caps_at_L_for_odd_level_counts():
    theta = torch.tensor(0.5, dtype=torch.float64)
    node = BitSerialIFNode(theta, 5, 3)  # L = 5 < 7
    currents = torch.tensor([[0.0, 2.4, 2.5, 2.75, 3.0, 3.5, 100.0]], dtype=torch.float64)
    assert torch.equal(decode_levels(node(currents)),
                       torch.tensor([0.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64))


def test_node_refuses_more_levels_than_timesteps_carry():
    with pytest.raises(ValueError):
        BitSerialIFNode(torch.tensor(0.1), 8, 3)


def test_reset_net_resets_membrane():
    net = nn.Sequential(BitSerialIFNode(torch.tensor(0.25), 7, 3), BitSerialIFNode(torch.tensor(0.5), 3, 2))
    currents = torch.tensor([[[0.3, 0.9, 0.1]]]).expand(2, 1, 3).clone()
    first = net(currents)
    residual = [m.v.clone() for m in net]
    assert all(isinstance(r, torch.Tensor) for r in residual)
    assert any((r != 0).any() for r in residual)  # a non-trivial memory to reset
    functional.reset_net(net)
    for m in net:
        v = m.v
        assert (v == 0) if not isinstance(v, torch.Tensor) else bool((v == 0).all())
    # after the reset the same input gives the same output again
    assert torch.equal(net(currents), first)


def test_single_step_mode_raises_value_error():
    with pytest.raises(ValueError):
        BitSerialIFNode(torch.tensor(0.25), 7, 3, step_mode="s")
    node = BitSerialIFNode(torch.tensor(0.25), 7, 3)
    with pytest.raises(ValueError):
        node.step_mode = "s"
    with pytest.raises(ValueError):
        node.single_step_forward(torch.ones(2, 3))
    node._step_mode = "s"  # bypass the setter: forward dispatches to single_step_forward
    with pytest.raises(ValueError):
        node(torch.ones(2, 3))


# --- in a converted net: OutputMonitor and spike counts -------------------------------------------

class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act1 = QuantClippedActivation(levels=7, clip=1.5, channels=4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.act2 = QuantClippedActivation(levels=15, clip=2.0)
        self.head = nn.Linear(3 * 3 * 3, 4)
        self.act1.clip.data = torch.tensor([1.5, 0.7, 2.2, 1.1])
        self.bn.running_mean.copy_(0.2 * torch.randn(4, generator=g))
        self.bn.running_var.copy_(0.5 + torch.rand(4, generator=g))
        self.bn.weight.data = 0.5 + torch.rand(4, generator=g)
        self.bn.bias.data = 0.3 * torch.randn(4, generator=g)
        for m in (self.conv, self.conv2, self.head):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5
        self.eval()

    def forward(self, x):
        h = self.pool(self.act1(self.bn(self.conv(x))))
        return self.head(torch.flatten(self.act2(self.conv2(h)), 1))


def ann_levels(model: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """q = output / theta of every site of the quantized ANN, and its logits."""
    levels, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantClippedActivation):
            def hook(mod, inputs, output, name=name):
                levels[name] = torch.round(output / channel_view(mod.theta().detach(), output.dim()))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return levels, logits


def test_output_monitor_records_spike_planes_of_every_neuron():
    model = SmallNet().double()
    x = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    snn = ann2snn.convert(model)
    assert sorted(snn.site_names) == ["act1", "act2"]
    mon = monitor.OutputMonitor(snn.graph_module, instance=BitSerialIFNode)
    try:
        out = snn.simulate(x)
    finally:
        mon.remove_hooks()
    assert sorted(mon.monitored_layers) == ["act1", "act2"]
    levels, logits = ann_levels(model, x)
    levels["act1"] = model.pool(levels["act1"])  # the pool moved before the neuron: max commutes with q
    for name, timesteps, shape in (("act1", 3, (3, 4, 3, 3)), ("act2", 4, (3, 3, 3, 3))):
        records = mon[name]
        assert len(records) == 1  # one forward
        planes = records[0]
        assert planes.shape == (timesteps,) + shape
        assert set(planes.unique().tolist()) <= {0.0, 1.0}
        decoded = decode_levels(planes)
        assert torch.equal(decoded, levels[name])
        assert 0 < decoded.sum() and decoded.max() > 1
        # spike counts per sample: popcount of the levels = number of ones in the planes
        levels_l = snn.graph_module.get_submodule(name).levels
        popcount = popcount_levels(decoded, levels_l).flatten(1).sum(1)
        assert torch.equal(out.spikes[name], popcount)
        assert torch.equal(out.spikes[name], planes.transpose(0, 1).flatten(1).sum(1).to(torch.int64))
    assert torch.allclose(out.logits, logits, rtol=0, atol=1e-9)
    # the evaluator reports the same counts
    ev = snn.evaluate(x)
    assert ev.spikes.keys() == out.spikes.keys()
    for name in out.spikes:
        assert torch.equal(ev.spikes[name], out.spikes[name])


@pytest.mark.parametrize("levels, length", [(15, 1000), (255, 70_000)])  # float32 sums; float64 past 2^24
def test_popcount_sum_equals_integer_popcounts(levels, length):
    q = torch.randint(0, levels + 1, (2, 3, length), generator=torch.Generator().manual_seed(levels))
    table = torch.tensor([bin(k).count("1") for k in range(levels + 1)])
    for dims in ((1, 2), (0, 2)):
        got = popcount_sum_(q.float(), levels, dims)
        assert got.dtype == torch.int64 and torch.equal(got, table[q].sum(dims))


def test_popcount_counts_ones_of_the_binary_code():
    q = torch.tensor([0, 1, 2, 3, 7, 8, 15, 128, 255, 170])
    assert popcount_levels(q, 255).tolist() == [0, 1, 1, 2, 3, 1, 4, 1, 8, 4]
    # Legendre's formula in floating point is exact for every level of every T, in every dtype
    for levels in (1, 3, 7, 15, 31, 63, 127, 255, 5, 100):
        expected = [bin(k).count("1") for k in range(levels + 1)]
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64):
            counts = popcount_levels(torch.arange(levels + 1).to(dtype), levels)
            assert counts.dtype == dtype and counts.tolist() == expected, (levels, dtype)
    # fired spike trains of levels q have exactly popcount(q) ones
    theta = torch.tensor(0.1, dtype=torch.float64)
    v = (q.to(torch.float64) + 0.5) * theta
    spikes = fire_msb_first(v, theta, 255, 8)
    assert torch.equal(decode_levels(spikes), q.to(torch.float64))
    assert torch.equal(spikes.sum(0).to(torch.int64), popcount_levels(q, 255))
