"""onnxruntime's run of an ONNX file as written: the reference executor that verification
(ann2snn/verify.py) and the level comparison (ann2snn/ort_check.py) compare the SNN with."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import UnsupportedModelError
from .export import onnxruntime_session
from .onnx_import.builder import first_line
from .onnx_import.qoperator import expand_qoperator

# onnxruntime runs the inputs in batches of this many samples
VERIFY_BATCH = 256


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

    from .onnx_import.reader import load_checked

    model = load_checked(path)
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
