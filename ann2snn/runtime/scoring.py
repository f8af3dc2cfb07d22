"""Scoring a converted SNN on a data set: accuracy, spikes per image, throughput (each batch run by `evaluate` or `simulate`)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor, fx
from torch.utils.data import Dataset

from ..data.sets import dataset_input_shape, dataset_source, fit_sample_rank, largest_label, sample_shapes
from .distributed import Context, all_reduce_max, all_reduce_sum
from ..errors import Ann2SnnError, DataError
from ..kernels.native import native_neuron_available
from .memory import ShapeProbe, activation_profile, on_meta
from ..progress import PROGRESS_DELAY_S, progress_bar  # noqa: F401  (the trainer's bar reads the delay here)
from ..ops import CONVS
from .snn import SNN

# Square input sizes tried, after the data's own, to name the shape a model takes when the data's
# does not fit: small ones (digits, CIFAR) one by one, then common image sizes.
_PROBE_SIDES = tuple(range(1, 65)) + (96, 112, 128, 160, 192, 224, 227, 256, 299, 320, 384, 448, 512)


@dataclass
class Score:
    """What `ann2snn eval` reports of a data set: top-1 and top-5 accuracy, spikes, throughput."""
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


def _output_shape(graph: fx.GraphModule, sample_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, ...] | None:
    """The shape of the graph's output for one sample of `sample_shape`; None when the graph cannot
    take such a sample."""
    try:
        with torch.no_grad():
            logits = ShapeProbe(graph).run(torch.empty((1, *sample_shape), dtype=dtype, device="meta"))
        return tuple(logits.shape[1:])
    except Exception:  # shape errors are RuntimeErrors, ValueErrors, IndexErrors, ... from any op
        return None


def _accepted_shape(graph: fx.GraphModule, found: tuple[int, ...], dtype: torch.dtype) -> tuple[int, ...] | None:
    """A sample shape the graph takes, as near to `found` as the probes get: the input channels of
    its first convolution, with the found size, else with the first square size that fits."""
    modules = [graph.get_submodule(n.target) for n in graph.graph.nodes if n.op == "call_module"]
    convs = [m for m in modules if isinstance(m, CONVS)]
    channels = [convs[0].in_channels] if convs else []
    candidates = [(c, *found[1:]) for c in channels + [found[0]]]
    candidates += [(c, side, side) for c in channels + [found[0]] for side in _PROBE_SIDES]
    return next((shape for shape in candidates if _output_shape(graph, shape, dtype) is not None), None)


def _takes(snn: SNN, sample_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output's shape for one sample of `sample_shape`, run for real on a zero image: the check
    of a meta probe that failed (an op may have no meta kernel). None: the SNN cannot take it."""
    param = next(snn.parameters(), torch.zeros(()))
    try:
        zeros = torch.zeros((1, *sample_shape), dtype=param.dtype, device=param.device)
        return tuple(snn.evaluate(zeros).logits.shape[1:])
    except Exception:
        return None


def class_scores(snn: SNN, logits: Tensor) -> Tensor:
    """The output as one row of class scores per sample: (N, classes), or (N, classes, 1, ...) as a
    convolutional classifier may end; any other output (a map per class) has no top-1."""
    if logits.dim() > 2 and math.prod(logits.shape[2:]) != 1:
        name = f"the SNN of {snn.source.file}" if snn.source.file else "the SNN"
        raise Ann2SnnError(f"{name}: its output per sample has shape {tuple(logits.shape[1:])}, not one score per "
                           "class: top-1 accuracy needs an output (N, classes) (energy and verify take any output)")
    return logits.flatten(1) if logits.dim() > 2 else logits


# How messages name a sample's dimensions, by its rank.
_SAMPLE_AXES = {1: "(features)", 2: "(C, L)", 3: "(C, H, W)"}


def check_data_fits(snn: SNN, dataset: Dataset, labels: bool = True) -> None:
    """Refuse, before the run, a data set whose samples the SNN cannot take (naming the shape it
    takes and the shape found) or, with `labels`, whose labels reach past its logits (such a label
    can never be predicted: the accuracy would be silently wrong). An (N, H, W) array goes back to
    (N, C, L) signals for an SNN that takes those (data.fit_sample_rank)."""
    if len(dataset) == 0:  # type: ignore[arg-type]  # nothing will run (e.g. an empty shard)
        return
    source = dataset_source(dataset)
    dtype = next(snn.parameters(), torch.zeros(())).dtype
    graph = on_meta(snn.graph_module)

    def output_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
        found = _output_shape(graph, shape, dtype)
        return found if found is not None else _takes(snn, shape)

    fit_sample_rank(dataset, lambda shape: output_shape(shape) is not None)
    found = dataset_input_shape(dataset)
    shape = output_shape(found)
    if shape is None:
        shapes = sample_shapes(dataset)
        expected = next(filter(None, (_accepted_shape(graph, shape, dtype) for shape in shapes)), None)
        if expected is None:
            raise DataError(f"{source}: the model cannot take samples of shape {found}")
        found = next((shape for shape in shapes if len(shape) == len(expected)), found)  # as the file has it
        named = f"{expected} {_SAMPLE_AXES.get(len(expected), '')}".rstrip()
        raise DataError(f"{source}: the model takes samples of shape {named}, found samples of shape {found}")
    if not labels:
        return
    logits = class_scores(snn, torch.empty((1, *shape), device="meta")).shape[1]
    top = largest_label(dataset)
    if top is not None and top >= logits:
        raise DataError(f"{source}: labels go up to {top}, but the model has {logits} classes "
                        f"(labels 0 to {logits - 1})")


# Copies of a sample's largest activation that a batch of the SNN holds at once (its input and
# output, potential, levels and counts), per time step when simulated; energy's counters hold
# their event maps on top.
RUN_COPIES = 6
COUNTING_COPIES = 12
# The batch size of eval and energy when the model's activations allow it.
DEFAULT_BATCH = 128


def auto_batch_size(snn: SNN, dataset: Dataset, mode: str = "evaluate", copies: int = RUN_COPIES,
                    labels: bool = True) -> int:
    """The batch size that keeps a run's activations within the activation budget
    (memory.activation_budget; at most DEFAULT_BATCH): what `ann2snn eval` and `energy` use without
    --batch-size. The data set is checked first (check_data_fits), so that the probe runs on samples
    the SNN takes."""
    check_data_fits(snn, dataset, labels)
    dtype = next(snn.parameters(), torch.zeros(())).dtype
    per_element = copies * dtype.itemsize * (snn.timesteps if mode == "simulate" else 1)
    profile = activation_profile(snn.graph_module, dataset_input_shape(dataset), dtype)
    return profile.batch(per_element, most=DEFAULT_BATCH)


def prepare_for_device(snn: SNN, device: torch.device) -> SNN:
    """Move the SNN; on CUDA use channels_last, which convolutions there run faster in; on the CPU
    load (or build) the C neuron now, so that its first use is not in a timed loop."""
    snn = snn.to(device)
    if device.type == "cuda":
        snn = snn.to(memory_format=torch.channels_last)
    else:
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
def score_snn(snn: SNN, batches: Iterable[tuple[Tensor, Tensor]], *, mode: str = "evaluate",
                 device: str | torch.device = "cpu", progress: bool = True, total: int | None = None,
                 context: Context = Context()) -> Score:
    """Top-1 / top-5 accuracy and spikes per image over `batches` of (images, labels).

    Counts stay on the device until the end: no host synchronization per batch. Under torchrun
    each rank passes its shard and the counts are summed over ranks, so the result equals a
    single-process run.
    Classes are ranked by the last layer's potentials (SNN.before_head): as the output ranks them, the
    output head's ops keeping their order, and also where its QDQ rounding makes two probabilities equal.
    """
    device = torch.device(device)
    if isinstance(getattr(batches, "dataset", None), Dataset):  # a DataLoader: check its data set first
        check_data_fits(snn, batches.dataset)
    ranked = prepare_for_device(snn, device).before_head()
    run = ranked.simulate if mode == "simulate" else ranked.evaluate
    dtype = next(ranked.parameters()).dtype
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    spikes: dict[str, Tensor] = {}
    images = 0
    start = time.perf_counter()
    bar = progress_bar(batches, total=total, desc=f"{mode} on {device.type}", enabled=progress)
    for x, y in device_batches(bar, device, dtype):
        logits, counts = run(x)
        logits = class_scores(snn, logits)
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
    return Score(
        top1=correct1 / max(images, 1), top5=correct5 / max(images, 1), images=images,
        spikes_per_image=sum(layer.values()), layer_spikes_per_image=layer,
        images_per_second=images / seconds if seconds > 0 else 0.0, mode=mode, device=str(device))
