"""Integer artifacts (format version 2): integer tensors kept exactly, the dtypes a module declares
held to, older and newer versions; `inspect` showing weight dtypes and the file size; `energy`
pricing an SNN of int8 weights with the int8 table by default. The integer layer is the test-only
Int8Linear (tests/int8_layers.py), put into a real converted SNN."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ann2snn
from ann2snn.energy import default_table, energy_report
from ann2snn.errors import ArtifactError
from ann2snn.runtime.artifact import CUSTOM_MODULES, read_metadata
from ann2snn.runtime.graph import layer_weight_dtypes
from ann2snn.runtime.quant import QuantClippedActivation
import int8_layers
from int8_layers import Int8Linear

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setitem(CUSTOM_MODULES, "Int8Linear", Int8Linear)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A converted MLP saved as it is (float) and with its second and third layers int8, and inputs."""
    folder = tmp_path_factory.mktemp("integer_artifacts")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), QuantClippedActivation(7, 2.0), nn.Linear(16, 16),
                          QuantClippedActivation(7, 2.0), nn.Linear(16, 10)).eval()
    snn = ann2snn.convert(model, T=3)
    snn.save(folder / "float.snn")
    integer = int8_layers.quantize_layers_after_the_first(snn)
    with pytest.MonkeyPatch.context() as patch:   # save writes only the modules the artifact lists
        patch.setitem(CUSTOM_MODULES, "Int8Linear", Int8Linear)
        integer.save(folder / "int8.snn")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.random((12, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 12))
    return {"folder": folder, "float": folder / "float.snn", "int8": folder / "int8.snn", "snn": integer,
            "data": folder / "data.npz"}


def rewritten(path, out, edit_tensors=None, edit_meta=None):
    """A copy of an .snn file with its tensors or JSON header edited."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["ann2snn"])
    (edit_tensors or (lambda t: None))(tensors)
    (edit_meta or (lambda m: None))(meta)
    save_file(tensors, str(out), metadata={"ann2snn": json.dumps(meta)})
    return out


# --- format version 2 -------------------------------------------------------------------------

def test_integer_tensors_load_with_their_dtype_and_values(files, registered):
    with safe_open(str(files["int8"]), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["3.weight"].dtype == torch.int8 and stored["3.bias"].dtype == torch.int32
    loaded = ann2snn.load_snn(files["int8"]).graph_module.state_dict()
    saved = files["snn"].graph_module.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(ann2snn.load_snn(files["int8"]).evaluate(x).logits, files["snn"].evaluate(x).logits)


def test_a_file_is_written_in_the_lowest_version_that_describes_it(files):
    assert read_metadata(files["float"])["format_version"] == 1   # every version 1 reader reads it
    assert read_metadata(files["int8"])["format_version"] == 2


def test_a_newer_version_is_refused_in_one_line(files, tmp_path):
    path = rewritten(files["int8"], tmp_path / "v3.snn", edit_meta=lambda m: m.update(format_version=3))
    with pytest.raises(ArtifactError, match=r"unsupported artifact format ann2snn-snn v3 \(this ann2snn reads "
                                            r"ann2snn-snn v1 to v2\)$"):
        ann2snn.load_snn(path)


def test_a_version_1_file_with_integer_tensors_is_refused(files, tmp_path, registered):
    path = rewritten(files["int8"], tmp_path / "v1.snn", edit_meta=lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match=r"v1\.snn: tensor 3\.bias is int32, which a version 1 artifact does not hold$"):
        ann2snn.load_snn(path)


def test_a_tensor_of_a_dtype_outside_the_format_is_refused(files, tmp_path, registered):
    def to_float8(tensors):
        tensors["3.scale"] = tensors["3.scale"].to(torch.float8_e4m3fn)
    path = rewritten(files["int8"], tmp_path / "f8.snn", edit_tensors=to_float8)
    with pytest.raises(ArtifactError, match=r"tensor 3\.scale is float8_e4m3fn, which an artifact does not hold"):
        ann2snn.load_snn(path)


@pytest.mark.parametrize("tensor, dtype, declared", [("3.weight", torch.float32, "int8"),
                                                     ("5.bias", torch.int64, "int32")])
def test_a_tensor_not_of_its_declared_dtype_is_refused(files, tmp_path, registered, tensor, dtype, declared):
    def retype(tensors):
        tensors[tensor] = tensors[tensor].to(dtype)
    path = rewritten(files["int8"], tmp_path / "retyped.snn", edit_tensors=retype)
    with pytest.raises(ArtifactError) as info:
        ann2snn.load_snn(path)
    message = str(info.value)
    assert f"tensor {tensor} should be {declared} (as Int8Linear declares)" in message and "\n" not in message
    assert f"the file holds {str(dtype).removeprefix('torch.')}" in message


def test_the_reader_holds_the_file_to_the_declaration(files, registered, monkeypatch):
    """BUFFER_DTYPES, not what from_artifact_config happens to allocate, is what the file must hold."""
    monkeypatch.setattr(Int8Linear, "BUFFER_DTYPES", {"weight": torch.int16, "bias": torch.int32})
    with pytest.raises(ArtifactError, match=r"tensor 3\.weight should be int16 \(as Int8Linear declares\)"):
        ann2snn.load_snn(files["int8"])


def test_layer_weight_dtypes_in_graph_order(files, registered):
    assert layer_weight_dtypes(ann2snn.load_snn(files["int8"]).graph_module) == {
        "1": torch.float32, "3": torch.int8, "5": torch.int8}
    assert set(layer_weight_dtypes(ann2snn.load_snn(files["float"]).graph_module).values()) == {torch.float32}


def test_the_default_table_follows_the_layers_between_the_first_and_the_last():
    f32, i8 = torch.float32, torch.int8
    assert default_table({"a": f32, "b": i8, "c": i8})[0] == "int8-45nm"
    assert default_table({"a": i8, "b": i8})[0] == "int8-45nm"
    assert default_table({"a": f32, "b": i8, "c": f32})[0] == "int8-45nm"   # float encoder and output layer
    assert default_table({"a": i8, "b": f32, "c": i8, "d": i8})[0] == "fp32-45nm"   # a float hidden layer
    assert default_table({"a": f32, "b": f32})[0] == "fp32-45nm"
    assert default_table({})[0] == "fp32-45nm"


# --- the command ------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ann2snn", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def run_cli_with_int8(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(int8_layers.cli_command(*args), capture_output=True, text=True, env=ENV, timeout=300)


def test_inspect_shows_weight_dtypes_and_file_size(files):
    result = run_cli_with_int8("inspect", str(files["int8"]), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    size = os.path.getsize(files["int8"])
    assert summary["file_bytes"] == size and summary["file_mib"] == round(size / 2**20, 3)
    assert summary["format_version"] == 2 and summary["weights"] == "int8 in 2 layers, float32 in 1"
    assert summary["layers"] == {"1": {"weight": "float32"}, "3": {"weight": "int8"}, "5": {"weight": "int8"}}
    text = run_cli_with_int8("inspect", str(files["int8"]))
    assert text.returncode == 0, text.stderr
    assert f"file_bytes: {size}\n" in text.stdout and "weights: int8 in 2 layers, float32 in 1\n" in text.stdout
    assert [line.split() for line in text.stdout.splitlines() if line.startswith(("3 ", "5 "))] == [
        ["3", "int8"], ["5", "int8"]]


def test_inspect_of_a_float_artifact(files):
    result = run_cli("inspect", str(files["float"]), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["weights"] == "float32 in 3 layers" and summary["format_version"] == 1
    assert summary["file_bytes"] == os.path.getsize(files["float"])


def test_inspect_refuses_an_integer_artifact_whose_layer_it_does_not_know(files):
    """Without Int8Linear among the artifact's modules, the same file is one line, exit 2."""
    result = run_cli("inspect", str(files["int8"]))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"ann2snn: error: {files['int8']}: module 3: type \"Int8Linear\" is not "
                                     "allowed in an artifact")


def test_energy_prices_int8_weights_with_the_int8_table_by_default(files):
    args = ("energy", str(files["int8"]), "--data", str(files["data"]), "--samples", "6")
    result = run_cli_with_int8(*args)
    assert result.returncode == 0, result.stderr
    assert "int8 weights: int8 operation costs (table int8-45nm); --table to choose another\n" in result.stdout
    assert "table int8-45nm: E_MAC = 0.3 pJ" in result.stdout
    chosen = run_cli_with_int8(*args, "--table", "fp32-45nm", "--json")
    assert chosen.returncode == 0, chosen.stderr
    report = json.loads(chosen.stdout)
    assert report["table"]["name"] == "fp32-45nm" and report["table_choice"] == "--table"


def test_energy_of_a_float_artifact_keeps_the_fp32_table(files):
    result = run_cli("energy", str(files["float"]), "--data", str(files["data"]), "--samples", "6", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["table"]["name"] == "fp32-45nm"
    assert report["table_choice"] == "float weights: fp32 operation costs (table fp32-45nm); --table to choose another"


def test_energy_report_picks_the_table_by_the_weights(files, registered):
    x = [torch.rand(3, 1, 8, 8)]
    assert energy_report(ann2snn.load_snn(files["int8"]), x).table.name == "int8-45nm"
    assert energy_report(ann2snn.load_snn(files["float"]), x).table.name == "fp32-45nm"
    assert energy_report(ann2snn.load_snn(files["int8"]), x, "fp32-45nm").table.name == "fp32-45nm"
