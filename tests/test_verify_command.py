"""`convert`'s verification and `ann2snn verify`: the exactness gate through the CLI.

A correct QDQ conversion passes both with its counts; a conversion broken in the compiler makes
`convert` exit 1 without writing; an artifact broken in its file makes `verify` exit 1; a float
source is never passed on its agreement with the float ANN unless `--min-agreement` asks.
"""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import ann2snn.compile.compiler as compiler_module
import ann2snn.runtime.neuron as neuron_module
from ann2snn.train.export import export_onnx
from hostile import invoke
from test_cli import digits_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    qdq, floating = folder / "qdq.onnx", folder / "float.onnx"
    export_onnx(digits_model(quantize=True), (1, 8, 8), qdq, qdq=True)
    export_onnx(digits_model(quantize=False), (1, 8, 8), floating, qdq=False)
    assert invoke("convert", qdq).exit_code == 0
    assert invoke("convert", floating, "-T", "2", "--calib", "digits").exit_code == 0
    return {"qdq": qdq, "float": floating, "folder": folder}


def test_convert_reports_the_gate_on_real_inputs(converted, tmp_path):
    result = invoke("convert", converted["qdq"], "--verify-data", "digits", "-o", tmp_path / "m.snn", "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["verify"]
    assert check["passed"] and check["exact"]["passed"] and not check["lossy"]
    assert check["inputs"] == "64 inputs of digits"
    assert check["exact"]["levels_compared"] > 10_000


def test_convert_without_data_says_it_used_noise(converted, tmp_path):
    result = invoke("convert", converted["qdq"], "-o", tmp_path / "m.snn")
    assert result.exit_code == 0 and "uniform noise (no --verify-data or --calib)" in result.stdout


def test_verify_passes_a_correct_artifact_with_counts(converted):
    result = invoke("verify", converted["folder"] / "qdq.snn", "--against", converted["qdq"], "--data", "digits",
                    "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)
    assert check["passed"] and check["exact"]["levels_compared"] > 10_000
    assert all(site["compared"] == site["equal"] for site in check["exact"]["sites"].values())


def _reversed_thresholds(theta, timesteps):
    return [theta * float(2 ** t) for t in range(timesteps)]


@pytest.mark.parametrize("broken", ["no_bias_shift", "bit_order_reversed"])
def test_convert_exits_1_and_writes_nothing_when_the_compiler_is_broken(converted, tmp_path, monkeypatch, broken):
    if broken == "no_bias_shift":
        monkeypatch.setattr(compiler_module, "shift_bias", lambda gm: gm)
    else:
        monkeypatch.setattr(neuron_module, "step_thresholds", _reversed_thresholds)
    out = tmp_path / "m.snn"
    result = invoke("convert", converted["qdq"], "--verify-data", "digits", "-o", out)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "FAILED" in result.stdout and "NO (" in result.stdout and not out.exists()


def _edit_artifact(src, dst, edit_tensors=None, edit_meta=None):
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["ann2snn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors, meta)
    if edit_meta:
        edit_meta(meta)
    safetensors.torch.save_file(tensors, str(dst), metadata={"ann2snn": json.dumps(meta)})


def _remove_a_bias_shift(tensors, meta):
    entry = next(e for e in meta["report"]["sites"].values() if e["bias_shift"]["kind"] == "bias")
    name = entry["bias_shift"]["target"] + ".bias"
    tensors[name] = tensors[name] - torch.as_tensor(entry["bias_shift"]["amount"], dtype=tensors[name].dtype)


def _theta_off(tensors, meta):
    name = next(k for k in tensors if k.endswith(".theta"))
    tensors[name] = tensors[name] * (1 + 1e-6)


def _one_weight(tensors, meta):
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3


def _cap_lower(meta):
    neuron = next(m for m in meta["graph"]["modules"].values() if m["type"] == "BitSerialIFNode")
    neuron["config"]["levels"] -= 1


def _one_more_step(meta):
    neuron = next(m for m in meta["graph"]["modules"].values() if m["type"] == "BitSerialIFNode")
    neuron["config"]["timesteps"] += 1


ARTIFACT_MUTATIONS = {
    "bias_shift_removed": (_remove_a_bias_shift, None),
    "theta_off_by_a_millionth": (_theta_off, None),
    "one_weight_changed": (_one_weight, None),
    "cap_one_level_lower": (None, _cap_lower),
    "one_more_step": (None, _one_more_step),
}


@pytest.mark.parametrize("mutation", sorted(ARTIFACT_MUTATIONS))
def test_verify_exits_1_on_a_broken_artifact(converted, tmp_path, mutation):
    bad = tmp_path / "bad.snn"
    _edit_artifact(converted["folder"] / "qdq.snn", bad, *ARTIFACT_MUTATIONS[mutation])
    result = invoke("verify", bad, "--against", converted["qdq"], "--data", "digits")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "FAILED" in result.stdout


def test_verify_refuses_a_source_the_artifact_was_not_converted_from(converted):
    result = invoke("verify", converted["folder"] / "qdq.snn", "--against", converted["float"])
    assert result.exit_code == 2 and "another SHA-256" in result.stderr


def test_a_float_source_is_lossy_and_gated_only_on_request(converted):
    snn, source = converted["folder"] / "float.snn", converted["float"]
    plain = json.loads(invoke("verify", snn, "--against", source, "--data", "digits", "--samples", "300",
                              "--json").stdout)
    assert plain["lossy"] and plain["exact"]["passed"] and plain["passed"]
    assert plain["agreement"] < 1.0, "T = 2 of a float ANN must lose some predictions for this test"
    strict = invoke("verify", snn, "--against", source, "--data", "digits", "--samples", "300",
                    "--min-agreement", "100")
    assert strict.exit_code == 1 and "lossy" in strict.stdout
