"""Training of the source ANN: float, or quantization-aware with the spike regularizer (METHOD.md 1, 5).

    model = quantize_model(build_model(...), T)        every ReLU-like site -> QuantClippedActivation
    calibrate_clips(model, loader)                     lambda from a high percentile of the activations
    loss = cross_entropy + beta * spike_regularizer(model)

`train(TrainConfig(...))` runs SGD with momentum and a per-step cosine learning-rate schedule,
checkpoints every epoch (no pickle, see `checkpoint.py`) and resumes bit for bit: the shuffle
order of epoch e comes from a loader generator seeded with seed + e (as do the augmentation
streams of an image folder, in workers or not), and the checkpoint holds the optimizer, scheduler
and random states.

Under torchrun (`torchrun --nproc_per_node W -m ann2snn train ...`, W processes) it trains with
DistributedDataParallel and computes what one process would, up to float rounding:
- every rank draws the same global order of epoch e (seed + e) and cuts it into the same global
  batches of `batch_size`; rank r takes positions r, r + W, r + 2W, ... of each global batch
  (a rank may get an empty part of a short last batch);
- each rank's loss is its per-sample sum times W / global batch size, so DDP's gradient average
  is the gradient of the mean over the global batch, spike regularizer and lambdas included;
- BatchNorm layers normalize with global batch statistics (`distributed.SyncBatchNorm`, for
  any backend) while training; their state-dict keys do not change;
- metrics and the test accuracy (on a sharded test set) are sums over ranks; rank 0 alone writes
  checkpoints, weights and the ONNX export, the others wait for them at a barrier;
- random draws differ per rank: torch's generator (dropout) is seeded per rank at the start of
  every epoch (so a resumed run redraws the same), augmentation streams per rank.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm import tqdm

from .checkpoint import Checkpoint, load_checkpoint, load_tensors, restore_rng, save_checkpoint, save_tensors
from .data import ImageFolderDataset, dataset_input_shape, dataset_source, load_dataset, make_loader, num_classes
from .distributed import (Context, all_reduce_sum, barrier, init_from_env, local_device, shard, sync_batch_norm,
                          unsync_batch_norm)
from .errors import Ann2SnnError, DataError
from .evaluation import PROGRESS_DELAY_S
from .export import export_onnx, onnx_initializers
from .quant import QuantClippedActivation, levels_for_timesteps

# Per-batch sample of a site's activations kept for its percentile (divided among its channels).
_CALIBRATION_SAMPLES = 1 << 20
# torch.quantile refuses larger inputs.
_QUANTILE_MAX = 1 << 24
# lambda is kept above this: a step driving it to zero or below would make theta = lambda / L useless.
MIN_CLIP = 1e-4
# Distributed training: rank r's random streams (augmentation, dropout) are seeded with
# seed + r * this (+ the epoch where they restart every epoch).
_RANK_SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------------------------------
# Activation sites


def activation_sites(model: nn.Module) -> dict[str, QuantClippedActivation]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantClippedActivation)}


def first_tensor(model: nn.Module) -> Tensor:
    """A parameter or buffer of `model`, for its device and dtype (CPU float32 when it has none)."""
    return next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(()))


def _source_clip(module: nn.Module) -> float | Tensor | None:
    """The clip bound of a ReLU-like module (inf for ReLU, c for ReLU6 / Hardtanh(0, c), lambda of a
    site); None for any other module."""
    if isinstance(module, QuantClippedActivation):
        return module.clip.detach()
    if isinstance(module, nn.ReLU):
        return math.inf
    if isinstance(module, nn.Hardtanh) and module.min_val == 0:  # nn.ReLU6 is Hardtanh(0, 6)
        return float(module.max_val)
    return None


def _site_channels(model: nn.Module, modules: list[nn.Module], input_shape: tuple[int, ...]) -> dict[int, int]:
    """The channel count (dimension 1) each module sees, from one forward pass of a dummy batch."""
    channels: dict[int, int] = {}

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        channels[id(module)] = int(inputs[0].shape[1])

    handles = [m.register_forward_hook(record) for m in modules]
    param = first_tensor(model)
    was_training = model.training
    try:
        model.eval()  # batch statistics of a dummy batch must not touch BN's running averages
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return channels


def quantize_model(model: nn.Module, timesteps: int, per_channel: bool = False,
                   input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Replace every activation site (nn.ReLU, nn.ReLU6, nn.Hardtanh(0, c), QuantClippedActivation)
    of `model`, in place, by a QuantClippedActivation with L = 2^T - 1 levels.

    lambda starts at the source's bound: c for ReLU6 / Hardtanh, the old lambda of a site, and inf
    for a ReLU, which `calibrate_clips` must set before the site quantizes. `per_channel` gives
    each site one lambda per channel; the channel counts come from a forward pass of a dummy batch
    of `input_shape` (C, H, W), which per-channel sites therefore need.
    """
    levels = levels_for_timesteps(timesteps)
    targets = [(name, m) for name, m in model.named_modules() if name and _source_clip(m) is not None]
    channels: dict[int, int] = {}
    if per_channel:
        if input_shape is None:
            raise Ann2SnnError("per-channel quantization needs the input shape (C, H, W) to count channels")
        channels = _site_channels(model, [m for _, m in targets], tuple(input_shape))
    param = first_tensor(model)
    for name, module in targets:
        if per_channel and id(module) not in channels:
            raise Ann2SnnError(f"activation {name!r} is not called in the forward pass: cannot count its channels")
        site = QuantClippedActivation(levels=levels, channels=channels.get(id(module), 0))
        source = torch.as_tensor(_source_clip(module))
        with torch.no_grad():
            # A per-layer lambda broadcasts over the channels; per channel -> per layer keeps the widest.
            site.clip.copy_(source.max() if site.clip.dim() == 0 else source)
        model.set_submodule(name, site.to(param.device))
    return model


@torch.no_grad()
def calibrate_clips(model: nn.Module, loader: Iterable, percentile: float = 99.9, batches: int | None = 10,
                    names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Set each site's lambda to the `percentile` of its positive float activations (per channel for a
    per-channel site), capped at its current lambda (a ReLU6's 6; inf for a ReLU).

    Runs `model` in eval mode on `batches` batches of `loader` ((inputs, labels) pairs; None: all)
    with every site in float mode (quantize=False); `names` restricts which sites are set. A channel
    that never fires takes its layer's value. Returns {site: lambda}.
    """
    sites = activation_sites(model)
    chosen = {n: sites[n] for n in (sites if names is None else names)}
    device = first_tensor(model).device
    samples: dict[str, list[Tensor]] = {name: [] for name in chosen}
    generator = torch.Generator().manual_seed(0)

    def record(name: str, site: QuantClippedActivation):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            z = inputs[0].detach().float()
            rows = z.transpose(0, 1).reshape(z.shape[1], -1) if site.per_channel else z.reshape(1, -1)
            keep = max(1024, _CALIBRATION_SAMPLES // rows.shape[0])
            if rows.shape[1] > keep:
                rows = rows[:, torch.randint(rows.shape[1], (keep,), generator=generator).to(rows.device)]
            # Zeros are the ReLU's "off" state, not part of the range the levels must cover.
            samples[name].append(torch.where(rows > 0, rows, torch.nan).cpu())
        return hook

    handles = [site.register_forward_hook(record(n, site)) for n, site in chosen.items()]
    modes = {n: s.quantize for n, s in sites.items()}
    was_training = model.training
    try:
        model.eval()
        for s in sites.values():
            s.quantize = False
        for i, (x, *_) in enumerate(loader):
            if batches is not None and i >= batches:
                break
            model(x.to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for n, s in sites.items():
            s.quantize = modes[n]
    result = {}
    for name, site in chosen.items():
        if not samples[name]:
            raise Ann2SnnError(f"calibration: site {name!r} saw no data")
        values = torch.cat(samples[name], dim=1)
        if values.numel() > _QUANTILE_MAX:
            values = values[:, torch.randperm(values.shape[1], generator=generator)[:_QUANTILE_MAX // values.shape[0]]]
        values = values.double()
        q = percentile / 100
        per_row = torch.nanquantile(values, q, dim=1)
        layer = torch.nanquantile(values.flatten(), q)
        if torch.isnan(layer):
            raise Ann2SnnError(f"calibration: site {name!r} never had a positive input; cannot set its lambda")
        per_row = torch.where(torch.isnan(per_row), layer, per_row)
        lam = torch.minimum(per_row.reshape(site.clip.shape).to(site.clip), site.clip)
        site.clip.copy_(lam)
        result[name] = lam.detach().clone()
    return result


def _sample_spikes(model: nn.Module) -> Tensor | None:
    """Per-sample spike counts summed over the sites the last forward pass recorded; None: no site."""
    counts = [s.spikes for s in activation_sites(model).values()
              if s.quantize and s.record_spikes and s.spikes is not None]
    return torch.stack(counts).sum(0) if counts else None


def spike_regularizer(model: nn.Module) -> Tensor:
    """sum over sites of the per-sample spike counts popcount(q), averaged over the batch (METHOD 5).

    The loss adds beta times this. Reads the counts the last forward pass recorded
    (sites with record_spikes=True); differentiable through the surrogate of SpikeCountSurrogate.
    """
    counts = _sample_spikes(model)
    if counts is None:
        return torch.zeros((), device=first_tensor(model).device)
    return counts.mean()


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Iterable, device: str | torch.device,
              context: Context = Context()) -> tuple[float, dict[str, float]]:
    """Accuracy and spikes per image of every quantized site; counts summed over ranks in one place."""
    sites = {n: s for n, s in activation_sites(model).items() if s.quantize}
    flags = {n: s.record_spikes for n, s in sites.items()}
    was_training = model.training
    device = torch.device(device)
    totals = torch.zeros(2 + len(sites), dtype=torch.float64, device=device)  # correct, images, spikes...
    try:
        model.eval()
        for s in sites.values():
            s.record_spikes = True
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            totals[0] += (logits.argmax(1) == y).sum()
            totals[1] += y.numel()
            if sites:
                totals[2:] += torch.stack([s.spikes.double().sum() for s in sites.values()])
    finally:
        model.train(was_training)
        for n, s in sites.items():
            s.record_spikes = flags[n]
            s.spikes = None
    totals = all_reduce_sum(totals, context).tolist()
    images = max(totals[1], 1)
    return totals[0] / images, {n: v / images for n, v in zip(sites, totals[2:])}


def evaluate_accuracy(model: nn.Module, loader: Iterable, device: str | torch.device) -> tuple[float, float]:
    """(top-1 accuracy, spikes per image summed over the quantized sites; 0 for a float model)."""
    accuracy, per_site = _evaluate(model, loader, device)
    return accuracy, sum(per_site.values())


# ----------------------------------------------------------------------------------------------
# Initialization


def load_init(model: nn.Module, path: str | os.PathLike) -> set[str]:
    """Copy tensors into `model` by state-dict name from a safetensors state dict or the initializers
    of an ONNX file (torch.onnx.export keeps parameter names unless it folds BN into Conv).

    Every tensor but the sites' lambdas and BN's num_batches_tracked must be present with the
    model's shape; a per-layer lambda may initialize a per-channel one. Returns the names loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise Ann2SnnError(f"{path}: init file not found")
    source = onnx_initializers(path) if path.suffix.lower() == ".onnx" else load_tensors(path)[0]
    state = model.state_dict()
    _check_init_tensors(path, source, state)
    clips = {f"{name}.clip" for name in activation_sites(model)}
    missing = [k for k in state if k not in source and k not in clips and not k.endswith("num_batches_tracked")]
    if missing:
        hint = " (an ONNX export in eval mode folds BN into Conv and renames weights; use ann2snn.export)" \
            if path.suffix.lower() == ".onnx" else ""
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise Ann2SnnError(f"{path}: no tensor for {', '.join(missing[:5])}{more}{hint}")
    loaded = {}
    for name, target in state.items():
        if name not in source:
            continue
        value = source[name]
        if name in clips and value.numel() == 1:
            value = value.reshape(()).expand(target.shape)
        if tuple(value.shape) != tuple(target.shape):
            raise Ann2SnnError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, "
                               f"the model needs {tuple(target.shape)}")
        loaded[name] = value
    with torch.no_grad():
        for name, value in loaded.items():
            state[name].copy_(value)  # state_dict() tensors share storage with the parameters
    return set(loaded)


def _check_init_tensors(path: Path, source: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    """Refuse init tensors that copy_ would silently turn into garbage: a complex, boolean or integer
    tensor for a floating one (copy_ drops the imaginary part, casts True to 1.0), and NaN or Inf
    in weights (a lambda may be inf: calibration sets it)."""
    for name, target in state.items():
        value = source.get(name)
        if value is None or not target.is_floating_point():
            continue
        if not value.is_floating_point():
            raise Ann2SnnError(f"{path}: tensor {name!r} has dtype {str(value.dtype).removeprefix('torch.')}, "
                               f"the model needs a floating dtype ({str(target.dtype).removeprefix('torch.')})")
        finite = value.isfinite() | (value == math.inf) if name.endswith(".clip") else value.isfinite()
        if not bool(finite.all()):
            raise Ann2SnnError(f"{path}: tensor {name!r} holds NaN or infinite values")


def _check_data_fits(config: TrainConfig, source: str, input_shape: tuple[int, ...], classes: int) -> None:
    """Refuse, before any work, data whose samples the zoo model cannot take (a digits-cnn built for
    8x8 images given 16x16 ones fails in its classifier): one forward pass on the meta device,
    which allocates nothing and computes nothing."""
    import models

    if is_onnx_source(config.model):   # prepare.onnx_network checks the file's own input shape
        return
    try:
        with torch.device("meta"):
            model = models.build_model(config.model, classes, in_channels=input_shape[0])
            model.eval()(torch.empty((1, *input_shape)))
    except Ann2SnnError:
        raise
    except Exception:  # shape errors come as RuntimeError, ValueError, ... from any layer
        expected = (input_shape[0], *models.default_input_shape(config.model)[1:])
        raise DataError(f"{source}: the model {config.model} takes samples of shape {expected} (C, H, W), "
                        f"found samples of shape {tuple(input_shape)}") from None


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    model: str = "digits-cnn"
    data: str = "digits"
    timesteps: int = 3
    beta: float = 0.0
    epochs: int = 40
    lr: float = 0.05
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_grad_norm: float | None = None  # clip the gradient's global norm (None: off); see _train_epoch
    per_channel: bool = False
    device: str = "cpu"
    seed: int = 0
    init: str | None = None           # safetensors state dict or ONNX file to start from
    workers: int = 0
    output: str | None = None         # final weights (safetensors); the checkpoint is <output>.ckpt
    onnx: str | None = None           # also export the final model here (QDQ, or float if float_only)
    float_only: bool = False          # train the float ANN: clipped ReLU sites with quantize=False
    float_activation: str = "clipped"  # float_only: "clipped" (trainable lambda) or "plain" (the zoo's ReLUs)
    resume: bool = False              # continue from <output>.ckpt if it exists
    calibrate: bool = False           # recalibrate every lambda, also those the init file provides
    percentile: float = 99.9          # of the activations, for lambdas calibrated from data
    train_limit: int | None = None    # use only the first N training samples (quick runs)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.output is None else Path(f"{self.output}.ckpt")


FLOAT_ACTIVATIONS = ("clipped", "plain")

# Fields a resumed run may change without changing the computation's meaning.
_RESUME_FREE_FIELDS = frozenset({"resume", "workers", "device", "onnx"})


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    test_accuracy: float
    spikes_per_image: float
    spikes_per_site: dict[str, float]
    seconds: float
    model: nn.Module = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"history": self.history, "test_accuracy": self.test_accuracy,
                "spikes_per_image": self.spikes_per_image, "spikes_per_site": self.spikes_per_site,
                "seconds": self.seconds}


def _epoch_loader(dataset: Dataset, config: TrainConfig, epoch: int, context: Context = Context()) -> DataLoader:
    """The training batches of `epoch`: shuffled by a generator seeded with seed + epoch, so a
    resumed run sees the same order.

    Distributed: the same global batches as one process (the order of the same loader), of which
    this rank takes positions rank, rank + world_size, ...; every rank has one (possibly empty)
    batch per global batch. Its workers' seeds differ per rank (rank 0: those of one process).
    """
    pin_memory = config.device.startswith("cuda")
    workers_seed = config.seed + epoch + _RANK_SEED_STRIDE * context.rank
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


def _global_batch_sizes(samples: int, batch_size: int) -> list[int]:
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


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; no weight decay on the clipping thresholds (it would only shrink lambda)."""
    clips = [s.clip for s in activation_sites(model).values()]
    clip_ids = {id(p) for p in clips}
    weights = [p for p in model.parameters() if id(p) not in clip_ids]
    return torch.optim.SGD([{"params": weights, "weight_decay": config.weight_decay},
                            {"params": clips, "weight_decay": 0.0}], lr=config.lr, momentum=config.momentum)


def _build_model(config: TrainConfig, classes: int, input_shape: tuple[int, ...],
                 device: str | torch.device | None = None) -> nn.Module:
    """The zoo model with its activations made sites (quantizing, or float for float_only), on
    `device` (default: config.device); for float_only with float_activation "plain", the zoo model
    as it is (ReLU / ReLU6, no trainable clip: what rate-coding converters such as SpikingJelly's take)."""
    model = _source_network(config.model, classes, input_shape)
    if config.float_activation not in FLOAT_ACTIVATIONS:
        raise Ann2SnnError(f"float_activation {config.float_activation!r}: expected one of {', '.join(FLOAT_ACTIVATIONS)}")
    if config.float_activation == "plain":
        if not config.float_only:
            raise Ann2SnnError("float_activation 'plain' trains a float ANN: it needs float_only")
        return model.to(device or config.device)
    model = quantize_model(model, config.timesteps, config.per_channel, input_shape).to(device or config.device)
    for site in activation_sites(model).values():
        site.quantize = not config.float_only
        site.record_spikes = not config.float_only
    return model


def is_onnx_source(model: str) -> bool:
    """`--model` names a float ONNX file to fine-tune rather than a zoo model."""
    return model.lower().endswith(".onnx")


def _source_network(model: str, classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The network to train: a zoo model by name, or a float ONNX file as imported."""
    if is_onnx_source(model):
        from .prepare import onnx_network

        return onnx_network(model, classes, input_shape)
    import models  # the model zoo is a top-level package beside ann2snn

    return models.build_model(model, classes, in_channels=input_shape[0])


def _initialize(model: nn.Module, config: TrainConfig) -> None:
    """Load `init`, then calibrate the lambdas it does not provide (all of them with `calibrate`) on
    the "calib" split (the training images without augmentation)."""
    loaded = load_init(model, config.init) if config.init else set()
    pending = [n for n, s in activation_sites(model).items()
               if config.calibrate or f"{n}.clip" not in loaded or not torch.isfinite(s.clip).all()]
    if pending:
        calib = load_dataset(config.data, "calib", seed=config.seed)
        loader = make_loader(calib, config.batch_size, shuffle=True, workers=config.workers, seed=config.seed)
        calibrate_clips(model, loader, config.percentile, names=pending)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = dataclasses.asdict(config)
    changed = sorted(k for k in current if k not in _RESUME_FREE_FIELDS and saved.get(k) != current[k])
    if changed:
        raise Ann2SnnError(f"{path}: checkpoint of a different run (changed: {', '.join(changed)}); "
                           "use the same settings or another output path")


def _restore(resume: Checkpoint, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Load a checkpoint's states; a damaged or edited checkpoint whose config still matches (tensors
    of other shapes, optimizer or random states of another form) is refused in one line."""
    state = model.state_dict()
    for name, value in resume.model.items():
        if name in state and tuple(value.shape) != tuple(state[name].shape):
            raise Ann2SnnError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, "
                               f"the model needs {tuple(state[name].shape)}")
    try:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        restore_rng(resume.rng)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise Ann2SnnError(f"{path}: cannot restore the training checkpoint ({type(err).__name__}: {first})") from None


def _train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, beta: float, max_grad_norm: float | None,
                 device: torch.device, bar: tqdm, global_sizes: list[int] | None = None,
                 world_size: int = 1) -> Tensor:
    """One pass over `loader`; returns this process's sums of loss, ce, spike term, correct, images.

    `max_grad_norm` (None: off) clips the gradient's global norm before each step, a guard against
    single huge steps (the surrogate's gradient to z grows as 1/theta where lambda is small).

    Distributed (`global_sizes`: the size of each step's global batch; `model` wrapped in DDP):
    the loss backpropagated is this rank's per-sample sum times world_size / global batch size,
    which DDP's average over ranks turns into the gradient of the global batch's mean.
    """
    from .prepare import classification_loss

    model.train()
    criterion = classification_loss(getattr(model, "module", model))   # DDP wraps the network
    sites = list(activation_sites(model).values())
    # Running sums stay on the device: no host synchronization per step.
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        if global_sizes is None:
            ce = criterion(logits, y)
            spikes = spike_regularizer(model)
            loss = ce + beta * spikes if beta > 0 else ce  # beta = 0: no backward pass through the counts
            objective = loss
        else:  # sums, not means: a rank's part of a short last global batch may be empty
            ce = criterion(logits, y, reduction="sum")
            counts = _sample_spikes(model)
            spikes = counts.sum() if counts is not None else torch.zeros((), device=device)
            loss = ce + beta * spikes if beta > 0 else ce
            objective = loss * (world_size / global_sizes[step])
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for site in sites:
                site.clip.clamp_(min=MIN_CLIP)
            n = float(y.numel())
            per_sample = n if global_sizes is None else 1.0  # distributed: already sums
            sums += torch.stack([loss.detach().double() * per_sample, ce.detach().double() * per_sample,
                                 spikes.detach().double() * per_sample, (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(n, device=device).double()])
        bar.update()
        if not bar.disable and step % 10 == 0:
            loss_sum, _, spike_sum, correct, images = sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / images:.3f}", acc=f"{correct / images:.3f}",
                            spk=f"{spike_sum / images:.0f}")
    return sums


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train per `config`; see the module docstring. Returns the history and the final test metrics."""
    start_time = time.perf_counter()
    ckpt_path = config.checkpoint_path
    if config.resume and ckpt_path is None:
        raise Ann2SnnError("resume needs an output path: the checkpoint is <output>.ckpt")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise Ann2SnnError(f"device {config.device}: no CUDA device is available")
    context = init_from_env(config.device)  # torchrun: DistributedDataParallel; else one process
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    device = torch.device(local_device(config.device, context))

    # Image-folder augmentation: each rank its own random stream (rank 0 that of one process).
    train_set = load_dataset(config.data, "train", seed=config.seed + _RANK_SEED_STRIDE * context.rank)
    if config.train_limit is not None:
        train_set = Subset(train_set, range(min(config.train_limit, len(train_set))))
    test_loader = make_loader(shard(load_dataset(config.data, "test", seed=config.seed), context),
                              config.batch_size, workers=config.workers)
    input_shape = dataset_input_shape(train_set)
    classes = num_classes(train_set)
    _check_data_fits(config, dataset_source(train_set), input_shape, classes)

    resume = load_checkpoint(ckpt_path) if config.resume and ckpt_path.is_file() else None
    model = _build_model(config, classes, input_shape, device)
    if resume is None:
        _initialize(model, config)
    else:
        _check_resumable(resume.config, config, ckpt_path)
    optimizer = _optimizer(model, config)
    global_sizes = _global_batch_sizes(len(train_set), config.batch_size) if context.distributed else None
    steps_per_epoch = len(global_sizes) if global_sizes is not None else len(_epoch_loader(train_set, config, 0))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * steps_per_epoch))
    history: list[dict[str, Any]] = []
    if resume is not None:
        _restore(resume, ckpt_path, model, optimizer, scheduler)
        history = resume.history

    trained: nn.Module = model
    swapped: list = []
    if context.distributed:  # global batch statistics in BN, gradients averaged over ranks
        swapped = sync_batch_norm(model)
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    bar = tqdm(total=config.epochs * steps_per_epoch, initial=len(history) * steps_per_epoch,
               disable=not progress or not context.is_main,
               desc="float" if config.float_only else f"QAT T={config.timesteps}", unit="step",
               delay=PROGRESS_DELAY_S)  # a bad image in the first batches: its error line alone
    per_site: dict[str, float] | None = None
    for epoch in range(len(history), config.epochs):
        epoch_start = time.perf_counter()
        if context.distributed:  # dropout masks: one stream per rank and epoch, the same after a resume
            torch.manual_seed(config.seed + epoch + _RANK_SEED_STRIDE * context.rank)
        sums = _train_epoch(trained, _epoch_loader(train_set, config, epoch, context), optimizer, scheduler,
                            config.beta, config.max_grad_norm, device, bar, global_sizes, context.world_size)
        loss_sum, ce_sum, spike_sum, correct, images = all_reduce_sum(sums, context).tolist()
        test_acc, per_site = _evaluate(model, test_loader, device, context)
        history.append({
            "epoch": epoch + 1, "loss": loss_sum / images, "ce": ce_sum / images, "spike_term": spike_sum / images,
            "train_acc": correct / images, "test_acc": test_acc, "spikes_per_image": sum(per_site.values()),
            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - epoch_start})
        bar.set_postfix(loss=f"{loss_sum / images:.3f}", acc=f"{correct / images:.3f}", test=f"{test_acc:.3f}",
                        spk=f"{sum(per_site.values()):.0f}")
        if ckpt_path is not None:
            if context.is_main:
                save_checkpoint(ckpt_path, epoch=epoch + 1, config=dataclasses.asdict(config), history=history,
                                model=model, optimizer=optimizer, scheduler=scheduler)
            barrier(context)
    bar.close()
    unsync_batch_norm(swapped)  # plain BatchNorm again for the export and the caller
    if per_site is None:  # nothing left to train (e.g. resuming a finished run): evaluate once
        test_acc, per_site = _evaluate(model, test_loader, device, context)
    result = TrainResult(history=history, test_accuracy=test_acc, spikes_per_image=sum(per_site.values()),
                         spikes_per_site=per_site, seconds=time.perf_counter() - start_time, model=model)
    if config.output is not None and context.is_main:
        meta = {"format": "ann2snn-weights", "config": dataclasses.asdict(config), "input_shape": list(input_shape),
                "num_classes": classes, **result.to_json()}
        save_tensors(config.output, model.state_dict(), meta)
    if config.onnx is not None and context.is_main:
        export_onnx(model, input_shape, config.onnx, qdq=not config.float_only)
    barrier(context)
    return result
