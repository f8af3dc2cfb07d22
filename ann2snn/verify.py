"""Verification of a converted SNN against a reference executor (onnxruntime or the source model)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import Ann2SnnError, UnsupportedModelError
from .onnx_import.builder import first_line
from .snn import SNN


# Verification inputs are held in memory at once: at most this many values (1 GiB of float32,
# 1,783 ImageNet images). The SNN and onnxruntime then run on them in batches of VERIFY_BATCH.
MAX_VERIFY_ELEMENTS = 2**28
VERIFY_BATCH = 256


# The exactness gate runs the float64 simulation: on this many of the verification inputs.
GATE_SAMPLES = 16


@dataclass
class Verification:
    reference: str           # what the SNN was compared with
    inputs: str              # what the inputs were: calibration or verification data, or noise
    samples: int
    agreement: float         # fraction of inputs with the same top-1 prediction as the reference
    max_abs_logit_diff: float
    simulate_matches_evaluate: bool  # the time-stepped and time-folded SNN agree (in float64)
    exact: dict              # the exactness gate against the quantized source (ann2snn/gate.py)
    levels: dict | None      # a QDQ file: onnxruntime's levels against the SNN's (ann2snn/ort_check.py)
    lossy: bool              # a float source: the reference is the float ANN, agreement is not a gate
    passed: bool

    def to_json(self) -> dict:
        return asdict(self)


# onnxruntime's names of the input types a network may have (reader.FLOAT_INPUTS).
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def _ort_errors() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises (Fail, InvalidGraph, NotImplemented, ...)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def _batches(x: np.ndarray, fixed: int | None) -> list[np.ndarray]:
    """`x` in batches of VERIFY_BATCH samples; of exactly `fixed` ones, the last padded with zeros,
    for a file whose batch size is fixed."""
    if fixed is None:
        return [x[i:i + VERIFY_BATCH] for i in range(0, len(x), VERIFY_BATCH)]
    padded = np.concatenate([x, np.zeros((-len(x) % fixed, *x.shape[1:]), x.dtype)])
    return np.split(padded, len(padded) // fixed)


def _with_outputs(path: str | os.PathLike, names: Sequence[str]) -> bytes:
    """The file's model with the tensors `names` added as graph outputs (typed by shape inference)."""
    import onnx

    from .onnx_import.qoperator import expand_qoperator

    model = onnx.load(str(path))
    # onnx infers no types for com.microsoft ops: their QDQ meaning has the same outputs, typed
    typed = {v.name: v for v in
             onnx.shape_inference.infer_shapes(expand_qoperator(model, str(path))[0]).graph.value_info}
    for name in names:
        if name not in typed:
            raise UnsupportedModelError(f"{path}: tensor {name!r} has no inferred type to read it back")
        model.graph.output.append(typed[name])
    return model.SerializeToString()


def onnxruntime_outputs(path: str | os.PathLike, x: Tensor, extra: Sequence[str] = ()) -> list[Tensor]:
    """onnxruntime's run of the file as written: the logits, then the tensors named in `extra`
    (intermediate tensors, added as graph outputs). Its QDQ-to-int8 rewrites are off, since they
    change the numbers of a QDQ graph with float weights. The inputs are fed in the file's input
    type, and in batches of its batch size when the file fixes one (an export at batch 1).
    A file onnxruntime refuses is bad input: UnsupportedModelError with onnxruntime's reason."""
    import onnxruntime

    from .export import onnxruntime_session

    quiet = onnxruntime.RunOptions()
    quiet.log_severity_level = 4  # a failing kernel would also log its error to stderr: the exception says it
    try:
        session = onnxruntime_session(_with_outputs(path, extra) if extra else path)
        feed = session.get_inputs()[0]
        data = x.detach().cpu().numpy().astype(_ORT_TYPES.get(feed.type, np.float32))
        fixed = feed.shape[0] if isinstance(feed.shape[0], int) and feed.shape[0] > 0 else None
        names = [session.get_outputs()[0].name, *extra]
        outputs = [session.run(names, {feed.name: chunk}, quiet) for chunk in _batches(data, fixed)]
    except _ort_errors() as err:
        raise UnsupportedModelError(f"{path}: onnxruntime cannot run it, so the SNN cannot be verified "
                                    f"(--no-verify skips that): {first_line(err)}") from None
    return [torch.from_numpy(np.concatenate([o[i] for o in outputs])[:len(data)]) for i in range(len(names))]


def onnxruntime_logits(path: str | os.PathLike, x: Tensor) -> Tensor:
    """onnxruntime's logits for `x` (onnxruntime_outputs)."""
    return onnxruntime_outputs(path, x)[0]


def random_inputs(path: str | os.PathLike, samples: int, seed: int = 0) -> Tensor:
    """`samples` uniform random inputs of the file's input shape, refused before allocation when
    they would not fit in memory (a --verify-samples of 10**9)."""
    from .onnx_import import inspect_onnx

    shape = inspect_onnx(path)["input"]["shape"][1:]
    values = samples * math.prod(shape)
    if values > MAX_VERIFY_ELEMENTS:
        raise Ann2SnnError(f"{path}: {samples:,} verification inputs of shape {shape} are {values:,} values, "
                           f"more than the {MAX_VERIFY_ELEMENTS:,} verification holds; ask for fewer")
    return torch.rand((samples, *shape), generator=torch.Generator().manual_seed(seed))


def verify_snn(path: str | os.PathLike, snn: SNN, source_graph: torch.nn.Module, x: Tensor, *, inputs: str,
               min_agreement: float | None = None) -> Verification:
    """The SNN of the ONNX file `path` against its quantized source (the exactness gate, on the
    first GATE_SAMPLES inputs) and against onnxruntime's run of the file on `x`.

    A QDQ file is the quantized model itself: onnxruntime's level at every site must equal the
    SNN's or be explained (ann2snn/ort_check.py), with no tolerance on the logits. A float file
    (post-training quantization) is compared by prediction agreement, a gate only with
    `min_agreement`.
    """
    from .gate import check_exact
    from .ort_check import compare_with_onnxruntime

    x = x.to(_dtype(snn))  # a float64 or float16 file converts to an SNN of its own dtype
    gate = check_exact(source_graph, snn, x[:GATE_SAMPLES])
    exact = snn.source.get("kind") == "qdq"
    levels = None
    if exact:
        comparison, reference_logits = compare_with_onnxruntime(str(path), snn, source_graph, x)
        levels = comparison.to_json()
    else:
        reference_logits = onnxruntime_logits(path, x)
    reference = "onnxruntime (quantized model)" if exact else "onnxruntime (float model)"
    # compared in float64, one row of logits per sample, whatever the output's rank and dtype
    logits = torch.cat([snn.evaluate(chunk).logits for chunk in x.split(VERIFY_BATCH)]).double().reshape(len(x), -1)
    reference_logits = reference_logits.double().reshape(len(reference_logits), -1)
    if logits.shape != reference_logits.shape:  # a wrong conversion, not a rounding difference
        return Verification(reference, inputs, int(x.shape[0]), 0.0, math.inf, gate.evaluation_matches_simulation,
                            gate.to_json(), levels, not exact, False)
    agreement = (logits.argmax(1) == reference_logits.argmax(1)).double().mean().item()
    max_diff = (logits - reference_logits).abs().max().item()
    # NaN logits agree with anything under argmax and compare False with everything: never a pass
    finite = bool(torch.isfinite(logits).all() and torch.isfinite(reference_logits).all())
    if exact:
        agrees = levels["passed"]
    else:
        agrees = min_agreement is None or agreement >= min_agreement
    passed = finite and gate.passed and agrees
    return Verification(reference, inputs, int(x.shape[0]), agreement, max_diff, gate.evaluation_matches_simulation,
                        gate.to_json(), levels, not exact, passed)


def _dtype(snn: SNN) -> torch.dtype:
    """The SNN's floating dtype (that of its first floating weight or buffer; float32 if none)."""
    tensors = (t for t in (*snn.parameters(), *snn.buffers()) if t.is_floating_point())
    return next(tensors, torch.zeros(())).dtype
