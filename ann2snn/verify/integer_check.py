"""Verification of an integer SNN (issue 27): its two ways of running agree bit for bit, and its
levels are compared with the float SNN of the same graph (the gate) and with onnxruntime's default
session, whose int8 kernels run the same file (reported).

Against each, every difference is explained per op, or counted as unexplained. The reference's
integer at every site (the float SNN's level; onnxruntime's QuantizeLinear output, read back as an
extra graph output) is compared with the integer SNN's, in graph order, sample by sample:
Against onnxruntime's default session every difference is explained per op, or counted as
unexplained. The session's integer at every site (each QuantizeLinear's output, read back as an
extra graph output) is compared with the integer SNN's, in graph order, sample by sample:
- rounding: the two differ by one, and the real value both round (runtime/integer_values.py:
  exact_value, in float64 from the site's integers) lies within the bound of a float32 evaluation
  of the boundary between them: REQUANTIZATION_ROUNDINGS roundoffs of its terms' magnitude, and
  for a layer's accumulator the (n + 2) roundoffs of sum |w x| + |b| of a float32 convolution of
  fan-in n. The integer SNN rounds the QDQ graph as written with exact accumulators; the float SNN
  rounds its float32 convolutions' sums; onnxruntime's default session rounds the same value its
  own way: fused int8 kernels (QLinearConv, QLinearAdd, ...) with their own float32 multipliers,
  or a float32 convolution where it does not fuse;
- downstream: the sample differed at an earlier site, which changes what follows;
- unexplained: anything else (a level two apart, or far from a boundary).
The logits of a sample whose every site agreed may still differ where a float output layer or
head sums in float32 in its own order: within OUTPUT_UNITS roundoffs of the row's largest |logit|
that is output rounding, else unexplained.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, fx

from ..data.inputs import Samples
from ..frontend.qoperator import expand_qoperator
from ..frontend.reader import load_checked
from ..progress import progress_bar
from ..runtime.integer_snn import IntegerProgram
from ..runtime.integer_values import UNIT_ROUNDOFF
from ..runtime.memory import activation_profile
from ..runtime.snn import SNN
from .gate import max_abs, moved_pools
from .ort_check import _snn_levels, graph_order, quantize_outputs
from .ort_run import OnnxruntimeRunner

# a float32 output layer of fan-in up to 4096: (n + 2) roundoffs of the row's magnitude
OUTPUT_UNITS = 4098
# bytes per activation element of a sample that the comparisons hold: onnxruntime's integers of
# every site (its int8 / uint8 outputs) and the float SNN's levels (float32) ...
EXPLANATION_BYTES = 6
# ... and, at the site being compared, float64 values, bounds and magnitudes and their int64 levels
SITE_BYTES = 64
# ops through which a site's QuantizeLinear is still the output of the op before them
_PASSING = {"Relu", "Clip", "Identity", "Flatten", "Reshape"}


def _agreement(count: int, samples: int) -> float:
    return count / max(samples, 1)


def _ops_before(path: str | os.PathLike, tensors: list[str]) -> dict[str, str]:
    """Each QuantizeLinear output tensor -> the ops that produce its input, e.g. "Conv+Relu" (the
    node onnxruntime's default session fuses with it)."""
    model = expand_qoperator(load_checked(path, load_external_data=False), str(path))[0]
    producer = {out: node for node in model.graph.node for out in node.output}
    ops = {}
    for tensor in tensors:
        chain, node = [], producer.get(producer[tensor].input[0]) if tensor in producer else None
        while node is not None and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            chain.insert(0, node.op_type)
            node = producer.get(node.input[0]) if node.op_type in _PASSING and node.input else None
        ops[tensor] = "+".join(chain) or "input"
    return ops


def classify(mine: Tensor, theirs: Tensor, value: tuple[Tensor, Tensor] | None,
             differed: Tensor) -> tuple[dict[str, int], Tensor]:
    """One site's integers [N, ...] against onnxruntime's: the counts of the module docstring's
    cases, and where they differ. value: (the real value both round, the bound of a float32
    evaluation of it), or None (every difference then unexplained unless downstream); differed [N]:
    the samples that differed at an earlier site."""
    differ = mine != theirs
    downstream = differ & differed.reshape(-1, *[1] * (differ.dim() - 1))
    rounding = torch.zeros_like(differ)
    if value is not None:
        real, bound = value
        boundary = torch.minimum(mine, theirs).to(torch.float64) + 0.5
        rounding = differ & ~downstream & ((mine - theirs).abs() == 1) & ((real - boundary).abs() <= bound)
    counts = {"compared": differ.numel(), "equal": int((~differ).sum()), "rounding": int(rounding.sum()),
              "downstream": int(downstream.sum()), "unexplained": int((differ & ~downstream & ~rounding).sum())}
    return counts, differ


class SiteTally:
    """The counts of one comparison of the integer SNN with a reference, per site and for the logits
    (module docstring), over batches: `start` a batch, `site` each site in graph order, `logits`."""

    def __init__(self, ops: dict[str, str]) -> None:
        self.sites = {site: {"op": op, "compared": 0, "equal": 0, "rounding": 0, "downstream": 0, "unexplained": 0}
                      for site, op in ops.items()}
        self.counts = {"equal": 0, "after_level_difference": 0, "output_rounding": 0, "unexplained": 0}

    def start(self, samples: int) -> None:
        self.differed = torch.zeros(samples, dtype=torch.bool)

    def site(self, site: str, mine: Tensor, theirs: Tensor, value: tuple[Tensor, Tensor] | None) -> None:
        counts, differ = classify(mine, theirs.reshape(mine.shape), value, self.differed)
        for key, count in counts.items():
            self.sites[site][key] += count
        self.differed |= differ.reshape(len(differ), -1).any(1)

    def logits(self, mine: Tensor, theirs: Tensor) -> None:
        """Rows [N, ...]: equal, after a level difference, output rounding (within OUTPUT_UNITS
        roundoffs of the row's largest |logit|), or unexplained."""
        mine, theirs = mine.reshape(len(mine), -1), theirs.to(mine.dtype).reshape(len(mine), -1)
        equal = (mine == theirs).all(1)
        largest = torch.maximum(mine.abs().amax(1), theirs.abs().amax(1)).to(torch.float64)
        close = (mine - theirs).abs().amax(1).to(torch.float64) <= OUTPUT_UNITS * UNIT_ROUNDOFF * largest
        self.counts["equal"] += int(equal.sum())
        self.counts["after_level_difference"] += int((~equal & self.differed).sum())
        self.counts["output_rounding"] += int((~equal & ~self.differed & close).sum())
        self.counts["unexplained"] += int((~equal & ~self.differed & ~close).sum())

    def result(self) -> dict:
        sites = {site: counts for site, counts in self.sites.items() if counts["compared"]}
        explained = self.counts["unexplained"] == 0 and all(c["unexplained"] == 0 for c in sites.values())
        return {"sites": sites, "logits": dict(self.counts), "explained": explained}


class IntegerComparison:
    """The integer SNN, observed site by site (IntegerProgram(observe=)), against onnxruntime's default
    session and against the float SNN of the same graph (module docstring), one run of each a batch."""

    def __init__(self, path: str | os.PathLike, snn: SNN, source_graph: fx.GraphModule | None = None) -> None:
        # the kept QDQ pairs' ONNX nodes are in the imported graph's node meta (a loaded artifact's
        # graph has none: `source_graph`, the file imported again, then has them)
        names, _ = quantize_outputs(str(path), snn.graph_module if source_graph is None else source_graph, snn)
        self.order = [site for site in graph_order(snn) if site in names]
        self.runner = OnnxruntimeRunner(path, [names[site] for site in self.order], integer_kernels=True)
        ops = _ops_before(path, [names[site] for site in self.order])
        ops = {site: ops[names[site]] for site in self.order}
        # a neuron's level is the file's integer less its zero point; a kept QDQ pair gives the integer
        self.zero = {site: entry["source"].get("zero_point", 0) for site, entry in snn.report.sites.items()
                     if isinstance(entry.get("source"), dict)}
        self.onnxruntime, self.float_snn = SiteTally(ops), SiteTally(ops)
        self.pools = moved_pools(snn)
        self.snn = snn
        self.program = IntegerProgram(snn.graph_module, snn.integer_layers, "evaluate", observe=self._observe)

    def _observe(self, site: str, integers: Tensor, value: tuple[Tensor, Tensor] | None) -> None:
        """Compares a site as the integer SNN reaches it (graph order), so no site's values are held
        (onnxruntime's integers are widened one site at a time)."""
        if site in self._theirs:
            theirs = self._theirs.pop(site).to(torch.float64) - self.zero.get(site, 0)
            if site in self.pools:   # a site whose MaxPool the compiler moved before it sees the pooled levels
                theirs = self.pools[site](theirs)
            self.onnxruntime.site(site, integers, theirs.to(torch.int64), value)
        if site in self._float_levels:
            self.float_snn.site(site, integers, self._float_levels.pop(site).to(torch.int64), value)

    def add(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Compares one batch; returns the integer SNN's, the float SNN's and onnxruntime's logits."""
        reference, *tensors = self.runner(x)
        self._theirs = dict(zip(self.order, tensors))
        del tensors
        floating, self._float_levels = _snn_levels(self.snn, x)
        for tally in (self.onnxruntime, self.float_snn):
            tally.start(len(x))
        logits, _ = self.program.run(x)
        self.onnxruntime.logits(logits, reference)
        self.float_snn.logits(logits, floating)
        return logits, floating, reference


def verify_integer(path: str | os.PathLike, snn: SNN, inputs: Samples, batch_size: int,
                   source_graph: fx.GraphModule | None = None, progress: bool = False) -> dict:
    """On `inputs`: simulate and evaluate on integers give torch.equal logits and identical spike
    counts, and every difference from the float SNN (which the exactness gate proved) is explained
    (the gate: `passed`); the same comparison with onnxruntime's default session (reported, not a
    gate), with top-1 agreement, max |logit difference| and how many samples' logits are equal."""
    comparison = IntegerComparison(path, snn, source_graph)
    # onnxruntime's integers and the float SNN's levels of every site at once, and a site's float64
    # values one at a time
    profile = activation_profile(snn.graph_module, inputs.shape, torch.float32)
    batch_size = min(batch_size, profile.batch(EXPLANATION_BYTES, held="total"),
                     profile.batch(SITE_BYTES, held="largest"))
    same, samples = True, 0
    agree = {"float_snn": 0, "onnxruntime_default": 0}
    equal_logits = {"float_snn": 0, "onnxruntime_default": 0}
    largest = {"float_snn": 0.0, "onnxruntime_default": 0.0}
    bar = progress_bar(desc="verification: integer SNN", total=len(inputs), unit="input", enabled=progress)
    with bar:
        for x in inputs.batches(batch_size):
            evaluated, simulated = snn.evaluate(x), snn.simulate(x)
            same = same and torch.equal(evaluated.logits, simulated.logits) and evaluated.spikes.keys() == \
                simulated.spikes.keys() and all(torch.equal(evaluated.spikes[k], simulated.spikes[k])
                                                for k in evaluated.spikes)
            logits, floating, reference = comparison.add(x)
            logits = logits.reshape(len(x), -1)
            for key, other in (("float_snn", floating), ("onnxruntime_default", reference)):
                other = other.to(logits.dtype).reshape(len(x), -1)
                agree[key] += int((logits.argmax(1) == other.argmax(1)).sum())
                equal_logits[key] += int((logits == other).all(1).sum())
                largest[key] = max_abs(logits - other, largest[key])
            samples += len(x)
            bar.update(len(x))
    reports = {key: {"agreement": _agreement(agree[key], samples), "equal_logits": equal_logits[key],
                     "max_abs_logit_diff": largest[key], **tally.result()}
               for key, tally in (("float_snn", comparison.float_snn), ("onnxruntime_default", comparison.onnxruntime))}
    return {"layers": len(snn.integer_layers), "samples": samples, "simulate_equals_evaluate": same, **reports,
            "passed": same and reports["float_snn"]["explained"]}
