"""Data-set evaluation of a converted SNN: accuracy, spikes per image, throughput."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from .distributed import Context, all_reduce_max, all_reduce_sum
from .snn import SNN


@dataclass
class EvalResult:
    top1: float
    top5: float
    images: int
    spikes_per_image: float
    layer_spikes_per_image: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    mode: str = "evaluate"
    device: str = "cpu"

    def to_json(self) -> dict:
        return asdict(self)


def prepare_for_device(snn: SNN, device: torch.device) -> SNN:
    """Move the SNN; on CUDA use channels_last, which convolutions there run faster in; on the CPU
    load (or build) the C neuron now, so that its first use is not in a timed loop."""
    snn = snn.to(device)
    if device.type == "cuda":
        snn = snn.to(memory_format=torch.channels_last)
    else:
        from kernels.native import native_neuron_available  # not at import: kernels import ann2snn

        native_neuron_available()
    return snn


def device_batches(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                   dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) on `device`, images in `dtype` (channels_last on CUDA).

    On CUDA the copy of batch i + 1 is issued on a side stream before batch i is handed out, so
    with pinned host memory it overlaps batch i's compute; the compute stream waits for the copy
    before it reads the batch, and no call here waits on the host.
    """
    def load(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(device, dtype=dtype, non_blocking=True)
        if device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)

    if device.type != "cuda":
        yield from (load(x, y) for x, y in batches)
        return
    copy_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)
    pending = None
    for x, y in batches:
        with torch.cuda.stream(copy_stream):
            loaded = load(x, y)
        if pending is not None:
            yield pending
        compute_stream.wait_stream(copy_stream)
        for t in loaded:  # the caching allocator must not reuse their memory before the compute is done
            t.record_stream(compute_stream)
        pending = loaded
    if pending is not None:
        yield pending


@torch.no_grad()
def evaluate_snn(snn: SNN, batches: Iterable[tuple[Tensor, Tensor]], *, mode: str = "evaluate",
                 device: str | torch.device = "cpu", progress: bool = True, total: int | None = None,
                 context: Context = Context()) -> EvalResult:
    """Top-1 / top-5 accuracy and spikes per image over `batches` of (images, labels).

    Counts stay on the device until the end: no host synchronization per batch. Under torchrun
    each rank passes its shard and the counts are summed over ranks, so the result equals a
    single-process run.
    """
    device = torch.device(device)
    snn = prepare_for_device(snn, device)
    run = snn.simulate if mode == "simulate" else snn.evaluate
    dtype = next(snn.parameters()).dtype
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    spikes: dict[str, Tensor] = {}
    images = 0
    start = time.perf_counter()
    progress_bar = tqdm(batches, total=total, desc=f"{mode} on {device.type}", unit="batch", disable=not progress)
    for x, y in device_batches(progress_bar, device, dtype):
        logits, counts = run(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum()
        correct5 += (top == y[:, None]).any(1).sum()
        for name, count in counts.items():
            spikes[name] = spikes.get(name, 0) + count.sum()
        images += x.shape[0]
    names = list(spikes)
    totals = torch.stack([correct1, correct5, torch.tensor(images, device=device)]
                         + [spikes[n].to(torch.int64) for n in names])
    totals = all_reduce_sum(totals, context).tolist()
    correct1, correct5, images = totals[:3]
    seconds = all_reduce_max(time.perf_counter() - start, context)
    layer = {name: total_spikes / max(images, 1) for name, total_spikes in zip(names, totals[3:])}
    return EvalResult(
        top1=correct1 / max(images, 1), top5=correct5 / max(images, 1), images=images,
        spikes_per_image=sum(layer.values()), layer_spikes_per_image=layer,
        images_per_second=images / seconds if seconds > 0 else 0.0, mode=mode, device=str(device))
