"""Energy: spikes, synaptic operations and energy of a converted SNN against its ANN, per layer.

Counted on the SNN's own two executors; the definitions are in docs/energy.md.
"""
from .count import LayerCounts, OpCounts, OperationCounter, count_operations
from .report import EnergyReport, energy_report, estimate_energy, format_report, plot_energy
from .costs import (DEFAULT_TABLE, INT8_TABLE, EnergyCost, EnergyTable, available_tables, default_table, load_table,
                    parse_table)

__all__ = ["DEFAULT_TABLE", "INT8_TABLE", "EnergyCost", "EnergyReport", "EnergyTable", "LayerCounts", "OpCounts",
           "OperationCounter", "available_tables", "count_operations", "default_table", "energy_report",
           "estimate_energy",
           "format_report", "load_table", "parse_table", "plot_energy"]
