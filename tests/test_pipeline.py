"""ann2snn.convert_onnx, the public pipeline: the same SNN as `ann2snn convert` from every form of
calibration data, VerificationError on a failed gate, and the typed report, source, header and
verification with their JSON round trips and one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import ann2snn
from ann2snn import VerificationError, convert_onnx
from ann2snn.data.inputs import tensor_samples
from ann2snn.data.sets import draw, load_dataset
from ann2snn.errors import Ann2SnnError, ArtifactError, DataError
from ann2snn.runtime.artifact import read_metadata
from ann2snn.runtime.metadata import ArtifactHeader, ConversionReport, Source
from ann2snn.train.export import export_onnx
from ann2snn.verify.verification import Verification
from test_cli import digits_model, run_cli

CALIB_SAMPLES = 64
X = torch.rand((8, 1, 8, 8), generator=torch.Generator().manual_seed(1))


def quantize_static_defaults(float_file: Path, path: Path) -> Path:
    """`float_file` quantized by onnxruntime's quantize_static with its default arguments."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = onnx.load(str(float_file)).graph.input[0].name

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: np.random.default_rng(i).random((8, 1, 8, 8), dtype=np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_file), str(path), Images())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    floating = folder / "float.onnx"
    export_onnx(digits_model(quantize=False), (1, 8, 8), floating, qdq=False)
    qdq = quantize_static_defaults(floating, folder / "qdq.onnx")
    converted = {}
    for name, path, options in (("float", floating, ["-T", "2"]), ("qdq", qdq, [])):
        out = folder / f"{name}.snn"
        done = run_cli("convert", str(path), *options, "--calib", "digits", "--calib-samples", str(CALIB_SAMPLES),
                       "-o", str(out), "--json")
        assert done.returncode == 0, done.stderr
        converted[name] = (path, json.loads(done.stdout), ann2snn.load_snn(out), out)
    return converted


def calibration_forms(folder: Path) -> dict[str, object]:
    """The digits calibration inputs the CLI draws, as each form convert_onnx takes (an .npz file
    of just those, read whole and in order)."""
    dataset = load_dataset("digits", split="calib")
    drawn = draw(dataset, CALIB_SAMPLES)
    x = torch.stack([x for x, _ in drawn])
    np.savez(folder / "drawn.npz", x=x.numpy(), y=np.array([int(y) for _, y in drawn]))

    class BareInputs(Dataset):   # a Dataset of x, no labels
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> torch.Tensor:
            return x[i]

    return {"path string": str(folder / "drawn.npz"), "zoo name": "digits", "Dataset of (x, y)": dataset,
            "Dataset of x": BareInputs(), "Samples": tensor_samples(x, "drawn inputs"),
            # calib_samples of a tensor are its first: the noise after them is not used
            "Tensor": torch.cat([x, torch.rand(16, 1, 8, 8)])}


@pytest.mark.parametrize("form", ["path string", "zoo name", "Dataset of (x, y)", "Dataset of x", "Samples", "Tensor"])
def test_every_form_of_calibration_data_gives_the_snn_of_the_command(files, form, tmp_path):
    path, command, expected, _ = files["float"]
    snn = convert_onnx(path, 2, calibration_forms(tmp_path)[form], calib_samples=CALIB_SAMPLES)
    assert torch.equal(snn.evaluate(X).logits, expected.evaluate(X).logits)
    assert snn.report.to_json() == expected.report.to_json()
    assert snn.source.to_json() == command["source"]
    assert snn.report.verification.passed and snn.report.verification.lossy


def test_other_calibration_data_gives_another_snn(files):
    """The comparison above can fail: calibrated on noise, the float file's SNN differs."""
    path, _, expected, _ = files["float"]
    snn = convert_onnx(path, 2, torch.rand(CALIB_SAMPLES, 1, 8, 8), verify=False)
    assert snn.report.to_json() != expected.report.to_json()


def test_a_qdq_file_converts_and_verifies_as_the_command_does(files):
    path, command, expected, _ = files["qdq"]
    snn = convert_onnx(str(path), calib="digits", calib_samples=CALIB_SAMPLES)
    assert torch.equal(snn.evaluate(X).logits, expected.evaluate(X).logits)
    # the report carries the verification, as the command's JSON has it under "verify"
    assert snn.report.verification.to_json() == command["verify"]
    assert command["verify"]["inputs"] == f"{CALIB_SAMPLES} calibration inputs of digits"
    assert snn.report.verification.passed and not snn.report.verification.lossy


def test_a_broken_compiler_raises_verification_error(files, monkeypatch):
    import ann2snn.compile.compiler as compiler

    monkeypatch.setattr(compiler, "shift_bias", lambda gm: gm)   # a compiler that forgets docs/method.md section 2
    with pytest.raises(VerificationError) as info:
        convert_onnx(files["qdq"][0])
    failed = info.value
    assert isinstance(failed, Ann2SnnError) and "\n" not in str(failed)
    assert str(failed).startswith(f"{files['qdq'][0]}: the SNN failed verification")
    assert not failed.verification.passed and not failed.verification.exact["passed"]
    assert isinstance(failed.snn, ann2snn.SNN) and failed.snn.report.verification is failed.verification


def test_verify_false_skips_verification(files):
    snn = convert_onnx(files["qdq"][0], verify=False)
    assert snn.report.verification is None
    assert torch.equal(snn.evaluate(X).logits, files["qdq"][2].evaluate(X).logits)


def test_data_of_another_shape_is_refused_in_one_line(files):
    path = files["float"][0]
    with pytest.raises(DataError) as info:
        convert_onnx(path, 2, TensorDataset(torch.rand(16, 3, 8, 8)))
    assert str(info.value) == ("the calibration Dataset: the model takes samples of shape (1, 8, 8), found samples "
                               "of shape (3, 8, 8)")
    with pytest.raises(DataError) as info:
        convert_onnx(files["qdq"][0], verify_data=torch.rand(4, 8, 8))
    assert str(info.value).startswith("the verification inputs: the model takes samples of shape (1, 8, 8)")


def test_report_source_header_and_verification_round_trip_through_json(files):
    _, command, snn, out = files["float"]
    meta = read_metadata(out)
    header = ArtifactHeader.from_json(meta)
    assert header.to_json() == meta
    assert header.source == Source.from_json(command["source"]) and header.source.kind == "float"
    assert header.report == ConversionReport.from_json(snn.report.to_json())
    verification = Verification.from_json(command["verify"])
    assert verification.to_json() == command["verify"] and verification.passed


BROKEN_HEADERS = {
    "format": (lambda m: m.update(format="onnx"), "unsupported artifact format onnx v1"),
    "newer": (lambda m: m.update(format_version=3), "unsupported artifact format ann2snn-snn v3 (this ann2snn "
                                                  "reads ann2snn-snn v1 to v2)"),
    "no report": (lambda m: m.pop("report"), "the header has no 'report'"),
    "timesteps": (lambda m: m.update(timesteps="2"), "timesteps must be an integer in 1..16, got str"),
    "sites": (lambda m: m["report"].update(sites=[1]), "report and source must be JSON objects"),
    "source": (lambda m: m.update(source=[]), "the source must be a JSON object, not list"),
}


@pytest.mark.parametrize("broken", list(BROKEN_HEADERS))
def test_from_json_refuses_a_broken_header_in_one_line(files, broken):
    meta = read_metadata(files["qdq"][3])
    edit, message = BROKEN_HEADERS[broken]
    edit(meta)
    with pytest.raises(ArtifactError) as info:
        ArtifactHeader.from_json(meta)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_from_json_refuses_a_verification_without_a_field(files):
    broken = dict(files["qdq"][1]["verify"])
    del broken["passed"]
    with pytest.raises(Ann2SnnError) as info:
        Verification.from_json(broken)
    assert "passed" in str(info.value) and "\n" not in str(info.value)
