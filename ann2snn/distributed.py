"""Running under torchrun: process group from the environment, data shards, reductions.

`torchrun --nproc_per_node N -m ann2snn eval|energy|train ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; without them everything here is the single-process identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str = "cpu") -> Context:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs), once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def local_device(device: str, context: Context) -> str:
    """Each rank on its own GPU: cuda becomes cuda:LOCAL_RANK."""
    if device == "cuda" and context.distributed:
        return f"cuda:{context.local_rank}"
    return device


def shard(dataset: Dataset, context: Context) -> Dataset:
    """Every rank-th sample, no padding: the shards add up to the data set exactly once.

    (DistributedSampler pads with repeated samples, which would change the counts.)
    """
    if not context.distributed:
        return dataset
    return Subset(dataset, range(context.rank, len(dataset), context.world_size))


def all_reduce_sum(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """The sum over ranks, as a CPU tensor (nccl reduces on the GPU, gloo on the CPU)."""
    if not context.distributed:
        return tensor.cpu()
    on_device = tensor.cuda() if dist.get_backend() == "nccl" else tensor.cpu()
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.cpu()


def all_reduce_max(value: float, context: Context) -> float:
    if not context.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
