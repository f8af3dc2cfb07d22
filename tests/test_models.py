"""The model zoo (models/): shapes, fx tracing, one module per activation site, parameter counts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from ann2snn import models
from ann2snn.data.sets import load_dataset, make_loader
from ann2snn.errors import Ann2SnnError
from ann2snn.runtime.quant import QuantClippedActivation

# Small inputs: the ImageNet-layout models end in adaptive pooling, so 32x32 works for all but the
# ImageNet head of VGG-16, which is checked at 224x224 separately.
INPUTS = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32),
          "resnet34": (3, 32, 32), "mobilenetv2": (3, 32, 32)}
OPTIONS = {"vgg16": {"small_input": True}, "mobilenetv2": {"small_input": True}}
# Activation sites per model (with the options above).
SITES = {"digits-cnn": 3, "vgg16": 13, "resnet18": 17, "resnet34": 33, "resnet20": 19, "mobilenetv2": 35}
# torchvision's parameter counts (1000 classes, ImageNet heads).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "vgg16": 138_365_992,
                      "mobilenetv2": 3_504_872}


class Marker(nn.ReLU):
    """A ReLU of its own type, so the sites a factory built can be counted in a model."""


class CountingFactory:
    def __init__(self, make=lambda c: Marker()) -> None:
        self.make = make
        self.built: list[nn.Module] = []
        self.channels: list[int] = []

    def __call__(self, channels: int) -> nn.Module:
        module = self.make(channels)
        self.built.append(module)
        self.channels.append(channels)
        return module


class SiteTracer(torch.fx.Tracer):
    """Keeps activation sites (Marker, QuantClippedActivation) as leaves, like the compiler's tracer."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, (Marker, QuantClippedActivation)) or super().is_leaf_module(m, qualified_name)


def _build(name: str, activation=None, num_classes: int = 7) -> nn.Module:
    return models.build_model(name, num_classes=num_classes, activation=activation, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_forward_shape_and_trace(name):
    torch.manual_seed(0)
    model = _build(name).eval()
    x = torch.rand(2, *INPUTS[name])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), out)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_site_is_its_own_module(name):
    factory = CountingFactory()
    model = _build(name, activation=factory)
    assert len(factory.built) == SITES[name]
    assert len({id(m) for m in factory.built}) == len(factory.built)
    registered = [m for m in model.modules() if isinstance(m, Marker)]
    assert len(registered) == len(factory.built)
    # No ReLU-like module that did not come from the factory.
    others = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU))
              and not isinstance(m, Marker)]
    assert others == []
    # In the traced graph each site is called exactly once and no functional relu sneaks in.
    graph = SiteTracer().trace(model)
    named = dict(model.named_modules())
    calls = [n.target for n in graph.nodes if n.op == "call_module" and isinstance(named[n.target], Marker)]
    assert len(calls) == len(set(calls)) == len(factory.built)
    functional = [n for n in graph.nodes if n.op in ("call_function", "call_method")
                  and getattr(n.target, "__name__", str(n.target)) in ("relu", "relu_", "relu6", "hardtanh", "clamp")]
    assert functional == []
    assert all(c > 0 for c in factory.channels)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_quantized_sites_run_per_channel(name):
    factory = CountingFactory(lambda c: QuantClippedActivation(levels=3, channels=c))
    model = _build(name, activation=factory).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *INPUTS[name]))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    # The factory's channel count is the channel count the site sees: per-channel clips broadcast.
    assert all(site.clip.shape == (c,) for site, c in zip(factory.built, factory.channels))
    graph = SiteTracer().trace(model)
    sites = [n for n in graph.nodes if n.op == "call_module" and n.target in dict(model.named_modules())
             and isinstance(model.get_submodule(n.target), QuantClippedActivation)]
    assert len(sites) == len(factory.built)


def test_default_activations():
    assert sum(isinstance(m, nn.ReLU6) for m in models.mobilenetv2(num_classes=5).modules()) == 35
    assert sum(isinstance(m, nn.ReLU) for m in models.resnet20().modules()) == 19
    assert sum(type(m) is nn.ReLU for m in models.digits_cnn().modules()) == 3


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    with torch.device("meta"):
        model = models.build_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


def test_vgg16_imagenet_head_at_224():
    torch.manual_seed(0)
    factory = CountingFactory()
    model = models.vgg16(num_classes=10, activation=factory).eval()
    assert len(factory.built) == 15  # 13 convolutions + 2 hidden fully connected layers
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 10)
    torch.fx.symbolic_trace(model)


def test_imagenet_layouts_at_224_downsample_by_32():
    for model in (models.resnet18(num_classes=3), models.mobilenetv2(num_classes=3)):
        features = {}
        last = model.layer4 if hasattr(model, "layer4") else model.features
        last.register_forward_hook(lambda m, i, o: features.update(shape=tuple(o.shape)))
        with torch.no_grad():
            model.eval()(torch.rand(1, 3, 224, 224))
        assert features["shape"][-2:] == (7, 7)


def test_small_input_options():
    with torch.no_grad():
        features = models.mobilenetv2(num_classes=3, small_input=True).features.eval()
        assert features(torch.rand(1, 3, 32, 32)).shape == (1, 1280, 4, 4)
        assert models.mobilenetv2(num_classes=3).features.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 1280, 1, 1)
    assert models.mobilenetv2(width_mult=0.5).last_channel == 1280
    vgg = models.vgg16(num_classes=10, small_input=True)
    assert isinstance(vgg.classifier[-1], nn.Linear) and vgg.classifier[-1].in_features == 512


def test_resnet20_projection_shortcuts():
    model = models.resnet20()
    shortcuts = [m.downsample for m in model.modules() if isinstance(m, models.BasicBlock) and m.downsample]
    assert len(shortcuts) == 2
    assert all(isinstance(s[0], nn.Conv2d) and s[0].kernel_size == (1, 1) and isinstance(s[1], nn.BatchNorm2d)
               for s in shortcuts)
    assert sum(isinstance(m, models.BasicBlock) for m in model.modules()) == 9


def test_initialization():
    model = models.resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    conv = model.layer3[0].conv2
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.2 * (2 / fan_out) ** 0.5


def test_build_model_registry():
    assert models.MODEL_NAMES == ("digits-cnn", "vgg16", "resnet18", "resnet20", "resnet34", "mobilenetv2")
    assert models.default_input_shape("digits-cnn") == (1, 8, 8)
    assert models.default_input_shape("resnet20") == (3, 32, 32)
    assert models.default_input_shape("resnet18") == (3, 224, 224)
    assert models.build_model("digits-cnn", 10).conv1.in_channels == 1
    assert models.build_model("resnet20", 10, in_channels=1).conv1.in_channels == 1
    with pytest.raises(models.UnknownModelError) as info:
        models.build_model("resnet50", 10)
    message = str(info.value)
    assert "\n" not in message and "resnet50" in message
    assert all(name in message for name in models.MODEL_NAMES)
    with pytest.raises(models.UnknownModelError):
        models.default_input_shape("nope")
    # the trainer reports it as bad input
    from ann2snn.train import TrainConfig, train
    with pytest.raises(Ann2SnnError, match="resnet50"):
        train(TrainConfig(model="resnet50", epochs=1), progress=False)


def test_the_zoo_does_not_import_ann2snn():
    """Dependencies point one way: ann2snn uses the zoo (installed as ann2snn.models), the zoo's
    modules import torch and each other, nothing of the compiler."""
    zoo = Path(models.__file__).parent
    for path in zoo.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("ann2snn"), (path.name, ast.unparse(node))
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("ann2snn") for a in node.names), (path.name, ast.unparse(node))


def test_digits_cnn_learns_digits():
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = models.digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(10):
        model.train()
        for x, y in make_loader(train, 64, shuffle=True, seed=epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
    assert accuracy >= 0.95
