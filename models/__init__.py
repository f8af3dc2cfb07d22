"""The model zoo: ANNs whose every ReLU-like activation site comes from an `activation` factory.

`activation(channels) -> nn.Module` builds one site per call (each site its own module, its own
trainable clip); the compiler replaces these sites. All models trace with `torch.fx.symbolic_trace`.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ._common import ActivationFactory
from .digits import DigitsCNN, digits_cnn
from .mobilenet import MobileNetV2, mobilenetv2
from .resnet import BasicBlock, CifarResNet, ResNet, resnet18, resnet20, resnet34
from .vgg import VGG, vgg16

MODEL_NAMES: tuple[str, ...] = ("digits-cnn", "vgg16", "resnet18", "resnet20", "resnet34", "mobilenetv2")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": digits_cnn,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet34": resnet34,
    "mobilenetv2": mobilenetv2,
}

_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32)}


class UnknownModelError(ValueError):
    """A name the zoo does not have (ann2snn reports it as bad input: the zoo does not import ann2snn)."""


def _check_name(name: str) -> str:
    if name not in _BUILDERS:
        raise UnknownModelError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return name


def build_model(
    name: str,
    num_classes: int,
    in_channels: int | None = None,
    activation: ActivationFactory | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build zoo model `name` (one of MODEL_NAMES); `in_channels=None` takes the model's default
    (1 for digits-cnn, else 3). Extra keyword arguments go to the model's constructor."""
    builder = _BUILDERS[_check_name(name)]
    if in_channels is None:
        in_channels = default_input_shape(name)[0]
    return builder(num_classes=num_classes, in_channels=in_channels, activation=activation, **kwargs)


def default_input_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) of the inputs a model is designed for."""
    return _INPUT_SHAPES.get(_check_name(name), (3, 224, 224))


__all__ = [
    "MODEL_NAMES", "ActivationFactory", "build_model", "default_input_shape",
    "BasicBlock", "CifarResNet", "DigitsCNN", "MobileNetV2", "ResNet", "VGG",
    "digits_cnn", "mobilenetv2", "resnet18", "resnet20", "resnet34", "vgg16",
]
