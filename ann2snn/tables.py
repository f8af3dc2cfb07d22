"""Plain-text tables for the CLI's reports, and the rows of its site tables."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .snn import SNN


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """Rows of dicts as an aligned table; numbers right-aligned, text left-aligned."""
    headers = list(headers or columns)
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def site_rows(snn: SNN) -> list[dict]:
    """One row per activation site of the SNN, for `convert`'s table."""
    rows = []
    for name, site in snn.report["sites"].items():
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
