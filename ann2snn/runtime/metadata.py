"""What an SNN says about itself, each shape known here only: the conversion report, the source's
description, and the JSON header of the .snn artifact that stores both. to_json() gives the JSON
the artifact and the CLI write; from_json() reads it back, checked."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ArtifactError
from ..levels import MAX_TIMESTEPS
from ..version import __version__

FORMAT = "ann2snn-snn"
FORMAT_VERSION = 2   # the newest this reader knows; a file is written in the lowest that describes it


class ReadByKey:
    """Also read by key, as the dicts these replaced were (`snn.source["kind"]` in older scripts)."""

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]   # type: ignore[attr-defined]


@dataclass
class Source(ReadByKey):
    """Where an SNN came from: an ONNX `file` with its `sha256`, `kind` (qdq, float or mixed), the
    `calibration_percentile` of its float sites, the graph `output` chosen and the `input_shape`
    given; `ann2snn_version` is that of the artifact it was loaded from; `extra` holds any other key
    (what `convert(model, source=...)` was told)."""

    file: str | None = None
    sha256: str | None = None
    kind: str | None = None
    calibration_percentile: float | None = None
    output: str | None = None
    input_shape: list[int] | None = None
    ann2snn_version: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        # an ONNX file's percentile is written as null too: a QDQ file calibrates nothing
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra" and (
            getattr(self, f.name) is not None or (f.name == "calibration_percentile" and self.sha256 is not None))},
            **self.extra}

    @classmethod
    def from_json(cls, value: Any) -> "Source":
        if not isinstance(value, dict):
            raise ArtifactError(f"the source must be a JSON object, not {type(value).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in value.items() if k in known},
                   extra={k: v for k, v in value.items() if k not in known})


@dataclass
class ConversionReport(ReadByKey):
    """What the passes did: per activation site (`sites`: levels, T, lambda, theta, its source and
    bias shift) and each graph rewrite (`rewrites`), and, after ann2snn.convert_onnx, the
    `verification` (an ann2snn.verify.Verification; not stored in the artifact: it is checked again
    by `ann2snn verify`)."""

    sites: dict[str, dict] = field(default_factory=dict)
    rewrites: list[dict] = field(default_factory=list)
    verification: Any = None

    def to_json(self) -> dict:
        return {"sites": self.sites, "rewrites": self.rewrites}

    @classmethod
    def from_json(cls, value: Any) -> "ConversionReport":
        if not isinstance(value, dict) or not isinstance(value.get("sites", {}), dict) \
                or not all(isinstance(v, dict) for v in value.get("sites", {}).values()) \
                or not isinstance(value.get("rewrites", []), list):
            raise ArtifactError("report and source must be JSON objects, the report's sites an object of objects")
        return cls(value.get("sites", {}), value.get("rewrites", []))


def check_format(meta: Any) -> None:
    """Refuse a header that is not of this artifact format, or of a newer version of it."""
    if not isinstance(meta, dict):
        raise ArtifactError("the graph description is not a JSON object")
    version = meta.get("format_version")
    if meta.get("format") != FORMAT or type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(f"unsupported artifact format {meta.get('format')} v{version} "
                            f"(this ann2snn reads {FORMAT} v1 to v{FORMAT_VERSION})")


@dataclass
class ArtifactHeader:
    """The JSON an .snn file holds beside its tensors: T, the graph description
    (artifact.describe_graph), the conversion report, the source, and the version that wrote it."""

    timesteps: int
    graph: dict
    report: ConversionReport
    source: Source
    ann2snn_version: str = __version__
    format_version: int = FORMAT_VERSION
    integer_layers: list[str] = field(default_factory=list)   # int8 layers (runtime/integer_artifact.py)

    def to_json(self) -> dict:
        integer = {"integer_layers": self.integer_layers} if self.integer_layers else {}
        return {"format": FORMAT, "format_version": self.format_version, "ann2snn_version": self.ann2snn_version,
                "timesteps": self.timesteps, "graph": self.graph, "report": self.report.to_json(),
                "source": self.source.to_json(), **integer}

    @classmethod
    def from_json(cls, meta: Any) -> "ArtifactHeader":
        """The header of a JSON object, refused with one line (an ArtifactError) where it is broken."""
        check_format(meta)
        missing = [key for key in ("ann2snn_version", "timesteps", "graph", "report", "source") if key not in meta]
        if missing:
            raise ArtifactError(f"the header has no {missing[0]!r}")
        timesteps = meta["timesteps"]
        if type(timesteps) is not int or not 1 <= timesteps <= MAX_TIMESTEPS:
            shown = timesteps if isinstance(timesteps, (int, float)) else type(timesteps).__name__
            raise ArtifactError(f"timesteps must be an integer in 1..{MAX_TIMESTEPS}, got {shown}")
        if not isinstance(meta["ann2snn_version"], str):
            raise ArtifactError("the header's ann2snn_version is not a string")
        integer = meta.get("integer_layers", [])
        if not isinstance(integer, list) or not all(isinstance(name, str) for name in integer):
            raise ArtifactError("the header's integer_layers is not a list of layer names")
        return cls(timesteps, meta["graph"], ConversionReport.from_json(meta["report"]),
                   Source.from_json(meta["source"]), meta["ann2snn_version"], meta["format_version"], integer)
