"""Counting spikes, synaptic operations and MACs per layer, on the simulator's spike planes or the evaluator's level maps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils.data import Dataset

from ..distributed import Context, all_reduce_max, all_reduce_sum
from ..errors import Ann2SnnError, UnsupportedModelError
from ..kernels import fire_fused
from ..levels import popcount_levels, spike_code_arithmetic_dtype, unpack_spikes
from ..lower.signal import Signal, align_steps
from ..lower.simulator import fold_time, read_out, simulate_call, simulate_method, simulation_module
from ..neuron import BitSerialIFNode
from ..ops import AVERAGE_POOLS, LAYERS, NORMS, STRUCTURAL, functions_of, methods_of
from .fanout import call_argument, conv_fanout, conv_ones_kernel, pool_fanout, pool_params, window_sums


# ==============================================================================================
# Counting: spikes, synaptic operations, MACs

_STRUCTURAL_FUNCTIONS = functions_of("structural")
_STRUCTURAL_METHODS = methods_of("structural")
_ADD_FUNCTIONS = functions_of("add")
_ADD_METHODS = methods_of("add")
_SCALE_FUNCTIONS = functions_of("scale")
_SCALE_METHODS = methods_of("scale")
_POOL_FUNCTIONS = functions_of("average_pool")
_POOL_METHODS = methods_of("average_pool")
_ON_POTENTIAL_FUNCTIONS = functions_of("max_pool", "activation")


@dataclass
class LayerCounts:
    """Counts of one layer of the SNN. `neurons` is per image; every other count is a total over
    the images counted (divide by `OpCounts.images`)."""
    name: str
    kind: str             # module type (Conv2d, Linear, AvgPool2d, ...), function name, or "neurons"
    input: str            # "spikes", "analog", "mixed", or "-" (a row of neurons without a layer)
    site: str | None      # the neuron layer this layer drives (None: the readout)
    neurons: int          # spiking neurons of `site` attributed to this row, per image
    timesteps: int        # T of those neurons
    spikes: int           # spikes of those neurons
    input_spikes: int     # events at the layer's input (sum over time steps)
    synaptic_ops: int     # accumulates driven by input events
    snn_macs: int         # MACs of the SNN layer (its analog input part: direct encoding)
    snn_adds: int         # adds of an average pool over an analog input part, in the SNN
    macs: int             # MACs of the same layer in the ANN (dense, from shapes)
    ann_adds: int         # adds of an average pool in the ANN
    weighted: bool        # conv / linear (reads weights), not a pool


@dataclass
class OpCounts:
    images: int
    timesteps: int
    mode: str
    layers: list[LayerCounts]


class _Info:
    """What rides along with a node's value: its events (spike planes or level maps) and whether
    an analog (non-spike) part is present."""
    __slots__ = ("events", "analog", "count")

    def __init__(self, events: Any = None, analog: bool = False) -> None:
        self.events = events
        self.analog = analog
        self.count: Tensor | None = None


class _Row:
    def __init__(self, name: str, kind: str, node: fx.Node, input_kind: str, macs: int, ann_adds: int,
                 snn_macs: int, snn_adds: int, weighted: bool) -> None:
        self.name, self.kind, self.node, self.input = name, kind, node, input_kind
        self.macs, self.ann_adds, self.snn_macs, self.snn_adds, self.weighted = macs, ann_adds, snn_macs, snn_adds, weighted
        self.input_spikes: Tensor | int = 0
        self.synaptic_ops: Tensor | int = 0


class _NeuronStats:
    def __init__(self, node: fx.Node, neurons: int, timesteps: int) -> None:
        self.node, self.neurons, self.timesteps = node, neurons, timesteps
        self.spikes: Tensor | int = 0


def _per_image(shape) -> int:
    return int(math.prod(shape[1:]))


def _shape_of(value: Any) -> torch.Size:
    return value.shape


def _total(counts: Tensor) -> Tensor:
    """The exact sum of a count tensor, as an int64 scalar (float counts are whole numbers)."""
    if counts.is_floating_point():
        return torch.round(counts.sum(dtype=torch.float64)).to(torch.int64)
    return counts.sum(dtype=torch.int64)


def _count_dtype(device: torch.device) -> torch.dtype:
    # float64 on CPU; on CUDA float32 (counts per element stay far below 2^24, so sums are exact)
    return torch.float64 if device.type == "cpu" else torch.float32


class _Counter(fx.Interpreter):
    """Runs the SNN graph by simulation or evaluation and tracks events along every edge."""

    def __init__(self, snn, mode: str) -> None:
        if mode not in ("simulate", "evaluate"):
            raise Ann2SnnError(f"unknown counting mode {mode!r} (simulate or evaluate)")
        super().__init__(snn.graph_module)
        self.mode = mode
        self.timesteps = int(snn.timesteps)
        self.level_dtype = spike_code_arithmetic_dtype(self.timesteps)   # level maps are shifted and added
        self.rows: dict[str, _Row] = {}
        self.neurons: dict[str, _NeuronStats] = {}
        self.images = 0
        self._simulated: dict[str, nn.Module] = {}
        self._levels: dict[str, Tensor] = {}
        self._fanouts: dict[tuple, Tensor] = {}
        self.info: dict[fx.Node, _Info] = {}

    # --- running the network: the simulator's rules, or the evaluator's -----------------------

    def placeholder(self, target, args, kwargs):
        x = super().placeholder(target, args, kwargs)
        return Signal.analog(x) if self.mode == "simulate" else x

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if self.mode == "simulate":
            if target not in self._simulated:
                self._simulated[target] = simulation_module(module)
            return self._simulated[target](*args, **kwargs)
        if isinstance(module, BitSerialIFNode):  # TimeFoldedNeuron's fused neuron, keeping the level map
            out = fire_fused(args[0], module.theta, module.membrane_offset, module.levels, module.timesteps,
                             want_levels=True, per_sample_counts=False, per_channel_counts=False)
            self._levels[target] = out.levels
            return out.value
        return module(*args, **kwargs)

    def call_function(self, target, args, kwargs):
        if self.mode == "simulate":
            return simulate_call(target, *args, **kwargs)
        return target(*args, **kwargs)

    def call_method(self, target, args, kwargs):
        if self.mode == "simulate":
            return simulate_method(target, *args, **kwargs)
        return super().call_method(target, args, kwargs)

    def output(self, target, args, kwargs):
        return read_out(args[0]) if self.mode == "simulate" else args[0]

    def run_batch(self, x: Tensor) -> Tensor:
        self.info = {}
        self.images += int(x.shape[0])
        try:
            logits = self.run(x)
        finally:
            self.info = {}
            self._levels = {}
        return logits

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        info = self._track(n, value)
        if info is not None:
            self.info[n] = info
        for dead in self.user_to_last_uses.get(n, []):
            self.info.pop(dead, None)
        return value

    # --- events: representation-specific pieces -------------------------------------------------
    # simulate: events are planes [T, N, ...] (0/1, or counts where two spike maps were added);
    # evaluate: events are a list of level maps [N, ...] (int64) whose binary digits are the planes.

    def _count_map(self, info: _Info) -> Tensor:
        """Events summed over time steps, per input element [N, ...]."""
        if info.count is None:
            if self.mode == "simulate":
                info.count = info.events.sum(0)
            else:  # popcount(q): the spikes that carry level q
                info.count = popcount_levels(info.events[0], 2**self.timesteps - 1)
                for p in info.events[1:]:
                    info.count = info.count + popcount_levels(p, 2**self.timesteps - 1)
        return info.count

    def _planes(self, info: _Info) -> Tensor:
        if self.mode == "simulate":
            return info.events
        planes = None
        for p in info.events:
            bits = unpack_spikes(p, self.timesteps, _count_dtype(p.device))
            planes = bits if planes is None else planes + bits
        return planes

    def _from_planes(self, planes: Tensor) -> Any:
        """Events from binary planes [T', N, ...]."""
        if self.mode == "simulate":
            return planes
        steps = planes.shape[0]
        weights = torch.tensor([2 ** (steps - 1 - t) for t in range(steps)], dtype=torch.int64, device=planes.device)
        packed = (planes.to(torch.int64) * weights.view((steps,) + (1,) * (planes.dim() - 1))).sum(0)
        return [packed.to(self.level_dtype)]

    def _combine(self, infos: list[_Info]) -> Any:
        events = [i.events for i in infos if i.events is not None]
        if not events:
            return None
        if self.mode == "evaluate":
            return [p for e in events for p in e]
        out = events[0]
        for e in events[1:]:
            out, e = align_steps(out, e)
            out = out + e
        return out

    def _proxy(self, node: Any, component: int) -> Any:
        """What stands in for a node argument when an op is applied to events."""
        if not isinstance(node, fx.Node):
            return node
        value = self.env[node]
        info = self.info.get(node)
        if info is None:
            return value
        if self.mode == "simulate":
            if info.events is not None:
                return Signal(steps=info.events)
            dtype = value.const.dtype if isinstance(value, Signal) and value.const is not None else (
                value.steps.dtype if isinstance(value, Signal) else value.dtype)
            return Signal(const=torch.zeros(_shape_of(value), dtype=dtype, device=self._device(value)))
        if info.events is not None and component < len(info.events):
            return info.events[component]
        return torch.zeros(_shape_of(value), dtype=self.level_dtype, device=self._device(value))

    @staticmethod
    def _device(value: Any) -> torch.device:
        if isinstance(value, Signal):
            return (value.const if value.const is not None else value.steps).device
        return value.device

    def _structural(self, n: fx.Node, infos: list[_Info]) -> Any:
        """Apply a structural op (flatten, reshape, concat, pad, ...) to the events."""
        components = 1 if self.mode == "simulate" else max(len(i.events) for i in infos if i.events is not None)
        results = []
        for k in range(components):
            args = fx.map_arg(n.args, lambda a: self._proxy(a, k))
            kwargs = fx.map_arg(n.kwargs, lambda a: self._proxy(a, k))
            if n.op == "call_module":
                module = self.fetch_attr(n.target)
                if self.mode == "simulate":
                    results.append(fold_time(module, args[0].steps))
                else:
                    results.append(module(args[0]))
            elif n.op == "call_function":
                if n.target is F.pad:  # padding carries no events, whatever the pad value
                    args, kwargs = (args[0], call_argument(args, kwargs, 1, "pad", None)), {}
                if self.mode == "simulate":
                    results.append(simulate_call(n.target, *args, **kwargs).steps)
                else:
                    results.append(n.target(*args, **kwargs))
            else:
                if self.mode == "simulate":
                    results.append(simulate_method(n.target, *args, **kwargs).steps)
                else:
                    results.append(getattr(args[0], n.target)(*args[1:], **kwargs))
        return results[0] if self.mode == "simulate" else results

    # --- rules ----------------------------------------------------------------------------------

    def _track(self, n: fx.Node, value: Any) -> _Info | None:
        if n.op == "output" or not isinstance(value, (Tensor, Signal)):
            return None
        if n.op in ("placeholder", "get_attr"):
            return _Info(None, analog=True)
        infos = [self.info[a] for a in n.all_input_nodes if a in self.info]
        has_events = any(i.events is not None for i in infos)
        analog = any(i.analog for i in infos)
        if n.op == "call_module":
            module = self.fetch_attr(n.target)
            if isinstance(module, BitSerialIFNode):
                return self._neuron(n, module, value)
            if isinstance(module, LAYERS):
                return self._layer(n, module, value, infos)
            if isinstance(module, AVERAGE_POOLS):
                return self._pool(n, module, (), {}, value, infos)
            if isinstance(module, STRUCTURAL):
                return _Info(self._structural(n, infos) if has_events else None, analog)
            if isinstance(module, NORMS):  # a per-channel scale of the events, and a shift (analog)
                return _Info(self._combine(infos), True)
            return _Info(None, True)  # MaxPool and other ops on the potential: analog
        fn = n.target
        method = n.op == "call_method"
        if (method and fn in _STRUCTURAL_METHODS) or (not method and fn in _STRUCTURAL_FUNCTIONS):
            return _Info(self._structural(n, infos) if has_events else None, analog)
        constants = [a for a in n.args if not isinstance(a, fx.Node)]
        if (method and fn in _ADD_METHODS) or (not method and fn in _ADD_FUNCTIONS):
            return _Info(self._combine(infos), analog or any(isinstance(c, (int, float, Tensor)) for c in constants))
        if (method and fn in _SCALE_METHODS) or (not method and fn in _SCALE_FUNCTIONS):
            # a scale (a constant, or a tensor attribute) keeps the events and adds nothing analog
            scaled = [self.info[a] for a in n.all_input_nodes if a in self.info and a.op != "get_attr"]
            return _Info(self._combine(scaled), any(i.analog for i in scaled))
        if (method and fn in _POOL_METHODS) or (not method and fn in _POOL_FUNCTIONS):
            fetched_args, fetched_kwargs = self.fetch_args_kwargs_from_env(n)
            return self._pool(n, torch.mean if method else fn, fetched_args, fetched_kwargs, value, infos)
        if has_events and not self._acts_on_potential(fn, method):
            raise UnsupportedModelError(f"energy: no rule for counting spikes through {getattr(fn, '__name__', fn)}")
        return _Info(None, True)

    @staticmethod
    def _acts_on_potential(fn: Any, method: bool) -> bool:
        return not method and fn in _ON_POTENTIAL_FUNCTIONS

    def _neuron(self, n: fx.Node, module: BitSerialIFNode, value: Any) -> _Info:
        if self.mode == "simulate":
            info = _Info(value.spikes, analog=False)
        else:
            info = _Info([self._levels.pop(n.target).to(self.level_dtype)], analog=False)
        stats = self.neurons.get(n.name)
        if stats is None:
            stats = self.neurons[n.name] = _NeuronStats(n, _per_image(_shape_of(value)), module.timesteps)
        stats.spikes = stats.spikes + _total(self._count_map(info))
        return info

    def _input_kind(self, info: _Info | None) -> str:
        if info is None or info.events is None:
            return "analog"
        return "mixed" if info.analog else "spikes"

    def _layer(self, n: fx.Node, layer: nn.Module, value: Any, infos: list[_Info]) -> _Info:
        source = n.args[0]
        info = self.info.get(source) if isinstance(source, fx.Node) else None
        in_shape = tuple(_shape_of(self.env[source]))
        row = self.rows.get(n.name)
        if row is None:
            out = _per_image(_shape_of(value))
            if isinstance(layer, nn.Linear):
                macs = out * layer.in_features
            else:
                macs = out * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
            kind = self._input_kind(info)
            row = self.rows[n.name] = _Row(n.target, type(layer).__name__, n, kind, macs, 0,
                                           macs if kind != "spikes" else 0, 0, True)
        if info is not None and info.events is not None:
            spikes, sops = self._layer_sops(layer, self._count_map(info), in_shape)
            row.input_spikes = row.input_spikes + spikes
            row.synaptic_ops = row.synaptic_ops + sops
        return _Info(None, analog=True)  # currents and bias: not spikes

    def _layer_sops(self, layer: nn.Module, count: Tensor, in_shape: tuple) -> tuple[Tensor, Tensor]:
        """(input events, synaptic ops) of a layer, from its input's event counts [N, ...]."""
        if isinstance(layer, nn.Linear):
            spikes = _total(count)
            return spikes, spikes * layer.out_features
        if self.mode == "simulate":
            # the definition: the event map convolved with an all-ones kernel of the weight's shape
            dtype = _count_dtype(count.device)
            occupancy = layer._conv_forward(count.to(dtype), conv_ones_kernel(layer, dtype, count.device), None)
            return _total(count), _total(occupancy) * (
                layer.out_channels // layer.groups)
        # fast path: popcount map, summed over images and channels, times the fan-out map
        key = (id(layer), in_shape[1:], count.device)
        if key not in self._fanouts:
            self._fanouts[key] = conv_fanout(layer, in_shape[1:]).to(count.device)
        positions = count.sum((0, 1), dtype=torch.int64)
        return positions.sum(), (positions * self._fanouts[key][0]).sum()

    def _pool(self, n: fx.Node, target: Any, args: tuple, kwargs: dict, value: Any, infos: list[_Info]) -> _Info:
        source = n.args[0]
        info = self.info.get(source) if isinstance(source, fx.Node) else None
        analog = info is None or info.analog
        if info is None or info.events is None:
            return _Info(None, analog)  # pooling analog values only: not counted
        in_shape = tuple(_shape_of(self.env[source]))
        kind, params = pool_params(target, args, kwargs)
        sums = window_sums(kind, params, torch.Size(in_shape))
        row = self.rows.get(n.name)
        if row is None:
            adds = int(pool_fanout(sums, in_shape[1:]).sum())
            name = n.target if n.op == "call_module" else n.name
            kind_name = type(target).__name__ if isinstance(target, nn.Module) else kind
            input_kind = self._input_kind(info)
            row = self.rows[n.name] = _Row(name, kind_name, n, input_kind, 0, adds, 0,
                                           adds if input_kind == "mixed" else 0, False)
        count = self._count_map(info)
        row.input_spikes = row.input_spikes + _total(count)
        if self.mode == "simulate":
            window_counts = sums(count.to(_count_dtype(count.device)))
            row.synaptic_ops = row.synaptic_ops + _total(window_counts)
        else:
            key = (n.name, in_shape[1:], count.device)
            if key not in self._fanouts:
                self._fanouts[key] = pool_fanout(sums, in_shape[1:]).to(count.device)
            row.synaptic_ops = row.synaptic_ops + (count * self._fanouts[key]).sum()
        # the events after the pool: the nonzero entries of each step's pooled plane
        planes = self._planes(info)
        pooled = fold_time(lambda s: sums(s), planes.to(_count_dtype(planes.device)))
        return _Info(self._from_planes((pooled != 0).to(pooled.dtype)), analog)

    # --- the result ------------------------------------------------------------------------------

    def result(self) -> OpCounts:
        graph_order = {node: i for i, node in enumerate(self.module.graph.nodes)}
        row_nodes = {row.node: key for key, row in self.rows.items()}
        layers: list[tuple[int, LayerCounts]] = []
        assigned: dict[str, _NeuronStats] = {}
        orphans: list[_NeuronStats] = []
        for stats in self.neurons.values():
            drivers = self._drivers(stats.node, row_nodes)
            if drivers:  # several (a projection shortcut): the layer of most MACs, the main path
                main = min(drivers, key=lambda d: (-self.rows[row_nodes[d]].macs, graph_order[d]))
                assigned.setdefault(row_nodes[main], stats)
            else:
                orphans.append(stats)
        sites = {key: self._drives(row.node, row_nodes) for key, row in self.rows.items()}
        for key, row in self.rows.items():
            stats = assigned.get(key)
            site = stats.node.target if stats else sites[key]
            layers.append((graph_order[row.node], LayerCounts(
                name=row.name, kind=row.kind, input=row.input, site=site,
                neurons=stats.neurons if stats else 0, timesteps=stats.timesteps if stats else 0,
                spikes=int(stats.spikes) if stats else 0, input_spikes=int(row.input_spikes),
                synaptic_ops=int(row.synaptic_ops), snn_macs=row.snn_macs * self.images,
                snn_adds=row.snn_adds * self.images, macs=row.macs * self.images,
                ann_adds=row.ann_adds * self.images, weighted=row.weighted)))
        for stats in orphans:
            layers.append((graph_order[stats.node], LayerCounts(
                name=stats.node.target, kind="neurons", input="-", site=stats.node.target,
                neurons=stats.neurons, timesteps=stats.timesteps, spikes=int(stats.spikes), input_spikes=0,
                synaptic_ops=0, snn_macs=0, snn_adds=0, macs=0, ann_adds=0, weighted=False)))
        return OpCounts(images=self.images, timesteps=self.timesteps, mode=self.mode,
                        layers=[row for _, row in sorted(layers, key=lambda item: item[0])])

    def _drivers(self, neuron: fx.Node, row_nodes: dict) -> list[fx.Node]:
        """The layer rows whose output reaches `neuron` without passing another neuron or layer."""
        found, stack, seen = [], list(neuron.all_input_nodes), set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in row_nodes:
                found.append(node)
            elif not (node.op == "call_module" and isinstance(self.fetch_attr(node.target), (BitSerialIFNode,) + LAYERS)):
                stack.extend(node.all_input_nodes)
        return found

    def _drives(self, row: fx.Node, row_nodes: dict) -> str | None:
        """The neuron layer a row's output reaches first (None: the readout)."""
        stack, seen = list(row.users), set()
        while stack:
            node = stack.pop(0)
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_module" and isinstance(self.fetch_attr(node.target), BitSerialIFNode):
                return node.target
            if node not in row_nodes and not (node.op == "call_module"
                                              and isinstance(self.fetch_attr(node.target), LAYERS)):
                stack.extend(node.users)
        return None


class OperationCounter:
    """Counts spikes, synaptic operations and MACs of an SNN, batch by batch.

    mode "evaluate": the fast path (level maps, popcounts, fan-out maps); "simulate": the
    time-stepped simulator's binary spike planes. Both give identical counts. Calling the counter
    on a batch returns the SNN's logits (equal to `snn.evaluate(x)` / `snn.simulate(x)`).
    """

    def __init__(self, snn, mode: str = "evaluate") -> None:
        self._counter = _Counter(snn, mode)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return self._counter.run_batch(x)

    def result(self) -> OpCounts:
        return self._counter.result()


@torch.no_grad()
def count_operations(snn, batches: Iterable, *, mode: str = "evaluate", device: str | torch.device = "cpu",
                     progress: bool = False, total: int | None = None, context: Context = Context()) -> OpCounts:
    """Spikes, SOPs and MACs of `snn` over `batches` of images (or (images, labels) pairs).

    `context` (a `distributed.Context`, under torchrun): each rank passes its shard of the images
    and the integer counts are summed over ranks, so every rank gets those of one process."""
    from tqdm import tqdm

    from ..evaluation import PROGRESS_DELAY_S, check_data_fits, prepare_for_device

    device = torch.device(device)
    if isinstance(getattr(batches, "dataset", None), Dataset):  # a DataLoader: refuse data that does not fit first
        check_data_fits(snn, batches.dataset, labels=False)
    snn = prepare_for_device(snn.eval(), device)
    dtype = next(iter(snn.parameters()), torch.zeros(())).dtype
    counter = OperationCounter(snn, mode)
    for batch in tqdm(batches, total=total, desc=f"energy ({mode})", unit="batch", disable=not progress,
                      delay=PROGRESS_DELAY_S):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        counter(x.to(device, dtype=dtype))
    counts = counter.result()
    if context.distributed:
        counts = _sum_over_ranks(counts, context)
    if counts.images == 0:
        raise Ann2SnnError("energy: no images to count over (the data set is empty)")
    return counts


# Totals over the images counted (LayerCounts' other fields are per image or structural).
_SUMMED_FIELDS = ("spikes", "input_spikes", "synaptic_ops", "snn_macs", "snn_adds", "macs", "ann_adds")


def _sum_over_ranks(counts: OpCounts, context: Context) -> OpCounts:
    """The counts of all ranks' shards added up (exact: int64). Every rank must have counted at
    least one image, so that all of them know the layers."""
    from dataclasses import replace

    fewest = -all_reduce_max(-float(counts.images), context)
    if fewest == 0:
        total = int(all_reduce_sum(torch.tensor([counts.images], dtype=torch.int64), context).item())
        if total == 0:
            raise Ann2SnnError("energy: no images to count over (the data set is empty)")
        raise Ann2SnnError(f"energy: {total} images for {context.world_size} processes leave some with none; "
                           "use fewer processes or more images")
    local = torch.tensor([counts.images] + [getattr(layer, f) for layer in counts.layers for f in _SUMMED_FIELDS],
                         dtype=torch.int64)
    totals = all_reduce_sum(local, context).tolist()
    per_layer = len(_SUMMED_FIELDS)
    layers = [replace(layer, **dict(zip(_SUMMED_FIELDS, totals[1 + i * per_layer:1 + (i + 1) * per_layer])))
              for i, layer in enumerate(counts.layers)]
    return replace(counts, images=totals[0], layers=layers)
