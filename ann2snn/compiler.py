"""convert(): the compiler pipeline from a quantized ANN to an SNN, as a sequence of passes."""
from __future__ import annotations

import os

from torch import Tensor, fx, nn

from .errors import UnsupportedModelError
from .passes import (float_activations_to_sites, fold_batch_norm, move_max_pool_before_sites,
                     place_neurons, shift_bias, trace)
from .passes.graph_utils import conversion_report, neuron_nodes, site_nodes
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
    return SNN(gm, _timesteps(gm), report=conversion_report(gm), source=source)


def _timesteps(gm: fx.GraphModule) -> int:
    return max(gm.get_submodule(n.target).timesteps for n in neuron_nodes(gm))


def _has_float_activations(gm: fx.GraphModule) -> bool:
    from .passes.calibrate import _clip_bound

    return any(_clip_bound(gm, node) is not None for node in gm.graph.nodes)


def convert_onnx(path: str | os.PathLike, T: int | None = None, calib: Tensor | None = None,
                 percentile: float = 99.99, batch_size: int = 64) -> SNN:
    """Import an ONNX file and convert it.

    QDQ activation sites keep their scale and level count (uint8 gives T = 8). Float Relu / Clip /
    Relu6 sites need `T` and calibration inputs `calib`: lambda is the `percentile` of each site's
    activations there.
    """
    from .artifact import file_sha256
    from .onnx_import import load_onnx
    from .onnx_import.sites import qdq_to_sites

    gm, qdq_sites = qdq_to_sites(load_onnx(path))
    report = conversion_report(gm)
    for entry in qdq_sites:
        report["sites"].setdefault(entry["site"], {})["source"] = {"kind": "qdq", **entry}
    kind = "qdq" if qdq_sites else "float"
    if _has_float_activations(gm):
        if T is None:
            raise UnsupportedModelError(f"{path}: the model has float activations (Relu/Clip): pass -T N")
        if calib is None:
            raise UnsupportedModelError(
                f"{path}: float activations (Relu/Clip) need calibration data to set their clipping "
                "thresholds: pass --calib DATA (digits, an .npz with arrays x and y, or an image folder)")
        from .train import calibrate_clips

        gm = float_activations_to_sites(gm, T)
        calibrate_clips(gm, [(x,) for x in calib.split(batch_size)], percentile, batches=None)
        kind = "float" if not qdq_sites else "mixed"
    source = {"file": os.path.basename(str(path)), "sha256": file_sha256(path), "kind": kind,
              "calibration_percentile": percentile if kind != "qdq" else None}
    snn_graph = compile_graph(gm, T)
    return SNN(snn_graph, _timesteps(snn_graph), report=conversion_report(snn_graph), source=source)
