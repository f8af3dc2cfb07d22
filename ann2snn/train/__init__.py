"""Training: the source ANN, float or quantization-aware with the spike regularizer, and its ONNX export.

One process or torchrun; checkpoints resume bit for bit (docs/training.md).
"""
from .config import DEFAULT_LR, FLOAT_ACTIVATIONS, MIN_CLIP, TrainConfig, TrainResult
from .init import load_init
from .loop import score_accuracy, is_onnx_source, train
from .regularizer import spike_regularizer

__all__ = ["DEFAULT_LR", "FLOAT_ACTIVATIONS", "MIN_CLIP", "TrainConfig", "TrainResult", "score_accuracy",
           "is_onnx_source", "load_init", "spike_regularizer", "train"]
