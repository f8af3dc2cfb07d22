"""The real `ann2snn` command in a subprocess: convert, inspect, demo, and one-line refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import ann2snn
from ann2snn import models
from ann2snn.train.export import export_onnx
from ann2snn.runtime.quant import QuantClippedActivation
from random_nets import randomize_batch_norm


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ann2snn", *args], capture_output=True, text=True, cwd=cwd,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=600)


def digits_model(quantize: bool) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def site(channels: int):
        if not quantize:
            return torch.nn.ReLU()
        q = QuantClippedActivation(levels=7, clip=1.0)
        q.clip.data = 0.5 + torch.rand((), generator=generator)
        return q

    model = models.build_model("digits-cnn", 10, activation=site)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            randomize_batch_norm(m, generator)
    return model.eval()


@pytest.fixture(scope="module")
def qdq_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qdq") / "digits_t3.onnx"
    export_onnx(digits_model(quantize=True), (1, 8, 8), path, qdq=True)
    return path


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"ann2snn, version {ann2snn.__version__}"
    out = run_cli("--help").stdout
    for command in ("convert", "inspect", "demo", "train", "eval", "energy"):
        assert command in out


def test_convert_qdq_file_verifies_and_writes_a_loadable_snn(qdq_file, tmp_path):
    out = tmp_path / "m.snn"
    done = run_cli("convert", str(qdq_file), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["timesteps"] == 3 and len(report["sites"]) == 3
    assert {"agreement", "max_abs_logit_diff", "reference"} <= set(report["verify"])
    assert report["verify"]["agreement"] == 1.0 and report["verify"]["passed"]
    assert all(site["levels"] == 7 and site["bias_shift"]["kind"] == "bias" for site in report["sites"])
    snn = ann2snn.load_snn(out)
    assert snn.timesteps == 3 and snn.source["kind"] == "qdq" and len(snn.source["sha256"]) == 64
    inspected = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert inspected["kind"] == "snn" and len(inspected["sites"]) == 3
    onnx_summary = json.loads(run_cli("inspect", str(qdq_file), "--json").stdout)
    assert onnx_summary["kind"] == "onnx" and onnx_summary["all_ops_supported"]


def test_float_file_needs_calibration_data_then_converts(tmp_path):
    path = tmp_path / "float.onnx"
    export_onnx(digits_model(quantize=False), (1, 8, 8), path, qdq=False)
    refused = run_cli("convert", str(path), "-T", "3")
    assert refused.returncode == 2 and "--calib" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "float.snn").exists()
    done = run_cli("convert", str(path), "-T", "3", "--calib", "digits", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout, parse_constant=strict_json_refuses)   # no Infinity / NaN tokens
    assert report["verify"]["reference"].startswith("onnxruntime (float")
    assert [site["source"]["clip_bound"] for site in report["sites"]] == [None] * 3   # Relu: no bound
    assert (tmp_path / "float.snn").exists()


def strict_json_refuses(token: str):
    raise AssertionError(f"{token} is not JSON")


@pytest.mark.parametrize("kind", ["qat", "plain-float"])
def test_train_exports_onnx_that_convert_compiles(kind, tmp_path):
    """`ann2snn train` writes ONNX, weights and a checkpoint; `convert` compiles the export (a QDQ
    file as it is, a plain-ReLU float file with calibration data) and verifies it against onnxruntime."""
    onnx_path = tmp_path / f"{kind}.onnx"
    flags = ["-T", "2", "--beta", "1e-4"] if kind == "qat" else ["--float", "--float-activation", "plain"]
    done = run_cli("train", "--epochs", "2", *flags, "-o", str(onnx_path), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert len(summary["history"]) == 2 and summary["test_accuracy"] > 0.5
    assert (summary["spikes_per_image"] > 0) == (kind == "qat")
    for path in (onnx_path, tmp_path / f"{kind}.safetensors", tmp_path / f"{kind}.safetensors.ckpt"):
        assert path.is_file(), path
    calib = [] if kind == "qat" else ["--calib", "digits"]
    converted = run_cli("convert", str(onnx_path), "-T", "2", *calib, "--json")
    assert converted.returncode == 0, converted.stderr
    report = json.loads(converted.stdout)
    assert report["verify"]["passed"]
    if kind == "qat":  # the SNN equals the quantized ANN; a float file's reference is the float ANN
        assert report["verify"]["agreement"] == 1.0
    assert (tmp_path / f"{kind}.snn").is_file()


def test_eval_on_an_image_folder_matches_a_direct_evaluation(tmp_path):
    """`ann2snn eval` on an ImageNet-style folder (val/<class>/*.jpg, resized to 256 and cropped to
    224): the JSON fields, top-1/top-5 as computed directly from the SNN, both modes alike."""
    from PIL import Image

    from ann2snn.data.sets import load_dataset
    from ann2snn.runtime.quant import QuantClippedActivation

    generator = torch.Generator().manual_seed(3)
    for label in ("cat", "dog", "fox"):
        folder = tmp_path / "images" / "val" / label
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(240, 300, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    torch.manual_seed(0)
    model = models.build_model("resnet20", 3, activation=lambda c: QuantClippedActivation(levels=3, clip=1.0))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            randomize_batch_norm(m, generator)
    snn_path = tmp_path / "r20.snn"
    ann2snn.convert(model.eval(), T=2).save(snn_path)

    data = load_dataset(tmp_path / "images", "test")
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    direct = ann2snn.load_snn(snn_path).evaluate(x)
    results = {}
    for mode in ("evaluate", "simulate"):
        done = run_cli("eval", str(snn_path), "--data", str(tmp_path / "images"), "--batch-size", "4",
                       "--mode", mode, "--json")
        assert done.returncode == 0, done.stderr
        results[mode] = json.loads(done.stdout)
    got = results["evaluate"]
    assert {"top1", "top5", "images", "spikes_per_image", "images_per_second", "mode", "device"} <= set(got)
    assert got["images"] == 6 and got["mode"] == "evaluate" and got["device"] == "cpu"
    assert got["top1"] == (direct.logits.argmax(1) == y).double().mean().item()
    assert got["top5"] == 1.0  # three classes
    spikes = {name: count.double().mean().item() for name, count in direct.spikes.items()}
    # float32 convolutions of a batch of 4 and one of 6 round differently: a level at a threshold may flip
    assert got["layer_spikes_per_image"] == pytest.approx(spikes, rel=1e-4) and got["spikes_per_image"] > 0
    assert got["images_per_second"] > 0
    for key in ("top1", "top5", "images"):
        assert results["simulate"][key] == got[key], key
    assert results["simulate"]["layer_spikes_per_image"] == pytest.approx(got["layer_spikes_per_image"], rel=1e-4)


def _unsupported_op(path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("LeakyRelu", ["x"], ["y"], name="squash")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _truncated(path: Path) -> None:
    export_onnx(digits_model(quantize=True), (1, 8, 8), path, qdq=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_FILES = {
    "not-onnx": lambda p: p.write_text("this is not a model"),
    "truncated": _truncated,
    "unsupported-op": _unsupported_op,
    "missing": lambda p: None,
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    path = tmp_path / "model.onnx"
    BAD_FILES[case](path)
    before = set(tmp_path.iterdir())
    done = run_cli("convert", str(path))
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error:") and "Traceback" not in done.stderr
    assert str(path) in lines[0]
    if case == "unsupported-op":
        assert "squash" in lines[0] and "LeakyRelu" in lines[0] and "17" in lines[0]
    assert set(tmp_path.iterdir()) == before  # no .snn, no temporary file


def test_demo_runs_and_the_snn_equals_the_quantized_ann(tmp_path):
    done = run_cli("demo", "-T", "2", "--epochs", "2", "--out", str(tmp_path / "demo"), "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["rows"]
    assert row["T"] == 2 and row["same prediction"] == "450/450" and row["SNN"] == row["quantized ANN"]
    assert row["spikes/img"] > 0
    # accuracies as fractions, as in every command's --json
    assert all(0.5 < row[k] <= 1.0 for k in ("float ANN", "quantized ANN", "SNN")) and abs(450 * row["SNN"] - round(450 * row["SNN"])) < 1e-9
    assert (tmp_path / "demo" / "digits_T2.snn").exists() and (tmp_path / "demo" / "digits_T2.onnx").exists()
