"""The inputs a command runs a model on, read in batches and never all at once: samples of a data
set drawn at random across its classes, or uniform noise. Peak memory is one batch, whatever the
number of samples."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

# Uniform noise is drawn in chunks of at most this many values, each from the one seeded
# generator in turn: the same noise for every batch size.
NOISE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Samples:
    """`count` inputs of `shape` (a sample's), from `dataset` (its images; labels dropped), or
    uniform noise in [0, 1) seeded by `seed` when `dataset` is None; `description` says which."""

    shape: tuple[int, ...]
    count: int
    description: str
    dataset: Dataset | None = None
    seed: int = 0

    def __len__(self) -> int:
        return self.count

    def head(self, count: int, description: str | None = None) -> "Samples":
        """The first `count` of these samples."""
        from torch.utils.data import Subset

        count = min(count, self.count)
        dataset = self.dataset if self.dataset is None or count == self.count else Subset(self.dataset, range(count))
        return Samples(self.shape, count, description or self.description, dataset, self.seed)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """The samples in order, `batch_size` at a time (the last batch may be smaller)."""
        if self.dataset is None:
            yield from _rebatched(self._noise(), batch_size)
            return
        from .sets import make_loader

        for x, *_ in make_loader(self.dataset, batch_size):
            yield x

    def _noise(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        chunk = max(1, NOISE_CHUNK_ELEMENTS // max(1, math.prod(self.shape)))
        for start in range(0, self.count, chunk):
            yield torch.rand((min(chunk, self.count - start), *self.shape), generator=generator)


def _rebatched(chunks: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    """The rows of `chunks`, in order, as batches of `batch_size` rows."""
    pending: list[Tensor] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        while held >= batch_size:
            joined = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, held = ([rest] if len(rest) else []), len(rest)
    if held:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


def data_samples(data: str, split: str, samples: int, seed: int = 0,
                 takes: Callable[[tuple[int, ...]], bool] | None = None) -> Samples:
    """`samples` images of DATA's `split`, drawn at random with `seed` across its classes; (C, L)
    signals rather than one-channel images where the model `takes` those (data.fit_sample_rank)."""
    from .sets import fit_sample_rank, load_dataset

    dataset = load_dataset(data, split=split, seed=seed)
    if takes is not None:
        fit_sample_rank(dataset, takes)
    return _drawn(dataset, samples, seed, data)


def _drawn(dataset: Dataset, samples: int, seed: int, name: str) -> Samples:
    """`samples` items of `dataset` drawn at random with `seed` across its classes, as Samples."""
    from .sets import dataset_input_shape, draw

    drawn = draw(dataset, samples, seed)
    count = len(drawn)  # type: ignore[arg-type]
    return Samples(dataset_input_shape(drawn), count, f"{count} inputs of {name}", drawn)


def noise_samples(shape: Sequence[int], samples: int, seed: int = 0) -> Samples:
    """`samples` uniform random inputs in [0, 1) of a sample's `shape`."""
    return Samples(tuple(shape), samples, f"{samples} inputs of uniform noise", seed=seed)


def tensor_samples(x: Tensor, description: str) -> Samples:
    """The samples of a tensor (N, ...) held in memory already."""
    from torch.utils.data import TensorDataset

    return Samples(tuple(x.shape[1:]), len(x), f"{len(x)} {description}", TensorDataset(x))


def model_samples(data: str, split: str, samples: int, expected: Sequence[int | str | None]) -> Samples:
    """`data_samples`, refused unless a sample has the shape `expected` (the model's input without
    the batch; a name or None is a free dimension)."""
    from .sets import check_input_shape, sample_fits

    drawn = data_samples(data, split, samples, takes=lambda shape: sample_fits(shape, expected))
    check_input_shape(data, drawn.shape, expected)
    return drawn


class _InputsOnly(Dataset):
    """A Dataset of bare inputs x, as one of (x,): what Samples.batches unpacks."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor]:
        return (self.dataset[index],)


def dataset_samples(dataset: Dataset, samples: int, expected: Sequence[int | str | None], name: str,
                    seed: int = 0) -> Samples:
    """`samples` items of a torch Dataset of (x, y) or of x, drawn at random with `seed` as a
    data set's are (`data_samples`), refused unless a sample has the shape `expected`."""
    from .sets import check_input_shape

    if len(dataset) and isinstance(dataset[0], Tensor):  # type: ignore[arg-type]
        dataset = _InputsOnly(dataset)
    drawn = _drawn(dataset, samples, seed, name)
    check_input_shape(name, drawn.shape, expected)
    return drawn


# What calibration and verification inputs may be given as: a data set (a path or zoo name), a
# torch Dataset, a tensor of samples, or Samples.
SampleSource = Union[str, os.PathLike, Dataset, Tensor, Samples]


def as_samples(data: SampleSource, split: str, samples: int, expected: Sequence[int | str | None],
               what: str) -> Samples:
    """At most `samples` of `data`'s inputs (a data set's `split`; `what` they are, for a tensor's
    or a Dataset's description): a tensor's first, the others drawn at random across classes."""
    if isinstance(data, Samples):
        return data.head(samples)
    if isinstance(data, Tensor):
        return tensor_samples(data[:samples], f"{what} inputs")
    if isinstance(data, Dataset):
        return dataset_samples(data, samples, expected, f"the {what} Dataset")
    return model_samples(os.fspath(data), split, samples, expected)
