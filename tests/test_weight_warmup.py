"""The float-weight warm-up of `--weight-bits` runs (int8 fake quantization starts after N epochs) and
the validation split the fine-tuning guard selects on (issue 27; ann2snn/train/schedule.py, batches.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ann2snn.data.sets import load_dataset
from ann2snn.errors import Ann2SnnError
from ann2snn.ops import NORMS
from ann2snn.train import TrainConfig, train
from ann2snn.train.batches import held_out_split
from ann2snn.train.weight_quant import WeightFakeQuant
from hostile import invoke
from test_train import kill_at_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py

RUN = {"epochs": 3, "timesteps": 2, "train_limit": 256}


def epochs_of(result) -> list[tuple[float, float]]:
    return [(h["loss"], h["test_acc"]) for h in result.history]


def test_the_warm_up_trains_float_weights_then_switches_to_int8_at_its_epoch():
    """Epochs before the switch compute exactly what a float-weight run computes; the next one does not."""
    float_weights = epochs_of(train(TrainConfig(**RUN), progress=False))
    runs = {n: train(TrainConfig(**RUN, weight_bits=8, float_weight_epochs=n), progress=False) for n in (1, 2)}
    for n, run in runs.items():
        assert epochs_of(run)[:n] == float_weights[:n] and epochs_of(run)[n] != float_weights[n]
        layers = [m for m in run.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert layers and all(parametrize.is_parametrized(m, "weight") and
                              isinstance(m.parametrizations.weight[0], WeightFakeQuant) for m in layers)
        assert not any(isinstance(m, NORMS) for m in run.model.modules())   # folded at the switch
    default = train(TrainConfig(**{**RUN, "epochs": 4}, weight_bits=8), progress=False)   # half the epochs
    assert epochs_of(default)[:2] == epochs_of(train(TrainConfig(**{**RUN, "epochs": 4}), progress=False))[:2]


@pytest.mark.parametrize("warm_up", [1, 2])
def test_a_run_killed_before_or_after_the_switch_resumes_to_the_same_model(warm_up, tmp_path):
    run = {**RUN, "weight_bits": 8, "float_weight_epochs": warm_up}
    output = tmp_path / "killed.safetensors"
    kill_at_first_checkpoint(run, output)   # after epoch 1: float weights (warm_up 2) or int8 (warm_up 1)
    resumed = train(TrainConfig(**run, output=str(output), resume=True), progress=False)
    fresh = train(TrainConfig(**run), progress=False)
    assert epochs_of(resumed) == epochs_of(fresh)
    got, want = resumed.model.state_dict(), fresh.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_validation_split_is_held_out_of_the_training_split_and_disjoint_from_test():
    train_set, test = load_dataset("digits", "calib"), load_dataset("digits", "test")
    config = TrainConfig(fine_tune=True, seed=3)
    trained, validation = held_out_split(len(train_set), config)
    assert len(validation) == round(0.1 * len(train_set)) and not set(trained) & set(validation)
    assert sorted(trained + validation) == list(range(len(train_set)))
    assert held_out_split(len(train_set), config) == (trained, validation)          # the seed's draw
    assert held_out_split(len(train_set), TrainConfig(fine_tune=True, seed=4))[1] != validation
    held = train_set.x[validation].flatten(1)
    assert not (held[:, None, :] == test.x.flatten(1)[None, :, :]).all(-1).any()   # no test image among them
    limited, held_limited = held_out_split(len(train_set), TrainConfig(validation=0.25, train_limit=100))
    assert len(held_limited) == 25 and sorted(limited + held_limited) == list(range(100))
    assert held_out_split(len(train_set), TrainConfig()) == (list(range(len(train_set))), [])  # from scratch: none
    with pytest.raises(Ann2SnnError, match="validation 0.001 of 100 training samples holds out 0"):
        held_out_split(len(train_set), TrainConfig(validation=0.001, train_limit=100))


@pytest.mark.parametrize("args, fragment", [
    (["--float-weight-epochs", "2"], "float_weight_epochs 2: a float-weight warm-up before int8 weights needs "
                                     "weight_bits"),
    (["--weight-bits", "8", "--float-weight-epochs", "3"], "float_weight_epochs 3: expected 0 to 2"),
    (["--weight-bits", "8", "--float-weight-epochs", "-1"], "float_weight_epochs -1: expected 0 to 2"),
    (["--weight-bits", "8", "--float-weight-epochs", "1", "--init", "INIT"], "fine-tuning starts from trained"),
    (["--validation", "1"], "validation 1.0: expected the fraction"),
    (["--validation", "-0.1"], "validation -0.1: expected the fraction"),
    (["--validation", "0", "--init", "INIT"], "validation 0: fine-tuning picks its best epoch on a validation"),
    (["--validation", "0.0001", "--init", "INIT"], "validation 0.0001 of 1347 training samples holds out 0"),
])
def test_warm_up_and_validation_refusals_are_one_line(args, fragment, init_weights, tmp_path):
    args = [str(init_weights) if a == "INIT" else a for a in args]
    result = invoke("train", *args, "--epochs", "3", "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    train(TrainConfig(epochs=1, train_limit=64, output=str(path)), progress=False)
    return path
