"""IDX files (MNIST, Fashion-MNIST): finding them in a folder and reading them, plain or gzipped.

``"fashion-mnist"`` / ``"mnist"`` name the IDX files of /usr/share/datasets/fashion-mnist (Debian's
dataset-fashion-mnist) or /usr/share/datasets/mnist; any folder holding IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each possibly gzipped as ``.gz``) is read the same way. Images [1, H, W]
float32 in [0, 1] (bytes / 255), 10 classes; "train" and "calib" read the train files, "test" the
t10k files. Every failure raises `DataError` with one line naming the path and the problem.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

IDX_FOLDERS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_CLASSES = 10  # MNIST, Fashion-MNIST and KMNIST: ten classes, labels 0..9
# split -> file prefix; each file is "<prefix>-<kind>-idx<dims>-ubyte", optionally ".gz"
_IDX_PREFIXES = {"train": "train", "calib": "train", "test": "t10k"}
_IDX_KINDS = {"images": 3, "labels": 1}  # kind -> dimensions
_IDX_UBYTE = 0x08
_READ_CHUNK = 1 << 20


def _idx_candidates(folder: Path, prefix: str, kind: str) -> list[Path]:
    """The names an IDX file goes by: "-idx3-ubyte" (LeCun's) or ".idx3-ubyte", plain or gzipped."""
    dims = _IDX_KINDS[kind]
    return [folder / f"{prefix}-{kind}{sep}idx{dims}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]


def is_idx_folder(folder: Path) -> bool:
    """A folder holding at least one IDX file of the MNIST names (an image folder holds none)."""
    return any(p.is_file() for prefix in ("train", "t10k") for kind in _IDX_KINDS
               for p in _idx_candidates(folder, prefix, kind))


def _idx_file(folder: Path, prefix: str, kind: str) -> Path:
    found = [p for p in _idx_candidates(folder, prefix, kind) if p.is_file()]
    if not found:
        raise DataError(f"{folder}: no IDX file {prefix}-{kind}-idx{_IDX_KINDS[kind]}-ubyte (or .gz) in the folder")
    return found[0]


def _read_count(stream: Any, path: Path, count: int, what: str) -> bytes:
    """Exactly `count` bytes, in chunks: a hostile header must not make one huge allocation."""
    chunks, left = [], count
    while left > 0:
        chunk = stream.read(min(left, _READ_CHUNK))
        if not chunk:
            raise DataError(f"{path}: truncated IDX file: {what} needs {count} bytes, found {count - left}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped when its name ends in .gz) with `dims` dimensions:
    magic 0x0000 08 <dims>, then each dimension as a big-endian uint32, then the bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            magic = _read_count(stream, path, 4, "the magic number")
            if magic[:3] != bytes((0, 0, _IDX_UBYTE)) or magic[3] != dims:
                raise DataError(f"{path}: not an IDX file of {dims}-d unsigned bytes (magic 0x{magic.hex()}, "
                                f"expected 0x00000{_IDX_UBYTE:x}0{dims})")
            shape = tuple(int(d) for d in np.frombuffer(_read_count(stream, path, 4 * dims, "the header"), ">u4"))
            data = _read_count(stream, path, math.prod(shape), f"shape {shape}")
            if stream.read(1):
                raise DataError(f"{path}: IDX file longer than its header's shape {shape} says")
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX file ({type(err).__name__}: {err})") from None
    if shape[0] == 0:
        raise DataError(f"{path}: IDX file holds no samples")
    return np.frombuffer(data, np.uint8).reshape(shape)


def read_idx_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """The `split` of the IDX files in `folder`: images float32 [N, 1, H, W] in [0, 1], labels int64 [N]."""
    prefix = _IDX_PREFIXES[split]
    images_path, labels_path = _idx_file(folder, prefix, "images"), _idx_file(folder, prefix, "labels")
    images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels but {images_path.name} has {len(images)} images")
    if labels.max() >= IDX_CLASSES:
        index = int(np.argmax(labels >= IDX_CLASSES))
        raise DataError(f"{labels_path}: label {labels[index]} at index {index} is out of range 0..{IDX_CLASSES - 1}")
    # scaled to [0, 1] as the digits set is (its 0..16 over 16)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def idx_folder(name: str) -> Path:
    """The folder of a named IDX data set ("fashion-mnist", "mnist")."""
    folder = Path(IDX_FOLDERS[name])
    if not folder.is_dir():
        raise DataError(f"{name}: {folder} not found (install the Debian package dataset-{name}, or pass "
                        "the folder that holds its IDX files)")
    return folder


__all__ = ["IDX_FOLDERS", "IDX_CLASSES", "is_idx_folder", "idx_folder", "read_idx_split"]
