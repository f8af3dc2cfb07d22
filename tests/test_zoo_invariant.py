"""docs/method.md section 4 on every model of the zoo: random weights, non-trivial BN statistics,
quantized sites, T = 2 and 4; in float64 the SNN's levels and logits equal the quantized ANN's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn import models
from ann2snn.runtime.quant import QuantClippedActivation
from random_nets import randomize_batch_norm
from test_invariant import expected_levels, snn_site_levels

# Small inputs keep the float64 simulation of the ImageNet-layout models within seconds.
INPUTS = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32),
          "resnet34": (3, 32, 32), "mobilenetv2": (3, 32, 32)}
OPTIONS = {"vgg16": {"small_input": True}, "mobilenetv2": {"small_input": True}}


def quantized_zoo_model(name: str, timesteps: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)

    def site(channels: int) -> QuantClippedActivation:
        q = QuantClippedActivation(levels=2**timesteps - 1, channels=channels if seed % 2 else 0)
        q.clip.data = 0.5 + 2.5 * torch.rand(q.clip.shape, generator=generator)
        return q

    torch.manual_seed(seed)
    model = models.build_model(name, num_classes=10, activation=site, **OPTIONS.get(name, {}))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_batch_norm(m, generator)
    return model.double().eval()


@pytest.mark.parametrize("timesteps", [2, 4])
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_zoo_model_converts_exactly(name, timesteps):
    model = quantized_zoo_model(name, timesteps, seed=timesteps)
    x = torch.rand((2, *INPUTS[name]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    snn = ann2snn.convert(model, T=timesteps)
    ann, _, logits = expected_levels(model, snn, x)
    snn_levels, simulated = snn_site_levels(snn, x)
    assert set(snn_levels) == set(ann) and len(ann) > 0
    for site, level in snn_levels.items():
        assert torch.equal(level, ann[site]), site
    assert any(level.sum() > 0 for level in snn_levels.values())  # the network really spikes
    torch.testing.assert_close(simulated.logits, logits, rtol=0, atol=1e-9)
    evaluated = snn.evaluate(x)
    torch.testing.assert_close(evaluated.logits, simulated.logits, rtol=0, atol=1e-9)
    assert all(torch.equal(evaluated.spikes[k], simulated.spikes[k]) for k in simulated.spikes)
