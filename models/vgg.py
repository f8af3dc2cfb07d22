"""VGG-16 with batch normalization (torchvision's vgg16_bn layout, configuration D)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import ActivationFactory, init_weights, relu_factory

#: Configuration D: output channels of each 3x3 convolution, "M" a 2x2 max pool.
CFG_D: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Convolutional features, an adaptive average pool and a classifier head.

    `small_input=False` is torchvision's ImageNet head: 7x7 average pool, then
    Linear(512*7*7, 4096)-act-Dropout-Linear(4096, 4096)-act-Dropout-Linear(4096, num_classes).
    `small_input=True` (CIFAR-size inputs): global average pool, then Linear(512, num_classes).
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...] = CFG_D,
        num_classes: int = 1000,
        in_channels: int = 3,
        activation: ActivationFactory | None = None,
        small_input: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        act = activation or relu_factory
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = int(v)
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), act(out)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.small_input = small_input
        if small_input:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(channels, num_classes))
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(channels * 7 * 7, 4096), act(4096), nn.Dropout(dropout),
                nn.Linear(4096, 4096), act(4096), nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16(
    num_classes: int = 1000,
    in_channels: int = 3,
    activation: ActivationFactory | None = None,
    small_input: bool = False,
    dropout: float = 0.5,
) -> VGG:
    """VGG-16 with BatchNorm (138,365,992 parameters with the ImageNet head and 1000 classes)."""
    return VGG(CFG_D, num_classes=num_classes, in_channels=in_channels, activation=activation,
               small_input=small_input, dropout=dropout)
