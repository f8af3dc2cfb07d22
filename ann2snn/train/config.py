"""What a training run is asked to do, and what it gives back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import Ann2SnnError


# lambda is kept above this: a step driving it to zero or below would make theta = lambda / L useless.
MIN_CLIP = 1e-4

@dataclass
class TrainConfig:
    model: str = "digits-cnn"
    data: str = "digits"
    timesteps: int = 3
    beta: float = 0.0
    epochs: int = 40
    lr: float | None = None           # None: DEFAULT_LR of the optimizer (see learning_rate)
    batch_size: int = 64
    optimizer: str | None = None      # "sgd" (with momentum) or "adam"; None: adam to fine-tune, else sgd
    momentum: float = 0.9             # SGD's
    weight_decay: float = 5e-4
    max_grad_norm: float | None = None  # clip the gradient's global norm (None: off); see _train_epoch
    per_channel: bool = False
    weight_bits: int | None = None    # 8: int8 weights (BN folded, per-channel fake quantization; weight_quant.py)
    float_weight_epochs: int | None = None  # weight_bits: the first N epochs train float weights with BN, then
                                      # fold + int8 (None: half the epochs from scratch, 0 to fine-tune)
    device: str = "cpu"
    seed: int = 0
    init: str | None = None           # safetensors state dict or ONNX file to start from
    workers: int = 0
    output: str | None = None         # final weights (safetensors; fine_tune: the best so far, during the run);
                                      # the checkpoint is <output>.ckpt
    onnx: str | None = None           # also export the final model here (QDQ, or float if float_only)
    float_only: bool = False          # train the float ANN: clipped ReLU sites with quantize=False
    float_activation: str = "clipped"  # float_only: "clipped" (trainable lambda) or "plain" (the zoo's ReLUs)
    resume: bool = False              # continue from <output>.ckpt if it exists
    calibrate: bool = False           # recalibrate every lambda, also those the init file provides
    percentile: float = 99.9          # of the activations, for lambdas calibrated from data
    train_limit: int | None = None    # use only the first N training samples (quick runs)
    fine_tune: bool = False           # from trained weights: keep the best epoch, guard against divergence (guard.py)
    validation: float | None = None   # the fraction of the training split held out (never trained on) for the
                                      # fine-tune guard's selection (None: VALIDATION_FRACTION to fine-tune, else 0)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.output is None else Path(f"{self.output}.ckpt")

    @property
    def optimizer_name(self) -> str:
        return self.optimizer or ("adam" if self.fine_tune else "sgd")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer_name, self.fine_tune]

    @property
    def validation_fraction(self) -> float:
        if self.validation is not None:
            return self.validation
        return VALIDATION_FRACTION if self.fine_tune else 0.0

    @property
    def warmup_epochs(self) -> int:
        """The epochs of float weights before int8 fake quantization starts (0 without weight_bits)."""
        if self.weight_bits is None:
            return 0
        if self.float_weight_epochs is not None:
            return self.float_weight_epochs
        return 0 if self.fine_tune else self.epochs // 2

    def check(self) -> None:
        """Refuse, in one line, settings that do not make a run."""
        if self.weight_bits is not None and self.float_only:
            raise Ann2SnnError("weight_bits trains int8 weights behind quantized activations: it cannot be "
                               "combined with float_only")
        if not 0 <= self.validation_fraction < 1:
            raise Ann2SnnError(f"validation {self.validation}: expected the fraction of the training split to "
                               "hold out, at least 0 and below 1")
        if self.fine_tune and self.validation_fraction == 0:
            raise Ann2SnnError("validation 0: fine-tuning picks its best epoch on a validation split (never the "
                               "test split); hold out a fraction above 0")
        if self.float_weight_epochs is None or self.float_weight_epochs == 0:
            return
        if self.weight_bits is None:
            raise Ann2SnnError(f"float_weight_epochs {self.float_weight_epochs}: a float-weight warm-up before "
                               "int8 weights needs weight_bits")
        if self.fine_tune:
            raise Ann2SnnError(f"float_weight_epochs {self.float_weight_epochs}: fine-tuning starts from trained "
                               "weights, quantized at once; the warm-up is for training from scratch")
        if not 0 < self.float_weight_epochs < self.epochs:
            raise Ann2SnnError(f"float_weight_epochs {self.float_weight_epochs}: expected 0 to {self.epochs - 1} "
                               f"(below epochs, {self.epochs}), so that int8 weights train at least one epoch")


FLOAT_ACTIVATIONS = ("clipped", "plain")
OPTIMIZERS = ("sgd", "adam")
# The learning rate by (optimizer, fine_tune) when none is given. Fine-tuning trained weights at
# SGD's 0.05 drove held-out accuracy far below the start (docs/training.md, "How the fine-tuning defaults were chosen").
DEFAULT_LR = {("sgd", False): 0.05, ("sgd", True): 0.01, ("adam", False): 1e-3, ("adam", True): 1e-3}

# The share of the training split a fine-tuning run holds out to pick its best epoch on.
VALIDATION_FRACTION = 0.1

# Fields a resumed run may change without changing the computation's meaning.
RESUME_FREE_FIELDS = frozenset({"resume", "workers", "device", "onnx"})


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    test_accuracy: float
    spikes_per_image: float
    spikes_per_site: dict[str, float]
    seconds: float
    model: nn.Module = field(repr=False)
    # fine_tune runs: start_accuracy, best_epoch, best_accuracy, backoffs, stopped, and "warnings",
    # the guard's lines (each also printed on stderr when it happened)
    fine_tune: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"history": self.history, "test_accuracy": self.test_accuracy,
                "spikes_per_image": self.spikes_per_image, "spikes_per_site": self.spikes_per_site,
                "seconds": self.seconds, **({"fine_tune": self.fine_tune} if self.fine_tune is not None else {})}
