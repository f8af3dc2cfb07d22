"""The exactness gate: METHOD.md section 4's invariant, checked element for element.

An SNN is exact for its quantized source when two things hold, both checked on the inputs given:

1. The compiler is exact on this source: the source converted in float64, where the invariant
   holds without rounding, fires at every site and for every input exactly the source's level q
   (the decoded spike train sum_t s_t 2^(T-1-t) of the time-stepped simulation, against the
   source's own output over theta), and its logits equal the source's to 1e-9 (relative); its
   time-folded evaluation gives the simulation's logits and spike counts.
2. The SNN given is that float64 SNN in its own dtype: the same graph (nodes, module types and
   settings) and every tensor equal to the float64 one cast to the SNN's dtype.

So a float32 artifact is proven to be the float32 rounding of an SNN that is exact for the source:
METHOD.md's "a level may differ by one where z / theta lies within rounding distance of a
boundary" is then the only difference float32 can make. A MaxPool the compiler moved before a
site (METHOD.md section 3) is applied to the source's levels too: max commutes with q.
"""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .neuron import BitSerialIFNode, decode_levels
from .quant import QuantClippedActivation, channel_view
from .snn import SNN, SNNOutput

LOGIT_RELATIVE_TOLERANCE = 1e-9   # float64 rounding of the same sums in another order


@dataclass
class SiteCheck:
    """One site: levels compared (neurons x samples), how many were equal, the first that was not."""

    compared: int
    equal: int
    first_difference: list[int] | None = None


@dataclass
class ExactGate:
    samples: int
    sites: dict[str, SiteCheck]
    max_relative_logit_difference: float   # the float64 SNN against the source
    evaluation_matches_simulation: bool
    tensors_compared: int                  # of the SNN given, against the float64 SNN cast to its dtype
    passed: bool
    problems: list[str] = field(default_factory=list)

    @property
    def levels_compared(self) -> int:
        return sum(s.compared for s in self.sites.values())

    def to_json(self) -> dict:
        return {**asdict(self), "levels_compared": self.levels_compared}


def _recording(modules: dict[str, nn.Module], levels_of) -> tuple[dict[str, Tensor], list]:
    """Forward hooks storing `levels_of(module, output)` per module name."""
    recorded: dict[str, Tensor] = {}
    handles = [module.register_forward_hook(
        lambda m, args, out, name=name: recorded.__setitem__(name, levels_of(m, out)))
        for name, module in modules.items()]
    return recorded, handles


def run_recording(run, modules: dict[str, nn.Module], levels_of, x: Tensor):
    """`run(x)`, and `levels_of(module, output)` of every module in `modules` during that run."""
    recorded, handles = _recording(modules, levels_of)
    try:
        return run(x), recorded
    finally:
        for h in handles:
            h.remove()


def _source_levels(source: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The source's logits and the level map q of every site: its output over theta, rounded
    (exact in float64, where q * theta / theta is within an ulp of the integer q)."""
    sites = {name: m for name, m in source.named_modules() if isinstance(m, QuantClippedActivation)}
    return run_recording(source, sites, lambda site, out: torch.round(
        out / channel_view(site.theta().detach().to(out.dtype), out.dim())), x)


def snn_levels(snn: SNN, x: Tensor) -> tuple[SNNOutput, dict[str, Tensor]]:
    """The simulation's output and the level each neuron fires (its decoded spike train)."""
    neurons = {name: m for name, m in snn.graph_module.named_modules() if isinstance(m, BitSerialIFNode)}
    return run_recording(snn.simulate, neurons, lambda neuron, out: decode_levels(out), x)


def moved_pools(snn: SNN) -> dict[str, Callable[[Tensor], Tensor]]:
    """Site -> the max pools the compiler moved before it, in order (a site may pass several), as
    one function that applies them as the SNN's graph does (modules, or torch.nn.functional calls
    with their other arguments)."""
    gm = snn.graph_module
    pools: dict[str, list[Callable[[Tensor], Tensor]]] = {}
    for rewrite in snn.report.get("rewrites", []):
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


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / (b.abs().max() + 1e-300)).item()


def _compare_levels(snn_levels: dict[str, Tensor], source_levels: dict[str, Tensor],
                    problems: list[str]) -> dict[str, SiteCheck]:
    unmatched = sorted(set(snn_levels) ^ set(source_levels))
    if unmatched:
        problems.append(f"sites without a counterpart: {', '.join(unmatched[:5])}")
    sites = {}
    for name in [n for n in snn_levels if n in source_levels]:
        got, want = snn_levels[name], source_levels[name]
        if got.shape != want.shape:
            problems.append(f"site {name}: the SNN fires {tuple(got.shape)} levels, the source has {tuple(want.shape)}")
            sites[name] = SiteCheck(want.numel(), 0)
            continue
        differ = (got != want).nonzero()
        sites[name] = SiteCheck(want.numel(), want.numel() - differ.shape[0],
                                differ[0].tolist() if differ.shape[0] else None)
        if differ.shape[0]:
            problems.append(f"site {name}: {differ.shape[0]} of {want.numel()} levels differ from the source")
    return sites


def _compare_with_reference(snn: SNN, reference: SNN, problems: list[str]) -> int:
    """Check 2: the SNN given is `reference` (float64) in the SNN's dtype. Returns tensors compared."""
    from .artifact import describe_graph

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


@torch.no_grad()
def check_exact(source: nn.Module, snn: SNN, x: Tensor) -> ExactGate:
    """Prove `snn` exact for the quantized `source` on inputs `x` (module docstring).

    `source` is a model whose sites are QuantClippedActivation: a zoo model, or an imported QDQ
    graph after `qdq_to_sites` (calibrated, for a float file). Neither argument is modified.
    """
    from .compiler import convert

    source64 = copy.deepcopy(source).double().eval()
    # the same T policy: one T for every neuron, or each site its own (convert's T=None)
    steps = {m.timesteps for m in snn.graph_module.modules() if isinstance(m, BitSerialIFNode)}
    reference = convert(source64, snn.timesteps if steps == {snn.timesteps} else None)
    problems: list[str] = []
    x64 = x.double()
    source_logits, source_levels = _source_levels(source64, x64)
    simulated, fired = snn_levels(reference, x64)
    sites = _compare_levels(fired, pool_moved_sites(reference, source_levels), problems)
    logit_difference = _relative(simulated.logits, source_logits)
    if not logit_difference <= LOGIT_RELATIVE_TOLERANCE:
        problems.append(f"logits differ from the source by {logit_difference:.3g} (relative)")
    evaluated = reference.evaluate(x64)
    evaluation_matches = _relative(evaluated.logits, simulated.logits) <= LOGIT_RELATIVE_TOLERANCE and all(
        torch.equal(evaluated.spikes[k], simulated.spikes[k]) for k in simulated.spikes)
    if not evaluation_matches:
        problems.append("the time-folded evaluation differs from the simulation")
    tensors = _compare_with_reference(snn, reference, problems)
    return ExactGate(int(x.shape[0]), sites, logit_difference, evaluation_matches, tensors, not problems, problems)
