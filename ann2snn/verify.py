"""Verification of a converted SNN against a reference executor (onnxruntime or the source model)."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .errors import Ann2SnnError
from .inputs import model_inputs
from .ort_run import VERIFY_BATCH, onnxruntime_logits
from .snn import SNN


# Verification inputs are held in memory at once: at most this many values (1 GiB of float32,
# 1,783 ImageNet images). The SNN and onnxruntime then run on them in batches of VERIFY_BATCH.
MAX_VERIFY_ELEMENTS = 2**28


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


def verification_inputs(model: str, verify_data: str | None, calib: str | None, calib_x, samples: int):
    """Real inputs where there are any (--verify-data, else the calibration data), else noise,
    with a description of which."""
    if verify_data:
        x = model_inputs(model, verify_data, "test", samples)
        return x, f"{len(x)} inputs of {verify_data}"
    if calib_x is not None:
        return calib_x[:samples], f"{min(samples, len(calib_x))} calibration inputs of {calib}"
    return random_inputs(model, samples), f"{samples} inputs of uniform noise (no --verify-data or --calib)"


def verify_converted(path: str, snn: SNN, source_graph: torch.nn.Module, verify_data: str | None, calib: str | None,
                     calib_x, samples: int, min_agreement: float | None) -> Verification:
    """`verify_snn` on the verification inputs; onnxruntime runs the model as imported
    (the output chosen, the input sized: ann2snn.onnx_import.save_as_imported)."""
    from .onnx_import import save_as_imported

    with tempfile.TemporaryDirectory() as folder:
        reference = save_as_imported(path, source_graph, folder)
        x, inputs = verification_inputs(reference, verify_data, calib, calib_x, samples)
        return verify_snn(reference, snn, source_graph, x, inputs=inputs,
                          min_agreement=None if min_agreement is None else min_agreement / 100)


def describe_verification(v: dict) -> str:
    """The verification in words: the exactness gate, then the comparison with onnxruntime."""
    gate = v["exact"]
    exact = (f"exactness gate on {gate['samples']} inputs: {gate['levels_compared']:,} levels at "
             f"{len(gate['sites'])} sites equal to the quantized source's: "
             f"{'yes' if gate['passed'] else 'NO (' + '; '.join(gate['problems'][:2]) + ')'}")
    if gate["ties"] or gate["evaluation_ties"]:
        exact += (f" ({gate['ties']:,} of them, and {gate['evaluation_ties']:,} of the evaluation's against the "
                  f"simulation, exact ties: z / theta a half-integer, rounded up or down by float64's last bit; "
                  f"given the same level there, everything else matches)")
    comparison = (f"{v['reference']}: prediction agreement {100 * v['agreement']:.2f}%, max |logit difference| "
                  f"{v['max_abs_logit_diff']:.3g}")
    if v["levels"] is not None:
        t = v["levels"]["totals"]
        comparison += (f"; levels: {t['compared']:,} compared, {t['equal']:,} equal, {t['ties']} ties, "
                       f"{t['near_boundary']} near a boundary, {t['downstream']} downstream of one, "
                       f"{t['unexplained']} unexplained")
    if v["lossy"]:
        comparison += " (post-training quantization of a float model: lossy, not part of the gate)"
    return f"verified on {v['inputs']}\n{exact}\n{comparison}\n{'PASSED' if v['passed'] else 'FAILED'}"
