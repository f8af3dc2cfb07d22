"""IDX data sets (MNIST, Fashion-MNIST): tiny files written here, plain and gzipped; no package needed."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.data import idx
from ann2snn.data.sets import load_dataset
from ann2snn.errors import DataError
from ann2snn.runtime.quant import QuantClippedActivation
from hostile import assert_refused, invoke, snapshot

SIZES = {"train": 12, "t10k": 6}


def write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes | np.ndarray) -> Path:
    """An IDX file: the big-endian magic and shape, then the bytes; gzipped when the name ends in .gz."""
    content = np.array([magic, *shape], dtype=">u4").tobytes() + bytes(payload)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as stream:
        stream.write(content)
    return path


def write_idx_set(folder: Path, gz: bool = False, sep: str = "-") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four files of a 28 x 28, 10-class set; returns {prefix: (images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in SIZES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{suffix}", 0x803, images.shape, images.tobytes())
        write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{suffix}", 0x801, labels.shape, labels.tobytes())
        arrays[prefix] = images, labels
    return arrays


@pytest.mark.parametrize("gz, sep", [(False, "-"), (True, "-"), (True, ".")])
def test_an_idx_folder_loads_scaled_like_digits(tmp_path, gz, sep):
    arrays = write_idx_set(tmp_path / "set", gz, sep)
    for split, prefix in (("train", "train"), ("calib", "train"), ("test", "t10k")):
        dataset = load_dataset(tmp_path / "set", split)
        images, labels = arrays[prefix]
        assert dataset.x.dtype == torch.float32 and dataset.y.dtype == torch.int64
        assert tuple(dataset.x.shape) == (len(images), 1, 28, 28) and dataset.num_classes == 10
        assert torch.equal(dataset.x, torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1))
        assert torch.equal(dataset.y, torch.from_numpy(labels.astype(np.int64)))
    assert float(load_dataset("digits", "test").x.max()) <= 1.0  # the same [0, 1] range as digits


def test_named_sets_read_their_debian_folder(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "fashion", gz=True)
    monkeypatch.setitem(idx.IDX_FOLDERS, "fashion-mnist", str(tmp_path / "fashion"))
    monkeypatch.setitem(idx.IDX_FOLDERS, "mnist", str(tmp_path / "absent"))
    assert len(load_dataset("fashion-mnist", "test")) == SIZES["t10k"]
    with pytest.raises(DataError, match="dataset-mnist") as err:
        load_dataset("mnist", "train")
    assert str(tmp_path / "absent") in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def mnist_snn(tmp_path_factory) -> Path:
    """A small SNN that takes [1, 28, 28] inputs and gives 10 logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), QuantClippedActivation(7, clip=1.0), nn.Flatten(),
                          nn.Linear(4 * 13 * 13, 10))
    path = tmp_path_factory.mktemp("snn") / "mnist.snn"
    ann2snn.convert(model).save(path)
    return path


def test_cli_eval_reads_an_idx_folder(tmp_path, mnist_snn):
    write_idx_set(tmp_path / "set", gz=True)
    result = invoke("eval", mnist_snn, "--data", tmp_path / "set", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["images"] == SIZES["t10k"]


def _bad(folder: Path, case: str) -> Path:
    """Spoil the test pair of a good set in one way; returns the file the refusal must name."""
    images_path, labels_path = folder / "t10k-images-idx3-ubyte", folder / "t10k-labels-idx1-ubyte"
    images = np.zeros((SIZES["t10k"], 28, 28), np.uint8)
    labels = np.zeros(SIZES["t10k"], np.uint8)
    if case == "magic":
        return write_idx(images_path, 0x802, images.shape, images.tobytes())
    if case == "truncated":
        return write_idx(images_path, 0x803, images.shape, images.tobytes()[:-5])
    if case == "longer":
        return write_idx(labels_path, 0x801, labels.shape, labels.tobytes() + b"x")
    if case == "counts":
        return write_idx(labels_path, 0x801, (3,), labels[:3].tobytes())
    if case == "label_range":
        labels[4] = 10
        return write_idx(labels_path, 0x801, labels.shape, labels.tobytes())
    if case == "bad_gzip":
        labels_path.unlink()
        gz = labels_path.with_name(labels_path.name + ".gz")
        gz.write_bytes(b"not gzip data")  # named .gz, not gzipped
        return gz
    if case == "missing":
        labels_path.unlink()
        return folder
    raise AssertionError(case)


@pytest.mark.parametrize("case, fragment", [
    ("magic", "magic 0x00000802"), ("truncated", "truncated IDX file"), ("longer", "longer than its header"),
    ("counts", "3 labels but t10k-images-idx3-ubyte has 6 images"), ("label_range", "label 10 at index 4"),
    ("bad_gzip", "cannot read IDX file"), ("missing", "no IDX file t10k-labels-idx1-ubyte"),
])
def test_bad_idx_files_are_refused_in_one_line(tmp_path, mnist_snn, case, fragment):
    write_idx_set(tmp_path / "set")
    named = _bad(tmp_path / "set", case)
    before = snapshot(tmp_path)
    assert_refused(invoke("eval", mnist_snn, "--data", tmp_path / "set"), named, fragment,
                   before=before, folders=(tmp_path,))
