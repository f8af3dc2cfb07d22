"""Counting through the lowered executors: `observe` puts event nodes and observers into the
simulator's or the evaluator's own graph, as torch.ao's prepare puts observers into a model.

The lowered graph computes what it computed; beside every value that carries spikes it also
computes their events (energy/events.py), and an observer at every neuron, layer and average
pool counts them. Which values carry spikes, and which carry an analog part, follows from the
graph alone, by the kinds of ops.py; the counts come from running it.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..errors import UnsupportedModelError
from ..runtime.neuron import BitSerialIFNode
from ..ops import AVERAGE_POOLS, FUNCTION_OPS, LAYERS, METHOD_KINDS, NORMS, STRUCTURAL
from ..runtime.graph import free_name, output_head
from .events import Events, Levels, Op, Planes, structural_events, summed_events, total
from .fanout import pool_fanout, pool_params, window_sums


def _per_image(shape: torch.Size) -> int:
    return int(math.prod(shape[1:]))


class SpikeObserver(nn.Module):
    """A neuron layer: counts its spikes and passes on its events."""

    def __init__(self, node: fx.Node, timesteps: int, mode: str) -> None:
        super().__init__()
        self.node, self.timesteps, self.mode = node, timesteps, mode
        self.neurons = 0     # per image
        self.spikes: Tensor | int = 0

    def forward(self, fired: Any) -> Events:
        # the simulator's Signal holds the binary planes; the evaluator gives the spike code
        events = Planes(fired.spikes) if self.mode == "simulate" else Levels.fired(fired, self.timesteps)
        counts = events.counts()
        self.neurons = _per_image(counts.shape)
        self.spikes = self.spikes + total(counts)
        return events


class RowObserver(nn.Module):
    """A row of the report: a layer, or an average pool fed by spikes; its input events and the
    synaptic operations they drive. MACs and adds are per image; the other counts are totals."""

    weighted = False

    def __init__(self, node: fx.Node, name: str, kind: str, input_kind: str) -> None:
        super().__init__()
        self.node, self.name, self.kind, self.input = node, name, kind, input_kind
        self.macs = self.ann_adds = self.snn_macs = self.snn_adds = 0
        self.input_spikes: Tensor | int = 0
        self.synaptic_ops: Tensor | int = 0
        self.fanouts: dict = {}   # fan-out maps by input shape and device

    def add(self, events: Events, synaptic_ops: Tensor) -> None:
        self.input_spikes = self.input_spikes + total(events.counts())
        self.synaptic_ops = self.synaptic_ops + synaptic_ops


class LayerObserver(RowObserver):
    """A conv or linear layer: dense MACs in the ANN (and in the SNN on an analog input part),
    synaptic operations on spikes."""

    weighted = True

    def __init__(self, node: fx.Node, layer: nn.Module, input_kind: str) -> None:
        super().__init__(node, node.target, type(layer).__name__, input_kind)
        self.layer = layer

    def forward(self, events: Events | None, output: Any) -> None:
        layer = self.layer
        fan_in = layer.in_features if isinstance(layer, nn.Linear) else \
            (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
        self.macs = _per_image(output.shape) * fan_in
        self.snn_macs = self.macs if self.input != "spikes" else 0
        if events is None:
            return
        if isinstance(layer, nn.Linear):
            self.add(events, total(events.counts()) * layer.out_features)
        else:
            self.add(events, events.layer_synaptic_ops(layer, self.fanouts))


class PoolObserver(RowObserver):
    """An average pool fed by spikes: each input spike reaches its pooling windows (one accumulate
    each); passes on the events after the pool."""

    def __init__(self, node: fx.Node, name: str, kind: str, input_kind: str, pool: str, params: dict) -> None:
        super().__init__(node, name, kind, input_kind)
        self.pool, self.params = pool, params

    def forward(self, events: Events, x: Any) -> Events:
        sums = window_sums(self.pool, self.params, torch.Size(x.shape))
        if not self.ann_adds:
            self.ann_adds = int(pool_fanout(sums, tuple(x.shape[1:])).sum())
            self.snn_adds = self.ann_adds if self.input == "mixed" else 0
        self.add(events, events.pool_synaptic_ops(sums, self.fanouts))
        return events.pooled(sums)


class StructuralEvents(nn.Module):
    """The events after a structural op (flatten, reshape, concat, pad, ...)."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.op = op

    def forward(self, *args, **kwargs) -> Events:
        return structural_events(self.op, args, kwargs)


def _kind(node: fx.Node, graph_module: fx.GraphModule) -> str:
    """What `node` is to the counts: a kind of ops.py, or input, neuron, on_potential, unknown."""
    if node.op in ("placeholder", "get_attr", "output"):
        return "input" if node.op != "output" else "output"
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        for types, kind in ((BitSerialIFNode, "neuron"), (LAYERS, "layer"), (AVERAGE_POOLS, "average_pool"),
                            (STRUCTURAL, "structural"), (NORMS, "norm")):
            if isinstance(module, types):
                return kind
        return "on_potential"   # MaxPool, output ops and others applied to the potential
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, "unknown")
    op = FUNCTION_OPS.get(node.target)
    return op.kind if op is not None else "unknown"


def _input_kind(source: Any, events: dict, analog: dict) -> str:
    if not isinstance(source, fx.Node) or source not in events:
        return "analog"
    return "mixed" if analog[source] else "spikes"


def observe(lowered: fx.GraphModule, snn_graph: fx.GraphModule, mode: str) -> list[RowObserver | SpikeObserver]:
    """Put event nodes and observers into `lowered`, a fresh lowering of `snn_graph` (the simulator,
    or the evaluator with levels); returns the observers in graph order."""
    values = {n.meta["snn_node"]: n for n in lowered.graph.nodes if "snn_node" in n.meta}
    fired = {n.meta["snn_levels"]: n for n in lowered.graph.nodes if "snn_levels" in n.meta}
    events: dict[fx.Node, fx.Node] = {}    # node of snn_graph -> the node of its events in `lowered`
    analog: dict[fx.Node, bool] = {}       # node of snn_graph -> whether its value has an analog part
    observers: list[RowObserver | SpikeObserver] = []
    head = set(output_head(snn_graph))

    def output_of(node: fx.Node) -> fx.Node:
        """`node`'s last output in `lowered`: a neuron's spike code in the evaluator, else its value."""
        return fired.get(node.name, values[node.name])

    def insert(node: fx.Node, module: nn.Module | None, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """A call after `node`'s outputs in `lowered`: of `module` (registered by the node's name) or of `target`."""
        with lowered.graph.inserting_after(output_of(node)):
            if module is None:
                return lowered.graph.call_function(target, args, kwargs or {})
            name = free_name(lowered, f"energy_{node.name}")   # never a module of the network
            lowered.add_submodule(name, module)
            return lowered.graph.call_module(name, args, kwargs or {})

    def value_or_events(arg: fx.Node) -> fx.Node:
        return events.get(arg, values[arg.name])

    for node in snn_graph.graph.nodes:
        kind = _kind(node, snn_graph)
        inputs = [a for a in node.all_input_nodes if a in analog]
        with_events = [a for a in inputs if a in events]
        constants = [a for a in node.args if not isinstance(a, fx.Node)]
        source = node.args[0] if node.args else None
        if kind == "input" or node in head:
            # the output head: float work on the SNN's output after its last layer, which the ANN does
            # alike; counted in neither network (count.OpCounts.head names its ops)
            analog[node] = True
        elif kind == "neuron":
            module = snn_graph.get_submodule(node.target)
            observer = SpikeObserver(node, module.timesteps, mode)
            events[node] = insert(node, observer, None, (output_of(node),))
            observers.append(observer)
            analog[node] = False
        elif kind == "layer":
            observer = LayerObserver(node, snn_graph.get_submodule(node.target), _input_kind(source, events, analog))
            insert(node, observer, None, (events.get(source), values[node.name]))
            observers.append(observer)
            analog[node] = True     # currents and bias: not spikes
        elif kind == "average_pool":
            analog[node] = analog.get(source, True)
            if source in events:
                if node.op == "call_module":
                    module = snn_graph.get_submodule(node.target)
                    pool, params = pool_params(module, (), {})
                    name, kind_name = node.target, type(module).__name__
                else:
                    target = torch.mean if node.op == "call_method" else node.target
                    pool, params = pool_params(target, node.args, node.kwargs)
                    name, kind_name = node.name, pool
                observer = PoolObserver(node, name, kind_name, _input_kind(source, events, analog), pool, params)
                events[node] = insert(node, observer, None, (events[source], values[source.name]))
                observers.append(observer)
        elif kind == "structural":
            analog[node] = any(analog[a] for a in inputs)
            if with_events:
                op = StructuralEvents(Op(snn_graph.get_submodule(node.target) if node.op == "call_module"
                                         else node.target, node.op))
                events[node] = insert(node, op, None, fx.map_arg(node.args, value_or_events),
                                      fx.map_arg(node.kwargs, value_or_events))
        elif kind in ("add", "scale", "norm"):
            # a residual sum carries both inputs' events; a scale (by a constant or a tensor
            # attribute) or an unfolded BN keeps them
            scaled = [a for a in inputs if kind != "scale" or a.op != "get_attr"]
            analog[node] = kind == "norm" or any(analog[a] for a in scaled) or (
                kind == "add" and any(isinstance(c, (int, float, Tensor)) for c in constants))
            if len(with_events) == 1:
                events[node] = events[with_events[0]]
            elif with_events:
                events[node] = insert(node, None, summed_events, tuple(events[a] for a in with_events))
        elif kind == "access":   # sizes and attributes: no values
            if node.target is operator.getitem and with_events:
                raise UnsupportedModelError("energy: no rule for counting spikes through getitem")
        elif kind != "output":   # ops on the potential: analog; any other op must not see spikes
            if with_events and kind not in ("on_potential", "max_pool", "activation"):
                name = node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)
                raise UnsupportedModelError(f"energy: no rule for counting spikes through {name}")
            analog[node] = True
    lowered.recompile()
    return observers
