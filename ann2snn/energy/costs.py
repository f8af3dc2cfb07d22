"""Energy tables: per-operation energies in pJ, each with its source (JSON data, validated)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import Ann2SnnError


# ==============================================================================================
# Energy tables

TABLE_PACKAGE_DIR = "tables"
DEFAULT_TABLE = "fp32-45nm"
INT8_TABLE = "int8-45nm"
REQUIRED_ENERGIES = ("mac", "ac")
OPTIONAL_ENERGIES = ("neuron_update", "memory_weight", "memory_state")
ENERGY_KEYS = REQUIRED_ENERGIES + OPTIONAL_ENERGIES


@dataclass(frozen=True)
class EnergyCost:
    """The energy of one operation in pJ, and where the number comes from."""
    pj: float
    source: str


@dataclass(frozen=True)
class EnergyTable:
    """Per-operation energies: mac, ac (required); neuron_update, memory_weight, memory_state."""
    name: str
    energies: dict[str, EnergyCost]
    description: str = ""
    source: str = ""
    file: str | None = None  # a user's table file; None for a shipped table
    primitives: dict[str, EnergyCost] = field(default_factory=dict)

    def pj(self, key: str) -> float:
        return self.energies[key].pj

    def require(self, key: str, option: str) -> float:
        if key not in self.energies:
            where = self.file or self.name
            raise Ann2SnnError(f"energy table {where} has no {key!r} energy, which {option} needs")
        return self.energies[key].pj

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "source": self.source,
                               "file": self.file,
                               "energies": {k: {"pj": v.pj, "source": v.source} for k, v in self.energies.items()}}
        if self.primitives:
            out["primitives"] = {k: {"pj": v.pj, "source": v.source} for k, v in self.primitives.items()}
        return out


def available_tables() -> list[str]:
    """Names of the tables shipped with ann2snn (usable as `--table NAME`)."""
    folder = resources.files("ann2snn.energy").joinpath(TABLE_PACKAGE_DIR)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _cost(value: Any, where: str, default_source: str) -> EnergyCost:
    if isinstance(value, dict):
        unknown = set(value) - {"pj", "source"}
        if unknown:
            raise Ann2SnnError(f"{where}: unknown field {sorted(unknown)[0]!r} (an entry is a number of pJ "
                               "or {\"pj\": number, \"source\": text})")
        if "pj" not in value:
            raise Ann2SnnError(f"{where}: missing \"pj\"")
        source = value.get("source", default_source)
        if not isinstance(source, str):
            raise Ann2SnnError(f"{where}: \"source\" must be text")
        value = value["pj"]
    else:
        source = default_source
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Ann2SnnError(f"{where}: the energy must be a number of pJ, got {json.dumps(value)}")
    if isinstance(value, int) and abs(value) > 1e300:  # a JSON integer of hundreds of digits: no float holds it
        raise Ann2SnnError(f"{where}: the energy must be a finite number >= 0 pJ, got an integer of "
                           f"{len(str(abs(value)))} digits")
    if not math.isfinite(value) or value < 0:
        raise Ann2SnnError(f"{where}: the energy must be a finite number >= 0 pJ, got {value}")
    return EnergyCost(float(value), source)


TABLE_FIELDS = ("name", "description", "source", "energies", "primitives")


def parse_table(data: Any, origin: str, file: str | None = None) -> EnergyTable:
    """Validate a table's JSON object; every problem is a one-line Ann2SnnError naming `origin`."""
    if not isinstance(data, dict):
        raise Ann2SnnError(f"energy table {origin}: expected a JSON object with \"energies\"")
    unknown_fields = [k for k in data if k not in TABLE_FIELDS]
    if unknown_fields:  # a misspelt field ("primitive", "energy") would otherwise be ignored
        raise Ann2SnnError(f"energy table {origin}: unknown field {json.dumps(unknown_fields[0])} "
                           f"(known: {', '.join(TABLE_FIELDS)})")
    energies = data.get("energies")
    if not isinstance(energies, dict):
        raise Ann2SnnError(f"energy table {origin}: expected \"energies\": {{\"mac\": pJ, \"ac\": pJ, ...}}")
    unknown = [k for k in energies if k not in ENERGY_KEYS]
    if unknown:
        raise Ann2SnnError(f"energy table {origin}: unknown energy {unknown[0]!r} (known: {', '.join(ENERGY_KEYS)})")
    missing = [k for k in REQUIRED_ENERGIES if k not in energies]
    if missing:
        raise Ann2SnnError(f"energy table {origin}: missing energy {missing[0]!r} (required: "
                           f"{', '.join(REQUIRED_ENERGIES)})")
    default_source = data.get("source") if isinstance(data.get("source"), str) else f"energy table {origin}"
    costs = {k: _cost(v, f"energy table {origin}: energies.{k}", default_source) for k, v in energies.items()}
    primitives = data.get("primitives", {})
    if not isinstance(primitives, dict):
        raise Ann2SnnError(f"energy table {origin}: \"primitives\" must be an object")
    prims = {k: _cost(v, f"energy table {origin}: primitives.{k}", default_source) for k, v in primitives.items()}
    name = data.get("name", Path(origin).stem)
    for key in ("name", "description", "source"):
        if key in data and not isinstance(data[key], str):
            raise Ann2SnnError(f"energy table {origin}: {key!r} must be text")
    return EnergyTable(name=name, energies=costs, description=data.get("description", ""),
                       source=data.get("source", ""), file=file, primitives=prims)


def load_table(spec: str | os.PathLike | None = None) -> EnergyTable:
    """A shipped table by name (None: the default, fp32-45nm), or a user's JSON file by path."""
    text = DEFAULT_TABLE if spec is None else os.fspath(spec)
    if text in available_tables():
        raw = resources.files("ann2snn.energy").joinpath(TABLE_PACKAGE_DIR, f"{text}.json").read_text(encoding="utf-8")
        return parse_table(json.loads(raw), text)
    path = Path(text).expanduser()
    if not path.exists():
        raise Ann2SnnError(f"energy table {text!r}: neither a shipped table ({', '.join(available_tables())}) "
                           "nor an existing JSON file")
    return parse_table(_read_json(path), str(path), file=str(path))


def default_table(weight_dtypes: dict[str, torch.dtype]) -> tuple[str, str]:
    """The shipped table for an SNN whose layers hold weights of these dtypes (in graph order:
    SNN.weight_dtypes), and a line saying why. int8 operation costs where every layer between the
    first and the last holds int8 weights (the first encodes the analog input, the last gives the
    float logits: either may stay float), else fp32 ones."""
    dtypes = list(weight_dtypes.values())
    if torch.int8 in dtypes and all(d == torch.int8 for d in dtypes[1:-1]):
        return INT8_TABLE, f"int8 weights: int8 operation costs (table {INT8_TABLE}); --table to choose another"
    return DEFAULT_TABLE, f"float weights: fp32 operation costs (table {DEFAULT_TABLE}); --table to choose another"


# A table is a few kB: a larger file is not one (and /dev/zero would never end).
_MAX_TABLE_BYTES = 1 << 20


def _read_json(path: Path) -> Any:
    """The JSON value of a user's table file; one-line Ann2SnnError for a file that is not a
    regular file (a FIFO blocks the reader), too large, not UTF-8, or not JSON, and for JSON nested
    thousands deep (RecursionError), numbers of more than 4300 digits (ValueError) and repeated keys
    (the last would silently win)."""
    if not path.is_file():
        raise Ann2SnnError(f"energy table {path}: not a regular file")
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_TABLE_BYTES + 1)
    except OSError as err:
        raise Ann2SnnError(f"energy table {path}: cannot read ({err.strerror or err})") from None
    if len(data) > _MAX_TABLE_BYTES:
        raise Ann2SnnError(f"energy table {path}: larger than {_MAX_TABLE_BYTES} bytes; a table is a small JSON file")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as err:
        raise Ann2SnnError(f"energy table {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise Ann2SnnError(f"energy table {path}: not valid JSON ({err.msg} at line {err.lineno} "
                           f"column {err.colno})") from None
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise Ann2SnnError(f"energy table {path}: not valid JSON ({reason})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {json.dumps(key)} appears twice in one object")
        obj[key] = value
    return obj
