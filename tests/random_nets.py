"""Random small quantized CNNs for the property tests of the conversion invariant (docs/method.md section 4)."""
from __future__ import annotations

import torch
from torch import nn

from ann2snn.runtime.quant import QuantClippedActivation

BLOCKS = ("conv", "grouped", "depthwise", "residual", "concat", "maxpool", "avgpool", "linear_site")


def random_site(levels: int, channels: int, per_channel: bool, generator: torch.Generator) -> QuantClippedActivation:
    site = QuantClippedActivation(levels=levels, channels=channels if per_channel else 0)
    site.clip.data = 0.5 + 2.5 * torch.rand(site.clip.shape, generator=generator)
    return site


def randomize_batch_norm(norm: nn.Module, generator: torch.Generator) -> None:
    c = norm.num_features
    norm.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
    norm.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
    norm.weight.data = 0.5 + torch.rand(c, generator=generator)
    norm.bias.data = 0.3 * torch.randn(c, generator=generator)


class Residual(nn.Module):
    def __init__(self, c: int, make_site) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), make_site(c)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), make_site(c)

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)


class Concat(nn.Module):
    def __init__(self, c: int, make_site) -> None:
        super().__init__()
        self.left, self.act_left = nn.Conv2d(c, c, 1), make_site(c)
        self.right, self.bn_right, self.act_right = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), make_site(c)

    def forward(self, x):
        return torch.cat([self.act_left(self.left(x)), self.act_right(self.bn_right(self.right(x)))], 1)


class RandomNet(nn.Module):
    """stem conv -> random blocks -> global average pool or flatten -> linear head."""

    def __init__(self, blocks: list[str], levels: int, per_channel: bool, seed: int, head: str = "gap",
                 in_shape: tuple[int, int, int] = (3, 8, 8), classes: int = 5) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        make_site = lambda c: random_site(levels, c, per_channel, generator)  # noqa: E731
        c, h = 6, in_shape[1]
        layers: list[nn.Module] = [nn.Conv2d(in_shape[0], c, 3, padding=1), nn.BatchNorm2d(c), make_site(c)]
        for block in blocks:
            if block in ("conv", "grouped", "depthwise"):
                groups = {"conv": 1, "grouped": 2, "depthwise": c}[block]
                layers += [nn.Conv2d(c, c, 3, padding=1, groups=groups), nn.BatchNorm2d(c), make_site(c)]
            elif block == "residual":
                layers.append(Residual(c, make_site))
            elif block == "concat":
                layers.append(Concat(c, make_site))
                c *= 2
            elif block in ("maxpool", "avgpool") and h >= 4:
                layers.append(nn.MaxPool2d(2) if block == "maxpool" else nn.AvgPool2d(2))
                h //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if head == "gap" else nn.Flatten()
        width = c if head == "gap" else c * h * h
        # "linear_site": a hidden linear layer with its own activation site before the head
        tail = [nn.Linear(width, 8), make_site(8)] if "linear_site" in blocks else []
        self.tail = nn.Sequential(*tail)
        self.head = nn.Linear(8 if tail else width, classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                randomize_batch_norm(m, generator)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data = torch.randn(m.weight.shape, generator=generator) * (2.0 / m.weight[0].numel()) ** 0.5
                if m.bias is not None:
                    m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=generator)
        self.eval()

    def forward(self, x):
        return self.head(self.tail(self.pool(self.features(x))))


def ann_site_inputs(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """z / theta at every site of the quantized ANN (by hooks), and the ANN's logits."""
    ratios: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, QuantClippedActivation):
            def hook(mod, inputs, output, name=name):
                theta = mod.theta().detach()
                if theta.dim():
                    theta = theta.view(1, -1, *[1] * (inputs[0].dim() - 2))
                ratios[name] = inputs[0] / theta
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return ratios, logits
