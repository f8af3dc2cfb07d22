"""Training of the source ANN: float, or quantization-aware with the spike regularizer (METHOD.md 1, 5).

    model = quantize_model(build_model(...), T)        every ReLU-like site -> QuantClippedActivation
    calibrate_clips(model, loader)                     lambda from a high percentile of the activations
    loss = cross_entropy + beta * spike_regularizer(model)

(quantize_model and calibrate_clips are the calibration pass's, ann2snn/passes/calibrate.py.) The
package: config.py (TrainConfig, TrainResult), regularizer.py, init.py (--init files), batches.py
(the epoch's batches, one process or torchrun), guard.py (fine-tuning: the starting model, the
best epoch, the divergence guard), loop.py (the run).

`train(TrainConfig(...))` runs SGD with momentum (or Adam) and a per-step cosine learning-rate schedule,
checkpoints every epoch (no pickle, see `checkpoint.py`) and resumes bit for bit: the shuffle
order of epoch e comes from a loader generator seeded with seed + e (as do the augmentation
streams of an image folder, in workers or not), and the checkpoint holds the optimizer, scheduler
and random states.

Under torchrun (`torchrun --nproc_per_node W -m ann2snn train ...`, W processes) it trains with
DistributedDataParallel and computes what one process would, up to float rounding:
- every rank draws the same global order of epoch e (seed + e) and cuts it into the same global
  batches of `batch_size`; rank r takes positions r, r + W, r + 2W, ... of each global batch
  (a rank may get an empty part of a short last batch);
- each rank's loss is its per-sample sum times W / global batch size, so DDP's gradient average
  is the gradient of the mean over the global batch, spike regularizer and lambdas included;
- BatchNorm layers normalize with global batch statistics (`distributed.SyncBatchNorm`, for
  any backend) while training; their state-dict keys do not change;
- metrics and the test accuracy (on a sharded test set) are sums over ranks; rank 0 alone writes
  checkpoints, weights and the ONNX export, the others wait for them at a barrier;
- random draws differ per rank: torch's generator (dropout) is seeded per rank at the start of
  every epoch (so a resumed run redraws the same), augmentation streams per rank.
"""

from .config import DEFAULT_LR, FLOAT_ACTIVATIONS, MIN_CLIP, TrainConfig, TrainResult
from .init import load_init
from .loop import evaluate_accuracy, is_onnx_source, train
from .regularizer import spike_regularizer

__all__ = ["DEFAULT_LR", "FLOAT_ACTIVATIONS", "MIN_CLIP", "TrainConfig", "TrainResult", "evaluate_accuracy",
           "is_onnx_source", "load_init", "spike_regularizer", "train"]
