"""The training batches of an epoch, alike in one process and under torchrun."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ..data.sets import make_loader
from ..errors import Ann2SnnError
from ..runtime.distributed import Context
from ..data.image_folder import ImageFolderDataset
from .config import TrainConfig


# Distributed training: rank r's random streams (augmentation, dropout) are seeded with
# seed + r * this (+ the epoch where they restart every epoch).
RANK_SEED_STRIDE = 1_000_003


def epoch_loader(dataset: Dataset, config: TrainConfig, epoch: int, context: Context = Context()) -> DataLoader:
    """The training batches of `epoch`: shuffled by a generator seeded with seed + epoch, so a
    resumed run sees the same order.

    Distributed: the same global batches as one process (the order of the same loader), of which
    this rank takes positions rank, rank + world_size, ...; every rank has one (possibly empty)
    batch per global batch. Its workers' seeds differ per rank (rank 0: those of one process).
    """
    pin_memory = config.device.startswith("cuda")
    workers_seed = config.seed + epoch + RANK_SEED_STRIDE * context.rank
    _reseed_augmentation(dataset, workers_seed)
    if not context.distributed:
        return make_loader(dataset, config.batch_size, shuffle=True, workers=config.workers,
                           seed=config.seed + epoch, pin_memory=pin_memory)
    order = make_loader(range(len(dataset)), config.batch_size, shuffle=True, seed=config.seed + epoch)
    batches = [b.tolist()[context.rank::context.world_size] for b in order]
    return DataLoader(dataset, batch_sampler=batches, num_workers=config.workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(workers_seed), collate_fn=_CollateOrEmpty(dataset))


def _reseed_augmentation(dataset: Dataset, seed: int) -> None:
    """Restart a data set's own augmentation stream (used without workers) from `seed`, so that a
    resumed run draws what an uninterrupted one draws in the same epoch."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ImageFolderDataset):
        dataset.reseed(seed)


def held_out_split(samples: int, config: TrainConfig) -> tuple[list[int], list[int]]:
    """(trained, validation) indices into a training split of `samples`: of its first train_limit
    samples, a share `validation_fraction` drawn with the run's seed is held out for validation and
    never trained on (nor calibrated on); the rest trains, in the split's order."""
    used = min(samples, config.train_limit) if config.train_limit is not None else samples
    held = round(config.validation_fraction * used)
    if config.validation_fraction > 0 and not 0 < held < used:
        raise Ann2SnnError(f"validation {config.validation_fraction:g} of {used} training samples holds out "
                           f"{held}: it must hold out at least one and leave at least one to train on")
    drawn = torch.randperm(used, generator=torch.Generator().manual_seed(config.seed))[:held]
    validation = sorted(drawn.tolist())
    excluded = set(validation)
    return [i for i in range(used) if i not in excluded], validation


def global_batch_sizes(samples: int, batch_size: int) -> list[int]:
    return [min(batch_size, samples - start) for start in range(0, samples, batch_size)]


class _CollateOrEmpty:
    """default_collate, and for an empty part of a global batch a batch of zero samples (shaped
    like the data set's first sample) so that the rank still takes part in the step."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __call__(self, batch: list) -> Any:
        if batch:
            return default_collate(batch)
        return [t[:0] for t in default_collate([self.dataset[0]])]
