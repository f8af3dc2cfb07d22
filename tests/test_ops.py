"""The table of module ops (ann2snn/ops.py), walked entry by entry (issue 14, item 1).

For every module type in the table, a small network uses it where a network would (after a site,
or after the last layer for an output op), in 1, 2 or 3 spatial dimensions as its name says. Its
SNN must simulate and evaluate alike (float64: logits and spike counts equal), count the same
spikes, synaptic operations and MACs both ways, and save and load as an artifact that evaluates
the same. The importer's contract must lie inside the table.
"""
from __future__ import annotations

import dataclasses
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.energy import count_operations
from ann2snn.frontend.importer import CONTRACT_MODULES
from ann2snn.ops import FUNCTION_KINDS, FUNCTION_OPS, KINDS, METHOD_KINDS, MODULE_OPS, kind_of, modules_of
from ann2snn.runtime.quant import QuantClippedActivation, QuantDequant

SIZE = 4   # spatial size per dimension


def _dims(op: type[nn.Module]) -> int:
    name = op.__name__
    return int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else 2


def _instance(op: type[nn.Module], channels: int) -> nn.Module:
    dims = _dims(op)
    kind = MODULE_OPS[op].kind
    if op is nn.Linear:
        return nn.Linear(channels * SIZE**dims, channels * SIZE**dims)
    if kind == "layer":
        return op(channels, channels, 3, padding=1)
    if kind == "norm":
        norm = op(channels).eval()
        with torch.no_grad():
            norm.running_mean.uniform_(-0.2, 0.2), norm.running_var.uniform_(0.5, 1.5)
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.2, 0.2)
        return norm
    if kind in ("average_pool", "max_pool"):
        return op(2)
    if op is nn.Dropout:
        return nn.Dropout(0.5)
    if kind == "output":
        return op() if op is nn.Sigmoid else op(dim=1)
    return op()


def network(op: type[nn.Module]) -> tuple[nn.Module, torch.Size]:
    """conv -> site -> [the op] -> conv -> site -> flatten -> linear (-> the output op)."""
    torch.manual_seed(0)
    dims, channels = _dims(op), 4
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]

    def site() -> QuantClippedActivation:
        return QuantClippedActivation(levels=7, clip=1.0)

    layers: list[nn.Module] = [conv(2, channels, 3, padding=1), site()]
    kind = MODULE_OPS[op].kind
    if op in (nn.Linear, nn.Flatten):
        layers += [nn.Flatten(), _instance(op, channels) if op is nn.Linear else nn.Identity(), site()]
    elif kind != "output":
        layers += [_instance(op, channels), conv(channels, channels, 1), site(), nn.Flatten()]
    else:
        layers += [nn.Flatten()]
    with torch.no_grad():
        features = nn.Sequential(*layers).eval()(torch.zeros((1, 2) + (SIZE,) * dims)).shape[1]
    layers.append(nn.Linear(features, 10))
    if kind == "output":
        layers.append(_instance(op, channels))
    return nn.Sequential(*layers).eval().double(), torch.Size((2,) + (SIZE,) * dims)


@pytest.mark.parametrize("op", list(MODULE_OPS), ids=lambda op: op.__name__)
def test_every_module_op_is_simulated_evaluated_counted_saved_and_loaded_alike(op, tmp_path):
    model, shape = network(op)
    snn = ann2snn.convert(model, T=3)
    assert any(type(m) is op for m in snn.graph_module.modules()), f"{op.__name__} left the SNN"
    x = torch.rand((6, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    simulated, evaluated = snn.simulate(x), snn.evaluate(x)
    torch.testing.assert_close(simulated.logits, evaluated.logits, rtol=0, atol=1e-9)   # sums in another order
    assert simulated.spikes.keys() == evaluated.spikes.keys()
    assert all(torch.equal(simulated.spikes[k], evaluated.spikes[k].to(simulated.spikes[k].dtype))
               for k in simulated.spikes)
    assert sum(int(s.sum()) for s in evaluated.spikes.values()) > 0   # the network really spikes

    counted = {mode: count_operations(snn, [x], mode=mode) for mode in ("simulate", "evaluate")}
    assert [dataclasses.astuple(row) for row in counted["simulate"].layers] == \
        [dataclasses.astuple(row) for row in counted["evaluate"].layers]
    if MODULE_OPS[op].kind == "average_pool":   # fed by spikes: one accumulate per window a spike reaches
        pool_rows = [row for row in counted["evaluate"].layers if row.kind == op.__name__]
        assert pool_rows and pool_rows[0].input == "spikes" and pool_rows[0].synaptic_ops > 0, pool_rows

    snn.save(tmp_path / "op.snn")
    loaded = ann2snn.load_snn(tmp_path / "op.snn")
    again = loaded.evaluate(x)
    assert torch.equal(again.logits, evaluated.logits)   # the same SNN, the same arithmetic


def test_the_kinds_partition_the_table_and_the_importer_emits_only_table_modules():
    assert set(op.kind for op in MODULE_OPS.values()) == set(KINDS)
    assert sum(len(modules_of(kind)) for kind in KINDS) == len(MODULE_OPS)
    assert kind_of(nn.Conv3d(1, 1, 1)) == "layer" and kind_of(nn.ReLU()) is None
    # the importer also emits float activations (sites to be) and QDQ pairs, which the passes replace
    assert set(CONTRACT_MODULES) - set(MODULE_OPS) == {nn.ReLU, nn.Hardtanh, QuantDequant}
    with pytest.raises(ValueError, match="unknown module kinds"):
        modules_of("pooling")


# ------------------------------------------------------------------------------------------ functions

FUNCTION_CASES = {   # the function applied in a network: f(h, g) of two site outputs [N, 4, 4, 4] (1-D: [N, 4, 4])
    "torch.flatten": lambda h, g: torch.flatten(h, 1),
    "torch.reshape": lambda h, g: torch.reshape(h, (h.shape[0], -1)),
    "torch.permute": lambda h, g: torch.permute(h, (0, 1, 3, 2)),
    "torch.squeeze": lambda h, g: torch.squeeze(h.unsqueeze(2), 2),
    "torch.unsqueeze": lambda h, g: torch.unsqueeze(h, 2),
    "torch.cat": lambda h, g: torch.cat([h, g], 1),
    "torch.concat": lambda h, g: torch.concat([h, g], 1),
    "F.pad": lambda h, g: F.pad(h, (1, 1, 1, 1)),
    "F.avg_pool1d": lambda h, g: F.avg_pool1d(h, 2),
    "F.avg_pool2d": lambda h, g: F.avg_pool2d(h, 2),
    "F.adaptive_avg_pool1d": lambda h, g: F.adaptive_avg_pool1d(h, 3),
    "F.adaptive_avg_pool2d": lambda h, g: F.adaptive_avg_pool2d(h, 3),
    "torch.mean": lambda h, g: torch.mean(h, (2, 3)),
    "F.max_pool1d": lambda h, g: F.max_pool1d(h, 2),
    "F.max_pool2d": lambda h, g: F.max_pool2d(h, 2),
    "F.adaptive_max_pool1d": lambda h, g: F.adaptive_max_pool1d(h, 3),
    "F.adaptive_max_pool2d": lambda h, g: F.adaptive_max_pool2d(h, 3),
    "operator.add": lambda h, g: operator.add(h, g),
    "torch.add": lambda h, g: torch.add(h, g),
    "operator.sub": lambda h, g: operator.sub(h, g),
    "torch.sub": lambda h, g: torch.sub(h, g),
    "operator.mul": lambda h, g: operator.mul(h, 0.5),
    "torch.mul": lambda h, g: torch.mul(h, 2.0),
    "operator.truediv": lambda h, g: operator.truediv(h, 2.0),
    "torch.div": lambda h, g: torch.div(h, 4.0),
    "operator.neg": lambda h, g: operator.neg(h),
}
# what the graph needs, not a network op: indexing and attributes; activations become sites first
NOT_IN_A_NETWORK = {"operator.getitem", "getattr", "torch.relu", "F.relu", "torch.clamp"}


class FunctionNet(nn.Module):
    """conv -> site (h) -> conv -> site (g) -> f(h, g) -> flatten -> linear; 1-D when f is."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.f = FUNCTION_CASES[name]
        conv = nn.Conv1d if "1d" in name else nn.Conv2d
        self.conv1, self.conv2 = conv(2, 4, 3, padding=1), conv(4, 4, 3, padding=1)
        self.site1 = QuantClippedActivation(levels=7, clip=1.0)
        self.site2 = QuantClippedActivation(levels=7, clip=1.0)
        self.shape = (2,) + (SIZE,) * (1 if "1d" in name else 2)
        with torch.no_grad():
            features = self.features(torch.zeros((1, *self.shape))).shape[1]
        self.fc = nn.Linear(features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.site1(self.conv1(x))
        return torch.flatten(self.f(h, self.site2(self.conv2(h))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def test_the_function_table_is_what_the_simulator_and_the_artifact_know():
    from ann2snn.runtime import artifact
    from ann2snn.runtime.simulator import FUNCTION_RULES
    from ann2snn.frontend.importer import CONTRACT_FUNCTIONS

    assert set(FUNCTION_RULES) == set(FUNCTION_OPS) - {operator.getitem}   # indexing a Signal: no rule
    assert artifact.FUNCTIONS == {op.name: fn for fn, op in FUNCTION_OPS.items()}
    assert artifact.METHODS == set(METHOD_KINDS)
    assert set(CONTRACT_FUNCTIONS) <= set(FUNCTION_OPS)
    assert {op.name for op in FUNCTION_OPS.values()} == set(FUNCTION_CASES) | NOT_IN_A_NETWORK | {"torch.matmul"}
    assert set(op.kind for op in FUNCTION_OPS.values()) == set(FUNCTION_KINDS)


@pytest.mark.parametrize("name", sorted(FUNCTION_CASES))
def test_every_function_op_is_simulated_evaluated_counted_saved_and_loaded_alike(name, tmp_path):
    torch.manual_seed(0)
    model = FunctionNet(name).eval().double()
    snn = ann2snn.convert(model, T=3)
    fn = next(f for f, op in FUNCTION_OPS.items() if op.name == name)
    assert any(n.op == "call_function" and n.target is fn for n in snn.graph_module.graph.nodes), name
    x = torch.rand((6, *model.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    simulated, evaluated = snn.simulate(x), snn.evaluate(x)
    torch.testing.assert_close(simulated.logits, evaluated.logits, rtol=0, atol=1e-9)
    assert all(torch.equal(simulated.spikes[k], evaluated.spikes[k].to(simulated.spikes[k].dtype))
               for k in simulated.spikes)
    counted = {mode: count_operations(snn, [x], mode=mode) for mode in ("simulate", "evaluate")}
    assert [dataclasses.astuple(row) for row in counted["simulate"].layers] == \
        [dataclasses.astuple(row) for row in counted["evaluate"].layers]
    snn.save(tmp_path / "fn.snn")
    assert torch.equal(ann2snn.load_snn(tmp_path / "fn.snn").evaluate(x).logits, evaluated.logits)
