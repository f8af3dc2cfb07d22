"""Quantization-aware fine-tuning of any PyTorch model (issue 17): the library path of `ann2snn train`.

    qat = ann2snn.prepare(model, T=3, example_input=x)     a copy; its ReLU-like ops are sites
    loss = F.cross_entropy(qat(x), y) + beta * ann2snn.spike_penalty(qat)
    snn = ann2snn.convert(qat)                             exact (docs/method.md section 4)
    ann2snn.export_onnx(qat, "qat.onnx", x)                QDQ file for `ann2snn convert`

With weight_bits=8 the copy's BNs are folded and its Conv / Linear weights fake-quantized to int8
(weight_quant.py); the export is then full QDQ, int8 weights and int32 biases included.

`prepare` traces the model with torch.fx, gives every call of a ReLU-like op (nn.ReLU, nn.ReLU6,
nn.Hardtanh(0, c), F.relu, torch.relu, torch.clamp / Tensor.clamp with min=0) a module of its own,
then reuses the calibration pass (ann2snn/compile/calibrate.py): `quantize_model` turns those modules into
QuantClippedActivation sites and `calibrate_clips` sets lambda from the example input.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import Ann2SnnError
from ..compile.calibrate import (activation_sites, calibrate_clips, clamp_bounds, clip_bound, first_tensor,
                               quantize_model)
from ..runtime.graph import free_name
from ..compile.trace import SiteTracer
from ..runtime.quant import QuantClippedActivation
from .config import MIN_CLIP, TrainConfig
from .regularizer import spike_regularizer
from .weight_quant import check_weight_bits, quantize_weights

# Tensor methods and in-place variants with the functional form that `clip_bound` recognises.
_METHOD_FUNCTIONS = {"relu": torch.relu, "relu_": torch.relu, "clamp": torch.clamp, "clamp_": torch.clamp,
                     "clip": torch.clamp, "clip_": torch.clamp}
_FUNCTION_ALIASES = {torch.relu_: torch.relu, nn.functional.relu_: torch.relu, torch.clamp_: torch.clamp,
                     torch.clip: torch.clamp}
# The trainer's default: the percentile of a site's positive activations that sets its first lambda.
DEFAULT_PERCENTILE = TrainConfig.percentile


class PreparedModel(fx.GraphModule):
    """The GraphModule `prepare` returns. Its sites keep the spike counts of the last forward pass for
    `spike_penalty`; after a training step those are autograd tensors, which cannot be deep-copied,
    so a deep copy (convert, check_exact and export_onnx each copy the model) leaves them out: a
    copy has had no forward pass of its own. The copy's lambdas are kept positive as the next
    forward pass would keep them (`_keep_lambda_positive`): a model converted right after an
    optimizer step is the model that step left."""

    def __deepcopy__(self, memo: dict) -> "PreparedModel":
        sites = list(activation_sites(self).values())
        spikes = [site.spikes for site in sites]
        for site in sites:
            site.spikes = None
        try:
            copied = super().__deepcopy__(memo)
            for site in activation_sites(copied).values():
                _keep_lambda_positive(site, ())
            return copied
        finally:
            for site, count in zip(sites, spikes):
                site.spikes = count


def prepare(model: nn.Module, T: int = 3, example_input: Tensor | None = None, per_channel: bool = False,
            percentile: float = DEFAULT_PERCENTILE, weight_bits: int | None = None) -> PreparedModel:
    """A trainable quantized copy of `model`: every ReLU-like op becomes a QuantClippedActivation with
    L = 2^T - 1 levels and a trainable lambda (one per channel with `per_channel`), calibrated as the
    `percentile` of the site's positive activations on `example_input` (a batch [N, C, ...]).
    weight_bits=8: every BN fed by a conv / linear layer is folded into it (from its running
    statistics: prepare a trained model) and every Conv / Linear weight is fake-quantized to int8
    per output channel (weight_quant.py); `export_onnx` then writes full QDQ.

    The sites record their spike counts, so `spike_penalty` reads the last forward pass. `model` is
    not modified; the copy keeps its training mode, device and dtype. Refuses (Ann2SnnError) a model
    torch.fx cannot trace, a clamp / Hardtanh with a lower bound other than 0, and a model without
    a ReLU-like op.
    """
    check_weight_bits(weight_bits)
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise Ann2SnnError("prepare needs example_input, a batch of inputs [N, C, ...], to calibrate lambda")
    gm = _trace_copy(model)
    modules = _sites_as_modules(gm)
    if not modules:
        raise Ann2SnnError(f"{type(model).__name__}: no ReLU-like activation (nn.ReLU, nn.ReLU6, nn.Hardtanh(0, c), "
                           "F.relu, torch.relu, clamp(min=0)) to quantize")
    quantize_model(gm, T, per_channel, tuple(example_input.shape[1:]))
    if weight_bits is not None:
        quantize_weights(gm, weight_bits)
    param = first_tensor(gm)
    calibrate_clips(gm, [(example_input.to(param.device, param.dtype),)], percentile, batches=None)
    for site in activation_sites(gm).values():
        site.to(param.dtype)
        site.record_spikes = True  # for spike_penalty, as the trainer's QAT does
        site.register_forward_pre_hook(_keep_lambda_positive)
    return gm


def spike_penalty(model: nn.Module) -> Tensor:
    """The spike regularizer of docs/method.md section 5 for the last forward pass of `model`: spikes per
    sample (popcount of the levels, summed over the sites), averaged over the batch; differentiable
    through the surrogate gradient. Add `beta * spike_penalty(qat)` to the loss."""
    return spike_regularizer(model)


def _keep_lambda_positive(site: QuantClippedActivation, inputs: tuple) -> None:
    """What the trainer does after each step (`MIN_CLIP`), here before each forward, since the user's
    loop steps the optimizer: a step may drive a lambda to zero or below, where theta = lambda / L
    quantizes nothing and no SNN can be built. Through .data, so the version counter stays and a
    graph built before (gradient accumulation) can still be backpropagated."""
    if bool((site.clip.data < MIN_CLIP).any()):
        site.clip.data.clamp_(min=MIN_CLIP)


def _trace_copy(model: nn.Module) -> PreparedModel:
    """A GraphModule of a deep copy of `model` (fx.GraphModule shares the root's submodules: without the
    copy, training it would train the user's model). Shared modules stay shared: weight tying is the
    user's design, only activations get a module per call (`_sites_as_modules`)."""
    copied = copy.deepcopy(model)
    try:
        graph = SiteTracer().trace(copied)
    except Exception as err:  # TraceError, TypeError, ...: whatever fx raised, one line of it
        first = (str(err).strip().splitlines() or [""])[0]
        raise Ann2SnnError(f"{type(model).__name__}: torch.fx cannot trace the model ({type(err).__name__}: {first}); "
                           "prepare needs a forward without data-dependent control flow") from None
    gm = PreparedModel(copied, graph, type(model).__name__)
    gm.train(model.training)
    return gm


def _sites_as_modules(gm: fx.GraphModule) -> list[str]:
    """Make every ReLU-like call a call_module of a module of its own (a ReLU-like module called at k
    places becomes k modules: each call is one site with its own lambda and spike count). Returns
    their names; refuses a ReLU-like op whose lower bound is not 0."""
    names: list[str] = []
    used: set[str] = set()
    for node in list(gm.graph.nodes):
        _as_function(node)
        _check_lower_bound(gm, node)
        bound = clip_bound(gm, node)
        if bound is None:
            continue
        if node.op == "call_module" and node.target not in used:
            used.add(node.target)
            names.append(node.target)
            continue
        name = free_name(gm, node.name)
        gm.add_submodule(name, nn.ReLU() if math.isinf(bound) else nn.Hardtanh(0.0, bound))
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        names.append(name)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return names


def _as_function(node: fx.Node) -> None:
    """x.relu(), x.clamp(...), torch.relu_(x), ...: rewritten in place to torch.relu / torch.clamp, the
    forms `clip_bound` recognises (the site's output replaces the in-place result)."""
    if node.op == "call_method" and node.target in _METHOD_FUNCTIONS:
        node.op, node.target = "call_function", _METHOD_FUNCTIONS[node.target]
    elif node.op == "call_function" and node.target in _FUNCTION_ALIASES:
        node.target = _FUNCTION_ALIASES[node.target]


def _check_lower_bound(gm: fx.GraphModule, node: fx.Node) -> None:
    """A clamp or Hardtanh with a lower bound other than 0 clips like a ReLU but passes negative
    values (or none above 0): no bit-serial site represents it."""
    bounds = clamp_bounds(gm, node)
    low = None if bounds is None or isinstance(bounds[0], Tensor) else bounds[0]
    if low is not None and math.isfinite(low) and low != 0:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        raise Ann2SnnError(f"node {node.name} ({_describe(node, module)}) has lower bound {low:g}: an activation "
                           "site needs a lower bound of 0 (a ReLU or clamp(min=0)); change the model")


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    return type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))


__all__ = ["prepare", "spike_penalty", "PreparedModel", "DEFAULT_PERCENTILE"]


def onnx_network(path: str, classes: int, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """A float ONNX file (any CNN `convert` accepts) as a trainable network for `ann2snn train
    --model FILE.onnx`: the importer's graph of torch modules, its ReLU-like ops each a module of
    their own (for `quantize_model`); its own pre- and post-processing stays in the graph.
    Refuses a QDQ file (already quantized), samples or classes that do not fit it."""
    from ..data.sets import check_input_shape
    from ..frontend.importer import load_onnx
    from ..runtime.quant import QuantDequant

    gm = load_onnx(path)
    if any(isinstance(m, QuantDequant) for m in gm.modules()):
        raise Ann2SnnError(f"{path}: a quantized (QDQ) file; train fine-tunes a float file (convert takes this one)")
    meta = gm.meta["onnx"]
    check_input_shape(path, input_shape, meta["input_shape"][1:])
    width = gm(torch.zeros((1, *input_shape), dtype=meta["dtype"])).reshape(1, -1).shape[1]
    if width != classes:
        raise Ann2SnnError(f"{path}: the model has {width} outputs, the data set {classes} classes")
    network = _trace_copy(gm)
    if not _sites_as_modules(network):
        raise Ann2SnnError(f"{path}: no ReLU-like activation (Relu, Clip(0, c)) to quantize")
    network.recompile()
    network.meta["onnx"] = meta
    return network


def classification_loss(model: nn.Module) -> Callable[..., Tensor]:
    """Cross-entropy for the network's output: logits, or probabilities / log-probabilities when the
    network ends in the Softmax / LogSoftmax it was exported with (a Sigmoid output is not a
    single-label classifier). Called as loss(output, labels, reduction=...)."""
    last = _last_operation(model)
    if isinstance(last, nn.LogSoftmax):
        return F.nll_loss
    if isinstance(last, nn.Softmax):
        return lambda output, labels, **kwargs: F.nll_loss(torch.log(output.clamp_min(1e-30)), labels, **kwargs)
    if isinstance(last, nn.Sigmoid):
        raise Ann2SnnError("the network ends in a Sigmoid: train fine-tunes single-label classifiers (logits, "
                           "Softmax or LogSoftmax outputs)")
    return F.cross_entropy


def _last_operation(model: nn.Module) -> nn.Module | None:
    """The module producing a GraphModule's output, if it is one."""
    if not isinstance(model, fx.GraphModule):
        return None
    output = next(n for n in model.graph.nodes if n.op == "output")
    produced = output.args[0]
    produced = produced[0] if isinstance(produced, (tuple, list)) else produced
    if isinstance(produced, fx.Node) and produced.op == "call_module":
        return model.get_submodule(produced.target)
    return None
