"""Shared pieces of the model zoo: the activation factory type and weight initialization."""
from __future__ import annotations

from typing import Callable

from torch import nn

#: Builds ONE activation site for a tensor with `channels` channels; every call a new module.
ActivationFactory = Callable[[int], nn.Module]


def relu_factory(channels: int) -> nn.Module:
    """The default activation site: a plain ReLU."""
    return nn.ReLU()


def relu6_factory(channels: int) -> nn.Module:
    """The default activation site of MobileNetV2: ReLU6."""
    return nn.ReLU6()


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal (fan_out) convolutions, BN weight 1 / bias 0, zero biases.

    Linear layers keep PyTorch's default initialization unless `linear_std` is given, in which
    case their weights are drawn from N(0, linear_std^2) and their biases are zero.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
