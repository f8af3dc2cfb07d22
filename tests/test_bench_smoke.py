"""Smoke tests of the benchmarks in bench/: run them small, check the JSON they write."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    plot = tmp_path / f"{Path(script).stem}.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out),
                           "--plot", str(plot)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert plot.is_file() and plot.stat().st_size > 0
    return json.loads(out.read_text())


def assert_percent(value: float) -> None:
    assert 0.0 <= value <= 100.0, value


@pytest.mark.slow
def test_sparsity_quick(tmp_path: Path) -> None:
    result = run_bench("sparsity.py", tmp_path)
    for key in ("benchmark", "accuracy_unit", "recipe", "timesteps", "betas", "float_ann_accuracy", "rows",
                "recommended", "targets", "seconds"):
        assert key in result, key
    assert result["benchmark"] == "sparsity" and result["accuracy_unit"] == "%"
    assert_percent(result["float_ann_accuracy"])
    rows = result["rows"]
    assert rows and 0.0 in result["betas"]
    for steps in result["timesteps"]:
        mine = [r for r in rows if r["T"] == steps]
        assert {r["beta"] for r in mine} == set(result["betas"])
        base = next(r for r in mine if r["beta"] == 0)
        assert base["spikes_per_image"] > 0
        assert base["spike_reduction_pct"] == 0
        assert sum(r["recommended"] for r in mine) == 1
    for r in rows:
        assert_percent(r["snn_accuracy"])
        assert_percent(r["ann_accuracy"])
        assert r["spikes_per_image"] >= 0
        # The conversion is exact: the SNN predicts what the quantized ANN predicts (float32 ties aside).
        assert r["same_prediction"] >= 0.99 * r["images"]
    assert {rec["T"] for rec in result["recommended"]} == set(result["timesteps"])
    for rec in result["recommended"]:
        assert rec["accuracy_drop"] <= 0.5 + 1e-9
        assert isinstance(result["targets"]["sparsity"][str(rec["T"])]["met"], bool)


@pytest.mark.slow
def test_peers_quick(tmp_path: Path) -> None:
    result = run_bench("peers.py", tmp_path)
    for key in ("benchmark", "accuracy_unit", "recipe", "float_ann_accuracy", "float_activations", "spikingjelly",
                "rows", "seconds"):
        assert key in result, key
    assert result["benchmark"] == "peers" and result["accuracy_unit"] == "%"
    assert_percent(result["float_ann_accuracy"])
    assert result["spikingjelly"]["version"].startswith("2.")
    rows = result["rows"]
    for r in rows:
        assert_percent(r["accuracy"])
        assert r["spikes_per_image"] >= 0
    sj = [r for r in rows if r["converter"] == "spikingjelly"]
    assert {r["mode"] for r in sj} == {"max", "99.9%", "99.9% ch + half-thr"}
    for mode in {r["mode"] for r in sj}:
        longest = max((r for r in sj if r["mode"] == mode), key=lambda r: r["T"])
        assert longest["spikes_per_image"] > 0
    ours = [r for r in rows if r["converter"] == "ann2snn"]
    assert ours and all(r["spikes_per_image"] > 0 for r in ours)
    assert all(r["same_prediction"] >= 0.99 * r["images"] for r in ours)



@pytest.mark.slow
def test_your_model_quick(tmp_path: Path) -> None:
    result = run_bench("your_model.py", tmp_path)
    for key in ("benchmark", "accuracy_unit", "settings", "float_ann_accuracy", "spikingjelly", "rows",
                "recommended", "targets", "seconds"):
        assert key in result, key
    assert result["benchmark"] == "your_model" and result["accuracy_unit"] == "%"
    assert_percent(result["float_ann_accuracy"])
    rows = result["rows"]
    methods = {r["method"] for r in rows}
    assert "ann2snn calibration only" in methods and "ann2snn QAT beta=0" in methods
    assert any(r["converter"] == "spikingjelly" for r in rows)
    for r in rows:
        assert_percent(r["accuracy"])
        assert r["spikes_per_image"] >= 0
    ours = [r for r in rows if r["converter"] == "ann2snn"]
    # every conversion verified by `ann2snn convert`; the SNN predicts what its quantized ANN predicts
    assert all(r["verified"] and r["spikes_per_image"] > 0 for r in ours)
    assert all(r["same_prediction"] >= 0.99 * r["images"] for r in ours)
    assert set(result["recommended"]) == {str(r["T"]) for r in ours if r["beta"] == 0}

def test_profile_eval_reports_operator_shares() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_eval.py"), "--model", "digits-cnn",
                           "--batch-size", "8", "-T", "2", "--steps", "1", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    shares = [r["share"] for r in result["ops"]]
    assert result["device"] == "cpu" and shares == sorted(shares, reverse=True)
    assert 0 < sum(shares) <= 1 + 1e-9
    assert any("conv" in r["op"] for r in result["ops"])
    # the C neuron shows up in the profile under its own name (its ctypes call is no aten op)
    assert any(r["op"] == "ann2snn::fire_fused_native" for r in result["ops"])


def test_eval_throughput_times_every_run() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_throughput.py"), "--model", "digits-cnn",
                           "--device", "cpu", "--batch-size", "8", "-T", "2", "--seconds", "0.2", "--rounds", "1",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    rates = result["images_per_second"]
    assert set(rates) == {"float ANN", "ann2snn evaluate", "evaluate, PyTorch neuron", "ann2snn simulate",
                          "SpikingJelly multi-step"}
    assert all(rate > 0 for rate in rates.values())
    assert result["ratios"]["evaluate / float ANN"] == rates["ann2snn evaluate"] / rates["float ANN"]


def test_eval_throughput_times_the_integer_snn_against_its_peers() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_throughput.py"), "--model", "digits-cnn",
                           "--batch-size", "8", "-T", "2", "--seconds", "0.2", "--rounds", "1", "--weight-bits", "8",
                           "--threads", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    rates = result["images_per_second"]
    assert {"float ANN NCHW", "float ANN channels_last", "float ANN bf16 channels_last", "integer SNN evaluate",
            "float SNN evaluate",
            "onnxruntime fp32", "onnxruntime int8 QDQ", "integer SNN, quantize_static (T = 8)",
            "onnxruntime int8, quantize_static", "integer SNN simulate"} == set(rates)
    assert all(rate > 0 for rate in rates.values())
    best = max(rates["float ANN NCHW"], rates["float ANN channels_last"])
    assert result["ratios"]["integer SNN / float ANN"] == rates["integer SNN evaluate"] / best


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_bench_explains_its_options(script: str) -> None:
    """`--help` prints the usage (a % in a help text once made argparse raise instead)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
