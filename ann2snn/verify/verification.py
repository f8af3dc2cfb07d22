"""Verification of a converted SNN against a reference executor (onnxruntime or the source model)."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from .gate import GATE_COPIES, ExactnessGate, max_abs
from .integer_check import verify_integer
from ..errors import Ann2SnnError
from ..data.inputs import SampleSource, Samples, as_samples, noise_samples
from ..runtime.memory import activation_profile, stage
from .ort_check import COMPARISON_BYTES, LevelComparison
from .ort_run import OnnxruntimeRunner
from ..progress import progress_bar
from ..runtime.snn import SNN


# The exactness gate runs the float64 simulation: on this many of the verification inputs.
GATE_SAMPLES = 16
# Bytes per element of a sample's largest activation that a batch of the float comparison holds:
# the SNN's evaluation and onnxruntime's run, float32 both.
EVALUATE_BYTES = 48
# Samples per batch of the integer SNN's checks, where no --batch-size says otherwise.
INTEGER_BATCH = 64


@dataclass
class Verification:
    reference: str           # what the SNN was compared with
    inputs: str              # what the inputs were: calibration or verification data, or noise
    samples: int
    agreement: float         # fraction of inputs with the same top-1 prediction as the reference
    max_abs_logit_diff: float
    simulate_matches_evaluate: bool  # the time-stepped and time-folded SNN agree (in float64)
    exact: dict              # the exactness gate against the quantized source (ann2snn/verify/gate.py)
    levels: dict | None      # a QDQ file: onnxruntime's levels against the SNN's (ann2snn/verify/ort_check.py)
    lossy: bool              # a float source: the reference is the float ANN, agreement is not a gate
    passed: bool
    integer: dict | None = None  # an integer SNN's own checks (ann2snn/verify/integer_check.py)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> "Verification":
        """The verification of its JSON (`to_json`, the CLI's "verify"), refused with one line where
        a field is missing or unknown."""
        names = [f.name for f in fields(cls)]
        if isinstance(value, dict) and "integer" not in value:   # written before integer SNNs
            value = {**value, "integer": None}
        if not isinstance(value, dict) or set(value) != set(names):
            found = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise Ann2SnnError(f"a verification needs exactly the fields {', '.join(names)}; found {found}")
        return cls(**value)


def verify_snn(path: str | os.PathLike, snn: SNN, source_graph: torch.nn.Module, inputs: Samples, *,
               min_agreement: float | None = None, batch_size: int | None = None,
               progress: bool = False) -> Verification:
    """The SNN of the ONNX file `path` against its quantized source (the exactness gate, on the
    first GATE_SAMPLES inputs) and against onnxruntime's run of the file on `inputs`, streamed in
    batches (`batch_size`, else as many as the activation budget (memory.activation_budget) allows for each stage).

    A QDQ file is the quantized model itself: onnxruntime's level at every site must equal the
    SNN's or be explained (ann2snn/verify/ort_check.py), with no tolerance on the logits. A float file
    (post-training quantization) is compared by prediction agreement, a gate only with
    `min_agreement`. `source_graph` is converted to float64 in place: both checks run it so, and a
    second copy of a large model's weights would not fit where one does.

    An integer SNN is checked so on its float backend (the same graph), then on integers
    (integer_check.verify_integer), which must pass too.
    """
    if snn.backend == "integer":
        with snn.using_backend("float"):
            check = verify_snn(path, snn, source_graph, inputs, min_agreement=min_agreement, batch_size=batch_size,
                               progress=progress)
        with stage("verification: the integer SNN", "--batch-size or --verify-samples"):
            integer = verify_integer(path, snn, inputs, batch_size or INTEGER_BATCH, source_graph, progress)
        return replace(check, integer=integer, passed=check.passed and integer["passed"])
    dtype = _dtype(snn)  # a float64 or float16 file converts to an SNN of its own dtype
    source64 = source_graph.double().eval()
    profile = activation_profile(source64, inputs.shape, torch.float64)
    exact = snn.source.kind == "qdq"
    gate_inputs = inputs.head(GATE_SAMPLES)
    bar = progress_bar(desc="verification", total=len(gate_inputs) + len(inputs), unit="input", enabled=progress)
    lower = "--batch-size or --verify-samples"
    with bar, stage("verification: the exactness gate (float64 simulation)", lower):
        gate = ExactnessGate(source64, snn)
        for x in gate_inputs.batches(batch_size or profile.batch(8 * GATE_COPIES * snn.timesteps)):
            gate.add(x.to(dtype))
            bar.update(len(x))
        exactness = gate.result()
        del gate   # its float64 SNN
        agreeing, max_diff, finite, shapes_match = 0, 0.0, True, True
        with stage("verification: onnxruntime and the SNN", lower):
            comparison = LevelComparison(str(path), snn, source64, source64) if exact else None
            run_reference = None if exact else OnnxruntimeRunner(path)
            per_element = COMPARISON_BYTES if exact else EVALUATE_BYTES
            for x in inputs.batches(batch_size or profile.batch(per_element, held="total" if exact else "largest")):
                x = x.to(dtype)
                if comparison is not None:
                    logits, reference_logits = comparison.add(x)
                else:
                    logits, reference_logits = snn.evaluate(x).logits, run_reference(x)[0]
                bar.update(len(x))
                # compared in float64, one row of logits per sample, whatever the output's rank and dtype
                logits = logits.double().reshape(len(x), -1)
                reference_logits = reference_logits.double().reshape(len(reference_logits), -1)
                if logits.shape != reference_logits.shape:   # a wrong conversion, not a rounding difference
                    shapes_match = False
                    break
                agreeing += int((logits.argmax(1) == reference_logits.argmax(1)).sum())
                max_diff = max_abs(logits - reference_logits, max_diff)
                # NaN logits agree with anything under argmax and compare False with everything: never a pass
                finite = finite and bool(torch.isfinite(logits).all() and torch.isfinite(reference_logits).all())
    reference = "onnxruntime (quantized model)" if exact else "onnxruntime (float model)"
    levels = comparison.result().to_json() if comparison is not None else None
    if not shapes_match:
        return Verification(reference, inputs.description, len(inputs), 0.0, math.inf,
                            exactness.evaluation_matches_simulation, exactness.to_json(), levels, not exact, False)
    agreement = agreeing / max(len(inputs), 1)
    agrees = levels["passed"] if exact else min_agreement is None or agreement >= min_agreement
    passed = finite and exactness.passed and agrees
    return Verification(reference, inputs.description, len(inputs), agreement, max_diff,
                        exactness.evaluation_matches_simulation, exactness.to_json(), levels, not exact, passed)


def _dtype(snn: SNN) -> torch.dtype:
    """The SNN's floating dtype (that of its first floating weight or buffer; float32 if none)."""
    tensors = (t for t in (*snn.parameters(), *snn.buffers()) if t.is_floating_point())
    return next(tensors, torch.zeros(())).dtype


def verification_inputs(source_graph: torch.nn.Module, verify_data: SampleSource | None, calib: str | None,
                        calib_samples: Samples | None, samples: int) -> Samples:
    """Real inputs where there are any (--verify-data, else the calibration data named `calib`),
    else noise, each described; refused unless they have the model's input shape."""
    from ..data.sets import check_input_shape

    expected = source_graph.meta["onnx"]["input_shape"][1:]
    if verify_data is not None:
        inputs = as_samples(verify_data, "test", samples, expected, "verification")
        check_input_shape("the verification inputs", inputs.shape, expected)
        return inputs
    if calib_samples is not None:
        count = min(samples, len(calib_samples))
        return calib_samples.head(count, f"{count} calibration inputs of {calib}")
    noise = noise_samples(expected, samples)
    return replace(noise, description=f"{noise.description} (no --verify-data or --calib)")


def verify_converted(path: str, snn: SNN, source_graph: torch.nn.Module, verify_data: SampleSource | None,
                     calib: str | None,
                     calib_samples: Samples | None, samples: int, min_agreement: float | None, *,
                     batch_size: int | None = None, progress: bool = False) -> Verification:
    """`verify_snn` on the verification inputs; onnxruntime runs the model as imported
    (the output chosen, the input sized: ann2snn.frontend.importer.save_as_imported)."""
    from ..frontend.importer import save_as_imported

    with tempfile.TemporaryDirectory() as folder:
        reference = save_as_imported(path, source_graph, folder)
        inputs = verification_inputs(source_graph, verify_data, calib, calib_samples, samples)
        return verify_snn(reference, snn, source_graph, inputs, batch_size=batch_size, progress=progress,
                          min_agreement=None if min_agreement is None else min_agreement / 100)


def describe_verification(v: Verification) -> str:
    """The verification in words: the exactness gate, then the comparison with onnxruntime."""
    gate = v.exact
    exact = (f"exactness gate on {gate['samples']} inputs: {gate['levels_compared']:,} levels at "
             f"{len(gate['sites'])} sites equal to the quantized source's: "
             f"{'yes' if gate['passed'] else 'NO (' + '; '.join(gate['problems'][:2]) + ')'}")
    if gate["ties"] or gate["evaluation_ties"]:
        exact += (f" ({gate['ties']:,} of them, and {gate['evaluation_ties']:,} of the evaluation's against the "
                  f"simulation, exact ties: z / theta a half-integer, rounded up or down by float64's last bit; "
                  f"given the same level there, everything else matches)")
    comparison = (f"{v.reference}: prediction agreement {100 * v.agreement:.2f}%, max |logit difference| "
                  f"{v.max_abs_logit_diff:.3g}")
    if v.levels is not None:
        t = v.levels["totals"]
        comparison += (f"; levels: {t['compared']:,} compared, {t['equal']:,} equal, {t['ties']} ties, "
                       f"{t['near_boundary']} near a boundary, {t['downstream']} downstream of one, "
                       f"{t['unexplained']} unexplained")
    if v.lossy:
        comparison += " (post-training quantization of a float model: lossy, not part of the gate)"
    if v.integer is not None:
        i = v.integer
        comparison += (f"\ninteger SNN ({i['layers']} int8 layers) on {i['samples']} inputs: simulate == evaluate "
                       f"bit for bit: {'yes' if i['simulate_equals_evaluate'] else 'NO'}")
        for key, name in (("float_snn", "the float SNN"), ("onnxruntime_default", "onnxruntime's int8 kernels")):
            c = i[key]
            sites, logits = c["sites"].values(), c["logits"]
            comparison += (f"; against {name}: prediction agreement {100 * c['agreement']:.2f}% "
                           f"({c['equal_logits']} of {i['samples']} logits equal, max |difference| "
                           f"{c['max_abs_logit_diff']:.3g}), levels per op {sum(s['rounding'] for s in sites):,} "
                           f"rounding, {sum(s['downstream'] for s in sites):,} downstream of one, "
                           f"{sum(s['unexplained'] for s in sites):,} unexplained, logits {logits['unexplained']} "
                           f"unexplained: {'every difference explained' if c['explained'] else 'NOT ALL EXPLAINED'}")
    return f"verified on {v.inputs}\n{exact}\n{comparison}\n{'PASSED' if v.passed else 'FAILED'}"
