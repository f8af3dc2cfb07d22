"""ann2snn.convert_onnx: an ONNX file to a verified SNN in one call; `ann2snn convert` is a thin layer over it."""
from __future__ import annotations

import os
from typing import Sequence

from .data.inputs import SampleSource, as_samples
from .errors import VerificationError
from .runtime.snn import SNN


def convert_onnx(path: str | os.PathLike, T: int | None = None, calib: SampleSource | None = None,
                 verify: bool = True, *, calib_samples: int = 512, percentile: float = 99.99,
                 verify_data: SampleSource | None = None, verify_samples: int = 64, output_name: str | None = None,
                 input_shape: Sequence[int] | None = None, min_agreement: float | None = None,
                 batch_size: int | None = None, progress: bool = False) -> SNN:
    """The SNN of the ONNX file `path`: imported, its float sites calibrated, compiled and verified.

    `calib` (needed by float Relu / Clip sites, with `T`) and `verify_data` are a data set (a path
    or zoo name, as the CLI's --calib), a torch Dataset of (x, y) or x, a tensor of samples, or
    ann2snn.data.Samples; `calib_samples` / `verify_samples` of them are used (a tensor's first,
    the others drawn at random across classes). lambda of a float site is the `percentile` of its
    activations. Verification (`verify`) compares the SNN with onnxruntime's run of the file on
    `verify_data`, else on the calibration inputs, else on noise; `min_agreement` (percent) gates
    a float file's prediction agreement. Its result is `snn.report.verification`; a failure raises
    VerificationError. `output_name` picks one of several graph outputs; `input_shape` (a sample's)
    sizes dynamic input dimensions; `batch_size` caps every batch (default: the memory budget's).
    """
    # through the modules' attributes, so that what replaces them (a test's monkeypatch) is called
    from .compile import compiler
    from .frontend import importer, source
    from .verify import verification

    calibration = None
    if calib is not None:
        expected = importer.inspect_onnx(path)["input"]["shape"][1:]
        calibration = as_samples(calib, "calib", calib_samples, expected, "calibration")
    source_graph, description = source.quantized_onnx(path, T, calibration, percentile=percentile, output=output_name,
                                                      input_shape=input_shape, batch_size=batch_size,
                                                      progress=progress)
    snn = compiler.compile_source(path, source_graph, description, T)
    if verify:
        check = verification.verify_converted(str(path), snn, source_graph, verify_data, _named(calib), calibration,
                                              verify_samples, min_agreement, batch_size=batch_size, progress=progress)
        snn.report.verification = check
        if not check.passed:
            raise VerificationError(f"{path}: the SNN failed verification against {check.reference} on "
                                    f"{check.inputs}", check, snn)
    return snn


def _named(data: SampleSource | None) -> str | None:
    """How the verification's description names the calibration data."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else os.fspath(data)
    return f"the {type(data).__name__} given"
