"""Verification of an integer SNN (issue 27): its two ways of running agree bit for bit, and its
predictions are compared with the float SNN of the same graph and with onnxruntime's default
session, whose int8 kernels run the same file."""
from __future__ import annotations

import os

import torch

from ..data.inputs import Samples
from ..runtime.snn import SNN
from .gate import max_abs
from .ort_run import OnnxruntimeRunner


def _agreement(count: int, samples: int) -> float:
    return count / max(samples, 1)


def verify_integer(path: str | os.PathLike, snn: SNN, inputs: Samples, batch_size: int) -> dict:
    """On `inputs`: simulate and evaluate on integers give torch.equal logits and identical spike
    counts, and the float SNN (which the exactness gate proved) predicts the same class for every
    input (the gate: `passed`); top-1 agreement and max |logit difference| against the float SNN
    and against onnxruntime's default session, and how many samples' logits equal the latter's."""
    runner = OnnxruntimeRunner(path, integer_kernels=True)
    same, float_agree, ort_agree, ort_equal, float_diff, ort_diff, samples = True, 0, 0, 0, 0.0, 0.0, 0
    for x in inputs.batches(batch_size):
        evaluated, simulated = snn.evaluate(x), snn.simulate(x)
        same = same and torch.equal(evaluated.logits, simulated.logits) and evaluated.spikes.keys() == \
            simulated.spikes.keys() and all(torch.equal(evaluated.spikes[k], simulated.spikes[k])
                                            for k in evaluated.spikes)
        with snn.using_backend("float"):
            floating = snn.evaluate(x).logits
        logits = evaluated.logits.reshape(len(x), -1)
        reference = runner(x)[0].to(logits.dtype).reshape(len(x), -1)
        floating = floating.reshape(len(x), -1)
        float_agree += int((logits.argmax(1) == floating.argmax(1)).sum())
        ort_agree += int((logits.argmax(1) == reference.argmax(1)).sum())
        ort_equal += int((logits == reference).all(1).sum())
        float_diff, ort_diff = max_abs(logits - floating, float_diff), max_abs(logits - reference, ort_diff)
        samples += len(x)
    return {"layers": len(snn.integer_layers), "samples": samples, "simulate_equals_evaluate": same,
            "float_snn": {"agreement": _agreement(float_agree, samples), "max_abs_logit_diff": float_diff},
            "onnxruntime_default": {"agreement": _agreement(ort_agree, samples), "equal_logits": ort_equal,
                                    "max_abs_logit_diff": ort_diff},
            "passed": same and float_agree == samples}
