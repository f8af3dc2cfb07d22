"""Activation sites of float models (docs/method.md section 1, second source of sites), and calibration.

Float Relu / Clip(0, c) / Relu6 become activation sites (`float_activations_to_sites` on a graph,
`quantize_model` on a module tree) whose lambda is then calibrated from data (`calibrate_clips`):
a high percentile of the site's activations, or the clip bound c when smaller. The compiler uses
this for post-training quantization (lossy: the conversion reports the gap), the trainer for the
first lambda of quantization-aware training.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable

import torch
from torch import Tensor, fx, nn

from ..errors import Ann2SnnError
from ..runtime.quant import QuantClippedActivation
from ..levels import levels_for_timesteps
from ..progress import progress_bar
from ..runtime.graph import conversion_report, finish, module_of
from .quantile import passes_needed, streaming_quantiles


def module_bounds(module: nn.Module | None) -> tuple[float, float] | None:
    """(low, high) of a clamp module: nn.ReLU (0, inf), nn.Hardtanh and nn.ReLU6 (min, max); None
    for any other module."""
    if isinstance(module, nn.ReLU):
        return 0.0, math.inf
    if isinstance(module, nn.Hardtanh):   # nn.ReLU6 is Hardtanh(0, 6)
        return float(module.min_val), float(module.max_val)
    return None


def _bound(gm: fx.GraphModule, value: object, rank: int | None, default: float) -> float | Tensor | None:
    """A clamp bound as a float or a per-channel vector; None when it is neither."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    if not (isinstance(value, fx.Node) and value.op == "get_attr" and rank is not None):
        return None
    tensor = getattr(gm, value.target).detach()
    if tensor.numel() == 1:
        return float(tensor.reshape(()))
    channel = 1 - (rank - tensor.dim())  # numpy broadcasting aligns the trailing dimensions
    sizes = [size for k, size in enumerate(tensor.shape) if k != channel]
    if channel < 0 or any(size != 1 for size in sizes):
        return None  # varies along a spatial dimension
    return tensor.reshape(-1)


def clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float | Tensor, float | Tensor] | None:
    """(low, high) of a clamp node: a clamp module, torch.relu / F.relu, or torch.clamp with bounds
    that are numbers or per-channel constants; None for any other node. What the passes, the
    importer's sites and `ann2snn.train.prepare` know of ReLU-like ops, said once."""
    bounds = module_bounds(module_of(gm, node))
    if bounds is not None:
        return bounds
    if node.op == "call_function" and node.target in (torch.relu, nn.functional.relu):
        return 0.0, math.inf
    if node.op == "call_function" and node.target is torch.clamp:
        rank = node.meta.get("rank")
        low = _bound(gm, node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None), rank, -math.inf)
        high = _bound(gm, node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None), rank, math.inf)
        if low is not None and high is not None:
            return low, high
    return None


def clip_bound(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """inf for a ReLU, c for Clip(0, c) / ReLU6 / Hardtanh(0, c), as a module or a function call;
    None when the node is no float ReLU-like site (another lower bound, or per-channel bounds)."""
    bounds = clamp_bounds(gm, node)
    if bounds is None or any(isinstance(b, Tensor) for b in bounds) or bounds[0] != 0:
        return None
    return bounds[1]


def float_activations_to_sites(gm: fx.GraphModule, timesteps: int) -> fx.GraphModule:
    """Replace each float ReLU-like node by a QuantClippedActivation with L = 2^T - 1.

    The clip starts at the op's own bound (inf for ReLU); calibrate_sites sets it from data.
    """
    report = conversion_report(gm)
    for node in list(gm.graph.nodes):
        bound = clip_bound(gm, node)
        if bound is None:
            continue
        target = node.target if node.op == "call_module" else f"site_{node.name}"
        site = QuantClippedActivation(levels=levels_for_timesteps(timesteps), clip=bound)
        gm.add_submodule(target, site)
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        report.sites.setdefault(target, {})["source"] = {"kind": "float", "clip_bound": bound}
    return finish(gm)


def activation_sites(model: nn.Module) -> dict[str, QuantClippedActivation]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantClippedActivation)}


def first_tensor(model: nn.Module) -> Tensor:
    """A parameter or buffer of `model`, for its device and dtype (CPU float32 when it has none)."""
    return next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(()))


def module_clip_bound(module: nn.Module | None) -> float | Tensor | None:
    """The clip bound of a ReLU-like module: inf for nn.ReLU, c for nn.ReLU6 / nn.Hardtanh(0, c),
    lambda for a site; None for any other module (or None)."""
    if isinstance(module, QuantClippedActivation):
        return module.clip.detach()
    bounds = module_bounds(module)
    return bounds[1] if bounds is not None and bounds[0] == 0 else None


def _site_channels(model: nn.Module, modules: list[nn.Module], input_shape: tuple[int, ...]) -> dict[int, int]:
    """The channel count (dimension 1) each module sees, from one forward pass of a dummy batch."""
    channels: dict[int, int] = {}

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        channels[id(module)] = int(inputs[0].shape[1])

    handles = [m.register_forward_hook(record) for m in modules]
    param = first_tensor(model)
    was_training = model.training
    try:
        model.eval()  # batch statistics of a dummy batch must not touch BN's running averages
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return channels


def quantize_model(model: nn.Module, timesteps: int, per_channel: bool = False,
                   input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Replace every activation site (nn.ReLU, nn.ReLU6, nn.Hardtanh(0, c), QuantClippedActivation)
    of `model`, in place, by a QuantClippedActivation with L = 2^T - 1 levels.

    lambda starts at the source's bound: c for ReLU6 / Hardtanh, the old lambda of a site, and inf
    for a ReLU, which `calibrate_clips` must set before the site quantizes. `per_channel` gives
    each site one lambda per channel; the channel counts come from a forward pass of a dummy batch
    of `input_shape` (C, H, W), which per-channel sites therefore need.
    """
    levels = levels_for_timesteps(timesteps)
    targets = [(name, m) for name, m in model.named_modules() if name and module_clip_bound(m) is not None]
    channels: dict[int, int] = {}
    if per_channel:
        if input_shape is None:
            raise Ann2SnnError("per-channel quantization needs the input shape (C, H, W) to count channels")
        channels = _site_channels(model, [m for _, m in targets], tuple(input_shape))
    param = first_tensor(model)
    for name, module in targets:
        if per_channel and id(module) not in channels:
            raise Ann2SnnError(f"activation {name!r} is not called in the forward pass: cannot count its channels")
        site = QuantClippedActivation(levels=levels, channels=channels.get(id(module), 0))
        source = torch.as_tensor(module_clip_bound(module))
        with torch.no_grad():
            # A per-layer lambda broadcasts over the channels; per channel -> per layer keeps the widest.
            site.clip.copy_(source.max() if site.clip.dim() == 0 else source)
        model.set_submodule(name, site.to(param.device))
    return model


@torch.no_grad()
def calibrate_clips(model: nn.Module, loader: Iterable, percentile: float = 99.9, batches: int | None = 10,
                    names: Iterable[str] | None = None, progress: bool = False) -> dict[str, Tensor]:
    """Set each site's lambda to the `percentile` of its positive float activations (per channel for a
    per-channel site), capped at its current lambda (a ReLU6's 6; inf for a ReLU).

    Runs `model` in eval mode on `batches` batches of `loader` ((inputs, labels) pairs; None: all of
    it, which must then give the same batches each time it is iterated) with every site in float
    mode (quantize=False); `names` restricts which sites are set. The percentile is exact, in memory
    that does not grow with the data (quantile.py: a few passes over it). A channel that never
    fires takes its layer's value. Returns {site: lambda}.
    """
    sites = activation_sites(model)
    chosen = {n: sites[n] for n in (sites if names is None else names)}
    device = first_tensor(model).device
    data = loader if batches is None else list(itertools.islice(loader, batches))  # the same batches each pass
    seen: set[str] = set()
    rows = {n: s.clip.numel() if s.per_channel else 1 for n, s in chosen.items()}
    passes = max(map(passes_needed, rows.values()), default=0)
    bar = progress_bar(desc="calibration", enabled=progress,
                       total=passes * len(data) if hasattr(data, "__len__") else None)

    def one_pass(add) -> None:
        def record(name: str, site: QuantClippedActivation):
            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                z = inputs[0].detach()
                seen.add(name)
                add(name, z.transpose(0, 1).reshape(z.shape[1], -1) if site.per_channel else z.reshape(1, -1))
            return hook

        handles = [site.register_forward_hook(record(n, site)) for n, site in chosen.items()]
        try:
            for x, *_ in data:
                model(x.to(device))
                bar.update()
        finally:
            for h in handles:
                h.remove()

    modes = {n: s.quantize for n, s in sites.items()}
    was_training = model.training
    try:
        model.eval()
        for s in sites.values():
            s.quantize = False
        quantiles = streaming_quantiles(one_pass, rows, percentile / 100)
    finally:
        bar.close()
        model.train(was_training)
        for n, s in sites.items():
            s.quantize = modes[n]
    result = {}
    for name, site in chosen.items():
        if name not in seen:
            raise Ann2SnnError(f"calibration: site {name!r} saw no data")
        per_row, layer = quantiles[name]
        if torch.isnan(layer):
            raise Ann2SnnError(f"calibration: site {name!r} never had a positive input; cannot set its lambda")
        per_row = torch.where(torch.isnan(per_row), layer, per_row)
        lam = torch.minimum(per_row.reshape(site.clip.shape).to(site.clip), site.clip)
        site.clip.copy_(lam)
        result[name] = lam.detach().clone()
    return result
