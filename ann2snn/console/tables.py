"""The rows of the CLI's site and layer tables."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runtime.snn import SNN


def site_rows(snn: SNN) -> list[dict]:
    """One row per activation site of the SNN, for `convert`'s table."""
    rows = []
    for name, site in snn.report.sites.items():
        theta = site.get("theta")
        lam = site.get("lambda")
        shift = site.get("bias_shift", {})
        rows.append({
            "site": name, "levels": site.get("levels"), "T": site.get("timesteps"),
            "lambda": channel_summary(lam), "theta": channel_summary(theta),
            "bias shift": f"{shift.get('kind', '')}:{shift.get('target', '')}",
        })
    return rows


def channel_summary(value) -> str | float:
    """A per-channel list as its range and length; anything else as it is."""
    if isinstance(value, list):
        return f"{min(value):.4g}..{max(value):.4g} ({len(value)} ch)"
    return value


def count_ops(graph: dict) -> dict:
    """How many nodes of each op an artifact's graph description holds (its modules by type)."""
    counts: dict[str, int] = {}
    for node in graph["nodes"]:
        if node["op"] in ("placeholder", "output"):
            continue
        op = graph["modules"][node["target"]]["type"] if node["op"] == "call_module" else node["target"]
        counts[op] = counts.get(op, 0) + 1
    return counts
