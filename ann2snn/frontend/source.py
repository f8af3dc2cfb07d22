"""The quantized source of an ONNX file: imported, its QDQ pairs made sites, its float sites calibrated."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor, fx

from ..compile.calibrate import calibrate_clips, clip_bound, float_activations_to_sites
from ..compile.qdq_to_sites import qdq_to_sites
from ..data.inputs import Samples, tensor_samples
from ..errors import UnsupportedModelError
from ..runtime.artifact import file_sha256
from ..runtime.graph import conversion_report, site_nodes
from ..runtime.memory import activation_profile, stage
from ..runtime.metadata import Source
from .importer import load_onnx


def _float_activations(gm: fx.GraphModule) -> list[str]:
    """The ONNX nodes of the float ReLU-like activations (no QDQ pair quantizes them)."""
    return [node.meta.get("onnx_node", node.name) for node in gm.graph.nodes if clip_bound(gm, node) is not None]


def quantized_onnx(path: str | os.PathLike, T: int | None = None, calib: Samples | Tensor | None = None,
                   percentile: float = 99.99, batch_size: int | None = None,
                   clips: dict[str, list[float] | float] | None = None, *, output: str | None = None,
                   input_shape: Sequence[int] | None = None, progress: bool = False) -> tuple[fx.GraphModule, Source]:
    """The quantized source of an ONNX file, the ANN its SNN must compute exactly: the imported
    graph with QuantClippedActivation sites (QDQ pairs keep their scale and level count; uint8
    gives T = 8), and the source's description.

    Float Relu / Clip / Relu6 sites need `T`, and lambda: from `clips` (site -> lambda, as an
    artifact's report records them) or else calibrated as the `percentile` of each site's
    activations on `calib` (samples streamed in batches of `batch_size`, else as many as
    the activation budget (memory.activation_budget) allows; or a tensor of them).

    `output` picks one of several graph outputs (the others are dropped before import);
    `input_shape` (a sample's shape) sizes the input's dynamic dimensions, else `calib`'s samples do.
    """
    calib = tensor_samples(calib, "calibration inputs") if isinstance(calib, Tensor) else calib
    sample_shape = input_shape or (calib.shape if calib is not None else None)
    gm, qdq_sites = qdq_to_sites(load_onnx(path, output=output, input_shape=sample_shape))
    _check_input_shape(path, gm, input_shape)
    _check_one_output(path, gm)
    _check_any_batch(path, gm)
    _check_calibration_shape(path, gm, calib)
    report = conversion_report(gm)
    if gm.meta["onnx"].get("upgraded_from"):
        report.rewrites.append({"pass": "upgrade_opset", "from": gm.meta["onnx"]["upgraded_from"],
                                "to": gm.meta["onnx"]["opset"]})
    for entry in qdq_sites:
        report.sites.setdefault(entry["site"], {})["source"] = {"kind": "qdq", **entry}
    kind = "qdq" if qdq_sites else "float"
    float_activations = _float_activations(gm)
    if float_activations:
        if T is None:
            mixed = (f"; {len(float_activations)} of its activations have no QuantizeLinear on their output (first: "
                     f"{float_activations[0]!r}), so they cannot convert exactly") if qdq_sites else ""
            raise UnsupportedModelError(f"{path}: the model has float activations (Relu/Clip){mixed}: pass -T N to "
                                        "calibrate them (lossy)")
        if calib is None and clips is None:
            raise UnsupportedModelError(
                f"{path}: float activations (Relu/Clip) need calibration data to set their clipping "
                "thresholds: pass --calib DATA (digits, an .npz with arrays x and y, or an image folder)")
        gm = float_activations_to_sites(gm, T)
        if clips is not None:
            _set_clips(path, gm, clips)
        else:
            with stage("calibration", "--batch-size or --calib-samples"):
                dtype = gm.meta["onnx"]["dtype"]
                size = batch_size or activation_profile(gm, calib.shape, dtype).batch(CALIBRATION_BYTES)
                calibrate_clips(gm, _CalibrationBatches(path, calib, size, dtype), percentile, batches=None,
                                progress=progress)
        kind = "float" if not qdq_sites else "mixed"
    sized = gm.meta["onnx"]["sized_input"]
    source = Source(os.path.basename(str(path)), file_sha256(path), kind, percentile if kind != "qdq" else None,
                    output, gm.meta["onnx"]["input_shape"][1:] if sized else None)
    return gm, source


def _set_clips(path: str | os.PathLike, gm: fx.GraphModule, clips: dict) -> None:
    for node in site_nodes(gm):
        site = gm.get_submodule(node.target)
        if node.target not in clips:
            raise UnsupportedModelError(f"{path}: no lambda recorded for site {node.target}")
        site.clip.data = torch.as_tensor(clips[node.target], dtype=site.clip.dtype).reshape(site.clip.shape)


def _check_input_shape(path: str | os.PathLike, gm: fx.GraphModule, input_shape: Sequence[int] | None) -> None:
    """`input_shape` sized the input's dynamic dimensions; it must not contradict its static ones."""
    shape = gm.meta["onnx"]["input_shape"]
    if input_shape is not None and list(input_shape) != list(shape[1:]):
        raise UnsupportedModelError(f"{path}: input {gm.meta['onnx']['input']!r} takes samples of shape "
                                    f"{list(shape[1:])}, not the input shape {list(input_shape)} given")


def _check_one_output(path: str | os.PathLike, gm: fx.GraphModule) -> None:
    """An SNN computes one tensor, the logits."""
    outputs = gm.meta["onnx"]["outputs"]
    if len(outputs) != 1:
        hint = ": pass --output-name NAME, the one with the logits" if outputs else ""
        raise UnsupportedModelError(f"{path}: the model has {len(outputs)} outputs "
                                    f"({', '.join(map(repr, outputs)) or 'none'}); an SNN has one, the logits{hint}")


def _check_any_batch(path: str | os.PathLike, gm: fx.GraphModule) -> None:
    """An SNN takes any batch size: a constant shaped like a file's fixed batch would pin it."""
    nodes = gm.meta["onnx"]["fixed_batch_nodes"]
    if nodes:
        raise UnsupportedModelError(
            f"{path}: node {nodes[0]} fits the file's fixed batch size {gm.meta['onnx']['input_shape'][0]} "
            "only, an SNN takes any batch size")


def _check_calibration_shape(path: str | os.PathLike, gm: fx.GraphModule, calib: Samples | None) -> None:
    """Refuse calibration samples without the model's input shape, before anything runs on them."""
    meta = gm.meta["onnx"]
    expected = list(meta["input_shape"][1:])
    if calib is not None and list(calib.shape) != expected:
        raise UnsupportedModelError(
            f"{path}: the calibration samples have shape {list(calib.shape)}; the model's input "
            f"{meta['input']!r} takes {expected} per sample")


# Bytes per element of a sample's largest activation that calibration holds: the float32 forward's
# input and output, the site's values in float32 and their bit patterns (quantile.py).
CALIBRATION_BYTES = 20


class _CalibrationBatches:
    """The calibration samples in batches of the model's dtype, each time they are iterated (a
    percentile takes a few passes); refused at the first batch that holds NaN / Inf, which would
    calibrate every lambda to NaN and still pass verification."""

    def __init__(self, path: str | os.PathLike, samples: Samples, batch_size: int, dtype: torch.dtype) -> None:
        self.path, self.samples, self.batch_size, self.dtype = path, samples, batch_size, dtype

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self):
        start = 0
        for x in self.samples.batches(self.batch_size):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                sample = start + int(torch.nonzero(~torch.isfinite(x))[0, 0])
                kind = "NaN" if bool(torch.isnan(x).any()) else "Inf"
                raise UnsupportedModelError(f"{self.path}: the calibration inputs x hold {kind} (first in sample {sample})")
            start += len(x)
            yield (x.to(self.dtype),)
