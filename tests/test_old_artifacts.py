"""Artifacts written before the typed contracts (issue 26) still load, run and save the same header.

tests/data holds two .snn files written by the code of main at 46fd4b5 (`ann2snn convert` of the
test_cli digits net: a float file at -T 2 --calib digits, and a QDQ file at T = 3), and the logits
that code computed for a fixed input.
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


@pytest.mark.parametrize("name", ARTIFACTS)
def test_an_old_artifact_gives_the_logits_it_gave_bit_for_bit(name):
    saved = load_file(DATA / "old_artifact_logits.safetensors")
    snn = ann2snn.load_snn(DATA / f"{name}.snn")
    assert torch.equal(snn.evaluate(saved["x"]).logits, saved[name])


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
    assert not torch.equal(snn.evaluate(saved["x"]).logits, saved["digits_t2"])
