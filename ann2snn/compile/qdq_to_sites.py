"""Pass: QDQ activation sites of an imported graph become QuantClippedActivation (docs/method.md section 1).

A QuantDequant with zero point 0 on a non-negative tensor is a quantized clipped ReLU; so is one
whose zero point is its qmin (onnxruntime's default int8 activations: zero point -128), whose
level q - zero_point is clamped at 0 by the quantizer itself:

    theta = scale,  lambda = the clip bound c (if c <= (qmax - zero_point) * scale) else
    (qmax - zero_point) * scale,  L = round(lambda / theta),  clip = L * theta  (clip / L == scale)

The tensor is non-negative when the QDQ sits behind a ReLU-like op (Relu, Clip(0, c) /
Hardtanh(0, c), torch.clamp(min=0[, max=c]), or a chain of these with Min(c)); the op and the QDQ
become one site. A QDQ whose zero point is its qmin (uint8 with zero point 0, int8 with -128) is
a clipped ReLU by itself, so it becomes a site even with nothing before it (onnxruntime's
quantizer drops the Relu in front of such a QDQ). Standard uint8 QDQ gives L = 255, T = 8; 16-bit
activations (uint16 with zero point 0, int16 with -32768: onnxruntime's A16W8) L = 65535, T = 16.

Rounding: ONNX QuantizeLinear rounds half to even; docs/method.md's q(z) = floor(z / theta + 1/2)
rounds half up. The two differ only where z / theta is exactly k + 1/2.

A QDQ whose input already lies on its grid (the output of a site or QDQ with the same scale,
zero point and range, directly or through MaxPool / Flatten / reshapes) is the identity: it is
removed. A QDQ on the output of a Softmax, LogSoftmax or Sigmoid (onnxruntime quantizes the
probabilities too) is part of the output head, not a site: it stays, and runs in float after the SNN.
Every other QuantDequant stays as it is.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, fx, nn

from ..ops import OUTPUT_OPS, VALUE_MOVING_FUNCTIONS, VALUE_MOVING_MODULES
from ..runtime.quant import QuantClippedActivation, QuantDequant
from .calibrate import clamp_bounds
from ..runtime.graph import conversion_report, finish, free_name, module_of

# Ops through which values stay on the grid of the quantizer before them.


def is_non_negative(root: nn.Module, node: fx.Node) -> bool:
    """`node` (of a graph whose modules `root` holds) is never negative: a ReLU-like clamp at 0 or
    above, or a QuantDequant whose zero point is its qmin (its levels start at 0)."""
    module = module_of(root, node)
    if isinstance(module, QuantDequant):
        return bool((module.zero_point <= module.qmin).all())
    bounds = clamp_bounds(root, node)
    return bounds is not None and bool(torch.as_tensor(bounds[0]).min() >= 0)


def _moves_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A max pool or a reshape: it selects or moves values without arithmetic, so it keeps a grid and
    commutes with a clamp (max(clamp(x)) = clamp(max(x)), a clamp being monotone)."""
    return isinstance(module_of(gm, node), VALUE_MOVING_MODULES) or (
        node.op == "call_function" and node.target in VALUE_MOVING_FUNCTIONS)


def _clamp_chain(gm: fx.GraphModule, qdq: fx.Node) -> tuple[list[fx.Node], float | Tensor, float | Tensor]:
    """The clamp ops before `qdq`, directly or behind max pools and reshapes (symmetric quantizers
    write Relu -> MaxPool -> Flatten -> QuantizeLinear), each used only by the next; their combined
    bounds."""
    chain, low, high = [], -math.inf, math.inf
    value = qdq.args[0]
    while isinstance(value, fx.Node) and len(value.users) == 1:
        bounds = clamp_bounds(gm, value)
        if bounds is None:
            if chain or not _moves_values(gm, value):
                break
            value = value.args[0]
            continue
        chain.append(value)
        low, high = _combine(max, torch.maximum, low, bounds[0]), _combine(min, torch.minimum, high, bounds[1])
        value = value.args[0]
    return chain, low, high


def _after_output_op(gm: fx.GraphModule, qdq: fx.Node) -> bool:
    """`qdq` quantizes the output of an output op (Softmax, ...), directly or behind reshapes and
    other QDQ pairs: values of the output head, which no neuron fires."""
    value = qdq.args[0]
    while isinstance(value, fx.Node) and (isinstance(module_of(gm, value), QuantDequant) or _moves_values(gm, value)):
        value = value.args[0]
    return isinstance(value, fx.Node) and isinstance(module_of(gm, value), OUTPUT_OPS)


def _combine(scalar_op, tensor_op, a, b):
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return tensor_op(torch.as_tensor(a), torch.as_tensor(b))
    return scalar_op(a, b)


def _exact_clip(scale: Tensor, levels: int) -> Tensor:
    """clip = levels * scale, nudged by ulps until clip / levels == scale in the tensor's dtype."""
    clip = scale * levels
    for _ in range(8):
        off = clip / levels - scale
        if not off.any():
            break
        clip = torch.where(off > 0, torch.nextafter(clip, torch.zeros_like(clip)),
                           torch.where(off < 0, torch.nextafter(clip, torch.full_like(clip, math.inf)), clip))
    return clip


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A clamp from below at 0 or lower and none from above: no change to values that are not negative."""
    bounds = clamp_bounds(gm, node)
    return bounds is not None and bool(torch.as_tensor(bounds[0]).max() <= 0) and bool(
        torch.as_tensor(bounds[1]).min() == math.inf)


def _grid(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple[Tensor, Tensor, int, int], list[fx.Node]] | None:
    """(scale, zero point, qmin, qmax) of the quantization grid `node`'s values lie on, if known; and
    the ReLUs passed on the way, which leave a grid without negative levels as it is (onnxruntime's
    QDQKeepRemovableActivations writes QuantizeLinear -> DequantizeLinear -> Relu -> QuantizeLinear)."""
    relus = []
    while isinstance(node, fx.Node):
        module = module_of(gm, node)
        if isinstance(module, QuantDequant):
            grid = module.scale, module.zero_point, module.qmin, module.qmax
        elif isinstance(module, QuantClippedActivation):
            grid = module.theta().detach().reshape(-1), torch.zeros(1), 0, module.levels
        elif _is_relu(gm, node):
            relus.append(node)
            node = node.args[0]
            continue
        elif _moves_values(gm, node):
            node = node.args[0]
            continue
        else:
            return None
        negative_levels = bool((grid[2] - grid[1] < 0).any())
        return None if relus and negative_levels else (grid, relus)
    return None


def _redundant(gm: fx.GraphModule, qdq: fx.Node, module: QuantDequant) -> list[fx.Node] | None:
    """For a QDQ pair on values already on its grid, the ReLUs before it that change nothing either
    (else None). On its grid: the same scale, and every level k of the grid (the integer q - zero
    point) inside its own range, so it gives back k * scale. A site's levels 0..L under an int8 pair
    with zero point -128 (levels 0..255) are; zero points need not match."""
    found = _grid(gm, qdq.args[0])
    if found is None or module.per_axis or module.zero_point.numel() != 1:
        return None
    (scale, zero_point, qmin, qmax), relus = found
    if scale.numel() != 1 or zero_point.numel() != 1 or not torch.equal(scale.to(module.scale.dtype), module.scale):
        return None
    grid_zero, own_zero = int(zero_point.reshape(-1)[0]), int(module.zero_point.reshape(-1)[0])
    fits = module.qmin - own_zero <= qmin - grid_zero and qmax - grid_zero <= module.qmax - own_zero
    return relus if fits else None


def _merge_duplicate_pairs(gm: fx.GraphModule, report: dict) -> None:
    """One QDQ pair per tensor and grid: onnxruntime's DedicatedQDQPair gives each consumer a copy of
    its own, which would become as many sites firing the same spikes."""
    first: dict[tuple, fx.Node] = {}
    for node in list(gm.graph.nodes):
        module = module_of(gm, node)
        if not isinstance(module, QuantDequant):
            continue
        key = (node.args[0], module.qmin, module.qmax, module.axis, tuple(module.scale.tolist()),
               tuple(module.zero_point.tolist()))
        if key not in first:
            first[key] = node
            continue
        node.replace_all_uses_with(first[key])
        gm.graph.erase_node(node)
        report.rewrites.append({"pass": "qdq_to_sites", "merged_duplicate_qdq": node.target,
                                "into": first[key].target})


def qdq_to_sites(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[dict]]:
    """Replace ReLU-like QDQ patterns by QuantClippedActivation sites; return the graph and a report.

    Each report entry: site (module name), scale, levels, clip, channels (0: per layer), sources (the
    ONNX nodes it replaces) and clip_bound (the Clip / Min bound that set lambda, else None).
    """
    report = conversion_report(gm)
    _merge_duplicate_pairs(gm, report)
    sites: list[dict] = []
    for qdq in list(gm.graph.nodes):
        module = module_of(gm, qdq)
        if not isinstance(module, QuantDequant):
            continue
        relus = _redundant(gm, qdq, module)
        if relus is not None:
            for identity in [qdq, *relus]:
                identity.replace_all_uses_with(identity.args[0])
                gm.graph.erase_node(identity)
            report.rewrites.append({"pass": "qdq_to_sites", "removed_identity_qdq": qdq.target,
                                    **({"removed_identity_relus": [r.name for r in relus]} if relus else {})})
            continue
        if _after_output_op(gm, qdq):
            continue   # probabilities of the output head: kept, run in float after the SNN
        zero = module.zero_point
        if (module.per_axis and module.axis != 1) or not bool((zero == zero.reshape(-1)[0]).all()):
            continue
        zero = int(zero.reshape(-1)[0])
        chain, low, high = _clamp_chain(gm, qdq)
        if chain and bool(torch.as_tensor(low).ne(0).any()):
            chain, high = [], math.inf  # not ReLU-like: only the QDQ itself can be the site
        if not chain and module.qmin != zero:
            continue  # a zero point inside the range with no ReLU before it: negative levels
        # behind a ReLU the integers start at the zero point, whatever it is: levels 0 .. qmax - zero
        scale = module.scale
        lam_max = (module.qmax - zero) * scale
        bound = torch.as_tensor(high, dtype=scale.dtype)
        if bound.numel() > 1 and (not module.per_axis or bound.numel() != scale.numel()):
            continue  # per-channel bounds need a per-channel QDQ
        clip = torch.where(bound <= lam_max, bound, lam_max)
        levels_per_channel = torch.round(clip / scale)
        levels = int(levels_per_channel.max().item())
        if not torch.all(levels_per_channel == levels) or levels < 1:
            continue  # per-channel clip bounds with different level counts: keep the QDQ
        channels = scale.numel() if module.per_axis else 0
        site = QuantClippedActivation(levels=levels, clip=1.0, channels=channels).to(scale.dtype)
        site.clip.data = _exact_clip(scale if channels else scale.reshape(()), levels)
        named_after = chain[-1].target if chain and chain[-1].op == "call_module" else qdq.target
        for clamp in chain:   # the site clamps; any pools and reshapes between commute with it
            clamp.replace_all_uses_with(clamp.args[0])
        source = qdq.args[0]
        target = free_name(gm, f"{named_after}_site")
        gm.add_submodule(target, site)
        with gm.graph.inserting_after(qdq):
            replacement = gm.graph.call_module(target, (source,))
        replacement.meta.update(qdq.meta)
        qdq.replace_all_uses_with(replacement)
        sources = [n.meta.get("onnx_node", n.name) for n in reversed(chain)] + qdq.meta.get("onnx_nodes", [qdq.name])
        for node in [qdq, *chain]:
            gm.graph.erase_node(node)
        entry = {"site": target, "scale": scale.tolist() if channels else scale.item(), "zero_point": zero,
                 "levels": levels,
                 "clip": site.clip.detach().tolist(), "channels": channels, "sources": sources,
                 "clip_bound": bound.tolist() if bool((bound <= lam_max).all()) else None}
        sites.append(entry)
    return finish(gm), sites
