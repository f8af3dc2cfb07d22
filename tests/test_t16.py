"""T up to 16 (issue 16, part 1): 16-bit activations convert, and every part of the stack takes T = 9..16.

A level's spike code is uint8 up to T = 8 and uint16 up to T = 16 (`ann2snn.runtime.neuron.spike_code_dtype`).
Checked here at T = 9..16: onnxruntime's A16W8 files (QUInt16 and QInt16 activations) through
`ann2snn convert` (T = 16, the exactness gate, 0 unexplained levels against onnxruntime); float32
levels against the exact floor of the real quotient; random and zoo networks, whose simulation and
evaluation agree and equal the quantized ANN (float64); the fused neuron in Triton and in C against
its reference; the spike code's pack / unpack; the artifact; energy's counts; the CLI's -T. Each
check has its failing case beside it: what the check catches (a byte-wide code or count, a float32
quotient, a reversed bit order, T = 17, float16 levels above 2048, a tampered artifact).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ann2snn
from ann2snn.runtime import neuron as neuron_module
from ann2snn.energy import OperationCounter
from ann2snn.errors import ArtifactError, UnsupportedModelError
from ann2snn.levels import (channel_view, decode_levels, fire_levels, fire_msb_first, popcount_levels,
                            spike_code_dtype)
from hostile import assert_refused, assert_usage_error, invoke, snapshot
from ann2snn.kernels import fire_fused_reference, fire_fused_triton, pack_spikes, unpack_spikes
from random_nets import BLOCKS, RandomNet
from test_invariant import expected_levels, snn_site_levels
from test_kernels import (FireBackend, _assert_same_neuron_output, _in_layout, _potentials, _shape_for, _theta,
                          fire_backend, fire_device)  # noqa: F401 (fixtures)
from test_neuron import exact_levels
from test_onnx_import import quantize
from test_quantizers import float_file  # noqa: F401 (a fixture)
from test_verify_command import _reversed_thresholds
from test_zoo_invariant import quantized_zoo_model

ROOT = Path(__file__).resolve().parents[1]
WIDE_TIMESTEPS = range(9, 17)


def byte_wide_spikes(levels: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Spikes of levels cut to one byte: what an 8-bit spike code or popcount would count."""
    return popcount_levels(levels.to(torch.int64) & 0xFF, 255).sum(dims)


# --- the spike code -----------------------------------------------------------------------------

def test_spike_code_is_a_byte_to_T_8_and_16_bits_to_T_16():
    assert [spike_code_dtype(t) for t in range(1, 17)] == [torch.uint8] * 8 + [torch.uint16] * 8
    for bad in (0, 17):
        with pytest.raises(ValueError, match="1..16"):
            spike_code_dtype(bad)


def test_pack_and_unpack_round_trip_at_T_16():
    every_level = torch.arange(2**16).reshape(4, 128, 128)
    planes = unpack_spikes(every_level, 16)
    assert planes.shape == (16, 4, 128, 128) and planes.dtype == torch.uint8
    assert torch.equal(decode_levels(planes.double()), every_level.double())   # MSB first
    codes = pack_spikes(planes)
    assert codes.dtype == torch.uint16 and torch.equal(codes.to(torch.int64), every_level)
    assert torch.equal(unpack_spikes(codes, 16), planes)
    # failing cases: a code stored in one byte loses the first 8 planes; 17 planes fit no code
    assert not torch.equal(unpack_spikes(codes.to(torch.int32).to(torch.uint8), 16), planes)
    with pytest.raises(ValueError, match="1..16"):
        pack_spikes(torch.zeros(17, 3, dtype=torch.uint8))


# --- float32 arithmetic at T = 16 -----------------------------------------------------------------

def test_float32_levels_at_T_16_are_the_exact_floor():
    """The evaluator's fire_levels and the simulator's compare and subtract fire, for float32
    potentials on and one float next to k theta (k up to 2^16), exactly floor(V / theta) of the
    real numbers; a float32 quotient (2^16 levels leave it 8 bits for the fraction) does not."""
    gen = torch.Generator().manual_seed(16)
    theta = _theta(True, 6, gen)
    v = _potentials((5, 6, 40), theta, 16, torch.float32, gen)
    t = channel_view(theta, 3)
    levels = 2**16 - 1
    exact = exact_levels(v, t, levels).float()
    assert torch.equal(fire_levels(v, t, levels, 16), exact)
    assert torch.equal(decode_levels(fire_msb_first(v, t, levels, 16)), exact)
    assert int(exact.max()) == levels and int((exact > 255).sum()) > 1000
    naive = torch.floor(v / t).clamp(0, levels)   # failing case
    assert not torch.equal(naive, exact)


# --- the fused neuron: Triton and C against the reference -------------------------------------------

@pytest.mark.parametrize("timesteps", WIDE_TIMESTEPS)
def test_fire_fused_equals_reference_above_T_8(fire_backend: FireBackend, timesteps: int) -> None:  # noqa: F811
    device = fire_backend.device
    levels = 2**timesteps - (3 if timesteps % 2 else 1)   # odd level counts (the cap) at odd T
    layout = ("nchw", "2d", "channels_last")[timesteps % 3]
    gen = torch.Generator().manual_seed(timesteps)
    shape = _shape_for(layout)
    theta = _theta(timesteps % 2 == 0, shape[1], gen)
    v = _in_layout(_potentials(shape, theta, timesteps, torch.float32, gen), layout)
    offset = theta / 2
    got = fire_backend.fire(v.to(device), theta.to(device), offset.to(device), levels, timesteps, want_levels=True)
    want = fire_fused_reference(v, theta, offset, levels, timesteps, want_levels=True)
    assert want.levels.dtype == torch.uint16 and got.levels.dtype == torch.uint16
    _assert_same_neuron_output(got, want)
    assert int(want.levels.to(torch.int32).max()) == levels
    # failing case: a byte-wide code or popcount would not match
    spatial = tuple(range(2, v.dim()))
    assert not torch.equal(byte_wide_spikes(want.levels, (1,) + spatial), want.sample_spikes)


def test_fire_fused_other_dtypes_above_T_8(fire_device: torch.device) -> None:  # noqa: F811
    """float64 at T = 16 and float16 at T = 11 (its integers are exact to 2048) in Triton; float16
    above T = 11 and bfloat16 above T = 8 are refused in every kernel, not rounded."""
    gen = torch.Generator().manual_seed(11)
    for dtype, timesteps in ((torch.float64, 16), (torch.float16, 11)):
        theta = _theta(True, 6, gen)
        v = _potentials((3, 6, 4, 5), theta, timesteps, dtype, gen)
        levels = 2**timesteps - 1
        want = fire_fused_reference(v, theta, theta / 2, levels, timesteps, want_levels=True)
        got = fire_fused_triton(v.to(fire_device), theta.to(fire_device), (theta / 2).to(fire_device), levels,
                                timesteps, want_levels=True)
        _assert_same_neuron_output(got, want)
    for dtype, timesteps in ((torch.float16, 12), (torch.bfloat16, 9)):
        v = torch.zeros(2, 3, dtype=dtype)
        for fire in (fire_fused_reference, fire_fused_triton):
            with pytest.raises(ValueError, match="not exact in"):
                fire(v.to(fire_device), 0.5, None, 2**timesteps - 1, timesteps)


# --- networks: simulation, evaluation and the quantized ANN ------------------------------------------

def _check_network(model: torch.nn.Module, x: torch.Tensor, timesteps: int) -> None:
    """float64: every level the SNN fires is the ANN's, logits equal; evaluation equals simulation;
    and the network fires levels a byte cannot count (the failing case)."""
    snn = ann2snn.convert(model, T=timesteps)
    ann, _, logits = expected_levels(model, snn, x)
    fired, simulated = snn_site_levels(snn, x)
    assert set(fired) == set(ann) and fired
    for name, level in fired.items():
        assert torch.equal(level, ann[name]), name
    torch.testing.assert_close(simulated.logits, logits, rtol=0, atol=1e-9)
    evaluated = snn.evaluate(x)
    torch.testing.assert_close(evaluated.logits, simulated.logits, rtol=0, atol=1e-9)
    assert simulated.spikes.keys() == evaluated.spikes.keys()
    for name, count in simulated.spikes.items():
        assert torch.equal(evaluated.spikes[name], count), name
    assert any(not torch.equal(byte_wide_spikes(level, tuple(range(1, level.dim()))), simulated.spikes[name])
               for name, level in fired.items())


@pytest.mark.parametrize("timesteps", WIDE_TIMESTEPS)
def test_random_network_above_T_8_simulates_and_evaluates_exactly(timesteps: int) -> None:
    blocks = [BLOCKS[(timesteps * 3 + k) % len(BLOCKS)] for k in range(3)]
    levels = 2**timesteps - (3 if timesteps % 2 else 1)
    model = RandomNet(blocks, levels, timesteps % 2 == 0, timesteps, head="flatten" if timesteps % 3 else "gap")
    x = torch.rand((3, 3, 8, 8), generator=torch.Generator().manual_seed(timesteps))
    _check_network(model.double(), x.double(), timesteps)


def test_float16_converts_up_to_T_11_and_is_refused_above() -> None:
    """float16 holds the integers up to 2048 exactly: levels of T = 12 would round without a word."""
    assert ann2snn.convert(RandomNet(["conv"], 2**11 - 1, False, 0).half(), T=11).timesteps == 11
    with pytest.raises(UnsupportedModelError, match="4095 levels are not exact in float16"):
        ann2snn.convert(RandomNet(["conv"], 2**12 - 1, False, 0).half(), T=12)


def test_zoo_resnet20_at_T_16_simulates_and_evaluates_exactly() -> None:
    model = quantized_zoo_model("resnet20", 16, seed=16)
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _check_network(model, x, 16)


# --- onnxruntime's A16W8 files through `ann2snn convert` ---------------------------------------------

@pytest.mark.parametrize("activations", ["QUInt16", "QInt16"])
def test_a16w8_converts_exactly_at_T_16(float_file, tmp_path, activations):  # noqa: F811
    path = quantize(float_file, tmp_path / "a16w8.onnx", activation_type=activations, weight_type="QInt8")
    result = invoke("convert", path, "-T", "16", "--json")
    assert result.exit_code == 0, (result.stderr, result.stdout[-2000:])
    report = json.loads(result.stdout)
    check = report["verify"]
    assert check["passed"] and check["exact"]["passed"] and check["levels"]["totals"]["unexplained"] == 0
    assert check["exact"]["levels_compared"] > 10_000
    assert report["source"]["kind"] == "qdq" and report["timesteps"] == 16
    sites = [site for site in report["sites"] if site.get("source", {}).get("kind") == "qdq"]
    assert len(sites) >= 3 and all(site["levels"] == 65535 and site["timesteps"] == 16 for site in sites)
    assert ann2snn.load_snn(tmp_path / "a16w8.snn").timesteps == 16
    # failing cases: one step short is refused; a compiler firing LSB first fails the gate, writes nothing
    before = snapshot(tmp_path)
    assert_refused(invoke("convert", path, "-T", "15", "-o", tmp_path / "t15.snn"), "T=15", "65535 levels",
                   before=before, folders=(tmp_path,))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(neuron_module, "step_thresholds", _reversed_thresholds)
        broken = invoke("convert", path, "-o", tmp_path / "lsb_first.snn")
    assert broken.exit_code == 1 and "FAILED" in broken.stdout and not (tmp_path / "lsb_first.snn").exists()


def test_convert_refuses_T_17_in_one_line(float_file):  # noqa: F811
    result = invoke("convert", float_file, "-T", "17")
    assert_usage_error(result, "17 is not in the range 1<=x<=16")
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: Invalid value for '-T': 17 is not in the range 1<=x<=16."]


# --- the artifact ----------------------------------------------------------------------------------

def net16(dtype: torch.dtype) -> tuple[ann2snn.SNN, torch.Tensor]:
    """An SNN at T = 16 (per-channel sites, residual add, concat, max pool) and inputs."""
    model = RandomNet(["residual", "concat", "maxpool"], 2**16 - 1, True, 5, head="flatten").to(dtype).eval()
    return ann2snn.convert(model, T=16), torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(2)).to(dtype)


@pytest.fixture(scope="module")
def artifact16(tmp_path_factory) -> tuple[ann2snn.SNN, torch.Tensor, Path]:
    """net16 in float32, saved."""
    snn, x = net16(torch.float32)
    path = tmp_path_factory.mktemp("t16") / "net.snn"
    snn.save(path)
    return snn, x, path


def test_artifact_at_T_16_loads_in_a_fresh_interpreter(artifact16, tmp_path):
    snn, x, path = artifact16
    inputs, outputs = tmp_path / "x.safetensors", tmp_path / "out.safetensors"
    save_file({"x": x}, str(inputs))
    script = ("import sys, ann2snn\nfrom safetensors.torch import load_file, save_file\n"
              "snn = ann2snn.load_snn(sys.argv[1])\nout = snn.evaluate(load_file(sys.argv[2])['x'])\n"
              "save_file({'logits': out.logits, **{'spikes.' + k: v for k, v in out.spikes.items()}}, sys.argv[3])\n"
              "print(snn.timesteps)")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(inputs), str(outputs)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "16", done.stderr
    want = snn.evaluate(x)
    with safe_open(str(outputs), framework="pt") as f:
        assert torch.equal(f.get_tensor("logits"), want.logits)
        assert all(torch.equal(f.get_tensor("spikes." + k), v) for k, v in want.spikes.items())


def _tampered(path: Path, out: Path, edit) -> Path:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ann2snn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(out), metadata={"ann2snn": json.dumps(meta)})
    return out


def _t17(meta: dict, tensors: dict) -> None:
    meta["timesteps"] = 17
    for module in meta["graph"]["modules"].values():
        if module["type"] == "BitSerialIFNode":
            module["config"]["timesteps"] = 17


def _float16(meta: dict, tensors: dict) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            tensors[name] = tensor.half()


@pytest.mark.parametrize("edit, message", [(_t17, "in 1..16"), (_float16, "not exact in float16")],
                         ids=["T=17", "float16"])
def test_a_tampered_T_16_artifact_is_refused_in_one_line(artifact16, tmp_path, edit, message):
    path = _tampered(artifact16[2], tmp_path / "tampered.snn", edit)
    with pytest.raises(ArtifactError, match=message) as info:
        ann2snn.load_snn(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert_refused(invoke("inspect", path), str(path), message)


# --- energy ------------------------------------------------------------------------------------------

def test_energy_at_T_16_counts_the_simulators_spikes(monkeypatch):
    snn, x = net16(torch.float64)   # float32 simulation and evaluation may fire a rare level apart
    simulated = snn.simulate(x)
    counts = {}
    for mode in ("evaluate", "simulate"):
        counter = OperationCounter(snn, mode)
        counter(x)
        counts[mode] = counter.result()
    assert counts["evaluate"].layers == counts["simulate"].layers and counts["evaluate"].timesteps == 16
    total = sum(layer.spikes for layer in counts["evaluate"].layers)
    assert total == sum(int(v.sum()) for v in simulated.spikes.values()) > 0
    # failing case: level maps of one byte (what energy kept up to T = 8) count other spikes
    monkeypatch.setattr("ann2snn.energy.events.spike_code_arithmetic_dtype", lambda timesteps: torch.uint8)
    counter = OperationCounter(snn, "evaluate")
    counter(x)
    assert sum(layer.spikes for layer in counter.result().layers) != total
