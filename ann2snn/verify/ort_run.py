"""onnxruntime's run of an ONNX file as written: the reference executor that verification
(ann2snn/verify/verification.py) and the level comparison (ann2snn/verify/ort_check.py) compare the SNN with."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor

from ..errors import UnsupportedModelError
from ..frontend.reader import onnxruntime_session
from ..runtime.memory import OutOfMemory, is_allocation_failure
from ..frontend.builder import first_line
from ..frontend.qoperator import expand_qoperator
from ..frontend.inference import infer_shapes
from ..frontend.reader import load_checked

# onnxruntime runs the inputs in batches of this many samples
VERIFY_BATCH = 256


# onnxruntime's names of the input types a network may have (reader.FLOAT_INPUTS).
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def _ort_errors() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises (Fail, InvalidGraph, NotImplemented, ...)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def _padded(x: np.ndarray, fixed: int | None) -> list[np.ndarray]:
    """`x` as it is; for a file whose batch size is fixed, in batches of exactly `fixed` samples,
    the last padded with zeros."""
    if fixed is None:
        return [x]
    padded = np.concatenate([x, np.zeros((-len(x) % fixed, *x.shape[1:]), x.dtype)])
    return np.split(padded, len(padded) // fixed)


def _with_outputs(path: str | os.PathLike, names: Sequence[str], folder: str) -> str | bytes:
    """The file's model with the tensors `names` added as graph outputs (typed by shape inference):
    a copy of the file in `folder` with those outputs appended as a second serialized ModelProto
    (protobuf merges repeated fields when it parses the two), so that the weights are never held in
    Python; a model with external data, whose paths are relative to its own folder, as bytes."""
    model = load_checked(path, load_external_data=False)
    # onnx infers no types for com.microsoft ops: their QDQ meaning has the same outputs, typed
    typed = {v.name: v for v in infer_shapes(expand_qoperator(model, str(path))[0], str(path)).graph.value_info}
    missing = [name for name in names if name not in typed]
    if missing:
        raise UnsupportedModelError(f"{path}: tensor {missing[0]!r} has no inferred type to read it back")
    outputs = [typed[name] for name in names]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        model = load_checked(path)
        model.graph.output.extend(outputs)
        return model.SerializeToString()
    target = os.path.join(folder, os.path.basename(str(path)))
    with open(path, "rb") as original, open(target, "wb") as copy:
        shutil.copyfileobj(original, copy)
        copy.write(onnx.ModelProto(graph=onnx.GraphProto(output=outputs)).SerializeToString())
    return target


class OnnxruntimeRunner:
    """onnxruntime's run of the file as written, one session for every batch: the logits, then
    the tensors named in `extra` (intermediate tensors, added as graph outputs). Its QDQ-to-int8
    rewrites are off, since they change the numbers of a QDQ graph with float weights. The inputs
    are fed in the file's input type, and in batches of its batch size when the file fixes one (an
    export at batch 1). A file onnxruntime refuses is bad input: UnsupportedModelError with
    onnxruntime's reason; running out of memory is memory.OutOfMemory. `integer_kernels`: its
    default session instead, whose int8 kernels an integer SNN is compared with."""

    def __init__(self, path: str | os.PathLike, extra: Sequence[str] = (), integer_kernels: bool = False) -> None:
        import onnxruntime

        self.path, self.extra = path, list(extra)
        self.quiet = onnxruntime.RunOptions()
        self.quiet.log_severity_level = 4  # a failing kernel would also log its error to stderr: the exception says it
        with self._errors(), tempfile.TemporaryDirectory() as folder:
            self.session = onnxruntime_session(_with_outputs(path, extra, folder) if extra else path,
                                               integer_kernels)
        feed = self.session.get_inputs()[0]
        self.feed, self.dtype = feed.name, _ORT_TYPES.get(feed.type, np.float32)
        self.fixed = feed.shape[0] if isinstance(feed.shape[0], int) and feed.shape[0] > 0 else None
        self.names = [self.session.get_outputs()[0].name, *self.extra]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except _ort_errors() as err:
            if is_allocation_failure(err):
                raise OutOfMemory(f"{self.path}: onnxruntime ran out of memory; lower --batch-size or "
                                  "--verify-samples") from None
            raise UnsupportedModelError(f"{self.path}: onnxruntime cannot run it, so the SNN cannot be verified "
                                        f"(--no-verify skips that): {first_line(err)}") from None

    def __call__(self, x: Tensor) -> list[Tensor]:
        data = x.detach().cpu().numpy().astype(self.dtype)
        with self._errors():
            outputs = [self.session.run(self.names, {self.feed: chunk}, self.quiet) for chunk in _padded(data, self.fixed)]
        return [torch.from_numpy(np.concatenate([o[i] for o in outputs])[:len(data)]) for i in range(len(self.names))]


def onnxruntime_outputs(path: str | os.PathLike, x: Tensor, extra: Sequence[str] = ()) -> list[Tensor]:
    """onnxruntime's outputs for `x` (OnnxruntimeRunner), run in batches of VERIFY_BATCH samples."""
    run = OnnxruntimeRunner(path, extra)
    batches = [run(chunk) for chunk in x.split(VERIFY_BATCH)]
    return [torch.cat([b[i] for b in batches]) for i in range(len(run.names))]


def onnxruntime_logits(path: str | os.PathLike, x: Tensor) -> Tensor:
    """onnxruntime's logits for `x` (onnxruntime_outputs)."""
    return onnxruntime_outputs(path, x)[0]
