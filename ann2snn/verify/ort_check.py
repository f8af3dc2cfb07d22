"""The SNN against onnxruntime, level by level, every difference explained.

onnxruntime runs the QDQ file in float32 with the integer output of every QuantizeLinear read
back as an extra graph output: its level at every activation site (and at every QDQ pair the
compiler kept, such as the input's or the logits'). The SNN's levels are those its time-folded
evaluation fires (and its kept QDQ pairs' integers); the exactness gate (ann2snn/verify/gate.py) has
already shown them equal to the simulation's in float64. Where they differ, the difference must be one
of these, or the comparison fails:

- tie: the source's float64 ratio z / theta lies exactly halfway between two levels; ONNX rounds
  half to even, docs/method.md's q() rounds half up;
- near boundary: the ratio lies within float32's accumulation error of a rounding boundary. The
  error is bounded per element by running the source graph once more and propagating a bound:
  a convolution or linear layer of fan-in n adds (n + 2) u times the sum of |w x| (u = 2^-24)
  and passes |W| times its input's bound on; sums, pools and layout ops pass bounds on; a site
  whose level agrees resets it; an op of the output head (a QDQ pair after a Softmax is compared
  too) spreads its input's bound B (the row's largest) as its derivative does: Softmax by a factor
  e^(2B) - 1 of its output, LogSoftmax by 2B, Sigmoid by B / 4, and adds twice its own roundings
  (u per subtraction, sum term and division, u |z - max z| where exp reads a rounded argument, 8 u
  for exp and log themselves);
- downstream: the sample already differed at an earlier site, which changes what follows.

A QOperator file (QLinearConv, QLinearAdd, ...: ann2snn/frontend/qoperator.py) is imported as its QDQ
meaning, and onnxruntime computes each of its nodes with an integer kernel instead: the bound is
then the sum of two parts. The source's part, between the float64 ratio and the exact value of the
integer op: its weights and bias dequantized to float32 (at most 2 u |w x| per product with Gemm's
alpha folded in; 4 u |b|: a scale of up to three factors, the int32 bias and the product), its
inputs levels times theta, exact, and float64's sum, under u (sum |w x| + |b|) for a fan-in below
2^29: a layer that a QOperator node computes adds 5 u (sum |w x| + |b|), not (n + 2) u, as
onnxruntime sums integers exactly. And the kernel's part, between that exact value and the one
onnxruntime rounds, derived for each op from its x86 kernel (qoperator.KernelError): u (c m + c0)
with m = |f|(|x|) / scale, the magnitude of the op.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .gate import moved_pools, pool_moved_sites, run_recording
from ..runtime.evaluator import TimeFoldedNeuron
from ..runtime.neuron import BitSerialIFNode
from ..ops import (AVERAGE_POOLS, FUNCTION_OPS, LAYERS, MAX_POOLS, METHOD_KINDS, NORMS, OUTPUT_OPS, STRUCTURAL,
                  functions_of)
from ..frontend.qoperator import KernelError, expand_qoperator, kernel_errors
from ..levels import channel_view
from ..runtime.quant import QuantClippedActivation, QuantDequant
from .ort_run import OnnxruntimeRunner
from ..runtime.memory import activation_profile
from ..runtime.snn import SNN

UNIT_ROUNDOFF = 2.0**-24   # float32
_INTEGER_LAYER = 5   # the source's roundings of a layer that onnxruntime sums in integers (module docstring)
# Ops f with |f(x)| <= f(|x|) (and f(|x|) >= every partial sum of |x| they form): the magnitude rule
_POSITIVE_MODULES = AVERAGE_POOLS + MAX_POOLS + STRUCTURAL
_POSITIVE_FUNCTIONS = functions_of("structural", "average_pool", "matmul")
_SUMS = functions_of("add")
_SCALES = functions_of("scale")


@dataclass
class SiteLevels:
    compared: int
    equal: int
    ties: int
    near_boundary: int
    downstream: int
    unexplained: int


@dataclass
class OnnxruntimeComparison:
    samples: int
    sites: dict[str, SiteLevels]
    predictions_equal: int
    predictions_explained: int     # differing predictions of samples with an explained level difference
    passed: bool

    def totals(self) -> dict[str, int]:
        keys = ("compared", "equal", "ties", "near_boundary", "downstream", "unexplained")
        return {k: sum(getattr(s, k) for s in self.sites.values()) for k in keys}

    def to_json(self) -> dict:
        return {**asdict(self), "totals": self.totals()}


class _ErrorBound(fx.Interpreter):
    """Runs the source graph in float64 and bounds, per element, how far a float32 run of the same
    graph on the same inputs can be from it (module docstring). Records, at every site and kept
    QDQ pair, the ratio z / theta of its input and the bound on that ratio."""

    def __init__(self, gm: fx.GraphModule, overrides: dict[str, Tensor],
                 kernels: dict[str, KernelError] | None = None) -> None:
        super().__init__(gm)
        self.overrides = overrides
        self.kernels = kernels or {}   # site or kept QDQ -> the error of onnxruntime's QOperator kernel there
        # the ops in front of each such site, back to exact values: their magnitudes (|f|(|x|), taken
        # while their inputs are still held)
        self.magnitudes: dict[fx.Node, Tensor | None] = {}
        cone = [n.args[0] for n in gm.graph.nodes
                if n.op == "call_module" and n.target in self.kernels and self.kernels[n.target].per_magnitude]
        while cone:
            node = cone.pop()
            if isinstance(node, fx.Node) and node not in self.magnitudes and not self._exact(node):
                self.magnitudes[node] = None
                cone.extend(node.all_input_nodes)
        self.bound: dict[fx.Node, Any] = {}
        self.ratios: dict[str, tuple[Tensor, Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.bound[n] = self._bound(n, value)
        if n in self.magnitudes:
            self.magnitudes[n] = self._magnitude(n, value)
        for used in self.user_to_last_uses.get(n, []):   # as the Interpreter frees its values: bounded memory
            self.bound.pop(used, None)
            if used in self.magnitudes:
                self.magnitudes[used] = None
        if (n.target if n.op == "call_module" else n.name) in self.overrides:
            # the SNN's own levels from here on: a flip upstream, where the SNN and onnxruntime agree
            # but both differ from float64, must not move the ratios that explain later sites
            value = self.overrides[n.target].to(value.dtype).reshape(value.shape)
        return value

    def _arg_bound(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda node: self.bound[node])

    def _bound(self, n: fx.Node, value: Any) -> Any:
        if not isinstance(value, Tensor) or not value.is_floating_point():
            return value                                   # shapes, sizes: exact
        if n.op in ("placeholder", "get_attr"):
            return torch.zeros_like(value)
        rounding = UNIT_ROUNDOFF * value.abs()
        inputs = [a for a in n.args if isinstance(a, fx.Node)]
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            x, bound_in = self.env[inputs[0]], self.bound[inputs[0]]
            if isinstance(module, (QuantClippedActivation, QuantDequant)):
                self._record(n, module, x, bound_in)
                return rounding                            # a level that agrees: exact again
            if isinstance(module, LAYERS):
                return self._layer(n, module, x, bound_in)
            if isinstance(module, NORMS):
                scale = module.weight / torch.sqrt(module.running_var + module.eps)
                return channel_view(scale.abs(), value.dim()) * bound_in + 2 * rounding
            if isinstance(module, AVERAGE_POOLS):
                return module(bound_in) + 4 * rounding
            if isinstance(module, OUTPUT_OPS):
                return _output_op_bound(module, x, bound_in, value)
            return module(bound_in)                        # max pools, flatten, identity, dropout
        if n.op == "call_function" and n.target in _SUMS:
            return sum(self.bound[a] for a in inputs) + rounding
        if n.op == "call_function" and n.target in _SCALES:
            if len(n.args) == 1:                           # a negation: exact
                return self.bound[n.args[0]]
            if isinstance(n.args[0], fx.Node) and not isinstance(n.args[1], fx.Node):
                return n.target(self.bound[n.args[0]], abs(n.args[1])) + rounding   # the bound times or over |c|
            return torch.full_like(value, float("inf"))    # a product of two tensors: not bounded here
        if n.op in ("call_function", "call_method"):       # layout, pooling, mean: the op on the bounds
            fn = getattr(torch.Tensor, n.target) if n.op == "call_method" else n.target
            bounded = fn(*self._arg_bound(n.args), **self._arg_bound(n.kwargs))
            kind = METHOD_KINDS.get(n.target) if n.op == "call_method" else getattr(FUNCTION_OPS.get(fn), "kind", None)
            if isinstance(bounded, Tensor) and bounded.shape == value.shape:
                return bounded.abs() + (4 * rounding if kind == "average_pool" else 0)
        return torch.full_like(value, float("nan"))      # an op this bound does not know: NaN explains nothing

    def _layer(self, n: fx.Node, layer: nn.Module, x: Tensor, bound_in: Tensor) -> Tensor:
        # a QOperator layer (its output rounded by a kernel site): onnxruntime sums integers exactly,
        # so only the source's own error counts, 5 u (sum |w x| + |b|) (module docstring)
        roundings = _INTEGER_LAYER if n in self.magnitudes else layer.weight[0].numel() + 2
        magnitude = _abs_layer(layer, x.abs(), with_bias=True)
        return roundings * UNIT_ROUNDOFF * magnitude + _abs_layer(layer, bound_in, with_bias=False)

    def _exact(self, n: fx.Node) -> bool:
        """A dequantized level (a site's or a kept QDQ's output) or a constant: no rounding of its own."""
        return n.op in ("placeholder", "get_attr") or (n.op == "call_module" and isinstance(
            self.module.get_submodule(n.target), (QuantClippedActivation, QuantDequant)))

    def _magnitude(self, n: fx.Node, value: Tensor) -> Tensor:
        """|f|(|x|): the op at `n` on the magnitudes of its inputs (|x| for an exact one) and |W|; it
        bounds |f(x)| and every partial sum that a kernel rounds, for the linear ops QOperator nodes
        expand to. An op it does not know gives NaN: no bound, so no difference there is explained."""
        def of(a: fx.Node) -> Any:
            held = self.env[a]
            return self.magnitudes[a] if a in self.magnitudes else held.abs() if isinstance(held, Tensor) else held

        absolute = fx.node.map_arg((n.args, n.kwargs), of)
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            if isinstance(module, LAYERS):
                return _abs_layer(module, absolute[0][0], with_bias=True)
            if isinstance(module, _POSITIVE_MODULES):
                return module(absolute[0][0])
        if n.op == "call_function":
            operands = [abs(a) if isinstance(a, (int, float)) else a for a in absolute[0]]
            if n.target in _SUMS:
                return sum(operands, torch.zeros_like(value))
            if n.target in _SCALES:
                return n.target(*operands)
            if n.target in _POSITIVE_FUNCTIONS:
                return n.target(*absolute[0], **absolute[1])
        return torch.full_like(value, float("nan"))

    def _record(self, n: fx.Node, module: nn.Module, x: Tensor, bound_in: Tensor) -> None:
        if isinstance(module, QuantClippedActivation):
            theta = channel_view(module.theta().detach().to(x.dtype), x.dim())
        else:
            shape = [1] * x.dim()
            if module.per_axis:
                shape[module.axis] = -1
            theta = module.scale.to(x.dtype).reshape(shape)
        ratio = x / theta
        bound = bound_in / theta + 4 * UNIT_ROUNDOFF * ratio.abs()
        kernel = self.kernels.get(n.target)
        if kernel is not None:   # onnxruntime's integer kernel rounds a value of its own (module docstring)
            if kernel.per_magnitude:
                magnitude = self.magnitudes[n.args[0]] + bound_in   # + bound_in: |exact| <= |source| + its error
                bound = bound + kernel.per_magnitude * UNIT_ROUNDOFF * magnitude / theta
            bound = bound + kernel.constant * UNIT_ROUNDOFF
        self.ratios[n.target] = (ratio, bound)


def quantize_outputs(path: str, source_graph: fx.GraphModule,
                      snn: SNN) -> tuple[dict[str, str], dict[str, KernelError]]:
    """Module name -> the ONNX tensor that holds its integer levels (a QuantizeLinear's output, or a
    QOperator node's); and module name -> the error of the QOperator kernel that computes them."""
    from ..frontend.reader import load_checked

    original = load_checked(path, load_external_data=False)
    # a QOperator node is imported as a QuantizeLinear of its own name and output (qoperator.py)
    produced_by = {node.name: node.output[0] for node in expand_qoperator(original, str(path))[0].graph.node}
    names = {}
    for site, entry in snn.report.sites.items():
        sources = entry.get("source", {}).get("sources") if isinstance(entry.get("source"), dict) else None
        if entry.get("source", {}).get("kind") == "qdq" and sources and len(sources) >= 2:
            names[site] = produced_by[sources[-2]]
    for node in source_graph.graph.nodes:
        if node.op == "call_module" and isinstance(source_graph.get_submodule(node.target), QuantDequant):
            names[node.target] = produced_by[node.meta["onnx_nodes"][0]]
    errors = kernel_errors(original)
    return names, {module: errors[tensor] for module, tensor in names.items() if tensor in errors}


def _snn_levels(snn: SNN, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The evaluation's logits, and the level of every neuron and the integer of every QDQ pair the
    SNN kept, from that same run (one mode for all: in float32 the simulation may fire a rare
    level apart, and a later layer must be compared with the levels it was fed)."""
    def neuron_level(m: TimeFoldedNeuron, out) -> Tensor:
        value = out[0]
        return torch.round(value / channel_view(m.neuron.theta.to(value.dtype), value.dim()))

    def qdq_integer(m: QuantDequant, out: Tensor) -> Tensor:
        return torch.round(out / m._view(m.scale, out)) + m._view(m.zero_point, out)

    rules = {TimeFoldedNeuron: neuron_level, QuantDequant: qdq_integer}
    modules = {name: m for name, m in snn._lowered_graph("evaluate").named_modules() if type(m) in rules}
    with snn.using_backend("float"):   # the levels of the float graph, whose modules are recorded
        output, recorded = run_recording(lambda inputs: snn.evaluate(inputs, cuda_graph=False), modules,
                                         lambda m, out: rules[type(m)](m, out), x)
    return output.logits, recorded


class LevelComparison:
    """`compare_with_onnxruntime` over batches: one onnxruntime session and one float64 source
    (`source64`, run, never modified) for every batch; `add` compares a batch and returns the SNN's
    and onnxruntime's logits for it, `result()` says what all batches showed."""

    def __init__(self, path: str, snn: SNN, source_graph: fx.GraphModule, source64: fx.GraphModule) -> None:
        names, self.kernels = quantize_outputs(path, source_graph, snn)
        self.order = list(names)
        self.run_onnxruntime = OnnxruntimeRunner(path, [names[k] for k in self.order])
        # a site's level is its integer less its zero point (0, or qmin); a kept pair compares its integer
        self.zero = {site: entry["source"].get("zero_point", 0) for site, entry in snn.report.sites.items()
                     if isinstance(entry.get("source"), dict)}
        self.snn, self.source_graph, self.source64 = snn, source_graph, source64
        self.sites = {name: SiteLevels(0, 0, 0, 0, 0, 0) for name in graph_order(snn)}
        self.samples = self.predictions_equal = self.explained = self.unexplained_predictions = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> tuple[Tensor, Tensor]:
        snn = self.snn
        ort_logits, *ort_tensors = self.run_onnxruntime(x)
        ort_levels = pool_moved_sites(snn, {k: t.double() - self.zero.get(k, 0) for k, t in zip(self.order, ort_tensors)})
        logits, mine = _snn_levels(snn, x.to(next(snn.parameters()).dtype))
        explainer = _ErrorBound(self.source64, _snn_values(self.source_graph, snn, mine), self.kernels)
        explainer.run(x.double())
        ratios = explainer.ratios
        del explainer
        for site, pool in moved_pools(snn).items():   # a moved pool: the neuron sees the pooled ratio
            if site in ratios:
                ratios[site] = tuple(pool(t) for t in ratios[site])
        differed = torch.zeros(len(x), dtype=torch.bool)   # samples with a difference at an earlier site
        for name in [n for n in self.sites if n in ort_levels and n in mine]:
            got, want = mine[name].double(), ort_levels[name].reshape(mine[name].shape)
            differ = got != want
            ratio, bound = ratios.pop(name)
            boundary = torch.floor(ratio) + 0.5
            tie = differ & (ratio == boundary)
            near = differ & ~tie & ((ratio - boundary).abs() <= bound)
            sample_of = differ.flatten(1) if differ.dim() > 1 else differ[:, None]
            downstream = differ & ~tie & ~near & channel_view(differed, differ.dim(), 0).expand_as(differ)
            unexplained = differ & ~tie & ~near & ~downstream
            counts = (got.numel(), int((~differ).sum()), int(tie.sum()), int(near.sum()), int(downstream.sum()),
                      int(unexplained.sum()))
            site = self.sites[name]
            for field, count in zip(("compared", "equal", "ties", "near_boundary", "downstream", "unexplained"), counts):
                setattr(site, field, getattr(site, field) + count)
            differed |= sample_of.any(1)
        # one row per sample, whatever the output's rank (an (N, C, H, W) output too), as verify.py compares
        predictions = logits.reshape(len(x), -1).argmax(1) == ort_logits.reshape(len(x), -1).argmax(1)
        self.samples += len(x)
        self.predictions_equal += int(predictions.sum())
        self.explained += int((~predictions & differed).sum())
        self.unexplained_predictions += int((~predictions & ~differed).sum())
        return logits, ort_logits

    def result(self) -> OnnxruntimeComparison:
        sites = {name: site for name, site in self.sites.items() if site.compared}
        passed = all(s.unexplained == 0 for s in sites.values()) and self.unexplained_predictions == 0
        return OnnxruntimeComparison(self.samples, sites, self.predictions_equal, self.explained, passed)


# The level comparison holds about this many bytes per activation of a sample: onnxruntime's
# float32 outputs of every site, the float64 ratios and bounds of the explanation.
COMPARISON_BYTES = 32


@torch.no_grad()
def compare_with_onnxruntime(path: str, snn: SNN, source_graph: fx.GraphModule,
                             x: Tensor) -> tuple[OnnxruntimeComparison, Tensor]:
    """Levels of onnxruntime's run of the QDQ file `path` against the SNN's, on inputs `x` (in
    batches: LevelComparison); and onnxruntime's logits."""
    source64 = copy.deepcopy(source_graph).double().eval()
    comparison = LevelComparison(path, snn, source_graph, source64)
    batch = activation_profile(source64, tuple(x.shape[1:]), torch.float64).batch(COMPARISON_BYTES, held="total")
    ort_logits = torch.cat([comparison.add(chunk)[1] for chunk in x.split(batch)])
    return comparison.result(), ort_logits


def _output_op_bound(module: nn.Module, z: Tensor, bound_in: Tensor, y: Tensor) -> Tensor:
    """The bound after an output op y = f(z) of the output head (module docstring)."""
    u = UNIT_ROUNDOFF
    if not hasattr(module, "dim"):   # Sigmoid: f' = y (1 - y) <= 1/4; exp(-z) reads -z exactly
        return bound_in / 4 + 2 * u * (y * (1 - y) * (z.abs() + 8) + 2 * y)
    dim = module.dim
    spread = bound_in.amax(dim, keepdim=True)
    shifted = (z - z.amax(dim, keepdim=True)).abs()
    # the row's exp terms and their sum: their largest rounding, n terms summed, exp's own 8 u
    row = shifted.amax(dim, keepdim=True) + z.shape[dim] + 8
    if isinstance(module, nn.Softmax):   # y_i e^(d_i) / sum_j y_j e^(d_j), |d| <= B; and a division
        return y * (torch.expm1(2 * spread) + 2 * u * (shifted + row + 9))
    # LogSoftmax: (z_i - max) - log(sum), |log(sum)| <= |z_i - max| + |y_i|
    return 2 * spread + 2 * u * (2 * shifted + 2 * y.abs() + row + 9)


def _abs_layer(layer: nn.Module, x: Tensor, with_bias: bool) -> Tensor:
    """The layer with |W| (and |b|) on `x`, a non-negative tensor."""
    weight = layer.weight.abs()
    out = F.linear(x, weight) if isinstance(layer, nn.Linear) else layer._conv_forward(x, weight, None)
    if with_bias and layer.bias is not None:
        out = out + channel_view(layer.bias.abs(), out.dim())
    return out


def _snn_values(source_graph: fx.GraphModule, snn: SNN, levels: dict[str, Tensor]) -> dict[str, Tensor]:
    """Source node -> the value the SNN passes on there (float64): a site's level times theta (at
    its MaxPool when the compiler moved the pool before it), a kept QDQ pair's dequantized value."""
    moved = {r["site"]: r["max_pool"] for r in snn.report.rewrites
             if r.get("pass") == "move_max_pool_before_sites" and "site" in r}
    values = {}
    for name, level in levels.items():
        module = source_graph.get_submodule(name)
        level = level.double()
        if isinstance(module, QuantClippedActivation):
            values[moved.get(name, name)] = level * channel_view(module.theta().detach().double(), level.dim())
        else:
            values[name] = (level - module._view(module.zero_point, level)) * module._view(module.scale, level)
    return values


def graph_order(snn: SNN) -> list[str]:
    return [n.target for n in snn.graph_module.graph.nodes if n.op == "call_module"
            and isinstance(snn.graph_module.get_submodule(n.target), (BitSerialIFNode, QuantDequant))]
