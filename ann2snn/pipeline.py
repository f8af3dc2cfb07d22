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
                 batch_size: int | None = None, progress: bool = False, integer: bool | None = None) -> SNN:
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
    `integer`: run on integers (docs/integer.md) where the file's layers have int8 weights; None
    (the default) does so where the whole SNN behind its first neurons lowers, else keeps the float
    SNN and says why in the report; True refuses a file that does not lower; False keeps the float SNN.
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
    _choose_backend(path, snn, source_graph, integer)
    if verify:
        check = verification.verify_converted(str(path), snn, source_graph, verify_data, _named(calib), calibration,
                                              verify_samples, min_agreement, batch_size=batch_size, progress=progress)
        snn.report.verification = check
        if not check.passed:
            raise VerificationError(f"{path}: the SNN failed verification against {check.reference} on "
                                    f"{check.inputs}", check, snn)
    return snn


def _choose_backend(path: str | os.PathLike, snn: SNN, source_graph, integer: bool | None) -> None:
    """Keep the integer layers where `integer` allows and two noise inputs run on them, else drop them."""
    from .data.inputs import noise_samples
    from .errors import UnsupportedModelError

    reason = None if snn.integer_layers else \
        "no layer has int8 weights (or uint8 ones) and, if it has a bias, an int32 one"
    lowerable = reason is None
    if lowerable and integer is not False:
        probe = next(noise_samples(source_graph.meta["onnx"]["input_shape"][1:], 2).batches(2))
        try:
            snn.evaluate(probe)
        except UnsupportedModelError as err:
            reason = str(err).removeprefix("integer SNN: ")
    if integer and reason is not None:
        raise UnsupportedModelError(f"{path}: no integer SNN: {reason}")
    if integer is False or reason is not None:
        snn.integer_layers.clear()
        snn.backend = "float"
        if integer is None and lowerable:
            snn.report.rewrites.append({"pass": "integer", "kept_float": reason})


def _named(data: SampleSource | None) -> str | None:
    """How the verification's description names the calibration data."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else os.fspath(data)
    return f"the {type(data).__name__} given"
