"""The CUDA path on a real GPU (skipped without one): the SNN on CUDA in channels_last with the
Triton neuron gives the CPU's logits and spike counts, evaluate equals simulate there, the replayed
CUDA graph equals the eager run, and `score_snn`'s side-stream prefetch counts what the CPU
counts. Exact equality across devices and between the two modes is asserted in float64, where
docs/method.md section 4 promises it; in float32 a level may move by one where z / theta lies within
rounding distance of a boundary, so there the graph must equal the eager run exactly and the
devices must agree on all but a few spikes."""
from __future__ import annotations

import pytest
import torch

import ann2snn
from ann2snn import models
from ann2snn.runtime.scoring import score_snn
from ann2snn.runtime.quant import QuantClippedActivation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CASES = [("digits-cnn", (1, 8, 8), 3), ("resnet20", (3, 32, 32), 4), ("mobilenetv2", (3, 64, 64), 2)]


def _snn(name: str, timesteps: int, dtype: torch.dtype = torch.float64) -> ann2snn.SNN:
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=10, activation=lambda c: QuantClippedActivation(
        levels=2**timesteps - 1, channels=c)).eval()
    return ann2snn.convert(model.to(dtype), T=timesteps)


def _same_counts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu().long(), b[k].cpu().long()) for k in a)


@pytest.mark.parametrize("name,shape,timesteps", CASES)
def test_cuda_evaluate_equals_cpu_and_simulate(name: str, shape: tuple[int, ...], timesteps: int) -> None:
    snn = _snn(name, timesteps)
    x = torch.rand((32, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cpu = snn.evaluate(x)
    gpu = snn.to("cuda").to(memory_format=torch.channels_last)
    x_gpu = x.cuda().contiguous(memory_format=torch.channels_last)
    eager = gpu.evaluate(x_gpu, cuda_graph=False)
    graphed = gpu.evaluate(x_gpu)
    simulated = gpu.simulate(x_gpu)
    assert sum(int(c.sum()) for c in cpu.spikes.values()) > 0, "a network that never fires tests nothing"
    assert torch.equal(cpu.logits.argmax(1), eager.logits.argmax(1).cpu())
    torch.testing.assert_close(eager.logits.cpu(), cpu.logits, rtol=1e-5, atol=1e-5)
    assert _same_counts(cpu.spikes, eager.spikes)
    assert _same_counts(eager.spikes, simulated.spikes)
    assert torch.equal(graphed.logits, eager.logits) and _same_counts(graphed.spikes, eager.spikes)


def test_cuda_float32_spikes_agree_with_cpu() -> None:
    snn = _snn("resnet20", 4, torch.float32)
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cpu = snn.evaluate(x)
    gpu = snn.to("cuda").to(memory_format=torch.channels_last)
    x_gpu = x.cuda().contiguous(memory_format=torch.channels_last)
    graphed, eager = gpu.evaluate(x_gpu), gpu.evaluate(x_gpu, cuda_graph=False)
    assert torch.equal(graphed.logits, eager.logits) and _same_counts(graphed.spikes, eager.spikes)
    for site, count in cpu.spikes.items():
        difference = (eager.spikes[site].cpu().long() - count.long()).abs().sum().item()
        assert difference <= 1e-3 * count.sum().item(), (site, difference)


def test_cuda_graph_outputs_survive_the_next_batch_and_follow_shapes() -> None:
    snn = _snn("resnet20", 3).cuda()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.rand(n, 3, 32, 32, generator=gen, dtype=torch.float64).cuda() for n in (8, 8, 5, 8)]
    graphed = [snn.evaluate(x) for x in batches]    # two shapes: two captured graphs
    eager = [snn.evaluate(x, cuda_graph=False) for x in batches]
    for g, e in zip(graphed, eager):
        assert torch.equal(g.logits, e.logits) and _same_counts(g.spikes, e.spikes)
    assert not torch.equal(graphed[0].logits, graphed[1].logits), "results must not share the graph's buffers"


def test_cuda_evaluate_snn_prefetch_counts_like_cpu() -> None:
    snn = _snn("resnet20", 4)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(40, 3, 32, 32, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    batches = [(x[i:i + 16].pin_memory(), y[i:i + 16]) for i in range(0, 40, 16)]
    on_cpu = score_snn(snn, batches, device="cpu", progress=False)
    on_gpu = score_snn(_snn("resnet20", 4), batches, device="cuda", progress=False)
    assert (on_gpu.top1, on_gpu.top5) == (on_cpu.top1, on_cpu.top5)
    assert on_gpu.layer_spikes_per_image == on_cpu.layer_spikes_per_image
