"""Energy of the ANN and the SNN from the counts, the text report and the plot."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import Ann2SnnError
from .count import OpCounts, count_operations
from .costs import EnergyTable, default_table, load_table


# ==============================================================================================
# Energy

MEMORY_MODEL = ("one weight read per MAC or synaptic op of a conv/linear layer (memory_weight); per neuron one "
                "state read and one write per time step in the SNN, once in the ANN (memory_state)")
NEURON_MODEL = "neurons * T * neuron_update"
HEAD_MODEL = ("float work on the SNN's output after its last layer, as in the ANN; counted in neither network "
              "(the table prices MACs and accumulates, not exp or division)")


@dataclass
class EnergyReport:
    images: int
    timesteps: int
    mode: str
    table: EnergyTable
    neuron_updates: bool
    memory: bool
    layers: list[dict]
    total: dict
    head: list[str]      # the output head's computing ops (OpCounts.head), not counted: HEAD_MODEL

    @property
    def terms(self) -> list[str]:
        """The energy terms included, named."""
        terms = ["compute (MAC / AC)"]
        if self.neuron_updates:
            terms.append(f"neuron updates ({NEURON_MODEL})")
        if self.memory:
            terms.append(f"memory ({MEMORY_MODEL})")
        return terms

    def to_json(self) -> dict:
        return {"images": self.images, "timesteps": self.timesteps, "mode": self.mode,
                "table": self.table.to_json(), "terms": self.terms,
                "options": {"neuron_updates": self.neuron_updates, "memory": self.memory},
                "layers": self.layers, "total": self.total,
                "output_head": {"ops": self.head, "counted": False, "why": HEAD_MODEL}}


def estimate_energy(counts: OpCounts, table: EnergyTable | None = None, *, neuron_updates: bool = False,
                    memory: bool = False) -> EnergyReport:
    """Per-layer and total energy per image of the SNN and of the same ANN (docs/method.md section 6)."""
    table = table or load_table()
    e_mac, e_ac = table.pj("mac"), table.pj("ac")
    e_neuron = table.require("neuron_update", "--neuron-updates") if neuron_updates else 0.0
    e_weight = table.require("memory_weight", "--memory") if memory else 0.0
    e_state = table.require("memory_state", "--memory") if memory else 0.0
    images = counts.images
    rows = []
    for layer in counts.layers:
        per: dict[str, Any] = {k: getattr(layer, k) / images for k in ("spikes", "input_spikes", "synaptic_ops")}
        per.update({k: getattr(layer, k) // images for k in ("snn_macs", "snn_adds", "macs", "ann_adds")})
        row: dict[str, Any] = {"name": layer.name, "kind": layer.kind, "input": layer.input, "site": layer.site,
                               "neurons": layer.neurons, "timesteps": layer.timesteps, **per}
        row["spike_rate"] = per["spikes"] / (layer.neurons * layer.timesteps) if layer.neurons else None
        snn = per["snn_macs"] * e_mac + (per["synaptic_ops"] + per["snn_adds"]) * e_ac
        ann = per["macs"] * e_mac + per["ann_adds"] * e_ac
        if neuron_updates:
            row["neuron_energy_pj"] = layer.neurons * layer.timesteps * e_neuron
            snn += row["neuron_energy_pj"]
        if memory:
            weight_reads = per["snn_macs"] + per["synaptic_ops"] if layer.weighted else 0.0
            row["snn_memory_energy_pj"] = weight_reads * e_weight + 2 * layer.neurons * layer.timesteps * e_state
            row["ann_memory_energy_pj"] = (per["macs"] if layer.weighted else 0.0) * e_weight \
                + 2 * layer.neurons * e_state
            snn += row["snn_memory_energy_pj"]
            ann += row["ann_memory_energy_pj"]
        row["snn_energy_pj"] = snn
        row["ann_energy_pj"] = ann
        rows.append(row)
    total: dict[str, Any] = {k: sum(r[k] for r in rows) for k in (
        "neurons", "spikes", "input_spikes", "synaptic_ops", "snn_macs", "snn_adds", "macs", "ann_adds",
        "snn_energy_pj", "ann_energy_pj")}
    neuron_steps = sum(r["neurons"] * r["timesteps"] for r in rows)
    total["spike_rate"] = total["spikes"] / neuron_steps if neuron_steps else None
    for key in ("neuron_energy_pj", "snn_memory_energy_pj", "ann_memory_energy_pj"):
        if rows and key in rows[0]:
            total[key] = sum(r[key] for r in rows)
    total["ratio"] = total["ann_energy_pj"] / total["snn_energy_pj"] if total["snn_energy_pj"] > 0 else None
    return EnergyReport(images=images, timesteps=counts.timesteps, mode=counts.mode, table=table,
                        neuron_updates=neuron_updates, memory=memory, layers=rows, total=total, head=counts.head)


def energy_report(snn, batches: Iterable, table: EnergyTable | str | os.PathLike | None = None, *,
                  mode: str = "evaluate", neuron_updates: bool = False, memory: bool = False,
                  device: str | torch.device = "cpu", progress: bool = False, total: int | None = None) -> EnergyReport:
    """count_operations, then estimate_energy with `table` (an EnergyTable, a shipped name or a file;
    None: the shipped table default_table picks for the SNN's weight dtypes)."""
    if table is None:
        table = default_table(snn.weight_dtypes())[0]
    table = table if isinstance(table, EnergyTable) else load_table(table)
    counts = count_operations(snn, batches, mode=mode, device=device, progress=progress, total=total)
    return estimate_energy(counts, table, neuron_updates=neuron_updates, memory=memory)


def format_report(report: EnergyReport) -> str:
    """The report as a readable table (energies in nJ per image)."""
    from ..tables import format_table

    rows = []
    for r in report.layers:
        rows.append({"layer": r["name"], "input": r["input"], "neurons": r["neurons"], "spikes": r["spikes"],
                     "rate": "" if r["spike_rate"] is None else r["spike_rate"], "SOPs": r["synaptic_ops"],
                     "SNN MACs": r["snn_macs"], "ANN MACs": r["macs"],
                     "SNN nJ": r["snn_energy_pj"] / 1e3, "ANN nJ": r["ann_energy_pj"] / 1e3})
    t = report.total
    rows.append({"layer": "total", "input": "", "neurons": t["neurons"], "spikes": t["spikes"],
                 "rate": "" if t["spike_rate"] is None else t["spike_rate"], "SOPs": t["synaptic_ops"],
                 "SNN MACs": t["snn_macs"], "ANN MACs": t["macs"],
                 "SNN nJ": t["snn_energy_pj"] / 1e3, "ANN nJ": t["ann_energy_pj"] / 1e3})
    columns = ["layer", "input", "neurons", "spikes", "rate", "SOPs", "SNN MACs", "ANN MACs", "SNN nJ", "ANN nJ"]
    headers = ["layer", "input", "neurons", "spikes/img", "spikes/neuron/step", "SOPs/img", "SNN MACs/img",
               "ANN MACs/img", "SNN nJ/img", "ANN nJ/img"]
    table = report.table
    lines = [f"energy per image over {report.images} images (T = {report.timesteps}, counted by {report.mode}); "
             f"table {table.name}: E_MAC = {table.pj('mac'):g} pJ, E_AC = {table.pj('ac'):g} pJ",
             "terms: " + "; ".join(report.terms),
             "neurons, spikes: the neuron layer each layer drives; SOPs: accumulates driven by the layer's input "
             "spikes; SNN MACs: layers driven by analog values (the input image)",
             format_table(rows, columns, headers)]
    if report.head:
        lines.append(f"output head ({', '.join(report.head)}): {HEAD_MODEL}")
    ratio = t["ratio"]
    lines.append(f"SNN {t['snn_energy_pj'] / 1e6:.4g} uJ, ANN {t['ann_energy_pj'] / 1e6:.4g} uJ per image: "
                 + (f"ANN / SNN energy ratio {ratio:.3g}x" if ratio is not None else "ANN / SNN energy ratio undefined"))
    return "\n".join(lines)


def plot_energy(report: EnergyReport, path: str | os.PathLike) -> None:
    """Per-layer spike rate and energy (SNN vs ANN) as an image, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime.artifact import write_atomically

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    names = [r["name"] for r in report.layers]
    x = list(range(len(names)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.6 * len(names) + 2), 7), sharex=True)
    rates = [r["spike_rate"] or 0.0 for r in report.layers]
    top.bar(x, rates, color="tab:green")
    top.set_ylabel("spikes / neuron / step\n(neurons each layer drives)")
    top.set_title(f"{report.images} images, T = {report.timesteps}, table {report.table.name}")
    width = 0.4
    bottom.bar([i - width / 2 for i in x], [r["snn_energy_pj"] / 1e3 for r in report.layers], width, label="SNN")
    bottom.bar([i + width / 2 for i in x], [r["ann_energy_pj"] / 1e3 for r in report.layers], width, label="ANN")
    bottom.set_ylabel("energy per image (nJ)")
    if any(r["snn_energy_pj"] > 0 or r["ann_energy_pj"] > 0 for r in report.layers):
        bottom.set_yscale("log")
    ratio = report.total["ratio"]
    bottom.legend(title=f"ANN / SNN = {ratio:.3g}x" if ratio is not None else None)
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=45, ha="right")
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt))
    except ValueError as err:  # an image format matplotlib does not know
        raise Ann2SnnError(f"--plot {path}: {str(err).splitlines()[0]}") from None
    finally:
        plt.close(fig)

