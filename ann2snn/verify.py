"""Verification of a converted SNN against a reference executor (onnxruntime or the source model)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import Ann2SnnError, UnsupportedModelError
from .onnx_import.builder import first_line
from .snn import SNN


LOGIT_TOLERANCE = 0.02  # of the reference's logit range, for a QDQ file
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


def onnxruntime_logits(path: str, x: Tensor) -> Tensor:
    """onnxruntime's run of the file as written: its QDQ-to-int8 rewrites are off, since they
    change the numbers of a QDQ graph with float weights. The inputs are fed in the file's input
    type, and in batches of its batch size when the file fixes one (an export at batch 1).
    A file onnxruntime refuses is bad input: UnsupportedModelError with onnxruntime's reason."""
    import onnxruntime

    from .export import onnxruntime_session

    quiet = onnxruntime.RunOptions()
    quiet.log_severity_level = 4  # a failing kernel would also log its error to stderr: the exception says it
    try:
        session = onnxruntime_session(path)
        feed = session.get_inputs()[0]
        data = x.detach().cpu().numpy().astype(_ORT_TYPES.get(feed.type, np.float32))
        fixed = feed.shape[0] if isinstance(feed.shape[0], int) and feed.shape[0] > 0 else None
        outputs = [session.run(None, {feed.name: chunk}, quiet)[0] for chunk in _batches(data, fixed)]
    except _ort_errors() as err:
        raise UnsupportedModelError(f"{path}: onnxruntime cannot run it, so the SNN cannot be verified "
                                    f"(--no-verify skips that): {first_line(err)}") from None
    return torch.from_numpy(np.concatenate(outputs)[:len(data)])


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


def verify_snn(snn: SNN, source_graph: torch.nn.Module, x: Tensor, reference_logits: Tensor, reference: str, *,
               inputs: str, exact: bool, min_agreement: float | None = None) -> Verification:
    """The SNN against its quantized source (the exactness gate, on the first GATE_SAMPLES inputs)
    and against a reference's logits on `x` (onnxruntime's run of the file).

    exact: the reference is the quantized model itself (a QDQ file), so the SNN must also agree
    with it: the same predictions and logits within a small tolerance. Otherwise (a float source,
    post-training quantization) agreement is reported and is a gate only with `min_agreement`.
    """
    from .gate import check_exact

    x = x.to(_dtype(snn))  # a float64 or float16 file converts to an SNN of its own dtype
    gate = check_exact(source_graph, snn, x[:GATE_SAMPLES])
    # compared in float64, one row of logits per sample, whatever the output's rank and dtype
    logits = torch.cat([snn.evaluate(chunk).logits for chunk in x.split(VERIFY_BATCH)]).double().reshape(len(x), -1)
    reference_logits = reference_logits.double().reshape(len(reference_logits), -1)
    if logits.shape != reference_logits.shape:  # a wrong conversion, not a rounding difference
        return Verification(reference, inputs, int(x.shape[0]), 0.0, math.inf, gate.evaluation_matches_simulation,
                            gate.to_json(), not exact, False)
    agreement = (logits.argmax(1) == reference_logits.argmax(1)).double().mean().item()
    max_diff = (logits - reference_logits).abs().max().item()
    # onnxruntime and PyTorch accumulate float32 in different orders, so a level at a rounding
    # boundary (or an exact tie, which ONNX rounds to even) can move by one step and shift the
    # logits by about one quantization step of the last layers (METHOD.md section 4). Measured on a
    # quantize_static ResNet-18: 0.7% of the logit range; a wrong conversion is off by far more.
    tolerance = LOGIT_TOLERANCE * (reference_logits.abs().max().item() + 1.0)
    # NaN logits agree with anything under argmax and compare False with everything: never a pass
    finite = bool(torch.isfinite(logits).all() and torch.isfinite(reference_logits).all())
    if exact:
        agrees = agreement == 1.0 and max_diff <= tolerance
    else:
        agrees = min_agreement is None or agreement >= min_agreement
    passed = finite and gate.passed and agrees
    return Verification(reference, inputs, int(x.shape[0]), agreement, max_diff, gate.evaluation_matches_simulation,
                        gate.to_json(), not exact, passed)


def _dtype(snn: SNN) -> torch.dtype:
    """The SNN's floating dtype (that of its first floating weight or buffer; float32 if none)."""
    tensors = (t for t in (*snn.parameters(), *snn.buffers()) if t.is_floating_point())
    return next(tensors, torch.zeros(())).dtype
