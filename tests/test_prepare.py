"""ann2snn.train.prepare / spike_penalty (issue 17): quantization-aware fine-tuning of a model from outside the zoo,
then an exact conversion and a QDQ export that `ann2snn convert` converts exactly."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.data.sets import load_dataset
from ann2snn.errors import Ann2SnnError, UnsupportedModelError
from ann2snn.frontend.reader import onnxruntime_session
from ann2snn.verify.gate import check_exact
from ann2snn.runtime.quant import QuantClippedActivation
from hostile import invoke

STEPS = 40
BETA = 1e-3


class ResidualNet(nn.Module):
    """Not a zoo model: sites from F.relu, nn.ReLU6 and torch.clamp(min=0), a residual add, max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = self.relu6(self.conv1(x))
        x = torch.clamp(self.conv2(y) + x, min=0)
        return self.head(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def fit(qat: nn.Module, train, beta: float, steps: int = STEPS) -> list[float]:
    """`steps` SGD steps of cross-entropy + beta * spike_penalty on seeded batches; the cross-entropies."""
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    losses = []
    qat.train()
    for _ in range(steps):
        index = torch.randint(len(train), (64,), generator=generator)
        ce = F.cross_entropy(qat(train.x[index]), train.y[index])
        loss = ce + beta * ann2snn.spike_penalty(qat)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(ce.item())
    return losses


@torch.no_grad()
def accuracy_and_spikes(qat: nn.Module, test) -> tuple[float, float]:
    qat.eval()
    accuracy = (qat(test.x).argmax(1) == test.y).float().mean().item()
    return accuracy, ann2snn.spike_penalty(qat).item()


@pytest.fixture(scope="module", params=[False, True], ids=["per-layer", "per-channel"])
def trained(request, digits):
    """The user's model, its state before prepare, and the QAT copy after training with BETA."""
    train, _ = digits
    torch.manual_seed(0)
    model = ResidualNet()
    before = copy.deepcopy(model.state_dict())
    qat = ann2snn.prepare(model, T=3, example_input=train.x[:256], per_channel=request.param)
    losses = fit(qat, train, BETA)
    return model, before, qat.eval(), losses


def test_prepare_makes_every_relu_like_op_a_calibrated_site(trained):
    _, _, qat, _ = trained
    sites = {n: m for n, m in qat.named_modules() if isinstance(m, QuantClippedActivation)}
    assert sorted(sites) == ["clamp", "relu", "relu6"]
    assert all(s.levels == 7 and s.record_spikes and s.clip.requires_grad for s in sites.values())
    assert all(torch.isfinite(s.clip).all() for s in sites.values())
    assert bool((sites["relu6"].clip <= 6).all())  # calibration keeps the ReLU6's bound as a cap
    assert all(s.per_channel == (s.clip.numel() == 8) for s in sites.values())


def test_training_learns_and_the_user_model_is_untouched(trained, digits):
    model, before, qat, losses = trained
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert accuracy_and_spikes(qat, digits[1])[0] > 0.5  # chance is 0.1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == [type(m) for m in ResidualNet().modules()]
    assert not {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in qat.parameters()}


def test_spike_penalty_has_a_gradient_and_beta_lowers_the_spikes(digits):
    train, test = digits
    torch.manual_seed(1)
    qat = ann2snn.prepare(ResidualNet(), T=3, example_input=train.x[:256])
    qat(train.x[:32])
    penalty = ann2snn.spike_penalty(qat)
    penalty.backward()
    assert penalty.item() > 0 and penalty.requires_grad
    assert qat.stem.weight.grad.abs().sum() > 0 and qat.relu.clip.grad.abs().sum() > 0
    qat.zero_grad()
    spikes = {}
    for beta in (0.0, BETA):
        copy_ = copy.deepcopy(qat)
        fit(copy_, train, beta)
        spikes[beta] = accuracy_and_spikes(copy_, test)[1]
    assert spikes[BETA] < 0.9 * spikes[0.0], spikes


def test_convert_is_exact(trained, digits):
    _, _, qat, _ = trained
    snn = ann2snn.convert(qat)
    assert snn.timesteps == 3
    assert check_exact(qat, snn, digits[1].x[:64]).passed


def test_exported_onnx_runs_and_cli_convert_verifies(trained, digits, tmp_path):
    _, _, qat, _ = trained
    x = digits[1].x[:64]
    path = ann2snn.export_onnx(qat, tmp_path / "qat.onnx", x)
    logits = onnxruntime_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = qat(x)
    assert logits.shape == (64, 10)
    assert (torch.from_numpy(logits).argmax(1) == expected.argmax(1)).float().mean() >= 0.95
    result = invoke("convert", path, "--json", "--verify-data", "digits", "-o", tmp_path / "qat.snn")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verify"]["passed"] and report["timesteps"] == 3


class AllForms(nn.Module):
    """Every ReLU-like form prepare recognises, and one nn.ReLU called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.relu, self.hardtanh = nn.ReLU(), nn.Hardtanh(0.0, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        x = torch.relu(x).clamp(min=0, max=3.0)
        return self.hardtanh(x.relu() * 2) + F.relu(torch.clamp(x, 0.0))


def test_every_relu_like_form_becomes_its_own_site():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    qat = ann2snn.prepare(AllForms(), T=2, example_input=x)
    sites = {n: m for n, m in qat.named_modules() if isinstance(m, QuantClippedActivation)}
    assert len(sites) == 8  # relu twice, torch.relu, clamp, hardtanh, x.relu(), F.relu, torch.clamp
    assert sites["hardtanh"].clip.item() <= 2.0
    ann2snn.convert(qat)


def test_a_step_that_drives_lambda_below_zero_still_converts():
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(0))
    qat = ann2snn.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), T=2, example_input=x)
    with torch.no_grad():
        qat.get_submodule("1").clip.fill_(-1.0)  # what an optimizer step may do
    assert check_exact(qat, ann2snn.convert(qat), x).passed  # converted as the next forward computes it
    qat(x)
    assert qat.get_submodule("1").clip.item() > 0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return F.relu(self.fc(x))
        return self.fc(x)


class Leaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act, self.leaky = nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU(), nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.leaky(self.act(self.fc1(x))))


class ClampMinusOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.fc(x), min=-1)


@pytest.mark.parametrize("model, fragments", [
    (Untraceable(), ("Untraceable", "torch.fx cannot trace", "data-dependent control flow")),
    (ClampMinusOne(), ("node clamp", "lower bound -1")),
    (nn.Sequential(nn.Linear(4, 2)), ("no ReLU-like activation",)),
], ids=["untraceable", "clamp-min-1", "no-site"])
def test_prepare_refusals_are_one_line(model, fragments):
    with pytest.raises(Ann2SnnError) as err:
        ann2snn.prepare(model, T=3, example_input=torch.rand(8, 4))
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_leaky_relu_stays_and_convert_names_it():
    qat = ann2snn.prepare(Leaky(), T=3, example_input=torch.rand(8, 4))
    assert isinstance(qat.leaky, nn.LeakyReLU) and isinstance(qat.act, QuantClippedActivation)
    with pytest.raises(UnsupportedModelError, match="LeakyReLU") as err:
        ann2snn.convert(qat)
    assert "\n" not in str(err.value)


# The example of docs/python-api.md's prepare section, read from the page and run as written.
API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def docs_example() -> str:
    """The first Python block after the page's heading of `ann2snn.prepare`."""
    text = API_PAGE.read_text()
    section = text[text.index("## Fine-tuning your own model: `ann2snn.prepare`"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    example = docs_example()
    assert "ann2snn.prepare(" in example and "ann2snn.export_onnx(" in example
    exec(compile(example, str(API_PAGE), "exec"), scope)
    test = load_dataset("digits", "test")
    assert (scope["logits"].argmax(1) == test.y).float().mean() > 0.8
    assert (tmp_path / "qat.onnx").is_file()
