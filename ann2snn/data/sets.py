"""Data sets for calibration, training and evaluation: digits, .npz arrays, IDX files, image folders.

`load_dataset(spec, split)` understands three kinds of `spec`:

- ``"digits"``: scikit-learn's bundled 8x8 digits, [1, 8, 8] float32 in [0, 1], a fixed stratified
  75/25 train/test split (random_state 0, 1347 / 450 images); "calib" is the train split.
- a ``.npz`` file with ``x`` and ``y`` (N,), used for every split, or with
  ``x_train, y_train, x_test, y_test`` (train and calib use the first pair, test the second).
  ``x`` is (N, C, H, W), (N, features) or three-dimensional: (N, H, W) one-channel images, or
  (N, C, L) signals for a model that takes those (fit_sample_rank). Arrays that np.savez stored
  uncompressed are memory-mapped, samples read when used (ann2snn/data/npz.py).
- a directory: an ImageNet-style image folder, one sub-folder per class (sorted names give the
  class indices). With ``train/`` and ``val/`` (or ``test/``) sub-folders, "train" and "calib" read
  ``train/`` and "test" reads ``val/`` (else ``test/``); otherwise the folder itself is every split.
  The evaluation transform is ImageNet's (resize the shorter side to 256, center crop 224,
  normalize); "train" uses a random resized crop and a random horizontal flip instead
  (ann2snn/data/image_folder.py).

- ``"fashion-mnist"`` / ``"mnist"``: the IDX files of /usr/share/datasets/fashion-mnist (Debian's
  dataset-fashion-mnist) or /usr/share/datasets/mnist; and any folder holding IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each possibly gzipped as ``.gz``). Images [1, H, W] float32 in
  [0, 1] (bytes / 255, as digits are scaled to [0, 1]), 10 classes; "train" and "calib" read the
  train files, "test" the t10k files (ann2snn/data/idx.py).

Every failure raises `DataError` with one line naming the path and the problem.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .idx import IDX_CLASSES, IDX_FOLDERS, idx_folder, is_idx_folder, read_idx_split
from .image_folder import load_image_folder
from .npz import read_npz

SPLITS = ("train", "test", "calib")
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
# Labels are class indices and a model gets one logit per class: a label of 10**9 in a hostile file
# would make training build a 10**9-way classifier. More than ImageNet-21k's 21,841 classes.
MAX_CLASSES = 100_000


# ----------------------------------------------------------------------------------------------
# Array data sets (digits, .npz, IDX)


class ArrayDataset(Dataset):
    """(x, y) pairs: y int64 [N]; x [N, ...] a tensor, or an array of an .npz file (memory-mapped,
    npz.py) whose samples are read, as float32, when they are used."""

    def __init__(self, x: Tensor | np.ndarray, y: Tensor, num_classes: int, name: str = "", source: str | None = None,
                 channel_axis_added: bool = False) -> None:
        self.samples = x
        self.y = y
        self.num_classes = int(num_classes)
        self.name = name
        self.source = source if source is not None else name  # what error messages name: the file
        self.channel_axis_added = channel_axis_added  # (N, H, W) read as (N, 1, H, W): fit_sample_rank

    @property
    def x(self) -> Tensor:
        """All samples as one tensor (of an .npz file: float32, in memory unless stored as float32)."""
        if isinstance(self.samples, Tensor):
            return self.samples
        return torch.from_numpy(np.asarray(self.samples, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        sample = self.samples[index]
        if isinstance(sample, np.ndarray):
            sample = torch.from_numpy(np.array(sample, dtype=np.float32))  # a copy: read from the file now
        return sample, self.y[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    def __repr__(self) -> str:
        return f"ArrayDataset({self.name!r}, {len(self)} samples, input {self.input_shape}, {self.num_classes} classes)"


def _load_digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y)
    xs, ys = (x_test, y_test) if split == "test" else (x_train, y_train)
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(xs)).unsqueeze(1),
                        torch.from_numpy(np.ascontiguousarray(ys)), 10, name=f"digits:{split}", source="digits")


def _array_pair(path: Path, x: np.ndarray, y: np.ndarray, xname: str,
                yname: str) -> tuple[np.ndarray, Tensor, bool]:
    x, added = _samples(path, x, xname)
    y = _labels(path, np.asarray(y), yname)
    if len(y) != len(x):
        raise DataError(f"{path}: {xname!r} has {len(x)} samples but {yname!r} has {len(y)}")
    return x, y, added


# Values converted at a time where samples are checked to be finite: memory stays this small.
_CHECK_CHUNK = 2**20


def _samples(path: Path, x: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """x as samples (N, features), (N, C, L) or (N, C, H, W), left where it is (a memory map stays
    one): (N, H, W) is read as one-channel images (N, 1, H, W), and whether it was so; every value
    finite in float32, checked chunk by chunk: a NaN or Inf image would give NaN logits, which
    argmax turns into a silently wrong accuracy."""
    # complex is a numpy number, but casting it to float32 drops the imaginary part
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: array {name!r} must hold real numbers, found dtype {x.dtype}")
    if not 2 <= x.ndim <= 4:
        raise DataError(f"{path}: array {name!r} must have shape (N, C, H, W), (N, H, W), (N, C, L) or "
                        f"(N, features), found {tuple(x.shape)}")
    added = x.ndim == 3
    x = x[:, None] if added else x
    if x.size == 0:
        raise DataError(f"{path}: array {name!r} is empty (shape {tuple(x.shape)})")
    if np.issubdtype(x.dtype, np.floating):  # integers and booleans are finite in float32
        step = max(1, _CHECK_CHUNK // math.prod(x.shape[1:]))
        for start in range(0, len(x), step):
            chunk = np.asarray(x[start:start + step], dtype=np.float32)  # float64 beyond float32 becomes inf
            bad = np.argwhere(~np.isfinite(chunk))
            if len(bad):
                raise DataError(f"{path}: array {name!r} must be finite in float32, found {chunk[tuple(bad[0])]} "
                                f"at index {(start + int(bad[0][0]), *map(int, bad[0][1:]))}")
    return x, added


def _labels(path: Path, y: np.ndarray, name: str) -> Tensor:
    """y as int64 (N,) class indices in 0..MAX_CLASSES - 1."""
    if y.ndim != 1:
        raise DataError(f"{path}: array {name!r} must have shape (N,), found {tuple(y.shape)}")
    if len(y) == 0:
        raise DataError(f"{path}: array {name!r} is empty")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{path}: labels {name!r} must be integers, found non-integral {y.dtype} values")
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{path}: labels {name!r} must be integers, found dtype {y.dtype}")
    # compared before the cast: 2**63 as uint64 or 1e30 as float would wrap or saturate in int64
    if y.min() < 0:
        raise DataError(f"{path}: labels {name!r} must be class indices >= 0, found {y.min()}")
    if y.max() >= MAX_CLASSES:
        raise DataError(f"{path}: labels {name!r} must be class indices below {MAX_CLASSES}, found {y.max()}")
    return torch.from_numpy(y.astype(np.int64))


def _load_npz(path: Path, split: str) -> ArrayDataset:
    arrays = read_npz(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        pairs = {name: _array_pair(path, arrays[f"x_{name}"], arrays[f"y_{name}"], f"x_{name}", f"y_{name}")
                 for name in ("train", "test")}
        if pairs["train"][0].shape[1:] != pairs["test"][0].shape[1:]:
            raise DataError(f"{path}: x_train samples have shape {tuple(pairs['train'][0].shape[1:])} "
                            f"but x_test samples {tuple(pairs['test'][0].shape[1:])}")
        classes = 1 + max(int(pairs["train"][1].max()), int(pairs["test"][1].max()))
        x, y, added = pairs["test"] if split == "test" else pairs["train"]
    elif {"x", "y"} <= set(arrays):
        x, y, added = _array_pair(path, arrays["x"], arrays["y"], "x", "y")
        classes = 1 + int(y.max())
    else:
        raise DataError(f"{path}: .npz needs arrays 'x' and 'y' (or x_train, y_train, x_test, y_test); "
                        f"found {', '.join(sorted(arrays)) or 'none'}")
    return ArrayDataset(x, y, classes, name=f"{path}:{split}", source=str(path), channel_axis_added=added)


def _load_idx(folder: Path, split: str) -> ArrayDataset:
    x, y = read_idx_split(folder, split)
    return ArrayDataset(x, y, IDX_CLASSES, name=f"{folder}:{split}", source=str(folder))


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_dataset(
    spec: str | os.PathLike,
    split: str = "test",
    seed: int = 0,
    image_size: int = 224,
    resize_size: int = 256,
) -> Dataset:
    """The `split` ("train", "test" or "calib") of data set `spec`: "digits", "fashion-mnist", "mnist",
    an .npz file, a folder of IDX files or an image folder (see the module docstring). `seed` seeds the random training augmentation of
    image folders; the digits split is fixed (random_state 0) so test accuracies stay comparable."""
    if split not in SPLITS:
        raise DataError(f"{spec}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    text = os.fspath(spec)
    if text == "digits":
        return _load_digits(split)
    if text in IDX_FOLDERS:
        return _load_idx(idx_folder(text), split)
    path = Path(text).expanduser()
    if path.is_dir():
        if is_idx_folder(path):
            return _load_idx(path, split)
        return load_image_folder(path, split, seed, image_size, resize_size)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (expected 'digits', 'fashion-mnist', 'mnist', an .npz file, a folder of IDX files or an image folder)")
    if not path.is_file():  # a FIFO would block the reader forever, a device never end
        raise DataError(f"{path}: not a regular file or folder (expected 'digits', 'fashion-mnist', 'mnist', an .npz file, a folder of IDX files or an image folder)")
    if path.suffix.lower() == ".npz":
        return _load_npz(path, split)
    raise DataError(f"{path}: unsupported data set (expected 'digits', 'fashion-mnist', 'mnist', an .npz file, a folder of IDX files or an image folder)")


def _unwrap(dataset: Dataset) -> Dataset:
    """The data set behind torch Subset / ConcatDataset-like wrappers."""
    seen = 0
    while hasattr(dataset, "dataset") and seen < 16:
        dataset = dataset.dataset  # type: ignore[attr-defined]
        seen += 1
    return dataset


def dataset_input_shape(dataset: Dataset) -> tuple[int, ...]:
    """The shape of one input sample, e.g. (1, 8, 8) or (3, 224, 224)."""
    inner = _unwrap(dataset)
    shape = getattr(inner, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("empty data set: no input shape")
    return tuple(dataset[0][0].shape)


def dataset_source(dataset: Dataset) -> str:
    """What error messages about `dataset` name: its file or folder ("digits" for digits)."""
    inner = _unwrap(dataset)
    source = getattr(inner, "source", None) or getattr(inner, "root", None)
    return str(source) if source is not None else type(inner).__name__


def sample_fits(found: Sequence[int], expected: Sequence[int | str | None]) -> bool:
    """A sample of shape `found` fits a model input whose shape without the batch is `expected`
    (a name, None or a size <= 0: a free dimension)."""
    return len(found) == len(expected) and all(
        not isinstance(e, int) or e <= 0 or e == int(f) for f, e in zip(found, expected))


def check_input_shape(data: str | os.PathLike, found: Sequence[int], expected: Sequence[int | str | None]) -> None:
    """Refuse samples of shape `found` (C, H, W) from `data` for a model whose input, without the
    batch dimension, is `expected` (a name or None: a free dimension), before anything runs on them.

    For `ann2snn convert --calib` (cli.py), after loading the calibration inputs:
    `check_input_shape(calib, tuple(calib_x.shape[1:]), inspect_onnx(model)["input"]["shape"][1:])`.
    """
    if not sample_fits(found, expected):
        shown = "(" + ", ".join(str(e) if isinstance(e, int) and e > 0 else "any" for e in expected) + ")"
        raise DataError(f"{data}: the model takes samples of shape {shown}, found samples of shape "
                        f"{tuple(int(d) for d in found)}")


def sample_shapes(dataset: Dataset) -> list[tuple[int, ...]]:
    """The shapes the samples of `dataset` may be read as: theirs, and for an (N, H, W) array read
    as one-channel images (1, H, W), also the (C, L) signals it stores."""
    shape = dataset_input_shape(dataset)
    return [shape, shape[1:]] if getattr(_unwrap(dataset), "channel_axis_added", False) else [shape]


def fit_sample_rank(dataset: Dataset, takes: Callable[[tuple[int, ...]], bool]) -> None:
    """An (N, H, W) array read as one-channel images goes back to the (C, L) signals it stores when
    the model `takes` those and not the images: in place, on the data set behind `dataset` (a
    Subset's too), before a loader reads it."""
    shapes = sample_shapes(dataset)
    if len(shapes) == 2 and not takes(shapes[0]) and takes(shapes[1]):
        inner = _unwrap(dataset)
        inner.samples, inner.channel_axis_added = inner.samples[:, 0], False


def largest_label(dataset: Dataset) -> int | None:
    """The largest label of the data set behind `dataset` (all of it, also under a Subset, so
    that every process of a sharded run refuses the same data); None when it has no labels."""
    inner = _unwrap(dataset)
    labels = getattr(inner, "y", None)
    if labels is None:
        labels = getattr(inner, "targets", None)
    if labels is None or len(labels) == 0:
        return None
    return int(max(labels)) if isinstance(labels, list) else int(labels.max())


def num_classes(dataset: Dataset) -> int:
    """The number of classes: the data set's own count, else 1 + the largest label."""
    inner = _unwrap(dataset)
    count = getattr(inner, "num_classes", None)
    if count is not None:
        return int(count)
    labels = getattr(inner, "targets", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    if len(labels) == 0:
        raise DataError("empty data set: no classes")
    return 1 + int(max(int(v) for v in labels))


def draw(dataset: Dataset, samples: int | None, seed: int = 0) -> Dataset:
    """`samples` items of `dataset` drawn at random with `seed` (all of it when None or more): an
    image folder lists its images class by class, so its first N are one class, not a sample."""
    from torch.utils.data import Subset

    if samples is None or samples >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:samples].tolist()))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with a generator seeded by `seed`: a reproducible shuffle order and
    reproducible worker seeds (so random augmentations repeat for the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


__all__ = [
    "ArrayDataset", "load_dataset", "dataset_input_shape", "dataset_source", "check_input_shape", "sample_fits",
    "sample_shapes", "fit_sample_rank", "largest_label", "num_classes", "make_loader", "MAX_CLASSES", "SPLITS",
]
