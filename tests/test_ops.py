"""The table of module ops (ann2snn/ops.py), walked entry by entry (issue 14, item 1).

For every module type in the table, a small network uses it where a network would (after a site,
or after the last layer for an output op), in 1, 2 or 3 spatial dimensions as its name says. Its
SNN must simulate and evaluate alike (float64: logits and spike counts equal), count the same
spikes, synaptic operations and MACs both ways, and save and load as an artifact that evaluates
the same. The importer's contract must lie inside the table.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.energy import count_operations
from ann2snn.onnx_import import CONTRACT_MODULES
from ann2snn.ops import KINDS, MODULE_OPS, kind_of, modules_of
from ann2snn.quant import QuantClippedActivation, QuantDequant

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
