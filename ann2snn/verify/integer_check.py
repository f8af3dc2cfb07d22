"""Verification of an integer SNN (issue 27): its two ways of running agree bit for bit, and its
predictions are compared with the float SNN of the same graph and with onnxruntime's default
session, whose int8 kernels run the same file.

Against onnxruntime's default session every difference is explained per op, or counted as
unexplained. The session's integer at every site (each QuantizeLinear's output, read back as an
extra graph output) is compared with the integer SNN's, in graph order, sample by sample:
- rounding: the two differ by one, and the real value both round (runtime/integer_values.py:
  exact_value, in float64 from the site's integers) lies within the bound of a float32 evaluation
  of the boundary between them: REQUANTIZATION_ROUNDINGS roundoffs of its terms' magnitude, and
  for a layer's accumulator the (n + 2) roundoffs of sum |w x| + |b| of a float32 convolution of
  fan-in n. The integer SNN rounds the QDQ graph as written; onnxruntime's default session
  rounds the same value its own way: fused int8 kernels (QLinearConv, QLinearAdd, ...) with their
  own float32 multipliers, or a float32 convolution where it does not fuse;
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
from ..runtime.integer_snn import IntegerProgram
from ..runtime.integer_values import UNIT_ROUNDOFF
from ..runtime.memory import activation_profile
from ..runtime.snn import SNN
from .gate import max_abs, moved_pools
from .ort_check import graph_order, quantize_outputs
from .ort_run import OnnxruntimeRunner

# a float32 output layer of fan-in up to 4096: (n + 2) roundoffs of the row's magnitude
OUTPUT_UNITS = 4098
# bytes per activation element of a sample that the explanation holds: onnxruntime's integers of
# every site (as its int8 / uint8 outputs, and their int64 copies as one is compared) ...
EXPLANATION_BYTES = 2
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


class OnnxruntimeExplanation:
    """The integer SNN against onnxruntime's default session, site by site (module docstring)."""

    def __init__(self, path: str | os.PathLike, snn: SNN, source_graph: fx.GraphModule | None = None) -> None:
        # the kept QDQ pairs' ONNX nodes are in the imported graph's node meta (a loaded artifact's
        # graph has none: `source_graph`, the file imported again, then has them)
        names, _ = quantize_outputs(str(path), snn.graph_module if source_graph is None else source_graph, snn)
        self.order = [site for site in graph_order(snn) if site in names]
        self.runner = OnnxruntimeRunner(path, [names[site] for site in self.order], integer_kernels=True)
        ops = _ops_before(path, [names[site] for site in self.order])
        # a neuron's level is the file's integer less its zero point; a kept QDQ pair gives the integer
        self.zero = {site: entry["source"].get("zero_point", 0) for site, entry in snn.report.sites.items()
                     if isinstance(entry.get("source"), dict)}
        self.sites = {site: {"op": ops[names[site]], "compared": 0, "equal": 0, "rounding": 0, "downstream": 0,
                             "unexplained": 0} for site in self.order}
        self.logits = {"equal": 0, "after_level_difference": 0, "output_rounding": 0, "unexplained": 0}
        self.pools = moved_pools(snn)
        self.program = IntegerProgram(snn.graph_module, snn.integer_layers, "evaluate", observe=self._observe)

    def _observe(self, site: str, integers: Tensor, value: tuple[Tensor, Tensor] | None) -> None:
        """Compares a site as the integer SNN reaches it (graph order), so no site's values are held
        (onnxruntime's integers are widened one site at a time)."""
        if site not in self._theirs:
            return
        theirs = self._theirs.pop(site).to(torch.float64) - self.zero.get(site, 0)
        if site in self.pools:   # a site whose MaxPool the compiler moved before it sees the pooled levels
            theirs = self.pools[site](theirs)
        theirs = theirs.to(torch.int64).reshape(integers.shape)
        counts, differ = classify(integers, theirs, value, self._differed)
        for key, count in counts.items():
            self.sites[site][key] += count
        self._differed |= differ.reshape(len(differ), -1).any(1)

    def add(self, x: Tensor) -> Tensor:
        """Compares one batch; returns onnxruntime's logits."""
        reference, *tensors = self.runner(x)
        self._theirs = dict(zip(self.order, tensors))
        del tensors
        self._differed = torch.zeros(len(x), dtype=torch.bool)
        logits, _ = self.program.run(x)
        self._compare_logits(logits.reshape(len(x), -1), reference.to(logits.dtype).reshape(len(x), -1),
                             self._differed)
        return reference

    def _compare_logits(self, mine: Tensor, theirs: Tensor, differed: Tensor) -> None:
        equal = (mine == theirs).all(1)
        largest = torch.maximum(mine.abs().amax(1), theirs.abs().amax(1)).to(torch.float64)
        close = ((mine - theirs).abs().amax(1).to(torch.float64) <= OUTPUT_UNITS * UNIT_ROUNDOFF * largest)
        self.logits["equal"] += int(equal.sum())
        self.logits["after_level_difference"] += int((~equal & differed).sum())
        self.logits["output_rounding"] += int((~equal & ~differed & close).sum())
        self.logits["unexplained"] += int((~equal & ~differed & ~close).sum())

    def result(self) -> dict:
        sites = {site: counts for site, counts in self.sites.items() if counts["compared"]}
        explained = self.logits["unexplained"] == 0 and all(c["unexplained"] == 0 for c in sites.values())
        return {"sites": sites, "logits": dict(self.logits), "explained": explained}


def verify_integer(path: str | os.PathLike, snn: SNN, inputs: Samples, batch_size: int,
                   source_graph: fx.GraphModule | None = None) -> dict:
    """On `inputs`: simulate and evaluate on integers give torch.equal logits and identical spike
    counts, and the float SNN (which the exactness gate proved) predicts the same class for every
    input (the gate: `passed`); top-1 agreement and max |logit difference| against the float SNN
    and against onnxruntime's default session, how many samples' logits equal the latter's, and
    every difference from it explained per op (OnnxruntimeExplanation)."""
    explanation = OnnxruntimeExplanation(path, snn, source_graph)
    # onnxruntime's integers of every site at once, and a site's float64 values one at a time
    profile = activation_profile(snn.graph_module, inputs.shape, torch.float32)
    batch_size = min(batch_size, profile.batch(EXPLANATION_BYTES, held="total"),
                     profile.batch(SITE_BYTES, held="largest"))
    same, float_agree, ort_agree, ort_equal, float_diff, ort_diff, samples = True, 0, 0, 0, 0.0, 0.0, 0
    for x in inputs.batches(batch_size):
        evaluated, simulated = snn.evaluate(x), snn.simulate(x)
        same = same and torch.equal(evaluated.logits, simulated.logits) and evaluated.spikes.keys() == \
            simulated.spikes.keys() and all(torch.equal(evaluated.spikes[k], simulated.spikes[k])
                                            for k in evaluated.spikes)
        with snn.using_backend("float"):
            floating = snn.evaluate(x).logits
        logits = evaluated.logits.reshape(len(x), -1)
        reference = explanation.add(x).to(logits.dtype).reshape(len(x), -1)
        floating = floating.reshape(len(x), -1)
        float_agree += int((logits.argmax(1) == floating.argmax(1)).sum())
        ort_agree += int((logits.argmax(1) == reference.argmax(1)).sum())
        ort_equal += int((logits == reference).all(1).sum())
        float_diff, ort_diff = max_abs(logits - floating, float_diff), max_abs(logits - reference, ort_diff)
        samples += len(x)
    return {"layers": len(snn.integer_layers), "samples": samples, "simulate_equals_evaluate": same,
            "float_snn": {"agreement": _agreement(float_agree, samples), "max_abs_logit_diff": float_diff},
            "onnxruntime_default": {"agreement": _agreement(ort_agree, samples), "equal_logits": ort_equal,
                                    "max_abs_logit_diff": ort_diff, **explanation.result()},
            "passed": same and float_agree == samples}
