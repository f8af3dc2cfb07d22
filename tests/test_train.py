"""Training (docs/method.md sections 1 and 5): sites, calibration, the spike regularizer, checkpoints."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ann2snn import models
from ann2snn.train.checkpoint import load_checkpoint, load_tensors, save_tensors
from ann2snn.data.sets import load_dataset
from ann2snn.errors import Ann2SnnError
from ann2snn.train.export import export_onnx
from ann2snn.runtime.quant import QuantClippedActivation
from ann2snn.levels import popcount_levels, quantize_levels
from ann2snn.compile.calibrate import activation_sites, calibrate_clips, quantize_model
from ann2snn.train import TrainConfig, score_accuracy, load_init, spike_regularizer, train
from ann2snn.train.batches import epoch_loader

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def float_weights(tmp_path_factory) -> tuple[Path, float]:
    """A float ANN (clipped ReLU sites, quantize=False) trained on digits, and its test accuracy."""
    path = tmp_path_factory.mktemp("float") / "float.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: runs before the function-scoped one_thread fixture
    try:
        result = train(TrainConfig(epochs=20, lr=0.05, float_only=True, output=str(path)), progress=False)
    finally:
        torch.set_num_threads(threads)
    return path, result.test_accuracy


def calibrated_digits_cnn(train_set, timesteps: int = 3, per_channel: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = quantize_model(models.build_model("digits-cnn", 10), timesteps, per_channel, (1, 8, 8))
    calibrate_clips(model, [(train_set.x[:256], train_set.y[:256])])
    return model


# --- sites and calibration ------------------------------------------------------------------

def test_quantize_model_replaces_every_relu_like_site():
    model = quantize_model(models.build_model("digits-cnn", 10), 3, per_channel=True, input_shape=(1, 8, 8))
    sites = activation_sites(model)
    assert list(sites) == ["act1", "act2", "act3"]
    assert all(s.levels == 7 for s in sites.values())
    assert [tuple(s.clip.shape) for s in sites.values()] == [(16,), (32,), (64,)]
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    # Source bounds: ReLU6 / Hardtanh(0, c) keep c, a site keeps its lambda, a ReLU waits for calibration.
    mixed = quantize_model(nn.Sequential(nn.ReLU6(), nn.Hardtanh(0.0, 2.5), QuantClippedActivation(3, clip=1.5),
                                         nn.ReLU()), 2)
    assert [s.clip.item() for s in activation_sites(mixed).values()] == [6.0, 2.5, 1.5, math.inf]
    with pytest.raises(Ann2SnnError, match="input shape"):
        quantize_model(models.build_model("digits-cnn", 10), 3, per_channel=True)


@pytest.mark.parametrize("per_channel", [False, True])
def test_calibration_sets_lambda_to_the_percentile(per_channel):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 4, 4, generator=generator) * torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    model = quantize_model(nn.Sequential(nn.Identity(), nn.ReLU()), 2, per_channel, input_shape=(3, 4, 4))
    lam = calibrate_clips(model, [(x[:120], None), (x[120:], None)], percentile=99.0)["1"]
    rows = x.transpose(0, 1).reshape(3, -1) if per_channel else x.reshape(1, -1)
    expected = torch.stack([torch.quantile(r[r > 0].double(), 0.99) for r in rows]).float()
    assert torch.allclose(lam.reshape(-1), expected, rtol=1e-6)
    assert torch.equal(model[1].clip.detach(), lam)
    # A ReLU6 site never gets a lambda above 6: the float activations never exceed it.
    capped = quantize_model(nn.Sequential(nn.Identity(), nn.ReLU6()), 2)
    assert calibrate_clips(capped, [(x * 10, None)])["1"].item() == 6.0


# --- the spike regularizer -------------------------------------------------------------------

def test_spike_regularizer_counts_popcounts_and_has_a_surrogate_gradient(digits_train):
    model = calibrated_digits_cnn(digits_train, timesteps=3)
    inputs: dict[str, torch.Tensor] = {}
    sites = activation_sites(model)
    for name, site in sites.items():
        site.record_spikes = True
        site.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].detach()))
    model(digits_train.x[:32])
    reg = spike_regularizer(model)
    # Forward: the exact spike count popcount(q), summed over sites and neurons, averaged over the batch.
    exact = sum(popcount_levels(quantize_levels(inputs[n], s.theta().detach(), s.levels), s.levels).sum()
                for n, s in sites.items()) / 32
    assert reg.item() == pytest.approx(exact.item(), rel=1e-6) and reg.item() > 0
    reg.backward()
    assert all(model.get_parameter(p).grad.abs().sum() > 0 for p in ("conv1.weight", "conv2.weight", "conv3.weight"))


def test_float_then_qat_reaches_97_percent_and_beta_lowers_spikes(float_weights):
    path, float_accuracy = float_weights
    assert float_accuracy >= 0.97
    runs = {beta: train(TrainConfig(epochs=6, lr=0.01, timesteps=2, beta=beta, init=str(path)), progress=False)
            for beta in (0.0, 1e-3)}
    assert runs[0.0].test_accuracy >= 0.97
    assert runs[1e-3].spikes_per_image < 0.7 * runs[0.0].spikes_per_image
    # The final metrics are those of score_accuracy, and the per-site counts add up.
    loader = [(x, y) for x, y in torch.utils.data.DataLoader(load_dataset("digits", "test"), batch_size=64)]
    accuracy, spikes = score_accuracy(runs[0.0].model, loader, "cpu")
    assert accuracy == runs[0.0].test_accuracy
    assert spikes == pytest.approx(runs[0.0].spikes_per_image) == pytest.approx(sum(runs[0.0].spikes_per_site.values()))


# --- initialization -------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_init_from_onnx_matches_parameters_by_name(tmp_path, digits_train):
    source = calibrated_digits_cnn(digits_train, per_channel=True)
    with torch.no_grad():
        source.bn2.running_mean.uniform_(-1, 1)
    export_onnx(source, (1, 8, 8), tmp_path / "m.onnx", qdq=True)
    torch.manual_seed(1)
    target = quantize_model(models.build_model("digits-cnn", 10), 3, True, (1, 8, 8))
    loaded = load_init(target, tmp_path / "m.onnx")
    expected = {k for k in source.state_dict() if not k.endswith(("clip", "num_batches_tracked"))}
    assert loaded == expected
    assert all(torch.equal(source.state_dict()[k], target.state_dict()[k]) for k in expected)
    wrong = quantize_model(models.build_model("digits-cnn", 5), 3, True, (1, 8, 8))
    with pytest.raises(Ann2SnnError, match=r"'fc.weight' has shape \(10, 1024\), the model needs \(5, 1024\)"):
        load_init(wrong, tmp_path / "m.onnx")
    # torch.onnx.export in eval mode folds BN into Conv and renames the weights: refused by name.
    torch.onnx.export(source.eval(), (torch.zeros(1, 1, 8, 8),), tmp_path / "folded.onnx", dynamo=False)
    with pytest.raises(Ann2SnnError, match="no tensor for conv1.weight"):
        load_init(target, tmp_path / "folded.onnx")


# --- checkpoints: kill, resume, no pickle ---------------------------------------------------

# A short QAT run from scratch: 10 steps an epoch, so the kill lands well before its end.
RUN = {"epochs": 4, "lr": 0.05, "timesteps": 2, "beta": 1e-4, "train_limit": 640}


def run_config(output: Path, **kw) -> TrainConfig:
    return TrainConfig(**RUN, output=str(output), **kw)


def kill_at_first_checkpoint(run: dict, output: Path) -> None:
    """train(TrainConfig(**run, output=output)) in a subprocess, killed (SIGKILL) as soon as its first
    checkpoint, OUTPUT.ckpt, exists."""
    ckpt = Path(f"{output}.ckpt")
    script = ("import torch; torch.set_num_threads(1)\n"
              "from ann2snn.train import TrainConfig, train\n"
              f"train(TrainConfig(**{run!r}, output={str(output)!r}), progress=False)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert process.poll() is None, "the training subprocess ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    output = tmp_path / "killed.safetensors"
    ckpt = Path(f"{output}.ckpt")
    kill_at_first_checkpoint(RUN, output)
    killed_at = load_checkpoint(ckpt).epoch
    assert 1 <= killed_at < 4 and not output.exists()

    # The checkpoint is plain safetensors: tensors plus JSON metadata, nothing to unpickle.
    with safe_open(str(ckpt), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["ann2snn"])
    assert {"model.conv1.weight", "model.act1.clip", "rng.torch"} <= keys
    assert any(k.startswith("optimizer.") and k.endswith("momentum_buffer") for k in keys)
    assert meta["epoch"] == killed_at and meta["config"]["epochs"] == 4 and len(meta["history"]) == killed_at
    assert {"param_groups", "state"} <= set(meta["optimizer"]) and "last_epoch" in meta["scheduler"]
    with open(ckpt, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        assert f.read(1) == b"{" and header > 0  # a safetensors JSON header, not a pickle (0x80)

    resumed = train(run_config(output, resume=True), progress=True)
    fresh = train(run_config(tmp_path / "fresh.safetensors"), progress=False)
    got, _ = load_tensors(output)
    want, _ = load_tensors(tmp_path / "fresh.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [h["test_acc"] for h in resumed.history] == [h["test_acc"] for h in fresh.history]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in fresh.history]

    # Resuming a finished run trains nothing; resuming with other settings is refused.
    again = train(run_config(output, resume=True), progress=False)
    assert again.test_accuracy == fresh.test_accuracy and len(again.history) == 4
    with pytest.raises(Ann2SnnError, match="changed: lr"):
        train(TrainConfig(**{**RUN, "lr": 0.1}, output=str(output), resume=True), progress=False)


# --- safeguards and float variants ------------------------------------------------------------

def test_gradient_norm_is_clipped(tmp_path):
    """The first SGD step moves the parameters by lr times the gradient, clipped to max_grad_norm."""
    torch.manual_seed(0)
    start = tmp_path / "start.safetensors"
    save_tensors(start, models.build_model("digits-cnn", 10).state_dict(), {"format": "ann2snn-weights"})
    base = models.build_model("digits-cnn", 10)
    load_init(base, start)
    moved = {}
    for clip in (1e-3, None):
        config = TrainConfig(float_only=True, float_activation="plain", epochs=1, train_limit=64, lr=1.0,
                             weight_decay=0.0, max_grad_norm=clip, init=str(start))
        model = train(config, progress=False).model
        moved[clip] = torch.sqrt(sum(((p - q.detach()) ** 2).sum() for p, q in
                                     zip(model.parameters(), base.parameters()))).item()
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moved[None] > 10 * moved[1e-3]


def test_plain_float_training_keeps_the_models_relus():
    result = train(TrainConfig(float_only=True, float_activation="plain", epochs=1, train_limit=128), progress=False)
    assert not activation_sites(result.model)
    assert sum(isinstance(m, nn.ReLU) for m in result.model.modules()) == 3
    assert result.spikes_per_image == 0
    with pytest.raises(Ann2SnnError, match="needs float_only"):
        train(TrainConfig(float_activation="plain", epochs=1, train_limit=64), progress=False)


@pytest.mark.parametrize("workers", [0, 1])
def test_image_folder_augmentation_of_an_epoch_does_not_depend_on_earlier_epochs(tmp_path, workers):
    """Epoch e's random crops and flips come from seed + e, in the main process or in workers: a
    resumed run (which starts at epoch e) draws what an uninterrupted run draws there."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        for k in range(3):
            folder = tmp_path / "imgs" / "train" / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (24, 32, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{k}.png")
    dataset = load_dataset(str(tmp_path / "imgs"), "train", image_size=16, resize_size=20)
    config = TrainConfig(data=str(tmp_path / "imgs"), batch_size=4, workers=workers, seed=3)

    def epoch_batches(epoch):
        return [x for x, _ in epoch_loader(dataset, config, epoch)]

    uninterrupted = [epoch_batches(0), epoch_batches(1)]
    resumed = epoch_batches(1)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[1], resumed))
    # the augmentation is random: another epoch draws other crops of the same images (a sum over
    # the epoch, which the shuffle order does not change)
    assert torch.cat(uninterrupted[0]).sum() != torch.cat(uninterrupted[1]).sum()
