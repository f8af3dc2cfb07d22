"""Spike, synaptic-operation and energy estimates of a converted SNN (METHOD.md section 6).

    E_ANN = sum over layers of MACs_l * E_MAC  (+ adds of average pools * E_AC)
    E_SNN = MACs of layers driven by analog values * E_MAC + SOPs * E_AC  (+ optional terms)

Layers are the SNN's convolutions and linear layers, and every average pool fed by spikes (each
input spike reaches its pooling windows: one accumulate per window). A layer's input is one of
- spikes: it costs synaptic operations, SOPs = sum over time steps of the input's event map
  convolved with an all-ones kernel of the layer's weight shape (stride, padding, dilation and
  groups as in the layer), i.e. every input spike times the number of synapses it reaches; for a
  linear layer, events * out_features;
- analog: the input image (direct encoding), or currents of a layer not followed by a neuron:
  the layer costs its dense MACs, once, as in the ANN;
- mixed (spikes plus an analog part, e.g. spikes plus the input image): both.
Events are the binary spike planes of the neurons, carried unchanged through structural ops
(flatten, reshape, concat, pad, identity, scaling); a residual add of two spike maps carries both
maps' events; after an average pool, the events are the nonzero entries of the pooled planes.
Residual additions and BN folded into biases cost nothing (as in SpikingJelly's SynOpCounter);
average pools fed by analog values are not counted in either network.
The output head (a final Softmax, the QDQ pairs around it, reshapes: passes/graph_utils.output_head)
is float work on the SNN's output that the ANN does alike: counted in neither network, and named.

Two counting paths, which give identical counts (METHOD.md section 7). Both run one of the SNN's
two executors, lowered as for `simulate` or `evaluate`, with observers put into its graph
(energy/observe.py, as torch.ao's prepare does): beside each value that carries spikes the graph
computes their events (energy/events.py), and an observer at every neuron, layer and pool counts.
- mode "simulate": the time-stepped simulator; a neuron's events are its binary spike planes
  [T, N, ...], and a layer's SOPs follow the definition above;
- mode "evaluate" (fast path): the time-folded evaluator; a neuron's events are its level map
  q, whose binary digits are the spike planes, so a layer's SOPs are popcount(q) times a
  precomputed fan-out map, one extra reduction.

Energy tables are JSON data (`ann2snn/energy_tables/*.json`, or a user's file): per-operation
energies in pJ, each with its source. Optional terms (off by default): neuron updates,
neurons * T * E_neuron_update; memory traffic, one weight read per MAC or synaptic op of a weighted
layer, and per neuron one state read and write per time step (SNN) or once (ANN).
"""

from .count import LayerCounts, OpCounts, OperationCounter, count_operations
from .report import EnergyReport, energy_report, estimate_energy, format_report, plot_energy
from .costs import DEFAULT_TABLE, EnergyCost, EnergyTable, available_tables, load_table, parse_table

__all__ = ["DEFAULT_TABLE", "EnergyCost", "EnergyReport", "EnergyTable", "LayerCounts", "OpCounts",
           "OperationCounter", "available_tables", "count_operations", "energy_report", "estimate_energy",
           "format_report", "load_table", "parse_table", "plot_energy"]
