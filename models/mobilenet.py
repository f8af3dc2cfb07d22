"""MobileNetV2 (Sandler et al. 2018), torchvision's layout: inverted residuals, depthwise convolutions."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import ActivationFactory, init_weights, relu6_factory

#: (expansion t, output channels c, repeats n, first stride s) of torchvision's MobileNetV2.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% down (torchvision)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def conv_bn_act(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int,
                activation: ActivationFactory) -> nn.Sequential:
    """Convolution (no bias), BN, activation site."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        activation(out_ch),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion-BN-act (absent when t = 1), 3x3 depthwise-BN-act, 1x1 linear projection-BN,
    plus the identity where the stride is 1 and the channel count is unchanged."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int,
                 activation: ActivationFactory) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, 1, 1, activation))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, hidden, activation),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:  # a Python attribute fixed at construction: no tensor control flow
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv 3x3/2 (32 ch), 17 inverted residual blocks, 1x1 conv to 1280 ch, global average
    pool, Dropout, Linear. `small_input=True` (32x32 inputs) keeps stride 1 in the stem and in the
    first strided stage (24 channels), so the last feature map is 2x2 instead of 1x1 at 32x32."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        activation: ActivationFactory | None = None,
        width_mult: float = 1.0,
        small_input: bool = False,
        dropout: float = 0.2,
        round_nearest: int = 8,
    ) -> None:
        super().__init__()
        act = activation or relu6_factory
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [conv_bn_act(in_channels, input_channel, 3, 1 if small_input else 2, 1, act)]
        first_strided = True
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            if s > 1 and first_strided:
                first_strided = False
                if small_input:
                    s = 1
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t, act))
                input_channel = output_channel
        features.append(conv_bn_act(input_channel, self.last_channel, 1, 1, 1, act))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenetv2(
    num_classes: int = 1000,
    in_channels: int = 3,
    activation: ActivationFactory | None = None,
    width_mult: float = 1.0,
    small_input: bool = False,
    dropout: float = 0.2,
) -> MobileNetV2:
    """MobileNetV2 with ReLU6 sites by default (3,504,872 parameters with 1000 classes)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, activation=activation,
                       width_mult=width_mult, small_input=small_input, dropout=dropout)
