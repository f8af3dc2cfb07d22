"""Streaming: exact percentiles in bounded memory, verification in batches, out of memory as bad input.

The conversions run the real CLI in a subprocess whose data segment is capped (RLIMIT_DATA): a model
whose activations over all samples at once would not fit under the cap converts under it, and the
same command with a budget too large for the cap is refused in one line, writing nothing.
"""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ann2snn.frontend.source import quantized_onnx
from ann2snn.errors import Ann2SnnError
from ann2snn.data.inputs import noise_samples, tensor_samples
from ann2snn.runtime.memory import ActivationProfile, OutOfMemory, activation_budget, activation_profile, stage
from ann2snn.compile.quantile import StreamingQuantile, radix_bits
from ann2snn.verify.verification import verify_snn
from ann2snn.compile.compiler import compile_source

SIDE = 256          # a 1 x 256 x 256 input, 8 channels at full size: 0.5 M activations a sample
CAP = 800 << 20     # the converting process's data segment, at most


def quantiles(values: torch.Tensor, q: float, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    stream = StreamingQuantile(values.shape[0], q)
    for _ in stream.passes():
        for chunk in values.split(batch, dim=1):
            stream.add(chunk)
        stream.end_pass()
    return stream.result()


def reference(values: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    positive = torch.where(values > 0, values, torch.nan).double()
    return torch.nanquantile(positive, q, dim=1), torch.nanquantile(positive.flatten(), q)


@pytest.mark.parametrize("rows, q", [(1, 0.9999), (1, 0.5), (7, 0.999), (300, 0.99)])
def test_streamed_percentile_is_torch_nanquantile_bit_for_bit(rows, q):
    generator = torch.Generator().manual_seed(rows)
    values = torch.randn(rows, 5000, generator=generator) * torch.rand(rows, 1, generator=generator) * 8
    values[0, :100] = 0.25                              # ties
    values[0, 100] = torch.inf
    values[0, 101] = torch.nan
    if rows > 2:
        values[2] = -1.0                                # a row that never fires: NaN, the layer's value
    want_rows, want_layer = reference(values, q)
    for batch in (1, 333, 5000):                        # whatever the batch size
        got_rows, got_layer = quantiles(values, q, batch)
        for got, want in ((got_rows, want_rows), (got_layer, want_layer)):   # NaN where torch gives NaN
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_streamed_percentile_needs_every_pass_over_the_same_data():
    """The passes refine one rank digit by digit: other data in a later pass gives another value."""
    values = torch.rand(1, 4000, generator=torch.Generator().manual_seed(0)) + 0.5
    stream = StreamingQuantile(1, 0.9)
    for index in stream.passes():
        stream.add(values if index == 0 else values * 1.5)
        stream.end_pass()
    assert stream.result()[1].item() != reference(values, 0.9)[1].item()


def test_histograms_stay_small_for_many_channels():
    assert radix_bits(1) == 16 and len(StreamingQuantile(1, 0.5).passes()) == 2
    assert radix_bits(4096) < 16 and (4097 * 2 ** radix_bits(4096) * 8) <= 1 << 26


def _big_model(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("AveragePool", ["r1"], ["p1"], name="pool1", kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Flatten", ["p1"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [weight("w1", 8, 1, 3, 3, scale=0.5), weight("b1", 8, scale=0.1),
         weight("w2", 10, 8 * (SIDE // 8) ** 2, scale=0.05), weight("b2", 10, scale=0.1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path, data = folder / "big.onnx", folder / "calib.npz"
    onnx.save(model, path)
    np.savez(data, x=rng.random((128, 1, SIDE, SIDE), dtype=np.float32), y=rng.integers(0, 10, 128))
    return path, data


def _capped(args: list[str], budget: str) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))

    return subprocess.run([sys.executable, "-m", "ann2snn", *args], capture_output=True, text=True, timeout=600,
                          preexec_fn=limit, env={**os.environ, "ANN2SNN_MEMORY_BUDGET": budget})


def test_conversion_streams_under_a_memory_cap_that_all_samples_at_once_exceed(tmp_path):
    path, data = _big_model(tmp_path)
    source_graph, _ = quantized_onnx(path, 2, tensor_samples(torch.rand(2, 1, SIDE, SIDE), "inputs"))
    profile = activation_profile(source_graph, (1, SIDE, SIDE), torch.float32)
    # verification's float64 explanation of 128 samples at once would need more than the cap by itself
    assert 128 * profile.total * 8 > CAP
    out = tmp_path / "big.snn"
    args = ["convert", str(path), "-T", "2", "--calib", str(data), "--calib-samples", "64", "--verify-samples", "128",
            "-o", str(out), "--json"]
    done = _capped(args, "32M")
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"passed": true' in done.stdout and out.is_file()

    # a budget the cap cannot hold: one line naming the stage and what to lower, exit 2, nothing written
    out.unlink()
    refused = _capped(args, "64G")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert re.match(r"ann2snn: error: (calibration|verification: [a-z ()0-9]+): out of memory; lower --batch-size", lines[0]), lines
    assert "Traceback" not in refused.stderr and not out.exists()


def test_verification_gives_the_same_result_in_any_batch_size(tmp_path):
    path, _ = _big_model(tmp_path)
    x = torch.rand(12, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    results = []
    for batch in (1, 5, 12):
        source_graph, source = quantized_onnx(path, 2, tensor_samples(x, "inputs"), batch_size=batch)
        snn = compile_source(path, source_graph, source, 2)
        check = verify_snn(path, snn, source_graph, tensor_samples(x, "inputs"), batch_size=batch)
        verified = check.to_json()
        # float64 and float32 sums may round in another order: all else is the same to the bit
        results.append((snn.report["sites"], verified["exact"]["sites"], verified["agreement"], verified["passed"]))
        assert verified["exact"]["max_relative_logit_difference"] < 1e-12
    assert results[0][3] and results[0][1]["relu1"]["compared"] == 12 * 8 * SIDE * SIDE
    assert results[0] == results[1] == results[2]


def test_a_stage_reports_running_out_of_memory_in_one_line():
    with pytest.raises(OutOfMemory, match=r"^calibration: out of memory; lower --batch-size$"):
        with stage("calibration", "--batch-size"):
            torch.empty(1 << 62, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not memory"):   # any other error passes through
        with stage("calibration", "--batch-size"):
            raise ValueError("not memory")


def test_batch_sizes_follow_the_activations_and_the_budget(monkeypatch):
    profile = ActivationProfile(largest=1 << 20, total=1 << 22)
    assert profile.batch(8) == 128                           # 1 GiB / 8 MiB a sample
    assert profile.batch(8, held="total") == 32
    assert ActivationProfile(10, 10).batch(8) == 256         # a small model: at most 256
    monkeypatch.setenv("ANN2SNN_MEMORY_BUDGET", "16M")
    assert activation_budget() == 16 << 20 and profile.batch(8) == 2
    monkeypatch.setenv("ANN2SNN_MEMORY_BUDGET", "lots")
    with pytest.raises(Ann2SnnError, match="ANN2SNN_MEMORY_BUDGET='lots' is not a size"):
        activation_budget()


def test_noise_is_the_same_in_any_batch_size():
    noise = noise_samples((3, 64, 64), 300)
    one = torch.cat(list(noise.batches(300)))
    assert torch.equal(torch.cat(list(noise.batches(7))), one) and one.shape == (300, 3, 64, 64)
