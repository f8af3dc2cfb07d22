"""The optimizer and its per-step cosine schedule, and the switch to int8 weights after a float warm-up."""
from __future__ import annotations

import torch
from torch import nn

from ..compile.calibrate import activation_sites
from ..errors import Ann2SnnError
from .config import OPTIMIZERS, TrainConfig
from .weight_quant import quantize_weights


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, or Adam; no weight decay on the clipping thresholds (it would only shrink lambda)."""
    if config.optimizer_name not in OPTIMIZERS:
        raise Ann2SnnError(f"optimizer {config.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    clips = [s.clip for s in activation_sites(model).values()]
    clip_ids = {id(p) for p in clips}
    weights = [p for p in model.parameters() if id(p) not in clip_ids]
    groups = [{"params": weights, "weight_decay": config.weight_decay}, {"params": clips, "weight_decay": 0.0}]
    if config.optimizer_name == "adam":
        return torch.optim.Adam(groups, lr=config.learning_rate)
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def start_weight_quantization(model: nn.Module, config: TrainConfig, optimizer: torch.optim.Optimizer,
                              scheduler: torch.optim.lr_scheduler.LRScheduler, total_steps: int
                              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """End the float-weight warm-up: fold the BNs from the statistics the warm-up gathered and
    fake-quantize the weights (quantize_weights), and go on with a new optimizer over the new
    parameters (no momentum carried over: it was of the float weights) at the schedule's place."""
    quantize_weights(model, config.weight_bits)
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer = build_optimizer(model, config)
    state = scheduler.state_dict()
    scheduler = cosine_schedule(optimizer, total_steps)
    scheduler.load_state_dict(state)   # the cosine's step count and base rates
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    return optimizer, scheduler
