"""docs/method.md section 6: spikes, synaptic operations, MACs and energy; `ann2snn energy`.

Synaptic ops are checked against a brute-force count over the simulator's binary spike planes
(explicit loops over every input spike and every output it reaches) and against SpikingJelly's
SynOpCounter; the ANN's MACs against torch's FlopCounterMode; both counting paths (simulation,
evaluation) against each other.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ann2snn
from ann2snn.energy import (LayerCounts, OpCounts, OperationCounter, available_tables, estimate_energy,
                            format_report, load_table, parse_table)
from ann2snn.errors import Ann2SnnError, UnsupportedModelError
from ann2snn.runtime import lower_to_simulator
from ann2snn.runtime.simulator import SimulatedLayer, SimulatedNeuron, SimulatedStructural
from ann2snn.runtime.quant import QuantClippedActivation
from random_nets import RandomNet

ROOT = Path(__file__).resolve().parents[1]


def site(channels: int, generator: torch.Generator, levels: int = 7) -> QuantClippedActivation:
    s = QuantClippedActivation(levels=levels, channels=channels)
    s.clip.data = 0.5 + 1.5 * torch.rand(s.clip.shape, generator=generator)
    return s


class Net2d(nn.Module):
    """Strided, dilated and grouped convs, spike-fed AvgPool2d (ceil mode), F.avg_pool2d and mean,
    concat, a hidden linear site and a readout fed by a concat of two neuron layers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.act1 = nn.Conv2d(2, 4, 3, stride=2, padding=1), site(4, g)
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), site(4, g)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.conv3, self.act3 = nn.Conv2d(4, 6, (2, 3), stride=(1, 2), padding=(1, 1), groups=2), site(6, g)
        self.fc1, self.act4 = nn.Linear(6 * 2 * 1 + 4, 8), site(8, g)
        self.fc2 = nn.Linear(8 + 6 * 4 * 2, 5)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (3.0 / m.weight[0].numel()) ** 0.5
                m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
        self.eval()

    def forward(self, x):
        a1 = self.act1(self.conv1(x))
        a2 = self.act2(self.conv2(a1))
        a3 = self.act3(self.conv3(self.pool(a2)))
        q = F.avg_pool2d(a3, 2, ceil_mode=True)
        m = a2.mean((2, 3))
        a4 = self.act4(self.fc1(torch.cat([torch.flatten(q, 1), m], 1)))
        return self.fc2(torch.cat([a4, torch.flatten(a3, 1)], 1))


class Net1d(nn.Module):
    """Conv1d with stride, padding, depthwise and dilated groups; AvgPool1d; AdaptiveAvgPool1d with
    overlapping windows; a linear readout."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.act1 = nn.Conv1d(3, 4, 3, stride=2, padding=2), site(4, g)
        self.conv2, self.act2 = nn.Conv1d(4, 4, 3, padding=1, groups=4), site(4, g)
        self.pool = nn.AvgPool1d(3, stride=2, padding=1)
        self.conv3, self.act3 = nn.Conv1d(4, 6, 2, dilation=2, groups=2), site(6, g)
        self.gap = nn.AdaptiveAvgPool1d(3)
        self.fc = nn.Linear(18, 5)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (3.0 / m.weight[0].numel()) ** 0.5
                m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
        self.eval()

    def forward(self, x):
        a = self.act2(self.conv2(self.act1(self.conv1(x))))
        a = self.act3(self.conv3(self.pool(a)))
        return self.fc(torch.flatten(self.gap(a), 1))


def networks():
    """(name, model, input) of small float64 networks."""
    g = torch.Generator().manual_seed(7)
    yield "net2d", Net2d(1).double(), torch.rand((3, 2, 9, 9), generator=g, dtype=torch.float64)
    yield "net1d", Net1d(2).double(), torch.rand((3, 3, 11), generator=g, dtype=torch.float64)
    blocks = ["grouped", "residual", "concat", "depthwise", "avgpool", "linear_site"]
    yield "random", RandomNet(blocks, 7, True, 3, head="flatten", in_shape=(3, 4, 4)).double(), \
        torch.rand((2, 3, 4, 4), generator=g, dtype=torch.float64)
    yield "random_gap", RandomNet(["conv", "maxpool", "concat"], 3, False, 4, head="gap", in_shape=(3, 6, 6)).double(), \
        torch.rand((2, 3, 6, 6), generator=g, dtype=torch.float64)


NETWORKS = list(networks())


@pytest.fixture(scope="module")
def converted():
    out = {}
    for name, model, x in NETWORKS:
        snn = ann2snn.convert(model, T=3 if name != "random_gap" else 2)
        counts = {}
        for mode in ("simulate", "evaluate"):
            counter = OperationCounter(snn, mode)
            logits = counter(x)
            reference = snn.simulate(x) if mode == "simulate" else snn.evaluate(x)
            assert torch.equal(logits, reference.logits)
            counts[mode] = counter.result()
        out[name] = (model, snn, x, counts)
    return out


# --- the binary spike planes of the simulator, and brute-force counts over them ---------------------

def simulator_planes(snn, x):
    """Inputs of every layer / pool module (binary: nonzero entries of its steps), and every
    neuron's spike planes, from the lowered simulator (hooks, independent of ann2snn.energy)."""
    sim = lower_to_simulator(snn.graph_module)
    inputs, spikes, hooks = {}, {}, []
    for name, module in sim.named_modules():
        if isinstance(module, (SimulatedLayer, SimulatedStructural)):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.__setitem__(name, args[0].steps)))
        elif isinstance(module, SimulatedNeuron):
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, name=name: spikes.__setitem__(name, out.spikes)))
    sim(x)
    for h in hooks:
        h.remove()
    binary = {k: (v != 0).to(torch.float64) for k, v in inputs.items() if v is not None}
    return binary, spikes


def _reach(index: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int):
    """(output position, kernel tap) pairs through which input position `index` is read."""
    return [(o, k) for o in range(out_size) for k in range(kernel) if o * stride - padding + k * dilation == index]


def brute_conv(planes: torch.Tensor, conv: nn.Module) -> int:
    """Every input spike times every (output position, output channel) it reaches, by loops."""
    dims = planes.dim() - 3
    spatial = planes.shape[3:]
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out = [(spatial[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(dims)]
    per_group_in, per_group_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    total = 0
    for t, n, c, *pos in planes.nonzero().tolist():
        group = c // per_group_in
        reaches = [_reach(pos[i], out[i], k[i], s[i], p[i], d[i]) for i in range(dims)]
        if dims == 1:
            combos = [(a,) for a in reaches[0]]
        else:
            combos = [(a, b) for a in reaches[0] for b in reaches[1]]
        for _ in combos:
            for _oc in range(group * per_group_out, (group + 1) * per_group_out):
                total += 1
    return total


def brute_linear(planes: torch.Tensor, fc: nn.Linear) -> int:
    total = 0
    for _ in planes.nonzero().tolist():
        for _o in range(fc.out_features):
            total += 1
    return total


def _avg_windows(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> list[range]:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return [range(o * stride - padding, o * stride - padding + kernel) for o in range(out)]


def _adaptive_windows(size: int, out: int) -> list[range]:
    return [range(math.floor(o * size / out), math.ceil((o + 1) * size / out)) for o in range(out)]


def brute_pool(planes: torch.Tensor, windows: list[list[range]]) -> int:
    """Every input spike times every pooling window that contains it."""
    total = 0
    for t, n, c, *pos in planes.nonzero().tolist():
        if len(windows) == 1:
            hits = [w for w in windows[0] if pos[0] in w]
        else:
            hits = [(a, b) for a in windows[0] for b in windows[1] if pos[0] in a and pos[1] in b]
        total += len(hits)
    return total


def pool_windows(module: nn.Module, spatial) -> list[list[range]]:
    if isinstance(module, nn.AvgPool2d):
        k, s, p = (v if isinstance(v, tuple) else (v, v) for v in (module.kernel_size, module.stride, module.padding))
        return [_avg_windows(spatial[i], k[i], s[i], p[i], module.ceil_mode) for i in range(2)]
    if isinstance(module, nn.AvgPool1d):
        return [_avg_windows(spatial[0], module.kernel_size[0], module.stride[0], module.padding[0], module.ceil_mode)]
    out = module.output_size
    out = out if isinstance(out, tuple) else (out,) * len(spatial)
    return [_adaptive_windows(spatial[i], out[i] or spatial[i]) for i in range(len(spatial))]


def brute_force_sops(snn, x, functional_pools: bool = False) -> dict[str, int]:
    """Synaptic ops per layer / spike-fed pool, from the simulator's binary planes."""
    inputs, spikes = simulator_planes(snn, x)
    gm = snn.graph_module
    expected = {}
    for name, planes in inputs.items():
        module = gm.get_submodule(name)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            expected[name] = brute_conv(planes, module)
        elif isinstance(module, nn.Linear):
            expected[name] = brute_linear(planes, module)
        elif isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            expected[name] = brute_pool(planes, pool_windows(module, planes.shape[3:]))
    if functional_pools:  # F.avg_pool2d and mean of Net2d: their inputs are neuron outputs
        a3, a2 = spikes["act3"], spikes["act2"]
        expected["avg_pool2d"] = brute_pool(a3, [_avg_windows(a3.shape[3], 2, 2, 0, True),
                                                 _avg_windows(a3.shape[4], 2, 2, 0, True)])
        expected["mean"] = brute_pool(a2, [[range(a2.shape[3])], [range(a2.shape[4])]])
    return expected


# --- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, _, _ in NETWORKS])
def test_simulation_and_evaluation_give_identical_counts(converted, name):
    _, snn, x, counts = converted[name]
    assert counts["simulate"].layers == counts["evaluate"].layers
    assert counts["simulate"].images == counts["evaluate"].images == x.shape[0]
    # spikes per neuron layer agree with the SNN's own spike counts
    out = snn.evaluate(x)
    assert sum(layer.spikes for layer in counts["evaluate"].layers) == sum(int(v.sum()) for v in out.spikes.values())


@pytest.mark.parametrize("name", [n for n, _, _ in NETWORKS])
def test_synaptic_ops_equal_a_brute_force_count(converted, name):
    _, snn, x, counts = converted[name]
    expected = brute_force_sops(snn, x, functional_pools=name == "net2d")
    got = {layer.name: layer.synaptic_ops for layer in counts["evaluate"].layers if layer.input != "analog"}
    assert expected and got == expected
    assert any(v > 0 for v in got.values())


class SpikesIntoMatmul(nn.Module):
    """Spikes into torch.matmul: a layer written as a function, which energy has no rule to count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.site = nn.Conv2d(1, 2, 3), site(2, torch.Generator().manual_seed(3))
        self.weight = nn.Parameter(torch.randn(2 * 4 * 4, 3, generator=torch.Generator().manual_seed(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.flatten(self.site(self.conv(x)), 1), self.weight)


@pytest.mark.parametrize("mode", ["simulate", "evaluate"])
def test_energy_refuses_spikes_through_an_op_it_cannot_count(mode):
    snn = ann2snn.convert(SpikesIntoMatmul().double(), T=3)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    simulated, evaluated = snn.simulate(x), snn.evaluate(x)   # the SNN itself runs
    assert torch.equal(simulated.spikes["site"], evaluated.spikes["site"])
    torch.testing.assert_close(simulated.logits, evaluated.logits)
    with pytest.raises(UnsupportedModelError, match="^energy: no rule for counting spikes through matmul$"):
        OperationCounter(snn, mode)


class ObserverNamedLayer(nn.Module):
    """A layer named as energy would name the observer of the layer before it (energy_conv)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv, self.site = nn.Conv2d(1, 2, 3), site(2, g)
        self.energy_conv, self.site2 = nn.Conv2d(2, 2, 3), site(2, g)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.site2(self.energy_conv(self.site(self.conv(x)))), 1))


@pytest.mark.parametrize("mode", ["simulate", "evaluate"])
def test_observers_never_take_the_name_of_a_layer(mode):
    snn = ann2snn.convert(ObserverNamedLayer().double(), T=3)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    counter = OperationCounter(snn, mode)
    reference = snn.simulate(x) if mode == "simulate" else snn.evaluate(x)
    assert torch.equal(counter(x), reference.logits)
    assert [layer.name for layer in counter.result().layers] == ["conv", "energy_conv", "fc"]


@pytest.mark.parametrize("mode", ["simulate", "evaluate"])
def test_counting_runs_the_lowered_executor_with_observers(converted, mode):
    """Energy has no executor of its own: the counter is the simulator's or the evaluator's graph
    with observers in it, and its neurons are those executors' own."""
    from ann2snn.energy.observe import LayerObserver, SpikeObserver
    from ann2snn.runtime.evaluator import TimeFoldedNeuron

    _, snn, x, _ = converted["random"]
    counter = OperationCounter(snn, mode)
    neuron_type = SimulatedNeuron if mode == "simulate" else TimeFoldedNeuron
    modules = dict(counter.lowered.named_modules())
    assert sum(isinstance(m, SpikeObserver) for m in modules.values()) == len(snn.site_names) \
        == sum(isinstance(m, neuron_type) for m in modules.values())
    assert any(isinstance(m, LayerObserver) for m in modules.values())
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in modules.values() if isinstance(m, neuron_type)]
    try:
        counter(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == len(snn.site_names)


def test_first_layer_costs_macs_and_later_layers_synaptic_ops(converted):
    _, _, x, counts = converted["net2d"]
    layers = {layer.name: layer for layer in counts["evaluate"].layers}
    first = layers["conv1"]
    assert first.input == "analog" and first.synaptic_ops == 0 and first.snn_macs == first.macs > 0
    assert all(layer.input == "spikes" and layer.snn_macs == 0 for name, layer in layers.items() if name != "conv1")
    assert layers["fc2"].site is None and layers["fc2"].neurons == 0  # the readout has no neuron
    assert layers["conv2"].site == "act2" and layers["conv2"].neurons == 4 * 5 * 5
    assert layers["pool"].kind == "AvgPool2d" and layers["pool"].macs == 0 and layers["pool"].ann_adds > 0


@pytest.mark.parametrize("name", [n for n, _, _ in NETWORKS])
def test_synaptic_ops_equal_spikingjelly_synop_counter(converted, name):
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

    _, snn, x, counts = converted[name]
    inputs, _ = simulator_planes(snn, x)
    ours = {layer.name: layer.synaptic_ops for layer in counts["simulate"].layers}
    checked = 0
    for layer_name, planes in inputs.items():
        layer = snn.graph_module.get_submodule(layer_name)
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        counter = SynOpCounter()
        folded = planes.flatten(0, 1)  # [T * N, ...]
        with torch.no_grad(), DispatchCounterMode([counter]):
            if isinstance(layer, nn.Linear):
                F.linear(folded, layer.weight)
            else:
                layer._conv_forward(folded, layer.weight, None)
        assert counter.get_total() == ours[layer_name], layer_name
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name", [n for n, _, _ in NETWORKS])
def test_ann_macs_equal_torch_flop_counter(converted, name):
    model, _, x, counts = converted[name]
    with FlopCounterMode(display=False) as flops:
        model(x)
    per_module = flops.get_flop_counts()
    prefix = type(model).__name__
    layers = [layer for layer in counts["evaluate"].layers if layer.kind in ("Conv1d", "Conv2d", "Linear")]
    assert layers
    for layer in layers:
        assert sum(per_module[f"{prefix}.{layer.name}"].values()) // 2 == layer.macs, layer.name
    assert sum(per_module["Global"].values()) // 2 == sum(layer.macs for layer in layers)


def test_energy_follows_method_section_6(converted):
    _, _, _, counts = converted["net2d"]
    table = load_table()
    report = estimate_energy(counts["evaluate"], table)
    n = counts["evaluate"].images
    snn = sum(layer.snn_macs * 4.6 + (layer.synaptic_ops + layer.snn_adds) * 0.9 for layer in counts["evaluate"].layers) / n
    ann = sum(layer.macs * 4.6 + layer.ann_adds * 0.9 for layer in counts["evaluate"].layers) / n
    assert report.total["snn_energy_pj"] == pytest.approx(snn)
    assert report.total["ann_energy_pj"] == pytest.approx(ann)
    assert report.total["ratio"] == pytest.approx(ann / snn)
    assert report.terms == ["compute (MAC / AC)"]
    with_terms = estimate_energy(counts["evaluate"], table, neuron_updates=True, memory=True)
    neuron_steps = sum(layer.neurons * layer.timesteps for layer in counts["evaluate"].layers)
    assert with_terms.total["neuron_energy_pj"] == pytest.approx(neuron_steps * 1.8)
    assert with_terms.total["snn_energy_pj"] > report.total["snn_energy_pj"]
    assert any("neuron updates" in t for t in with_terms.terms) and any("memory" in t for t in with_terms.terms)
    text = format_report(with_terms)
    assert "total" in text and "neuron updates" in text and "ratio" in text


def test_energy_arithmetic_on_given_counts():
    counts = OpCounts(images=2, timesteps=2, mode="evaluate", layers=[
        LayerCounts("conv1", "Conv2d", "analog", "act1", 10, 2, 8, 0, 0, 200, 0, 200, 0, True),
        LayerCounts("fc", "Linear", "spikes", None, 0, 0, 0, 8, 30, 0, 0, 100, 0, True)])
    report = estimate_energy(counts, load_table("int8-45nm"))
    assert report.layers[0]["snn_energy_pj"] == pytest.approx(100 * 0.3)
    assert report.layers[1]["snn_energy_pj"] == pytest.approx(15 * 0.1)
    assert report.layers[1]["ann_energy_pj"] == pytest.approx(50 * 0.3)
    assert report.layers[0]["spike_rate"] == pytest.approx(4 / (10 * 2))
    assert report.total["ratio"] == pytest.approx((30 + 15) / (30 + 1.5))


def test_shipped_tables_have_sources():
    assert {"fp32-45nm", "int8-45nm"} <= set(available_tables())
    fp32, int8 = load_table("fp32-45nm"), load_table("int8-45nm")
    assert load_table().name == "fp32-45nm"
    assert (fp32.pj("mac"), fp32.pj("ac")) == (4.6, 0.9)
    assert (int8.pj("mac"), int8.pj("ac")) == (0.3, 0.1)
    assert int8.primitives["int8_mult"].pj == 0.2 and int8.primitives["int8_add"].pj == 0.03
    assert int8.primitives["int32_add"].pj == 0.1
    for table in (fp32, int8):
        assert all("Horowitz" in c.source for c in list(table.energies.values()) + list(table.primitives.values()))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"energies": {"ac": 0.9}}', "missing energy 'mac'"),
    ('{"energies": {"mac": 4.6, "ac": -1}}', ">= 0"),
    ('{"energies": {"mac": "4.6", "ac": 0.9}}', "number of pJ"),
    ('{"energies": {"mac": 4.6, "ac": 0.9, "macs": 1}}', "unknown energy 'macs'"),
    ('{"energies": {"mac": {"source": "x"}, "ac": 0.9}}', "missing \"pj\""),
])
def test_bad_table_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(Ann2SnnError, match=message) as err:
        load_table(path)
    assert "\n" not in str(err.value)


def test_user_table_and_missing_optional_energy(tmp_path, converted):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "energies": {"mac": 2.0, "ac": {"pj": 0.5, "source": "lab"}}}))
    table = load_table(str(path))
    assert table.file == str(path) and table.energies["ac"].source == "lab"
    with pytest.raises(Ann2SnnError, match="neuron_update"):
        estimate_energy(converted["net1d"][3]["evaluate"], table, neuron_updates=True)
    with pytest.raises(Ann2SnnError, match="neither a shipped table"):
        load_table("no-such-table")
    assert parse_table({"energies": {"mac": 1, "ac": 0}}, "inline").name == "inline"


# --- the command ----------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), QuantClippedActivation(7, 2.0, 4)
        self.conv2, self.act2 = nn.Conv2d(4, 8, 3, stride=2, padding=1), QuantClippedActivation(7, 2.0)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.act2(self.conv2(self.act1(self.bn1(self.conv1(x))))), 1))


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("energy_cli")
    torch.manual_seed(0)
    model = SmallCNN().eval()
    ann2snn.convert(model, T=3).save(folder / "small.snn")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.random((20, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 20))
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ann2snn", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_json_schema_user_table_and_plot(cli_files):
    table = cli_files / "mine.json"
    table.write_text(json.dumps({"name": "mine", "energies": {"mac": 3.0, "ac": 1.0, "neuron_update": 0.5}}))
    plot = cli_files / "energy.png"
    result = run_cli("energy", str(cli_files / "small.snn"), "--data", str(cli_files / "data.npz"), "--json",
                     "--samples", "12", "--batch-size", "5", "--table", str(table), "--neuron-updates",
                     "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 12 and report["table"]["name"] == "mine" and report["table"]["file"] == str(table)
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "conv2", "fc"]
    for layer in report["layers"]:
        for key in ("name", "neurons", "spikes", "synaptic_ops", "macs", "snn_energy_pj", "ann_energy_pj"):
            assert key in layer
    first = report["layers"][0]
    assert first["input"] == "analog" and first["macs"] == 64 * 4 * 9 and first["neurons"] == 4 * 8 * 8
    assert first["snn_energy_pj"] == pytest.approx(first["macs"] * 3.0 + first["neuron_energy_pj"])
    assert report["layers"][2]["macs"] == 128 * 10
    total = report["total"]
    assert total["ratio"] == pytest.approx(total["ann_energy_pj"] / total["snn_energy_pj"])
    assert any("neuron updates" in term for term in report["terms"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(cli_files.glob(".energy.png.*"))  # written atomically: no temporary left


def test_cli_text_report(cli_files):
    result = run_cli("energy", str(cli_files / "small.snn"), "--data", str(cli_files / "data.npz"),
                     "--samples", "8", "--table", "int8-45nm", "--mode", "simulate", "--memory")
    assert result.returncode == 0, result.stderr
    assert "int8-45nm" in result.stdout and "conv2" in result.stdout and "ANN / SNN energy ratio" in result.stdout
    assert "memory" in result.stdout


def test_cli_bad_table_exits_2_with_one_line(cli_files):
    bad = cli_files / "bad.json"
    bad.write_text('{"energies": {"mac": 4.6}}')
    result = run_cli("energy", str(cli_files / "small.snn"), "--data", str(cli_files / "data.npz"),
                     "--table", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error:") and "'ac'" in lines[0]
