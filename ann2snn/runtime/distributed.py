"""Running under torchrun: process group from the environment, data shards, reductions, and the
synchronized batch norm of distributed training.

`torchrun --nproc_per_node N -m ann2snn eval|energy|train ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; without them everything here is the single-process identity.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..ops import NORMS


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
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs), once.

    With nccl, each rank's current CUDA device becomes cuda:LOCAL_RANK, so that "cuda" tensors
    and the collectives of a rank use its own GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        # left to interpreter teardown, the group's threads can be destroyed while still joinable
        # (std::terminate, "terminate called without an active exception"): leave it first
        atexit.register(_leave_process_group)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank)


def _leave_process_group() -> None:
    if dist.is_initialized():
        # leave together: rank 0 holds the store the others still use while they tear down theirs
        # (a rank 1 that outlived it aborted, "terminate called", once in a few hundred runs)
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:   # a rank that failed already: nothing to wait for
            pass
        dist.destroy_process_group()


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


def barrier(context: Context) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if not context.distributed:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


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
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ----------------------------------------------------------------------------------------------
# Synchronized batch norm (any backend)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of each rank's input is the sum over ranks of
    the gradients of the output (what torch.distributed.nn.functional.all_reduce computes; that
    function is deprecated in recent torch, its suggested replacement has no autograd)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def differentiable_all_reduce_sum(tensor: Tensor) -> Tensor:
    return _AllReduceSum.apply(tensor)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training-mode statistics are those of the global batch over all ranks.

    torch.nn.SyncBatchNorm runs only on GPUs; this one works with any backend (gloo on CPUs,
    nccl on GPUs). Each rank sums x and x^2 per channel (in float64) and counts its values; one
    differentiable all-reduce (its backward sums the gradients over ranks, as
    torch.distributed.nn.functional.all_reduce does) gives the global mean and biased variance,
    which normalize x. The running averages are updated exactly as nn.BatchNorm*d does, with the
    unbiased global variance, so they stay equal on every rank. In eval mode (running
    statistics), or outside a process group, it is plain batch norm. A rank may hold an empty
    batch: it contributes zeros to the sums.

    `sync_batch_norm` turns the BatchNorm layers of a model into this class in place (same
    parameters, buffers and state-dict keys); `unsync_batch_norm` turns them back.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if not bn_training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() // channels, dtype=torch.float64)
        local = torch.cat([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64), count])
        total = differentiable_all_reduce_sum(local)
        n = total[-1]  # stays on the device: no host synchronization per layer
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0)

        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

        shape = [1, channels] + [1] * (x.dim() - 2)
        inv_std = torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        y = (x - mean.to(x.dtype).view(shape)) * inv_std
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batch_norm(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """Make every nn.BatchNorm1d/2d/3d of `model` a SyncBatchNorm, in place: the module objects,
    their parameters, buffers and state-dict keys stay the same, only their forward changes.
    Returns what `unsync_batch_norm` needs to undo it."""
    swapped = []
    for module in model.modules():
        if type(module) in NORMS:
            swapped.append((module, type(module)))
            module.__class__ = SyncBatchNorm
    return swapped


def unsync_batch_norm(swapped: list[tuple[nn.Module, type]]) -> None:
    """Turn the modules `sync_batch_norm` changed back into their own BatchNorm classes."""
    for module, cls in swapped:
        module.__class__ = cls
