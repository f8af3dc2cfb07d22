"""ResNets built from BasicBlocks: ImageNet layout (ResNet-18/34) and CIFAR layout (ResNet-20)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import ActivationFactory, init_weights, relu_factory


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act.

    The shortcut is the identity, or a 1x1 convolution + BN where the stride or the channel count
    changes (torchvision's downsample, option B of He et al.).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, activation: ActivationFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = activation(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        self.act2 = activation(planes)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.act2(out)


class ResNet(nn.Module):
    """ImageNet layout: 7x7/2 conv, BN, act, 3x3/2 max pool, four stages of BasicBlocks
    (64/128/256/512 channels), global average pool, fully connected."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        activation: ActivationFactory | None = None,
    ) -> None:
        super().__init__()
        act = activation or relu_factory
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = act(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        planes = 64
        stages = []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for j in range(count):
                stage.append(BasicBlock(planes, width, 2 if (i > 0 and j == 0) else 1, act))
                planes = width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class CifarResNet(nn.Module):
    """CIFAR layout (He et al. 2016, section 4.2): 3x3 conv with 16 channels, BN, act, three stages
    of `blocks_per_stage` BasicBlocks with 16/32/64 channels (stride 1/2/2), global average pool, fc.
    Shortcuts that change shape are 1x1 convolution + BN projections."""

    def __init__(
        self,
        blocks_per_stage: int = 3,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: ActivationFactory | None = None,
    ) -> None:
        super().__init__()
        act = activation or relu_factory
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = act(16)
        planes = 16
        stages = []
        for i, width in enumerate((16, 32, 64)):
            stage = []
            for j in range(blocks_per_stage):
                stage.append(BasicBlock(planes, width, 2 if (i > 0 and j == 0) else 1, act))
                planes = width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, in_channels: int = 3, activation: ActivationFactory | None = None) -> ResNet:
    """ResNet-18, ImageNet layout (11,689,512 parameters with 1000 classes)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, activation=activation)


def resnet34(num_classes: int = 1000, in_channels: int = 3, activation: ActivationFactory | None = None) -> ResNet:
    """ResNet-34, ImageNet layout (21,797,672 parameters with 1000 classes)."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, activation=activation)


def resnet20(num_classes: int = 10, in_channels: int = 3, activation: ActivationFactory | None = None) -> CifarResNet:
    """ResNet-20, CIFAR layout (3 stages x 3 BasicBlocks, 16/32/64 channels)."""
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels, activation=activation)
