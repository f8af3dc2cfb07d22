"""The rows of the CLI's site and layer tables, and what `inspect` shows of an .snn file."""
from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

import torch

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


def weight_summary(dtypes: dict[str, torch.dtype]) -> str:
    """"int8 in 19 layers, float32 in 1": how many layers hold weights of each dtype, most first."""
    counts = Counter(str(d).removeprefix("torch.") for d in dtypes.values()).most_common()
    if not counts:
        return "no layers with weights"
    parts = [f"{name} in {n}" for name, n in counts]
    parts[0] += " layer" if counts[0][1] == 1 else " layers"
    return ", ".join(parts)


def snn_summary(path: str | os.PathLike) -> dict:
    """What `inspect` shows of an .snn file: the header, the file's size, each layer's weight dtype,
    the activation sites and the ops; the whole file is checked, as eval would load it."""
    import ann2snn
    from ..runtime.artifact import read_metadata
    from ..runtime.metadata import ArtifactHeader

    dtypes = ann2snn.load_snn(path).weight_dtypes()
    header = ArtifactHeader.from_json(read_metadata(path))
    size = os.path.getsize(path)
    return {"kind": "snn", "timesteps": header.timesteps, "ann2snn_version": header.ann2snn_version,
            "format_version": header.format_version, "file_bytes": size, "file_mib": round(size / 2**20, 3),
            "weights": weight_summary(dtypes),
            "layers": {name: {"weight": str(d).removeprefix("torch.")} for name, d in dtypes.items()},
            "source": header.source.to_json(), "sites": header.report.sites, "ops": count_ops(header.graph)}
