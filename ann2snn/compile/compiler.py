"""convert(): the compiler pipeline from a quantized ANN to an SNN, as a sequence of passes."""
from __future__ import annotations

import copy
import os

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError
from ..levels import check_levels_exact
from .fold_bn import fold_batch_norm
from .integer_weights import integer_weights
from .move_max_pool import move_max_pool_before_sites
from .place_neurons import place_neurons
from .shift_bias import shift_bias
from .trace import trace
from ..runtime.graph import conversion_report, neuron_nodes, site_nodes
from ..runtime.metadata import Source
from ..runtime.snn import SNN


def compile_graph(gm: fx.GraphModule, timesteps: int | None = None) -> fx.GraphModule:
    """fold BN -> shift bias -> move MaxPool before sites -> place neurons, on `gm` itself; the
    layers' int8 weights (integer_weights, after fold BN) go to gm.meta["integer_layers"].

    The passes compute in float64 and the result is cast back to gm's dtype once, at the end: a
    float32 SNN is then exactly the float32 rounding of the float64 SNN, which the exactness gate
    (ann2snn/verify/gate.py) proves exact for the source, and no folded weight or shifted bias is rounded
    twice.
    """
    if not site_nodes(gm):
        raise UnsupportedModelError("the model has no quantized activation site (QuantClippedActivation or QDQ)")
    dtype = next((t.dtype for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()), torch.float32)
    gm = gm.double()
    gm = fold_batch_norm(gm)
    layers = integer_weights(gm)
    for graph_pass in (shift_bias, move_max_pool_before_sites):
        gm = graph_pass(gm)
    gm = place_neurons(gm, timesteps).to(dtype)
    for node in neuron_nodes(gm):   # e.g. float16 with T > 11
        try:
            check_levels_exact(gm.get_submodule(node.target).levels, dtype)
        except ValueError as err:
            raise UnsupportedModelError(f"site {node.target}: {err}") from None
    gm.meta["integer_layers"] = layers
    return gm


def convert(model: nn.Module, T: int | None = None, *, source: Source | dict | None = None) -> SNN:
    """Convert a model whose activation sites are QuantClippedActivation into an SNN.

    T: time steps; None takes the sites' own T (L = 2^T - 1). The model is left untouched; the
    SNN keeps the model's dtype. `source` describes where the model came from (a dict is kept as
    the artifact's JSON has it).
    """
    gm = compile_graph(trace(model), T)
    source = source if isinstance(source, Source) else Source.from_json(source or {})
    return SNN(gm, _timesteps(gm), report=conversion_report(gm), source=source)


def _timesteps(gm: fx.GraphModule) -> int:
    return max(gm.get_submodule(n.target).timesteps for n in neuron_nodes(gm))


def compile_source(path: str | os.PathLike, source_graph: fx.GraphModule, source: Source,
                   T: int | None = None) -> SNN:
    """The SNN of a quantized source (`quantized_onnx`); the source graph is left as it was."""
    try:
        snn_graph = compile_graph(copy.deepcopy(source_graph), T)
    except UnsupportedModelError as err:  # the passes know graphs, not files: name the file
        raise UnsupportedModelError(f"{path}: {err}") from None
    return SNN(snn_graph, _timesteps(snn_graph), report=conversion_report(snn_graph), source=source,
               integer_layers=snn_graph.meta["integer_layers"])
