"""Fine-tuning from trained weights: the starting model's accuracy, the best epoch, a divergence guard.

A run that starts from trained weights (`TrainConfig.fine_tune`, what `ann2snn train --model
FILE.onnx` and `--init` run) never hands back a model worse than the one it started from without
saying so:

- every accuracy the guard reads is on the validation split: a share of the training split
  (TrainConfig.validation, 10% by default) held out from training and calibration, never the test
  split, so that the test accuracy of the model it selects is an honest one;
- the starting model (the trained weights with their sites quantized and calibrated) is evaluated
  on the validation split before the first step: it is epoch 0;
- after every epoch, a loss or a weight that is not finite, or a validation accuracy more than
  COLLAPSE_DROP below the starting model's, is a divergence: the best weights so far come back, the
  optimizer's state (momentum, Adam's moments) is dropped and the learning rate halved; the
  divergence after MAX_BACKOFFS back-offs stops the run;
- the best epoch by validation accuracy (the earlier one on a tie) is the model the run returns and
  writes. Without the spike regularizer the starting model takes part; with it (beta > 0) only the
  epochs that did not diverge do, since the start was not trained for fewer spikes: a best epoch
  below the starting model's accuracy is then written with a warning line saying so.

The best weights so far are also written to the run's weights file with every checkpoint, so that
a resumed run continues with the same best model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_tensors, save_tensors
from ..errors import Ann2SnnError

# A validation accuracy this far below the starting model's is a collapse, not the noise of one epoch.
COLLAPSE_DROP = 0.05
# Back-offs (restore the best weights, halve the learning rate) before a divergence stops the run.
MAX_BACKOFFS = 3


@dataclass
class BestModel:
    epoch: int                     # 0: the starting model
    accuracy: float
    state: dict[str, Tensor]


class DivergenceGuard:
    """The starting model's accuracy, the best epoch so far, and the back-offs of one run."""

    def __init__(self, model: nn.Module, start_accuracy: float, start_spikes: float, start_competes: bool) -> None:
        self.start_accuracy, self.start_spikes, self.start_competes = start_accuracy, start_spikes, start_competes
        self.best = BestModel(0, start_accuracy, _copy_state(model))   # also where a back-off returns to
        self.backoffs = 0
        self.stopped = False

    def after_epoch(self, epoch: int, model: nn.Module, loss: float, accuracy: float, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> str | None:
        """Keep epoch `epoch` if it is the best so far, or back off or stop if it diverged; returns
        the message of a back-off or stop, else None."""
        reason = self._divergence(model, loss, accuracy)
        if reason is None:
            if accuracy > self.best.accuracy or (self.best.epoch == 0 and not self.start_competes):
                self.best = BestModel(epoch, accuracy, _copy_state(model))
            return None
        kept = f"epoch {self.best.epoch} ({100 * self.best.accuracy:.2f}%)"
        if self.backoffs >= MAX_BACKOFFS:
            self.stopped = True
            return (f"training diverged at epoch {epoch}: {reason}; stopped after {MAX_BACKOFFS} back-offs, "
                    f"keeping {kept}")
        self.backoffs += 1
        model.load_state_dict(self.best.state)
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
        # CosineAnnealingLR's next step scales the groups' lr; base_lrs too, for a closed-form step.
        scheduler.base_lrs = [lr * 0.5 for lr in scheduler.base_lrs]
        return (f"training diverged at epoch {epoch}: {reason}; restored {kept} and halved the learning rate "
                f"to {optimizer.param_groups[0]['lr']:.3g} (back-off {self.backoffs} of {MAX_BACKOFFS})")

    def _divergence(self, model: nn.Module, loss: float, accuracy: float) -> str | None:
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        broken = next((name for name, value in model.state_dict().items()
                       if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
        if broken is not None:
            return f"tensor {broken!r} is not finite"
        if accuracy < self.start_accuracy - COLLAPSE_DROP:
            return (f"validation accuracy {100 * accuracy:.2f}% fell more than {100 * COLLAPSE_DROP:g} points below "
                    f"the starting model's {100 * self.start_accuracy:.2f}%")
        return None

    def finish(self, model: nn.Module, history: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
        """Load the best weights into `model`. Returns the run's record (TrainResult.fine_tune) and the
        line saying that no fine-tuned epoch beat the starting model (then the one kept), or None."""
        model.load_state_dict(self.best.state)
        start = f"the starting model's validation accuracy of {100 * self.start_accuracy:.2f}%"
        verdict = None
        if self.best.epoch == 0 and self.start_competes:
            tuned = max(history, key=lambda h: h["val_acc"], default=None)
            best_tuned = f"; the best fine-tuned epoch, {tuned['epoch']}, reached {100 * tuned['val_acc']:.2f}%" \
                if tuned is not None else ""
            verdict = f"no fine-tuned epoch beat {start}{best_tuned}: keeping the starting model"
        elif self.best.epoch == 0:
            verdict = f"every fine-tuned epoch diverged: keeping the starting model ({start})"
        elif self.best.accuracy < self.start_accuracy:
            spikes = next(h["spikes_per_image"] for h in history if h["epoch"] == self.best.epoch)
            verdict = (f"the best fine-tuned epoch, {self.best.epoch}, reached {100 * self.best.accuracy:.2f}% at "
                       f"{spikes:.0f} spikes per image, below {start} at {self.start_spikes:.0f}: writing epoch "
                       f"{self.best.epoch}, as --beta trades accuracy for spikes")
        warnings = [h["guard"] for h in history if h.get("guard")] + ([verdict] if verdict else [])
        return {**self.to_json(), "epochs_done": len(history), "warnings": warnings}, verdict

    def to_json(self) -> dict[str, Any]:
        return {"start_accuracy": self.start_accuracy, "start_spikes_per_image": self.start_spikes,
                "best_epoch": self.best.epoch, "best_accuracy": self.best.accuracy,
                "below_start": self.best.accuracy < self.start_accuracy, "backoffs": self.backoffs,
                "stopped": self.stopped}

    # -- resuming ------------------------------------------------------------------------------

    def save(self, path: str | Path, epochs_done: int) -> None:
        """The best weights so far, with what a resumed run needs to go on with them."""
        save_tensors(path, self.best.state, {"format": "ann2snn-weights", "fine_tune": {
            **self.to_json(), "epochs_done": epochs_done}})

    @classmethod
    def resume(cls, path: str | Path, history: list[dict[str, Any]], start_competes: bool) -> "DivergenceGuard":
        """The guard of an interrupted run from its weights file. The file is written just before each
        checkpoint, so it is of the checkpoint's epoch or, killed in between, of the next one, which
        the resumed run computes again to the same weights."""
        path = Path(path)
        try:
            state, meta = load_tensors(path)
            saved = meta["fine_tune"]
            ahead = int(saved["epochs_done"]) - len(history)
            start, start_spikes = float(saved["start_accuracy"]), float(saved["start_spikes_per_image"])
            best = BestModel(int(saved["best_epoch"]), float(saved["best_accuracy"]), state)
        except (Ann2SnnError, KeyError, TypeError, ValueError) as err:
            raise Ann2SnnError(f"{path}: cannot resume the fine-tuning run: its best weights are unreadable "
                               f"({type(err).__name__}: {err})") from None
        if ahead not in (0, 1):
            raise Ann2SnnError(f"{path}: cannot resume the fine-tuning run: its best weights are of epoch "
                               f"{saved['epochs_done']}, the checkpoint of epoch {len(history)}")
        guard = cls.__new__(cls)
        guard.start_accuracy, guard.start_spikes, guard.start_competes, guard.best = \
            start, start_spikes, start_competes, best
        guard.backoffs = sum(1 for h in history if h.get("guard") and not h.get("stopped"))
        guard.stopped = any(h.get("stopped") for h in history)
        return guard


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy in host memory: the best weights need no room on the accelerator."""
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
