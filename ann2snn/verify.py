"""Verification of a converted SNN against a reference executor (onnxruntime or the source model)."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from .snn import SNN


LOGIT_TOLERANCE = 0.02  # of the reference's logit range, for a QDQ file


@dataclass
class Verification:
    reference: str           # what the SNN was compared with
    samples: int
    agreement: float         # fraction of inputs with the same top-1 prediction
    max_abs_logit_diff: float
    simulate_matches_evaluate: bool  # the time-stepped and time-folded SNN agree on the first inputs
    passed: bool

    def to_json(self) -> dict:
        return asdict(self)


def onnxruntime_logits(path: str, x: Tensor) -> Tensor:
    """onnxruntime's run of the file as written: its QDQ-to-int8 rewrites are off, since they
    change the numbers of a QDQ graph with float weights."""
    from .export import onnxruntime_session

    session = onnxruntime_session(path)
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0])


def simulation_matches_evaluation(snn: SNN, x: Tensor) -> bool:
    """The two ways of running the SNN give the same logits and spike counts (in float64, where
    float32's different summation order cannot move a level)."""
    snn64 = copy.deepcopy(snn).double()
    x64 = x.double()
    simulated, evaluated = snn64.simulate(x64), snn64.evaluate(x64)
    scale = evaluated.logits.abs().max().item() + 1.0
    return bool((simulated.logits - evaluated.logits).abs().max().item() <= 1e-9 * scale and all(
        torch.equal(simulated.spikes[k], evaluated.spikes[k]) for k in simulated.spikes))


def verify_snn(snn: SNN, x: Tensor, reference_logits: Tensor, reference: str, *, exact: bool,
               simulate_samples: int = 1) -> Verification:
    """Compare the SNN's logits on `x` with a reference's.

    exact: the reference is the quantized model itself (a QDQ file), so the SNN must equal it up to
    float rounding: the same predictions and logits within a small tolerance; otherwise (a float
    source) the comparison only reports the gap.
    """
    evaluated = snn.evaluate(x)
    logits = evaluated.logits.to(reference_logits.dtype)
    agreement = (logits.argmax(1) == reference_logits.argmax(1)).double().mean().item()
    max_diff = (logits - reference_logits).abs().max().item()
    sim_ok = simulation_matches_evaluation(snn, x[:simulate_samples])
    # onnxruntime and PyTorch accumulate float32 in different orders, so a level at a rounding
    # boundary (or an exact tie, which ONNX rounds to even) can move by one step and shift the
    # logits by about one quantization step of the last layers (METHOD.md section 4). Measured on a
    # quantize_static ResNet-18: 0.7% of the logit range; a wrong conversion is off by far more.
    tolerance = LOGIT_TOLERANCE * (reference_logits.abs().max().item() + 1.0)
    passed = sim_ok and (not exact or (agreement == 1.0 and max_diff <= tolerance))
    return Verification(reference, int(x.shape[0]), agreement, max_diff, sim_ok, passed)
