"""convert(): the compiler pipeline from a quantized ANN to an SNN, as a sequence of passes."""
from __future__ import annotations

from torch import fx, nn

from .passes import fold_batch_norm, move_max_pool_before_sites, place_neurons, shift_bias, trace
from .passes.graph_utils import conversion_report, site_nodes
from .errors import UnsupportedModelError
from .snn import SNN


def compile_graph(gm: fx.GraphModule, timesteps: int | None = None) -> fx.GraphModule:
    """fold BN -> shift bias -> move MaxPool before sites -> place neurons."""
    if not site_nodes(gm):
        raise UnsupportedModelError("the model has no quantized activation site (QuantClippedActivation or QDQ)")
    for graph_pass in (fold_batch_norm, shift_bias, move_max_pool_before_sites):
        gm = graph_pass(gm)
    return place_neurons(gm, timesteps)


def convert(model: nn.Module, T: int | None = None, *, source: dict | None = None) -> SNN:
    """Convert a model whose activation sites are QuantClippedActivation into an SNN.

    T: time steps; None takes the sites' own T (L = 2^T - 1). The model is left untouched; the
    SNN keeps the model's dtype.
    """
    gm = compile_graph(trace(model), T)
    neurons = [gm.get_submodule(t) for t in conversion_report(gm)["sites"]]
    timesteps = max(n.timesteps for n in neurons)
    return SNN(gm, timesteps, report=conversion_report(gm), source=source)
