"""The converted SNN: one graph of bit-serial neurons, run by simulation or evaluation."""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, fx, nn

from .artifact import read_artifact, write_artifact
from .metadata import ConversionReport, Source
from .evaluator import lower_to_evaluator
from .simulator import lower_to_simulator
from .cuda_graph import CudaGraphRunner
from .graph import head_arithmetic, layer_weight_dtypes, neuron_nodes
from .integer_snn import IntegerProgram
from .integer_values import IntegerWeights


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convolutions in IEEE float32 while inside: cuDNN's default is TF32 on Ampere and later
    GPUs, which rounds the inputs to 10 mantissa bits and so moves potentials across firing
    thresholds; the SNN must compute what its quantized ANN computes. (Matmuls are IEEE by default.)"""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


class SNNOutput(NamedTuple):
    logits: Tensor   # the network's output as its source computes it: through the output head, if any
    spikes: dict[str, Tensor]  # per neuron layer (site): spikes per sample, shape [N]


class SNN(nn.Module):
    """A converted SNN.

    `graph_module` is the SNN graph: folded layers with shifted biases and BitSerialIFNode
    neurons (SpikingJelly nodes). `report` is the conversion report (sites, shifts, rewrites, and
    the verification after ann2snn.convert_onnx); `source` describes where it came from (file
    hash, ann2snn version).

    `integer_layers` holds the int8 weights and int32 biases of the layers of an int8 QDQ source
    (the graph's float weights are their exact dequantization); with them `backend` is "integer"
    and simulate / evaluate run on integers (runtime/integer_snn.py). Setting `backend` to "float"
    runs the float SNN of the same graph.
    """

    def __init__(self, graph_module: fx.GraphModule, timesteps: int, report: ConversionReport | None = None,
                 source: Source | None = None, integer_layers: dict[str, IntegerWeights] | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.timesteps = int(timesteps)
        self.report = report or ConversionReport()
        self.source = source or Source()
        self.integer_layers = dict(integer_layers or {})
        self.backend = "integer" if self.integer_layers else "float"
        self._lowered: dict[str, fx.GraphModule] = {}
        self._integer: dict[str, IntegerProgram] = {}
        self._graphed: CudaGraphRunner | None = None

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in ("float", "integer") or (name == "integer" and not self.integer_layers):
            raise ValueError(f"backend must be 'float' or, with integer layers, 'integer'; got {name!r}")
        self._backend = name

    @contextmanager
    def using_backend(self, name: str) -> Iterator["SNN"]:
        """This SNN with `backend` set to `name` while inside."""
        saved, self.backend = self.backend, name
        try:
            yield self
        finally:
            self.backend = saved

    def weight_dtypes(self) -> dict[str, torch.dtype]:
        """Layer name -> the dtype its weights run in, in graph order: int8 for the integer layers
        of the integer backend, else the graph's."""
        dtypes = layer_weight_dtypes(self.graph_module)
        if self.backend == "integer":
            dtypes.update({name: layer.weight.dtype for name, layer in self.integer_layers.items()})
        return dtypes

    def _integer_program(self, mode: str) -> IntegerProgram:
        if mode not in self._integer:
            self._integer[mode] = IntegerProgram(self.graph_module, self.integer_layers, mode)
        return self._integer[mode]

    @property
    def site_names(self) -> list[str]:
        return [n.target for n in neuron_nodes(self.graph_module)]

    def _apply(self, fn, recurse=True):
        self._lowered.clear()  # lowered graphs hold references to tensors that fn replaces
        self._integer.clear()
        self._graphed = None
        return super()._apply(fn, recurse)

    def _lowered_graph(self, mode: str) -> fx.GraphModule:
        if mode not in self._lowered:
            lower = lower_to_simulator if mode == "simulate" else lower_to_evaluator
            self._lowered[mode] = lower(self.graph_module)
        return self._lowered[mode]

    @torch.no_grad()
    def simulate(self, x: Tensor) -> SNNOutput:
        """Time-stepped simulation over [T, N, ...] binary spike planes."""
        if self.backend == "integer":
            return SNNOutput(*self._integer_program("simulate").run(x))
        with ieee_float32():
            return SNNOutput(*self._lowered_graph("simulate")(x))

    @torch.no_grad()
    def evaluate(self, x: Tensor, cuda_graph: bool = True) -> SNNOutput:
        """Time-folded evaluation: the same logits and spike counts at about the ANN's cost.

        On CUDA it replays a CUDA graph captured at the first batch of each shape (`cuda_graph`,
        runtime/cuda_graph.py): the same kernels without a launch from Python per layer."""
        if self.backend == "integer":
            return SNNOutput(*self._integer_program("evaluate").run(x))
        with ieee_float32():
            if cuda_graph and x.is_cuda:
                if self._graphed is None:
                    self._graphed = CudaGraphRunner(self._lowered_graph("evaluate"))
                return SNNOutput(*self._graphed(x))
            return SNNOutput(*self._lowered_graph("evaluate")(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.evaluate(x).logits

    def before_head(self) -> "SNN":
        """This SNN without the arithmetic of its output head (the Softmax, LogSoftmax, Sigmoid and QDQ
        pairs after the last layer; reshapes stay), sharing its modules: the same spikes, and as output
        the last layer's potentials. Each of those ops keeps the order of a sample's classes, so these
        rank the classes as the output does, and also where a QDQ pair's rounding makes two equal."""
        graph = copy.deepcopy(self.graph_module.graph)
        nodes = {n.name: n for n in graph.nodes}
        for node in reversed(head_arithmetic(self.graph_module)):
            nodes[node.name].replace_all_uses_with(nodes[node.name].args[0])
            graph.erase_node(nodes[node.name])
        return SNN(fx.GraphModule(self.graph_module, graph), self.timesteps, self.report, self.source,
                   self.integer_layers).train(self.training)

    def save(self, path: str | os.PathLike) -> None:
        """Write the .snn artifact (graph as JSON, tensors as safetensors, atomically)."""
        write_artifact(path, self.graph_module, self.timesteps, self.report, self.source, self.integer_layers)


def load_snn(path: str | os.PathLike) -> SNN:
    """Load an .snn artifact; needs neither the source ONNX file nor pickle."""
    graph_module, header, integer_layers = read_artifact(path)
    # eval: modules are built in training mode, where an unfolded BatchNorm would normalize with
    # the batch's statistics and a Dropout drop
    return SNN(graph_module, header.timesteps, report=header.report, source=header.source,
               integer_layers=integer_layers).eval()
