"""Counting spikes, synaptic operations and MACs per layer, on the simulator's spike planes or the evaluator's level maps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, fx
from torch.utils.data import Dataset

from ..runtime.distributed import Context, all_reduce_max, all_reduce_sum
from ..errors import Ann2SnnError
from ..runtime import lower_to_evaluator, lower_to_simulator
from ..runtime.neuron import BitSerialIFNode
from ..ops import LAYERS
from ..runtime.graph import head_arithmetic
from ..runtime.snn import ieee_float32
from .observe import RowObserver, SpikeObserver, observe


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
    head: list[str] = field(default_factory=list)   # the output head's computing ops (Softmax, QuantDequant, ...)


class OperationCounter:
    """Counts spikes, synaptic operations and MACs of an SNN, batch by batch, by running one of its
    lowered executors with observers in it (energy/observe.py).

    mode "evaluate": the fast path (level maps, popcounts, fan-out maps); "simulate": the
    time-stepped simulator's binary spike planes. Both give identical counts. Calling the counter
    on a batch returns the SNN's logits (equal to `snn.evaluate(x)` / `snn.simulate(x)`).
    """

    def __init__(self, snn, mode: str = "evaluate") -> None:
        if mode not in ("simulate", "evaluate"):
            raise Ann2SnnError(f"unknown counting mode {mode!r} (simulate or evaluate)")
        self.mode, self.timesteps, self.images = mode, int(snn.timesteps), 0
        self.snn_graph = snn.graph_module
        gm = snn.graph_module
        self.lowered = lower_to_simulator(gm) if mode == "simulate" else lower_to_evaluator(gm, levels=True)
        self.observers = observe(self.lowered, gm, mode)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        with ieee_float32():
            logits, _ = self.lowered(x)
        self.images += int(x.shape[0])
        return logits

    def result(self) -> OpCounts:
        graph_order = {node: i for i, node in enumerate(self.snn_graph.graph.nodes)}
        rows = {o.node: o for o in self.observers if isinstance(o, RowObserver)}
        layers: list[tuple[int, LayerCounts]] = []
        assigned: dict[fx.Node, SpikeObserver] = {}
        orphans: list[SpikeObserver] = []
        for neuron in (o for o in self.observers if isinstance(o, SpikeObserver)):
            drivers = self._drivers(neuron.node, rows)
            if drivers:  # several (a projection shortcut): the layer of most MACs, the main path
                main = min(drivers, key=lambda d: (-rows[d].macs, graph_order[d]))
                assigned.setdefault(main, neuron)
            else:
                orphans.append(neuron)
        for node, row in rows.items():
            neuron = assigned.get(node)
            layers.append((graph_order[node], LayerCounts(
                name=row.name, kind=row.kind, input=row.input,
                site=neuron.node.target if neuron else self._drives(node, rows),
                neurons=neuron.neurons if neuron else 0, timesteps=neuron.timesteps if neuron else 0,
                spikes=int(neuron.spikes) if neuron else 0, input_spikes=int(row.input_spikes),
                synaptic_ops=int(row.synaptic_ops), snn_macs=row.snn_macs * self.images,
                snn_adds=row.snn_adds * self.images, macs=row.macs * self.images,
                ann_adds=row.ann_adds * self.images, weighted=row.weighted)))
        for neuron in orphans:
            layers.append((graph_order[neuron.node], LayerCounts(
                name=neuron.node.target, kind="neurons", input="-", site=neuron.node.target,
                neurons=neuron.neurons, timesteps=neuron.timesteps, spikes=int(neuron.spikes), input_spikes=0,
                synaptic_ops=0, snn_macs=0, snn_adds=0, macs=0, ann_adds=0, weighted=False)))
        head = [type(self.snn_graph.get_submodule(n.target)).__name__ for n in head_arithmetic(self.snn_graph)]
        return OpCounts(images=self.images, timesteps=self.timesteps, mode=self.mode,
                        layers=[row for _, row in sorted(layers, key=lambda item: item[0])], head=head)

    def _stops(self, node: fx.Node) -> bool:
        """A neuron or a layer: where a layer's currents end."""
        return node.op == "call_module" and isinstance(self.snn_graph.get_submodule(node.target),
                                                       (BitSerialIFNode,) + LAYERS)

    def _drivers(self, neuron: fx.Node, rows: dict) -> list[fx.Node]:
        """The rows whose output reaches `neuron` without passing another neuron or layer."""
        found, stack, seen = [], list(neuron.all_input_nodes), set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in rows:
                found.append(node)
            elif not self._stops(node):
                stack.extend(node.all_input_nodes)
        return found

    def _drives(self, row: fx.Node, rows: dict) -> str | None:
        """The neuron layer a row's output reaches first (None: the readout)."""
        stack, seen = list(row.users), set()
        while stack:
            node = stack.pop(0)
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_module" and isinstance(self.snn_graph.get_submodule(node.target), BitSerialIFNode):
                return node.target
            if node not in rows and not self._stops(node):
                stack.extend(node.users)
        return None


@torch.no_grad()
def count_operations(snn, batches: Iterable, *, mode: str = "evaluate", device: str | torch.device = "cpu",
                     progress: bool = False, total: int | None = None, context: Context = Context()) -> OpCounts:
    """Spikes, SOPs and MACs of `snn` over `batches` of images (or (images, labels) pairs).

    `context` (a `distributed.Context`, under torchrun): each rank passes its shard of the images
    and the integer counts are summed over ranks, so every rank gets those of one process."""
    from ..runtime.scoring import check_data_fits, prepare_for_device
    from ..progress import progress_bar

    device = torch.device(device)
    if isinstance(getattr(batches, "dataset", None), Dataset):  # a DataLoader: refuse data that does not fit first
        check_data_fits(snn, batches.dataset, labels=False)
    snn = prepare_for_device(snn.eval(), device)
    dtype = next(iter(snn.parameters()), torch.zeros(())).dtype
    counter = OperationCounter(snn, mode)
    for batch in progress_bar(batches, total=total, desc=f"energy ({mode})", enabled=progress):
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
