"""A test-only integer layer: what an integer artifact's layers hold, before the integer SNN exists.

`Int8Linear` is a Linear layer with an int8 weight and an int32 bias on a per-output-channel float32
scale: y = scale * (x W^T + bias). It declares those dtypes (BUFFER_DTYPES) and rebuilds from its
artifact configuration like ann2snn's own modules; `register` lists it in the artifact's
CUSTOM_MODULES (in a test through monkeypatch, in a CLI subprocess through `cli_command`).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn.runtime.graph import set_module
from ann2snn.runtime.snn import SNN


class Int8Linear(nn.Linear):
    BUFFER_DTYPES = {"weight": torch.int8, "bias": torch.int32}

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        del self.weight, self.bias
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def quantized(cls, linear: nn.Linear) -> "Int8Linear":
        """Per-output-channel symmetric int8 weights of a float layer, the bias in the same scale."""
        layer = cls(linear.in_features, linear.out_features)
        scale = linear.weight.detach().abs().amax(dim=1) / 127
        layer.weight = torch.round(linear.weight.detach() / scale[:, None]).to(torch.int8)
        layer.bias = torch.round(linear.bias.detach() / scale).to(torch.int32)
        layer.scale = scale
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x.dtype) * (F.linear(x, self.weight.to(x.dtype)) + self.bias.to(x.dtype))

    def artifact_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_artifact_config(cls, config: dict) -> "Int8Linear":
        return cls(config["in_features"], config["out_features"])


def register(modules: dict) -> None:
    modules["Int8Linear"] = Int8Linear


def quantize_layers_after_the_first(snn: SNN) -> SNN:
    """The SNN with every Linear layer but the first replaced by its Int8Linear (the evaluator runs
    it; the simulator, which applies a layer's weight itself, does not)."""
    gm = copy.deepcopy(snn.graph_module)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"
               and type(gm.get_submodule(n.target)) is nn.Linear]
    for target in targets[1:]:
        set_module(gm, target, Int8Linear.quantized(gm.get_submodule(target)))
    gm.recompile()
    return SNN(gm, snn.timesteps, report=snn.report, source=snn.source)


def cli_command(*args: str) -> list[str]:
    """The real `ann2snn` command, in a Python that lists Int8Linear among the artifact's modules."""
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import int8_layers; "
            "from ann2snn.runtime.artifact import CUSTOM_MODULES; int8_layers.register(CUSTOM_MODULES); "
            "from ann2snn.cli import main; sys.argv[0] = 'ann2snn'; main()")
    return [sys.executable, "-c", code, str(Path(__file__).parent), *args]
