"""Every command that reads an ONNX file checks its external data the same way (reader.load_checked):
inside the model's folder, no absolute path, no `..` escape, no link out, within its file. Each
hostile file is refused by the real CLI in a subprocess: exit 2, one line naming the file and the
tensor, nothing written (tests/test_hostile_onnx.py runs the same files through convert and inspect
in-process)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from hostile import assert_refused, invoke, snapshot
from test_hostile_onnx import external

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = "lies outside the model's folder"


def run(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ann2snn", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line(done: subprocess.CompletedProcess, path: Path, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"ann2snn: error: {path}: "), done.stderr
    assert "Traceback" not in done.stderr and all(f in done.stderr for f in fragments), done.stderr


def escaping(tmp_path: Path, how: str) -> Path:
    """model/model.onnx whose tensor 'w' reads a secret.bin beside the model's folder: by a `..`
    location or by its absolute path. The secret holds the model's own weights, so only the
    location is wrong."""
    folder = tmp_path / "model"
    folder.mkdir()
    external(folder)
    secret = tmp_path / "secret.bin"
    shutil.copy(folder / "weights.bin", secret)
    return external(folder, location="../secret.bin" if how == "parent" else str(secret))


@pytest.mark.parametrize("how", ["parent", "absolute"])
def test_train_init_refuses_external_data_outside_the_folder(tmp_path, how):
    model = escaping(tmp_path, how)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32), y=np.arange(10))
    before = snapshot(tmp_path)
    done = run("train", "--data", data, "--epochs", "1", "--init", model, "-o", tmp_path / "out" / "m.onnx")
    assert_one_line(done, model, "tensor 'w'", OUTSIDE)
    assert snapshot(tmp_path) == before


def test_convert_refuses_external_data_outside_the_folder(tmp_path):
    model = escaping(tmp_path, "parent")
    before = snapshot(tmp_path)
    assert_one_line(run("convert", model), model, "tensor 'w'", "'../secret.bin'", OUTSIDE)
    assert snapshot(tmp_path) == before


def test_verify_refuses_external_data_linked_out_of_the_folder(tmp_path):
    """The file converted with its weights beside it verifies; the same file (the same SHA-256),
    its weights file now a link to a copy outside the folder, is refused."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = external(folder)
    snn = tmp_path / "m.snn"
    assert invoke("convert", model, "-o", snn, "--no-verify").exit_code == 0
    assert invoke("verify", snn, "--against", model, "--samples", "4").exit_code == 0
    shutil.move(folder / "weights.bin", tmp_path / "secret.bin")
    (folder / "weights.bin").symlink_to(tmp_path / "secret.bin")
    before = snapshot(tmp_path)
    assert_one_line(run("verify", snn, "--against", model), model, "tensor 'w'", "'weights.bin'", OUTSIDE)
    assert snapshot(tmp_path) == before


def subgraph_external(tmp_path: Path) -> Path:
    """A model whose If branch holds a Constant tensor 'hidden' stored in ../secret.bin: a tensor
    that onnx's external-data loader reads, though it is no initializer of the main graph."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    hidden = onnx.helper.make_tensor("hidden", onnx.TensorProto.FLOAT, [4], np.zeros(4, np.float32).tobytes(),
                                     raw=True)
    onnx.external_data_helper.set_external_data(hidden, location="../secret.bin", offset=0, length=16)
    hidden.ClearField("raw_data")
    hidden.data_location = onnx.TensorProto.EXTERNAL
    branch = onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["b"], value=hidden)], "branch", [],
                                    [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [4])])
    nodes = [onnx.helper.make_node("Constant", [], ["c"], value=onnx.helper.make_tensor("c", onnx.TensorProto.BOOL,
                                                                                      [], [True])),
             onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                   ["N", 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "model.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("build, fragments", [
    pytest.param(subgraph_external, ("tensor 'hidden'", OUTSIDE), id="subgraph-tensor-outside"),
    pytest.param(lambda tmp_path: external(tmp_path, offset="4096"), ("tensor 'w' ends at byte 4,", "past the end of "
                                                                      "'weights.bin'"), id="past-the-end"),
])
def test_every_stored_tensor_is_checked(tmp_path, build, fragments):
    path = build(tmp_path)
    before = snapshot(tmp_path)
    assert_refused(invoke("inspect", path), str(path), *fragments, before=before, folders=(tmp_path,))
