"""The training loop: build, initialize, calibrate, train epoch by epoch with checkpoints, export."""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm import tqdm

from .checkpoint import Checkpoint, load_checkpoint, restore_rng, save_checkpoint, save_tensors
from ..data.sets import dataset_input_shape, dataset_source, load_dataset, make_loader, num_classes
from ..runtime.distributed import (Context, all_reduce_sum, barrier, init_from_env, local_device, shard, sync_batch_norm,
                           unsync_batch_norm)
from ..errors import Ann2SnnError, DataError
from ..runtime.scoring import PROGRESS_DELAY_S
from .export import export_onnx
from ..compile.calibrate import activation_sites, calibrate_clips, quantize_model
from .batches import RANK_SEED_STRIDE, epoch_loader, global_batch_sizes, held_out_split
from .config import FLOAT_ACTIVATIONS, MIN_CLIP, RESUME_FREE_FIELDS, TrainConfig, TrainResult
from .guard import DivergenceGuard
from .init import load_init
from .regularizer import sample_spikes, spike_regularizer
from .schedule import build_optimizer, cosine_schedule, start_weight_quantization
from .weight_quant import check_weight_bits, quantize_weights


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


def score_accuracy(model: nn.Module, loader: Iterable, device: str | torch.device) -> tuple[float, float]:
    """(top-1 accuracy, spikes per image summed over the quantized sites; 0 for a float model)."""
    accuracy, per_site = _evaluate(model, loader, device)
    return accuracy, sum(per_site.values())


# ----------------------------------------------------------------------------------------------
# Initialization


def _check_data_fits(config: TrainConfig, source: str, input_shape: tuple[int, ...], classes: int) -> None:
    """Refuse, before any work, data whose samples the zoo model cannot take (a digits-cnn built for
    8x8 images given 16x16 ones fails in its classifier): one forward pass on the meta device,
    which allocates nothing and computes nothing."""
    from .. import models

    if is_onnx_source(config.model):   # prepare.onnx_network checks the file's own input shape
        return
    try:
        with torch.device("meta"):
            model = models.build_model(config.model, classes, in_channels=input_shape[0])
            model.eval()(torch.empty((1, *input_shape)))
    except models.UnknownModelError as err:
        raise Ann2SnnError(str(err)) from None
    except Ann2SnnError:
        raise
    except Exception:  # shape errors come as RuntimeError, ValueError, ... from any layer
        expected = (input_shape[0], *models.default_input_shape(config.model)[1:])
        raise DataError(f"{source}: the model {config.model} takes samples of shape {expected} (C, H, W), "
                        f"found samples of shape {tuple(input_shape)}") from None


# ----------------------------------------------------------------------------------------------
# Training


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
    from .. import models  # the model zoo (models/, installed as ann2snn.models)

    return models.build_model(model, classes, in_channels=input_shape[0])


def _initialize(model: nn.Module, config: TrainConfig, held_out: set[int]) -> None:
    """Load `init`, then (weight_bits, no warm-up) fold BN and quantize the weights, then calibrate the
    lambdas `init` does not provide (all of them with `calibrate`) on the "calib" split (the training
    images without augmentation) less the `held_out` validation images, through the quantized weights."""
    loaded = load_init(model, config.init) if config.init else set()
    if config.weight_bits is not None and config.warmup_epochs == 0:   # after init: the fold uses its BN statistics
        quantize_weights(model, config.weight_bits)
    pending = [n for n, s in activation_sites(model).items()
               if config.calibrate or f"{n}.clip" not in loaded or not torch.isfinite(s.clip).all()]
    if pending:
        calib = load_dataset(config.data, "calib", seed=config.seed)
        if held_out:
            calib = Subset(calib, [i for i in range(len(calib)) if i not in held_out])
        loader = make_loader(calib, config.batch_size, shuffle=True, workers=config.workers, seed=config.seed)
        calibrate_clips(model, loader, config.percentile, names=pending)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = dataclasses.asdict(config)
    changed = sorted(k for k in current if k not in RESUME_FREE_FIELDS and saved.get(k) != current[k])
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
            counts = sample_spikes(model)
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


def _warn(message: str | None, context: Context) -> None:
    """The guard's line on stderr, at once (also under --json, and with the progress bar off)."""
    if message and context.is_main:
        tqdm.write(f"ann2snn: warning: {message}", file=sys.stderr)


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train per `config`; see the module docstring. Returns the history and the final test metrics."""
    start_time = time.perf_counter()
    ckpt_path = config.checkpoint_path
    if config.resume and ckpt_path is None:
        raise Ann2SnnError("resume needs an output path: the checkpoint is <output>.ckpt")
    check_weight_bits(config.weight_bits)
    config.check()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise Ann2SnnError(f"device {config.device}: no CUDA device is available")
    context = init_from_env(config.device)  # torchrun: DistributedDataParallel; else one process
    if context.distributed and config.warmup_epochs:
        raise Ann2SnnError(f"float_weight_epochs {config.warmup_epochs}: the float-weight warm-up runs in one "
                           "process, not under torchrun; pass float_weight_epochs 0")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    device = torch.device(local_device(config.device, context))

    # Image-folder augmentation: each rank its own random stream (rank 0 that of one process).
    train_set = load_dataset(config.data, "train", seed=config.seed + RANK_SEED_STRIDE * context.rank)
    trained_indices, validation_indices = held_out_split(len(train_set), config)
    if len(trained_indices) < len(train_set):
        train_set = Subset(train_set, trained_indices)
    test_loader = make_loader(shard(load_dataset(config.data, "test", seed=config.seed), context),
                              config.batch_size, workers=config.workers)
    # the held-out images as calibration reads them (no augmentation); the guard selects on them
    validation_loader = make_loader(shard(Subset(load_dataset(config.data, "calib", seed=config.seed),
                                                 validation_indices), context),
                                    config.batch_size, workers=config.workers) if validation_indices else None
    input_shape = dataset_input_shape(train_set)
    classes = num_classes(train_set)
    _check_data_fits(config, dataset_source(train_set), input_shape, classes)

    resume = load_checkpoint(ckpt_path) if config.resume and ckpt_path.is_file() else None
    model = _build_model(config, classes, input_shape, device)
    if resume is None:
        _initialize(model, config, set(validation_indices))
    else:
        _check_resumable(resume.config, config, ckpt_path)
        if config.weight_bits is not None and len(resume.history) >= config.warmup_epochs:
            quantize_weights(model, config.weight_bits)   # the checkpoint's layers: BN folded, weights parametrized
    optimizer = build_optimizer(model, config)
    global_sizes = global_batch_sizes(len(train_set), config.batch_size) if context.distributed else None
    steps_per_epoch = len(global_sizes) if global_sizes is not None else len(epoch_loader(train_set, config, 0))
    scheduler = cosine_schedule(optimizer, config.epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    if resume is not None:
        _restore(resume, ckpt_path, model, optimizer, scheduler)
        history = resume.history
    guard: DivergenceGuard | None = None
    if config.fine_tune:  # the starting model, measured before the first step, is epoch 0
        start_competes = config.beta == 0   # with the spike regularizer, the dense start is no candidate
        if resume is not None:
            guard = DivergenceGuard.resume(config.output, history, start_competes)
        else:
            start_accuracy, start_sites = _evaluate(model, validation_loader, device, context)
            guard = DivergenceGuard(model, start_accuracy, sum(start_sites.values()), start_competes)

    trained: nn.Module = model
    swapped: list = []
    if context.distributed:  # global batch statistics in BN, gradients averaged over ranks
        swapped = sync_batch_norm(model)
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    bar = tqdm(total=config.epochs * steps_per_epoch, initial=len(history) * steps_per_epoch,
               disable=True if not progress or not context.is_main else None,   # None: off unless a terminal
               desc="float" if config.float_only else f"QAT T={config.timesteps}", unit="step",
               delay=PROGRESS_DELAY_S)  # a bad image in the first batches: its error line alone
    if guard is not None and not history and not bar.disable:
        bar.write(f"epoch 0 (the starting model): validation accuracy {100 * guard.start_accuracy:.2f}%",
                  file=sys.stderr)
    per_site: dict[str, float] | None = None
    for epoch in range(len(history), config.epochs):
        if guard is not None and guard.stopped:
            break
        epoch_start = time.perf_counter()
        if context.distributed:  # dropout masks: one stream per rank and epoch, the same after a resume
            torch.manual_seed(config.seed + epoch + RANK_SEED_STRIDE * context.rank)
        sums = _train_epoch(trained, epoch_loader(train_set, config, epoch, context), optimizer, scheduler,
                            config.beta, config.max_grad_norm, device, bar, global_sizes, context.world_size)
        loss_sum, ce_sum, spike_sum, correct, images = all_reduce_sum(sums, context).tolist()
        test_acc, per_site = _evaluate(model, test_loader, device, context)
        entry = {
            "epoch": epoch + 1, "loss": loss_sum / images, "ce": ce_sum / images, "spike_term": spike_sum / images,
            "train_acc": correct / images, "test_acc": test_acc, "spikes_per_image": sum(per_site.values()),
            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - epoch_start}
        if validation_loader is not None:
            entry["val_acc"] = _evaluate(model, validation_loader, device, context)[0]
        if guard is None and not math.isfinite(entry["loss"]):
            raise Ann2SnnError(f"training diverged at epoch {epoch + 1}: the loss is {entry['loss']}; "
                               "lower the learning rate or clip the gradient norm")
        if guard is not None:
            warning = guard.after_epoch(epoch + 1, model, entry["loss"], entry["val_acc"], optimizer, scheduler)
            entry.update(guard=warning, stopped=guard.stopped)
            _warn(warning, context)
        history.append(entry)
        if config.weight_bits is not None and epoch + 1 == config.warmup_epochs:  # before the checkpoint
            optimizer, scheduler = start_weight_quantization(model, config, optimizer, scheduler,
                                                             config.epochs * steps_per_epoch)
        bar.set_postfix(loss=f"{loss_sum / images:.3f}", acc=f"{correct / images:.3f}", test=f"{test_acc:.3f}",
                        spk=f"{sum(per_site.values()):.0f}")
        if not bar.disable:
            best = f", best: epoch {guard.best.epoch}" if guard is not None else ""
            validated = f", validation accuracy {100 * entry['val_acc']:.2f}%" if "val_acc" in entry else ""
            bar.write(f"epoch {epoch + 1}/{config.epochs}: loss {entry['loss']:.4f}, train accuracy "
                      f"{100 * entry['train_acc']:.2f}%{validated}, test accuracy {100 * test_acc:.2f}%{best}",
                      file=sys.stderr)
        if ckpt_path is not None:
            if context.is_main:
                if guard is not None:  # first: a checkpoint always has its best weights on disk
                    guard.save(config.output, epoch + 1)
                save_checkpoint(ckpt_path, epoch=epoch + 1, config=dataclasses.asdict(config), history=history,
                                model=model, optimizer=optimizer, scheduler=scheduler)
            barrier(context)
    bar.close()
    unsync_batch_norm(swapped)  # plain BatchNorm again for the export and the caller
    fine_tune = None
    if guard is not None:  # the best epoch, the starting model included, is what the run returns
        fine_tune, verdict = guard.finish(model, history)
        _warn(verdict, context)
        per_site = None
    if per_site is None:  # nothing trained here (e.g. resuming a finished run), or the best epoch's weights
        test_acc, per_site = _evaluate(model, test_loader, device, context)
    result = TrainResult(history=history, test_accuracy=test_acc, spikes_per_image=sum(per_site.values()),
                         spikes_per_site=per_site, seconds=time.perf_counter() - start_time, model=model,
                         fine_tune=fine_tune)
    if config.output is not None and context.is_main:
        meta = {"format": "ann2snn-weights", "config": dataclasses.asdict(config), "input_shape": list(input_shape),
                "num_classes": classes, **result.to_json()}
        save_tensors(config.output, model.state_dict(), meta)
    if config.onnx is not None and context.is_main:
        export_onnx(model, input_shape, config.onnx, qdq=not config.float_only)
    barrier(context)
    return result
