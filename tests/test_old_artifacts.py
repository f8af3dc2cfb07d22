"""Artifacts written before the typed contracts (issue 26) still load, run and save the same header.

tests/data holds two .snn files written by the code of main at 46fd4b5 (`ann2snn convert` of the
test_cli digits net: a float file at -T 2 --calib digits, and a QDQ file at T = 3), and the logits
that code computed for a fixed input. They are compared to float32 rounding: bit for bit on the
machine that wrote them, but oneDNN picks its convolution kernels by CPU, and on another host the
float SNN's sums round apart by a few roundoffs (7e-7 of the row's largest logit, seen).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ann2snn
from ann2snn.runtime.artifact import read_metadata

DATA = Path(__file__).parent / "data"
ARTIFACTS = ["digits_t2", "digits_qdq_t3"]
# float32 roundings of a float32 output layer's sums in another order, relative to the row's largest |logit|
ROUNDING = 64 * 2.0 ** -24


def same_logits(logits: torch.Tensor, saved: torch.Tensor) -> bool:
    """The same predictions, and every logit within ROUNDING of its row's largest."""
    close = (logits - saved).abs().amax(1) <= ROUNDING * saved.abs().amax(1)
    return torch.equal(logits.argmax(1), saved.argmax(1)) and bool(close.all())


@pytest.mark.parametrize("name", ARTIFACTS)
def test_an_old_artifact_gives_the_logits_it_gave(name):
    saved = load_file(DATA / "old_artifact_logits.safetensors")
    snn = ann2snn.load_snn(DATA / f"{name}.snn")
    stored, loaded = load_file(DATA / f"{name}.snn"), snn.graph_module.state_dict()   # every tensor, bit for bit
    assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored)
    assert same_logits(snn.evaluate(saved["x"]).logits, saved[name])


@pytest.mark.parametrize("name", ARTIFACTS)
def test_an_old_artifact_saves_again_with_the_same_header(name, tmp_path):
    old = DATA / f"{name}.snn"
    ann2snn.load_snn(old).save(tmp_path / "again.snn")
    expected = read_metadata(old)
    # a loaded SNN's source names the version that wrote it, and saving keeps that (as main did)
    expected["source"]["ann2snn_version"] = expected["ann2snn_version"]
    assert read_metadata(tmp_path / "again.snn") == expected


def test_a_changed_old_artifact_gives_other_logits(tmp_path):
    """The logits comparison can fail: the same file with one weight changed does not pass it."""
    saved = load_file(DATA / "old_artifact_logits.safetensors")
    snn = ann2snn.load_snn(DATA / "digits_t2.snn")
    weight = next(p for p in snn.parameters() if p.ndim == 2)   # the output layer
    weight.data[0, 0] += 1.0
    assert not same_logits(snn.evaluate(saved["x"]).logits, saved["digits_t2"])
