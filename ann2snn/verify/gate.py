"""The exactness gate: docs/method.md section 4's invariant, checked element for element.

An SNN is exact for its quantized source when two things hold, both checked on the inputs given:

1. The compiler is exact on this source: the source converted in float64, where the invariant
   holds without rounding, fires at every site and for every input exactly the source's level q
   (the decoded spike train sum_t s_t 2^(T-1-t) of the time-stepped simulation, against the
   source's own output over theta), and its logits equal the source's to 1e-9 (relative); its
   time-folded evaluation gives the simulation's logits and spike counts.
2. The SNN given is that float64 SNN in its own dtype: the same graph (nodes, module types and
   settings) and every tensor equal to the float64 one cast to the SNN's dtype.

Exact ties: where z / theta is a half-integer (an average pool of levels requantized at the same
scale gives many), q() rounds up in real arithmetic, but the source and the SNN reach z by sums
in different orders, and float64's last bit decides on which side each lands. A level that differs
by one where both the source's z / theta and the neuron's own V / theta lie within TIE_TOLERANCE
of the rounding boundary is counted as a tie, and the source (and the evaluation, against the
simulation) continues with the SNN's level there, site by site: everything else (every other
level, the logits) must still be equal, so the ties are the only difference.

So a float32 artifact is proven to be the float32 rounding of an SNN that is exact for the source:
docs/method.md's "a level may differ by one where z / theta lies within rounding distance of a
boundary" is then the only difference float32 can make. A MaxPool the compiler moved before a
site (docs/method.md section 3) is applied to the source's levels too: max commutes with q.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..levels import channel_view, decode_levels, popcount_levels
from ..runtime.memory import activation_profile
from ..runtime.evaluator import TimeFoldedNeuron
from ..runtime.signal import Signal
from ..runtime.neuron import BitSerialIFNode
from ..runtime.quant import QuantClippedActivation
from ..runtime.snn import SNN, SNNOutput

LOGIT_RELATIVE_TOLERANCE = 1e-9   # float64 rounding of the same sums in another order
TIE_TOLERANCE = 1e-9              # relative distance of z / theta from a half-integer, in float64


@dataclass
class SiteCheck:
    """One site: levels compared (neurons x samples), how many were equal, how many were exact ties
    (module docstring), the first that was neither."""

    compared: int
    equal: int
    first_difference: list[int] | None = None
    ties: int = 0


@dataclass
class ExactGate:
    samples: int
    sites: dict[str, SiteCheck]
    max_relative_logit_difference: float   # the float64 SNN against the source
    evaluation_matches_simulation: bool
    tensors_compared: int                  # of the SNN given, against the float64 SNN cast to its dtype
    passed: bool
    problems: list[str] = field(default_factory=list)
    evaluation_ties: int = 0               # levels the evaluation took from the simulation at exact ties

    @property
    def levels_compared(self) -> int:
        return sum(s.compared for s in self.sites.values())

    @property
    def ties(self) -> int:
        return sum(s.ties for s in self.sites.values())

    def to_json(self) -> dict:
        return {**asdict(self), "levels_compared": self.levels_compared, "ties": self.ties}


@contextlib.contextmanager
def _hooked(modules: dict[str, nn.Module], hook):
    """`hook(name, module, args, output)` on each module while the block runs; it may replace the output."""
    handles = [m.register_forward_hook(functools.partial(hook, name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_recording(run, modules: dict[str, nn.Module], levels_of, x: Tensor):
    """`run(x)`, and `levels_of(module, output)` of every module in `modules` during that run."""
    recorded: dict[str, Tensor] = {}
    with _hooked(modules, lambda name, module, args, out: recorded.__setitem__(name, levels_of(module, out))):
        return run(x), recorded


def _at_boundary(ratio: Tensor, boundary: Tensor) -> Tensor:
    return (ratio - boundary).abs() <= TIE_TOLERANCE * boundary.abs().clamp(min=1)


def _exact_tie(got: Tensor, want: Tensor, ratio: Tensor, boundary: Tensor, fired_ratio: Tensor) -> Tensor:
    """Where a level `got` is one off `want` at an exact tie (module docstring): the quotient
    `ratio` deciding `want` lies within TIE_TOLERANCE of its rounding `boundary`, and the neuron's
    own V / theta (`fired_ratio`) within TIE_TOLERANCE of the integer it fired at. Both: a neuron
    whose potential is off by more than float64's rounding fires off a tie too, and is caught."""
    return (((got - want).abs() == 1) & _at_boundary(ratio, boundary)
            & _at_boundary(fired_ratio, torch.round(fired_ratio)))


def _source_with_snn_ties(source: nn.Module, x: Tensor, fired: dict[str, Tensor], fired_ratios: dict[str, Tensor],
                          moved: set[str]) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """The source's logits and level maps (its output over theta, rounded: exact in float64) on x,
    with each site's level taken from the SNN's where they differ at an exact tie (sites whose
    MaxPool the compiler moved are compared after the pool: none of theirs is taken); and the
    ties. Sites run in order, so a tie taken upstream reaches every later sum."""
    levels: dict[str, Tensor] = {}
    ties: dict[str, Tensor] = {}

    def record(name: str, site: QuantClippedActivation, args: tuple, out: Tensor) -> Tensor:
        theta = channel_view(site.theta().detach().to(out.dtype), out.dim())
        level, got = torch.round(out / theta), fired.get(name)
        if name not in moved and got is not None and got.shape == level.shape:
            ratio = args[0] / theta
            tie = _exact_tie(got, level, ratio, torch.floor(ratio) + 0.5, fired_ratios[name])
            if bool(tie.any()):
                ties[name], level = tie, torch.where(tie, got, level)
                out = torch.where(tie, got * theta, out)
        levels[name] = level
        return out

    sites = {name: m for name, m in source.named_modules() if isinstance(m, QuantClippedActivation)}
    with _hooked(sites, record):
        return source(x), levels, ties


def _evaluation_with_simulation_ties(snn: SNN, x: Tensor, fired: dict[str, Tensor],
                                     fired_ratios: dict[str, Tensor]) -> tuple[SNNOutput, int]:
    """The time-folded evaluation of x, each neuron's level taken from the simulation's where they
    differ at an exact tie of floor(V / theta) (the two reach V by sums in different orders), its
    spike counts with them; and the number of ties."""
    tied = 0

    def record(name: str, folded: TimeFoldedNeuron, args: tuple, out: tuple[Tensor, Tensor]):
        nonlocal tied
        value, counts = out
        n = folded.neuron
        theta = channel_view(n.theta.to(value.dtype), value.dim())
        level = torch.round(value / theta)
        ratio = (args[0] + channel_view(torch.as_tensor(n.membrane_offset, dtype=value.dtype), value.dim())) / theta
        tie = _exact_tie(fired[name], level, ratio, torch.round(ratio), fired_ratios[name])
        if not bool(tie.any()):
            return out
        tied += int(tie.sum())
        extra = torch.where(tie, popcount_levels(fired[name], n.levels) - popcount_levels(level, n.levels), 0)
        return torch.where(tie, fired[name] * theta, value), counts + extra.flatten(1).sum(1).to(counts.dtype)

    evaluator = snn._lowered_graph("evaluate")
    neurons = {name: m for name, m in evaluator.named_modules() if isinstance(m, TimeFoldedNeuron)}
    with _hooked(neurons, record):
        return SNNOutput(*evaluator(x)), tied


def _simulated_levels(snn: SNN, x: Tensor) -> tuple[SNNOutput, dict[str, Tensor], dict[str, Tensor]]:
    """The simulation's output, the level each neuron fires (its decoded spike train) and the
    quotient V / theta it fired from (V: the integrated potential plus the membrane offset)."""
    fired: dict[str, Tensor] = {}
    ratios: dict[str, Tensor] = {}

    def record(name: str, neuron: BitSerialIFNode, args: tuple, spikes: Tensor) -> None:
        potential = Signal(steps=args[0]).potential()   # the doubling rule over the currents, then the offset
        offset = channel_view(neuron.membrane_offset.to(potential.dtype), potential.dim())
        fired[name] = decode_levels(spikes)
        ratios[name] = (potential + offset) / channel_view(neuron.theta.to(potential.dtype), potential.dim())

    neurons = {name: m for name, m in snn.graph_module.named_modules() if isinstance(m, BitSerialIFNode)}
    with _hooked(neurons, record):
        return snn.simulate(x), fired, ratios


def moved_pools(snn: SNN) -> dict[str, Callable[[Tensor], Tensor]]:
    """Site -> the max pools the compiler moved before it, in order (a site may pass several), as
    one function that applies them as the SNN's graph does (modules, or torch.nn.functional calls
    with their other arguments)."""
    gm = snn.graph_module
    pools: dict[str, list[Callable[[Tensor], Tensor]]] = {}
    for rewrite in snn.report.rewrites:
        if rewrite.get("pass") != "move_max_pool_before_sites" or "site" not in rewrite:
            continue
        node = next(n for n in gm.graph.nodes if (n.op == "call_module" and n.target == rewrite["max_pool"])
                    or (n.op == "call_function" and n.name == rewrite["max_pool"]))
        pools.setdefault(rewrite["site"], []).append(gm.get_submodule(node.target) if node.op == "call_module" else (
            lambda t, node=node: node.target(t, *node.args[1:], **node.kwargs)))

    def chain(functions: list[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
        return lambda t: functools.reduce(lambda value, pool: pool(value), functions, t)

    return {site: chain(functions) for site, functions in pools.items()}


def pool_moved_sites(snn: SNN, levels: dict[str, Tensor]) -> dict[str, Tensor]:
    """Source levels of sites whose MaxPools the compiler moved before them, pooled like the SNN."""
    pools = moved_pools(snn)
    return {name: pools[name](level) if name in pools else level for name, level in levels.items()}


def _compare_with_reference(snn: SNN, reference: SNN, problems: list[str]) -> int:
    """Check 2: the SNN given is `reference` (float64) in the SNN's dtype. Returns tensors compared."""
    from ..runtime.artifact import describe_graph

    def described(gm) -> str:   # as saved: tuples and lists alike
        return json.dumps(describe_graph(gm), sort_keys=True)

    if described(snn.graph_module) != described(reference.graph_module) or snn.timesteps != reference.timesteps:
        problems.append("the SNN's graph is not what the compiler makes of the source")
        return 0
    mine, theirs = snn.graph_module.state_dict(), reference.graph_module.state_dict()
    for name, tensor in mine.items():
        if not torch.equal(tensor, theirs[name].to(tensor.dtype)):
            problems.append(f"tensor {name} is not the compiler's (float64, cast to {str(tensor.dtype)[6:]})")
    return len(mine)


class ExactnessGate:
    """`check_exact` over batches of inputs: the float64 reference SNN is built once, each batch's
    levels and logits are compared as it comes, and `result()` says what all of them showed. Its
    memory is the two float64 graphs and one batch, whatever the number of inputs.

    `source64` is the quantized source in float64 and eval mode; it is run, never modified.
    """

    def __init__(self, source64: nn.Module, snn: SNN) -> None:
        from ..compile.compiler import convert

        self.source64 = source64
        # the same T policy: one T for every neuron, or each site its own (convert's T=None)
        steps = {m.timesteps for m in snn.graph_module.modules() if isinstance(m, BitSerialIFNode)}
        self.reference = convert(source64, snn.timesteps if steps == {snn.timesteps} else None)
        _share_equal_tensors(self.reference.graph_module, source64)
        self.moved = set(moved_pools(self.reference))
        self.tensor_problems: list[str] = []
        self.tensors = _compare_with_reference(snn, self.reference, self.tensor_problems)
        self.samples = 0
        self.sites: dict[str, SiteCheck] = {}
        self.site_problems: dict[str, str] = {}   # a site's first problem of shape or pairing
        self.unmatched: list[str] = []
        self.logit_difference = self.logit_scale = 0.0
        self.evaluation_difference = self.evaluation_scale = 0.0
        self.spikes_equal = True
        self.evaluation_ties = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x64 = x.double()
        simulated, fired, fired_ratios = _simulated_levels(self.reference, x64)
        source_logits, source_levels, ties = _source_with_snn_ties(self.source64, x64, fired, fired_ratios, self.moved)
        self._compare_levels(fired, pool_moved_sites(self.reference, source_levels), ties)
        self.logit_difference = max_abs(simulated.logits - source_logits, self.logit_difference)
        self.logit_scale = max_abs(source_logits, self.logit_scale)
        evaluated, evaluation_ties = _evaluation_with_simulation_ties(self.reference, x64, fired, fired_ratios)
        self.evaluation_ties += evaluation_ties
        self.evaluation_difference = max_abs(evaluated.logits - simulated.logits, self.evaluation_difference)
        self.evaluation_scale = max_abs(simulated.logits, self.evaluation_scale)
        self.spikes_equal = self.spikes_equal and all(
            torch.equal(evaluated.spikes[k], simulated.spikes[k]) for k in simulated.spikes)
        self.samples += int(x.shape[0])

    def _compare_levels(self, snn_levels: dict[str, Tensor], source_levels: dict[str, Tensor],
                        ties: dict[str, Tensor]) -> None:
        self.unmatched = sorted(set(snn_levels) ^ set(source_levels))
        for name in [n for n in snn_levels if n in source_levels]:
            got, want = snn_levels[name], source_levels[name]
            site = self.sites.setdefault(name, SiteCheck(0, 0))
            site.compared += want.numel()
            if got.shape != want.shape:
                self.site_problems.setdefault(
                    name, f"site {name}: the SNN fires {tuple(got.shape)} levels, the source has {tuple(want.shape)}")
                continue
            differ = (got != want).nonzero()
            tied = int(ties[name].sum()) if name in ties else 0
            site.equal += want.numel() - differ.shape[0] - tied
            site.ties += tied
            if differ.shape[0] and site.first_difference is None:
                site.first_difference = [int(differ[0, 0]) + self.samples, *differ[0, 1:].tolist()]

    def result(self) -> ExactGate:
        problems = [f"sites without a counterpart: {', '.join(self.unmatched[:5])}"] if self.unmatched else []
        for name, site in self.sites.items():
            if name in self.site_problems:
                problems.append(self.site_problems[name])
            elif site.equal + site.ties < site.compared:
                problems.append(f"site {name}: {site.compared - site.equal - site.ties} of {site.compared} levels "
                                "differ from the source")
        logit_difference = self.logit_difference / (self.logit_scale + 1e-300)
        if not logit_difference <= LOGIT_RELATIVE_TOLERANCE:
            problems.append(f"logits differ from the source by {logit_difference:.3g} (relative)")
        evaluation_matches = self.spikes_equal and (
            self.evaluation_difference / (self.evaluation_scale + 1e-300) <= LOGIT_RELATIVE_TOLERANCE)
        if not evaluation_matches:
            problems.append("the time-folded evaluation differs from the simulation")
        problems += self.tensor_problems
        return ExactGate(self.samples, self.sites, logit_difference, evaluation_matches, self.tensors, not problems,
                         problems, self.evaluation_ties)


def _share_equal_tensors(target: nn.Module, source: nn.Module) -> None:
    """Each tensor of `target` equal to `source`'s of the same name becomes that tensor: a layer
    without BN keeps its weights through the passes, and a second float64 copy of a large model's
    weights would not fit where one does. Both are only read."""
    tensors = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    for name, tensor in [*target.named_parameters(), *target.named_buffers()]:
        same = tensors.get(name)
        if same is None or same is tensor or same.shape != tensor.shape or same.dtype != tensor.dtype \
                or not torch.equal(same, tensor):
            continue
        owner, _, leaf = name.rpartition(".")
        module = target.get_submodule(owner)
        if leaf in module._parameters and isinstance(same, nn.Parameter):
            module._parameters[leaf] = same
        elif leaf in module._buffers and not isinstance(same, nn.Parameter):
            module._buffers[leaf] = same


def max_abs(t: Tensor, so_far: float) -> float:
    """max(|t|, so_far), NaN once either holds a NaN: no comparison with it passes."""
    value = t.abs().max().item() if t.numel() else 0.0
    return math.nan if math.isnan(value) or math.isnan(so_far) else max(value, so_far)


# The float64 simulation holds about this many copies of a neuron's largest input, per time step.
GATE_COPIES = 6


@torch.no_grad()
def check_exact(source: nn.Module, snn: SNN, x: Tensor, batch_size: int | None = None) -> ExactGate:
    """Prove `snn` exact for the quantized `source` on inputs `x` (module docstring), in batches of
    `batch_size` (None: as many as the activation budget allows for the float64 simulation).

    `source` is a model whose sites are QuantClippedActivation: a zoo model, or an imported QDQ
    graph after `qdq_to_sites` (calibrated, for a float file). Neither argument is modified.
    """
    gate = ExactnessGate(copy.deepcopy(source).double().eval(), snn)
    if batch_size is None:
        batch_size = activation_profile(gate.reference.graph_module, tuple(x.shape[1:]), torch.float64).batch(
            8 * GATE_COPIES * snn.timesteps)
    for chunk in x.split(batch_size):
        gate.add(chunk)
    return gate.result()
