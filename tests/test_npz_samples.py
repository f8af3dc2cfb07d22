"""Samples of an .npz file: memory-mapped where np.savez stored them uncompressed and read when
used (ann2snn/data/npz.py), and of the rank the model takes: (features,) for an MLP, (C, L) signals for
a Conv1d model, (C, H, W) images. The models are ONNX files built here, run by the real CLI."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ann2snn.data.sets import load_dataset, make_loader
from ann2snn.data.npz import read_npz
from hostile import assert_refused, invoke, snapshot

RNG = np.random.default_rng(0)


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (/proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def test_uncompressed_npz_is_memory_mapped_and_compressed_one_read(tmp_path):
    x, y = RNG.random((64, 3, 8, 8)).astype(np.float32), np.arange(64) % 10
    plain, packed = tmp_path / "plain.npz", tmp_path / "packed.npz"
    np.savez(plain, x=x, y=y)
    np.savez_compressed(packed, x=x, y=y)
    assert isinstance(read_npz(plain)["x"], np.memmap)
    assert not isinstance(read_npz(packed)["x"], np.memmap)
    mapped, read = load_dataset(plain), load_dataset(packed)
    assert mapped_file(mapped.x.data_ptr()) == str(plain)   # the samples are the file's pages
    assert mapped_file(read.x.data_ptr()) is None
    for dataset in (mapped, read):
        assert torch.equal(dataset.x, torch.from_numpy(x)) and torch.equal(dataset.y, torch.from_numpy(y))
        images, labels = next(iter(make_loader(dataset, 64)))
        assert torch.equal(images, torch.from_numpy(x)) and images.dtype == torch.float32
    # other dtypes are cast to float32 sample by sample, as they are read
    np.savez(plain, x=(x * 255).astype(np.uint8), y=y)
    assert torch.equal(load_dataset(plain)[5][0], torch.from_numpy((x[5] * 255).astype(np.uint8).astype(np.float32)))


def peak_bytes(path: Path) -> int:
    """Memory numpy allocates (tracemalloc sees its arrays) while the .npz is loaded and a batch read."""
    tracemalloc.start()
    try:
        next(iter(make_loader(load_dataset(path), 64)))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loading_an_npz_holds_no_copy_of_it(tmp_path):
    """32 MiB of float64 samples: loading them (every value checked finite) and reading a batch
    takes a fraction of that; the same file compressed is read whole, which the measure shows."""
    x = np.zeros((4096, 1, 32, 32))
    plain, packed = tmp_path / "plain.npz", tmp_path / "packed.npz"
    np.savez(plain, x=x, y=np.arange(4096) % 10)
    np.savez_compressed(packed, x=x, y=np.arange(4096) % 10)
    assert peak_bytes(plain) < x.nbytes / 2
    assert peak_bytes(packed) > x.nbytes


def model_file(folder: Path, input_shape: list, nodes: list, weights: dict) -> Path:
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items()])
    path = folder / "net.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def conv1d(folder: Path) -> Path:
    """Conv1d (1 -> 4 channels, kernel 3) on [N, 1, 16] signals, ReLU, a linear layer to 3 classes."""
    return model_file(folder, ["N", 1, 16], [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw"], ["y"], name="fc")],
        {"w": RNG.normal(size=(4, 1, 3)), "b": RNG.normal(size=4), "fw": RNG.normal(size=(64, 3)) * 0.3})


def mlp(folder: Path) -> Path:
    """[N, 20] features, a linear layer, ReLU, a linear layer to 3 classes."""
    return model_file(folder, ["N", 20], [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2")],
        {"w1": RNG.normal(size=(20, 8)), "w2": RNG.normal(size=(8, 3))})


def data_file(folder: Path, sample_shape: tuple[int, ...]) -> Path:
    path = folder / "data.npz"
    np.savez(path, x=RNG.random((32, *sample_shape)).astype(np.float32), y=np.arange(32) % 3)
    return path


@pytest.mark.parametrize("model, sample_shape", [(conv1d, (1, 16)), (mlp, (20,))], ids=["conv1d", "mlp"])
def test_convert_eval_and_energy_take_the_samples_the_model_was_converted_for(tmp_path, model, sample_shape):
    path, data, snn = model(tmp_path), data_file(tmp_path, sample_shape), tmp_path / "net.snn"
    converted = invoke("convert", path, "-T", "3", "--calib", data, "-o", snn, "--json")
    assert converted.exit_code == 0, converted.stderr
    assert json.loads(converted.stdout)["verify"]["passed"]
    evaluated = invoke("eval", snn, "--data", data, "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["images"] == 32
    counted = invoke("energy", snn, "--data", data, "--json")
    assert counted.exit_code == 0, counted.stderr
    assert [layer["name"] for layer in json.loads(counted.stdout)["layers"]] == (
        ["conv", "fc"] if model is conv1d else ["fc1", "fc2"])


def test_signals_of_another_channel_count_are_refused_naming_both_shapes(tmp_path):
    snn = tmp_path / "net.snn"
    assert invoke("convert", conv1d(tmp_path), "-T", "3", "--calib", data_file(tmp_path, (1, 16)), "-o",
                  snn).exit_code == 0
    wrong = data_file(tmp_path, (2, 16))
    before = snapshot(tmp_path)
    assert_refused(invoke("eval", snn, "--data", wrong), str(wrong), "takes samples of shape (1, 16) (C, L)",
                   "found samples of shape (2, 16)", before=before, folders=(tmp_path,))
