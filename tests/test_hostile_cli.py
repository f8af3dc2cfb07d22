"""Hostile command lines: outputs that would overwrite inputs or cannot be written, bogus devices,
newlines in paths, hostile .snn files given to every command that reads one, interrupted writes,
and the exit codes (0 success, 1 verification failed, 2 bad input, 3 internal error).
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ann2snn
from ann2snn.train.export import export_onnx
from hostile import assert_refused, assert_usage_error, invoke, snapshot
from test_artifact_attacks import REFUSED, original, payload, write  # noqa: F401 (a fixture)
from test_cli import digits_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A QDQ ONNX file and its converted .snn, in a folder of their own."""
    folder = tmp_path_factory.mktemp("inputs")
    onnx_path = folder / "digits.onnx"
    export_onnx(digits_model(quantize=True), (1, 8, 8), onnx_path, qdq=True)
    snn_path = folder / "digits.snn"
    ann2snn.convert(digits_model(quantize=True)).save(snn_path)
    return {"onnx": onnx_path, "snn": snn_path, "folder": folder}


# --- outputs ------------------------------------------------------------------------------------

def test_convert_refuses_to_overwrite_its_input(files, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(files["onnx"].read_bytes())
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", model, "-o", model), str(model), "overwrite the input", before=before,
                   folders=(tmp_path,))


def test_convert_of_an_onnx_file_named_snn_refuses_its_default_output(files, tmp_path):
    model = tmp_path / "x.snn"   # an ONNX file under an .snn name: the default output is itself
    model.write_bytes(files["onnx"].read_bytes())
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", model), str(model), "overwrite the input", before=before, folders=(tmp_path,))


@pytest.mark.parametrize("link", ["symlink", "hardlink", "dotdot"])
def test_convert_refuses_an_output_that_is_the_input_by_another_name(files, tmp_path, link):
    model = tmp_path / "m.onnx"
    model.write_bytes(files["onnx"].read_bytes())
    out = tmp_path / "out.snn"
    if link == "symlink":
        out.symlink_to(model)
    elif link == "hardlink":
        os.link(model, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "m.onnx"
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", model, "-o", out), "overwrite the input", before=before, folders=(tmp_path,))


def test_convert_refuses_its_calibration_file_as_output(files, tmp_path):
    calib = tmp_path / "calib.npz"
    import numpy as np

    np.savez(calib, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", files["onnx"], "--calib", calib, "-T", "3", "-o", calib), "overwrite the input",
                   before=before, folders=(tmp_path,))


UNWRITABLE = {
    "proc": lambda tmp: Path("/proc/ann2snn-test/out.snn"),
    "parent_is_a_file": lambda tmp: tmp / "a_file" / "out.snn",
    "is_a_folder": lambda tmp: tmp / "a_folder",
    "read_only_folder": lambda tmp: tmp / "read_only" / "out.snn",
}


def _prepare(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "read_only").mkdir()
    (tmp_path / "read_only").chmod(0o555)


def _writable_by_root(folder: Path) -> bool:
    try:
        (folder / "probe").touch()
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.mark.parametrize("where", sorted(UNWRITABLE))
@pytest.mark.parametrize("command", ["convert", "train", "energy --plot"])
def test_unwritable_outputs_are_refused_before_the_work(files, tmp_path, where, command):
    _prepare(tmp_path)
    if where == "read_only_folder" and _writable_by_root(tmp_path / "read_only"):
        pytest.skip("root writes into read-only folders")
    out = UNWRITABLE[where](tmp_path)
    args = {"convert": ["convert", files["onnx"], "-o", out],
            "train": ["train", "--data", "digits", "--epochs", "1", "-o", out],
            "energy --plot": ["energy", files["snn"], "--data", "digits", "--plot", out]}[command]
    before = snapshot(tmp_path, files["folder"])
    started = time.perf_counter()
    result = invoke(*args)
    if where == "is_a_folder":   # click's own check of the option, in click's format
        assert_usage_error(result, "is a directory")
    else:
        assert_refused(result, str(out), before=before, folders=(tmp_path, files["folder"]))
    assert snapshot(tmp_path, files["folder"]) == before
    assert time.perf_counter() - started < 20, "the refusal must come before the long work"


# --- devices and names --------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["bogus", "tpu", "cuda:99" if torch.cuda.is_available() else "cuda", "cpu:x",
                                    "", "mps"])
@pytest.mark.parametrize("command", ["eval", "energy", "train"])
def test_bogus_devices_are_refused(files, tmp_path, device, command):
    args = {"eval": ["eval", files["snn"], "--data", "digits"],
            "energy": ["energy", files["snn"], "--data", "digits"],
            "train": ["train", "--data", "digits", "--epochs", "1", "-o", tmp_path / "t.onnx"]}[command]
    before = snapshot(tmp_path)
    assert_refused(invoke(*args, "--device", device), "--device", before=before, folders=(tmp_path,))


@pytest.mark.parametrize("command", ["convert", "inspect", "eval"])
def test_a_path_with_a_newline_keeps_the_error_on_one_line(tmp_path, command):
    path = tmp_path / "two\nlines.onnx"
    path.write_bytes(b"not an onnx file")
    args = {"convert": ["convert", path], "inspect": ["inspect", path],
            "eval": ["eval", path.with_suffix(".snn"), "--data", "digits"]}[command]
    if command == "eval":
        path.with_suffix(".snn").write_bytes(b"not a safetensors file")
    line = assert_refused(invoke(*args), "two\\nlines")
    assert "two\nlines" not in line


# --- hostile .snn files through every command that reads one --------------------------------------

@pytest.mark.parametrize("attack", REFUSED, ids=[a.__name__ for a in REFUSED])
@pytest.mark.parametrize("command", ["inspect", "eval", "energy"])
def test_every_reader_refuses_a_hostile_artifact(original, tmp_path, attack, command):
    marker = tmp_path / "executed"
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    attack(meta, tensors, payload(marker))
    path = write(tmp_path / "hostile.snn", meta, tensors)
    args = [command, path] + ([] if command == "inspect" else ["--data", "digits"])
    before = snapshot(tmp_path)
    assert_refused(invoke(*args), str(path), before=before, folders=(tmp_path,))
    assert not marker.exists()


@pytest.mark.parametrize("edit", ["report_not_object", "source_not_object", "timesteps_string", "timesteps_zero",
                                  "graph_list", "nodes_not_list", "modules_not_object", "node_missing_key",
                                  "version_missing", "format_newer", "sites_not_object"])
def test_inspect_refuses_metadata_of_the_wrong_shape(original, tmp_path, edit):
    meta, tensors = copy.deepcopy(original[0]), dict(original[1])
    if edit == "report_not_object":
        meta["report"] = [1, 2]
    elif edit == "source_not_object":
        meta["source"] = "x"
    elif edit == "timesteps_string":
        meta["timesteps"] = "3"
    elif edit == "timesteps_zero":
        meta["timesteps"] = 0
    elif edit == "graph_list":
        meta["graph"] = []
    elif edit == "nodes_not_list":
        meta["graph"]["nodes"] = {"a": 1}
    elif edit == "modules_not_object":
        meta["graph"]["modules"] = ["conv"]
    elif edit == "node_missing_key":
        del meta["graph"]["nodes"][1]["args"]
    elif edit == "version_missing":
        del meta["ann2snn_version"]
    elif edit == "format_newer":
        meta["format_version"] = 99
    else:
        meta["report"]["sites"] = [1]
    path = write(tmp_path / f"{edit}.snn", meta, tensors)
    assert_refused(invoke("inspect", path), str(path))


# --- exit codes ---------------------------------------------------------------------------------

def test_exit_code_1_when_verification_fails_and_nothing_is_written(files, tmp_path, monkeypatch):
    import ann2snn.compile.compiler as compiler

    monkeypatch.setattr(compiler, "shift_bias", lambda gm: gm)   # a compiler that forgets docs/method.md section 2
    out = tmp_path / "out.snn"
    result = invoke("convert", files["onnx"], "-o", out)
    assert result.exit_code == 1, result.stderr
    assert "FAILED" in result.stdout and "no output written" in result.stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_exit_code_3_for_an_internal_error_with_one_line(files, tmp_path, monkeypatch):
    import ann2snn.frontend.source as source

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(source, "quantized_onnx", broken)
    result = invoke("convert", files["onnx"], "--no-verify", "-o", tmp_path / "out.snn")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error: internal error") and "ZeroDivisionError" in lines[0]
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
    debug = invoke("--debug", "convert", files["onnx"], "--no-verify", "-o", tmp_path / "out.snn")
    assert isinstance(debug.exception, ZeroDivisionError)   # --debug lets the traceback through


def test_warnings_before_an_error_are_dropped(files, monkeypatch):
    import warnings

    import ann2snn.frontend.source as source
    from ann2snn.errors import UnsupportedModelError

    def warns_then_refuses(path, *args, **kwargs):
        warnings.warn("a torch warning on the way")
        raise UnsupportedModelError(f"{path}: refused")

    monkeypatch.setattr(source, "quantized_onnx", warns_then_refuses)
    assert_refused(invoke("convert", files["onnx"], "-o", files["folder"] / "never-written.snn"), "refused")


def test_help_states_the_exit_codes():
    out = invoke("--help").stdout
    for text in ("0 success", "1 the conversion was built but failed verification", "2 bad input", "3 an internal"):
        assert text in " ".join(out.split()), text


# --- interrupted writes -------------------------------------------------------------------------

_SLOW_WRITER = textwrap.dedent("""
    import signal, sys, time
    sys.path.insert(0, {root!r})
    from ann2snn import cli
    from ann2snn.runtime.artifact import write_atomically
    signal.signal(signal.SIGTERM, cli.exit_on_signal)
    # Ctrl-C as in a terminal: a test worker may have left SIGINT ignored, which a child inherits
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 1_000_000)
        print("writing", flush=True)
        time.sleep(60)

    write_atomically({out!r}, write)
""")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_an_interrupted_write_leaves_no_file_under_the_final_name(tmp_path, how):
    out = tmp_path / "out.snn"
    process = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER.format(root=str(ROOT), out=str(out))],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(getattr(signal, how))
    process.wait(timeout=60)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    if how == "SIGKILL":   # no handler runs: the next write of the same output removes it
        assert len(leftovers) == 1 and leftovers[0].startswith(".out.snn.")
        from ann2snn.runtime.artifact import write_atomically

        write_atomically(out, lambda tmp: Path(tmp).write_bytes(b"done"))
        assert [p.name for p in tmp_path.iterdir()] == ["out.snn"]
    else:
        assert leftovers == [], leftovers
        assert process.returncode != 0


def test_inspect_reads_an_upper_case_snn_suffix_as_an_artifact(files, tmp_path):
    upper = tmp_path / "MODEL.SNN"
    upper.write_bytes(files["snn"].read_bytes())
    result = invoke("inspect", upper, "--json")
    assert result.exit_code == 0, result.stderr
    assert '"kind": "snn"' in result.stdout
