"""Fine-tuning a trained file (`ann2snn train --model FILE.onnx`, `--init`): the fine-tuning defaults,
the starting model's accuracy, the divergence guard and the best epoch written (ann2snn/train/guard.py)."""
from __future__ import annotations

import json
import math
import os
import pty
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils.data import Subset

from ann2snn.data.sets import load_dataset, make_loader
from ann2snn.compile.calibrate import quantize_model
from ann2snn.train.prepare import onnx_network
from ann2snn.train import TrainConfig, score_accuracy, load_init
from ann2snn.train.batches import held_out_split
from ann2snn.train.guard import COLLAPSE_DROP, MAX_BACKOFFS, DivergenceGuard
from test_cli import run_cli
from test_train import kill_at_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def float_file(tmp_path_factory) -> str:
    """The zoo digits-cnn trained float for 3 epochs, exported to ONNX by `ann2snn train --float`."""
    path = tmp_path_factory.mktemp("float") / "float.onnx"
    done = run_cli("train", "--model", "digits-cnn", "--data", "digits", "--float", "--epochs", "3", "-o", str(path))
    assert done.returncode == 0, done.stderr
    return str(path)


def fine_tune(source: str, out, *extra: str) -> tuple[dict, str]:
    done = run_cli("train", "--model", source, "--data", "digits", "-T", "2", "-o", str(out), "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def onnxruntime_accuracy(path) -> float:
    """Top-1 accuracy of the written QDQ file on the digits test split, run by onnxruntime."""
    test = load_dataset("digits", "test")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: test.x.numpy()})[0]
    return float((logits.argmax(1) == test.y.numpy()).mean())


def written_accuracy(source: str, weights, data=None) -> float:
    """Accuracy on `data` (default: the digits test split) of the written weights, loaded into the
    trainer's network of `source` at T = 2.
    (onnxruntime's run of the QDQ export computes z in another order: at L = 3 a few images near a
    level boundary may change, more than the epochs of a run differ.)"""
    network = quantize_model(onnx_network(source, 10, (1, 8, 8)), 2, False, (1, 8, 8))
    load_init(network, weights)
    return score_accuracy(network, make_loader(data or load_dataset("digits", "test"), 450), "cpu")[0]


def validation_split() -> Subset:
    """The images a fine-tuning run on digits holds out of its training split for the guard."""
    calib = load_dataset("digits", "calib")
    return Subset(calib, held_out_split(len(calib), TrainConfig(fine_tune=True))[1])


def test_fine_tuning_a_trained_file_with_the_defaults_holds_or_improves_and_writes_the_best_epoch(float_file, tmp_path):
    summary, stderr = fine_tune(float_file, tmp_path / "tuned.onnx", "--epochs", "2")
    tuned = summary["fine_tune"]
    assert (summary["optimizer"], summary["lr"]) == ("adam", 1e-3)
    assert tuned["backoffs"] == 0 and not tuned["stopped"] and "diverged" not in stderr and "epoch 1/" not in stderr
    # the choice reads the validation split; the accuracy reported is the test split's, of the model chosen
    accuracies = [tuned["start_accuracy"]] + [h["val_acc"] for h in summary["history"]]
    assert tuned["best_epoch"] == int(np.argmax(accuracies)) and tuned["best_accuracy"] == max(accuracies)
    assert tuned["best_accuracy"] >= tuned["start_accuracy"] > 0.5
    assert written_accuracy(float_file, tmp_path / "tuned.safetensors") == summary["test_accuracy"] > 0.5
    if tuned["best_epoch"] > 0:
        assert summary["test_accuracy"] == summary["history"][tuned["best_epoch"] - 1]["test_acc"]
    assert onnxruntime_accuracy(tmp_path / "tuned.onnx") > 0.8


def test_a_terminal_gets_a_line_per_epoch(float_file, tmp_path):
    """tqdm on stderr: on a terminal, the starting model's accuracy and a line per epoch (the run
    above, with stderr a pipe, printed none)."""
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ann2snn", "train", "--model", float_file, "--data", "digits",
                                "-T", "2", "--epochs", "2", "-o", str(tmp_path / "out.onnx")],
                               stdout=subprocess.DEVNULL, stderr=slave,
                               env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # EIO: the command ended and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=600) == 0
    shown = b"".join(chunks).decode()
    assert "epoch 0 (the starting model): validation accuracy" in shown and "test accuracy" in shown
    assert "epoch 1/2: loss" in shown and "epoch 2/2: loss" in shown and ", best: epoch" in shown


def test_a_forced_divergence_is_caught_reported_and_the_starting_model_is_written(float_file, tmp_path):
    summary, stderr = fine_tune(float_file, tmp_path / "diverged.onnx", "--epochs", "6", "--lr", "1e3")
    tuned = summary["fine_tune"]
    diverged = [h for h in summary["history"] if h["guard"]]
    assert diverged and all(h["val_acc"] < 0.3 and h["test_acc"] < 0.3 for h in diverged)        # it truly diverged, every epoch
    assert tuned["backoffs"] == MAX_BACKOFFS and tuned["stopped"] and tuned["epochs_done"] == MAX_BACKOFFS + 1 < 6
    assert "ann2snn: warning: training diverged at epoch 1: validation accuracy" in stderr
    assert "keeping the starting model" in stderr and any("keeping the starting model" in w for w in tuned["warnings"])
    assert tuned["best_epoch"] == 0 and tuned["start_accuracy"] > 0.5
    written = tmp_path / "diverged.safetensors"   # the starting model: the guard's number is its validation accuracy
    assert written_accuracy(float_file, written) == summary["test_accuracy"] > 0.5
    assert written_accuracy(float_file, written, validation_split()) == tuned["start_accuracy"]
    assert onnxruntime_accuracy(tmp_path / "diverged.onnx") > 0.8


def test_the_starting_accuracy_is_measured_on_the_file_given(float_file, tmp_path):
    """A file whose classifier weights are zeroed starts at chance (one class: 10% of digits), the
    trained file far above it: the measurement reads the model, not the file's float accuracy."""
    model = onnx.load(float_file)
    last = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    for tensor in model.graph.initializer:
        if tensor.name in last.input:
            tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    summary, _ = fine_tune(str(broken), tmp_path / "out.onnx", "--epochs", "1")
    assert summary["fine_tune"]["start_accuracy"] < 0.15
    assert summary["fine_tune"]["best_epoch"] == 1 and summary["test_accuracy"] > 0.5


def test_with_the_spike_regularizer_a_fine_tuned_epoch_is_written(float_file, tmp_path):
    summary, stderr = fine_tune(float_file, tmp_path / "sparse.onnx", "--epochs", "1", "--beta", "1e-3")
    tuned = summary["fine_tune"]
    assert tuned["best_epoch"] == 1 and summary["test_accuracy"] == summary["history"][0]["test_acc"]
    assert summary["spikes_per_image"] < tuned["start_spikes_per_image"]
    below = tuned["best_accuracy"] < tuned["start_accuracy"]
    assert tuned["below_start"] == below and ("below the starting model's" in stderr) == below


def test_training_from_scratch_refuses_a_loss_that_is_not_finite(tmp_path):
    done = run_cli("train", "--model", "digits-cnn", "--data", "digits", "--epochs", "1", "--lr", "1e6",
                   "-o", str(tmp_path / "out.onnx"))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "ann2snn: error: training diverged at epoch 1: the loss is nan; lower the learning rate or clip the "
        "gradient norm"]
    assert not list(tmp_path.iterdir())


def test_the_help_states_the_guards_limits():
    from hostile import invoke

    shown = " ".join(invoke("train", "--help").stdout.split())
    assert f"more than {100 * COLLAPSE_DROP:g} points below the start" in shown
    assert f"halves the learning rate ({MAX_BACKOFFS} times, then the run stops)" in shown


# --- the guard alone ----------------------------------------------------------------------------


def _run(start_accuracy: float = 0.9, start_competes: bool = True):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()   # a momentum buffer the back-off must drop
    return model, optimizer, scheduler, DivergenceGuard(model, start_accuracy, 100.0, start_competes)


def test_the_guard_keeps_a_better_epoch_and_passes_a_small_dip():
    model, optimizer, scheduler, guard = _run()
    assert guard.after_epoch(1, model, 0.5, 0.9 - COLLAPSE_DROP / 2, optimizer, scheduler) is None
    assert guard.best.epoch == 0
    with torch.no_grad():
        model.weight.add_(1.0)
    assert guard.after_epoch(2, model, 0.4, 0.95, optimizer, scheduler) is None
    assert guard.best.epoch == 2 and torch.equal(guard.best.state["weight"], model.weight)
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.state


def test_with_the_spike_regularizer_the_start_is_no_candidate_and_a_lower_best_is_said():
    """beta > 0: the best epoch that did not diverge is written, even below the start, with a line saying so."""
    model, optimizer, scheduler, guard = _run(start_competes=False)
    assert guard.after_epoch(1, model, 0.5, 0.87, optimizer, scheduler) is None
    assert guard.after_epoch(2, model, 0.5, 0.86, optimizer, scheduler) is None
    assert guard.best.epoch == 1
    history = [{"epoch": 1, "val_acc": 0.87, "spikes_per_image": 40.0, "guard": None},
               {"epoch": 2, "val_acc": 0.86, "spikes_per_image": 30.0, "guard": None}]
    record, verdict = guard.finish(model, history)
    assert record["best_epoch"] == 1 and record["below_start"] and record["warnings"] == [verdict]
    assert verdict == ("the best fine-tuned epoch, 1, reached 87.00% at 40 spikes per image, below the starting "
                       "model's validation accuracy of 90.00% at 100: writing epoch 1, as --beta trades accuracy for "
                       "spikes")
    _, _, _, competing = _run(start_competes=True)
    assert competing.after_epoch(1, model, 0.5, 0.87, optimizer, scheduler) is None and competing.best.epoch == 0
    assert not competing.finish(model, history[:1])[0]["below_start"]


@pytest.mark.parametrize("broken", ["nan loss", "inf weight", "collapse"])
def test_the_guard_backs_off_from_a_broken_epoch_and_stops_after_its_back_offs(broken):
    model, optimizer, scheduler, guard = _run()
    start = model.weight.detach().clone()
    for epoch in range(1, MAX_BACKOFFS + 2):
        with torch.no_grad():
            model.weight.add_(math.inf if broken == "inf weight" else 1.0)
        loss = math.nan if broken == "nan loss" else 0.5
        accuracy = 0.9 - 2 * COLLAPSE_DROP if broken == "collapse" else 0.95
        message = guard.after_epoch(epoch, model, loss, accuracy, optimizer, scheduler)
        reason = {"nan loss": "the loss is nan", "inf weight": "tensor 'weight' is not finite",
                  "collapse": "below the starting model's 90.00%"}[broken]
        assert message is not None and f"training diverged at epoch {epoch}: " in message and reason in message
        if epoch <= MAX_BACKOFFS:
            assert "restored epoch 0 (90.00%)" in message and torch.equal(model.weight, start)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** epoch) and not optimizer.state
            assert not guard.stopped
    assert guard.stopped and "stopped after" in message and guard.best.epoch == 0


def test_a_killed_fine_tuning_run_resumes_to_the_same_best_model(float_file, tmp_path):
    """The best weights so far sit in the weights file, written just before each checkpoint: a run
    killed after its first checkpoint resumes to what an uninterrupted run writes."""
    from ann2snn.train.checkpoint import load_tensors
    from ann2snn.train import train

    run = {"model": float_file, "timesteps": 2, "epochs": 3, "fine_tune": True, "train_limit": 640}
    output = tmp_path / "killed.safetensors"
    kill_at_first_checkpoint(run, output)
    resumed = train(TrainConfig(**run, output=str(output), resume=True), progress=False)
    fresh = train(TrainConfig(**run, output=str(tmp_path / "fresh.safetensors")), progress=False)
    assert resumed.fine_tune == fresh.fine_tune and resumed.test_accuracy == fresh.test_accuracy
    got, want = load_tensors(output)[0], load_tensors(tmp_path / "fresh.safetensors")[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    again = train(TrainConfig(**run, output=str(output), resume=True), progress=False)   # a finished run
    assert again.fine_tune == fresh.fine_tune and again.test_accuracy == fresh.test_accuracy
