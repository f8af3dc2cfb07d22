"""Starting weights from a file: a safetensors state dict (torchvision's parameter names) or an ONNX file."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import load_tensors
from ..errors import Ann2SnnError
from .export import onnx_initializers
from ..compile.calibrate import activation_sites


def load_init(model: nn.Module, path: str | os.PathLike) -> set[str]:
    """Copy tensors into `model` by state-dict name from a safetensors state dict or the initializers
    of an ONNX file (torch.onnx.export keeps parameter names unless it folds BN into Conv).

    Every tensor but the sites' lambdas and BN's num_batches_tracked must be present with the
    model's shape; a per-layer lambda may initialize a per-channel one. Returns the names loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise Ann2SnnError(f"{path}: init file not found")
    source = onnx_initializers(path) if path.suffix.lower() == ".onnx" else load_tensors(path)[0]
    state = model.state_dict()
    _check_init_tensors(path, source, state)
    clips = {f"{name}.clip" for name in activation_sites(model)}
    missing = [k for k in state if k not in source and k not in clips and not k.endswith("num_batches_tracked")]
    if missing:
        hint = " (an ONNX export in eval mode folds BN into Conv and renames weights; use ann2snn.train.export)" \
            if path.suffix.lower() == ".onnx" else ""
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise Ann2SnnError(f"{path}: no tensor for {', '.join(missing[:5])}{more}{hint}")
    loaded = {}
    for name, target in state.items():
        if name not in source:
            continue
        value = source[name]
        if name in clips and value.numel() == 1:
            value = value.reshape(()).expand(target.shape)
        if tuple(value.shape) != tuple(target.shape):
            raise Ann2SnnError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, "
                               f"the model needs {tuple(target.shape)}")
        loaded[name] = value
    with torch.no_grad():
        for name, value in loaded.items():
            state[name].copy_(value)  # state_dict() tensors share storage with the parameters
    return set(loaded)


def _check_init_tensors(path: Path, source: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    """Refuse init tensors that copy_ would silently turn into garbage: a complex, boolean or integer
    tensor for a floating one (copy_ drops the imaginary part, casts True to 1.0), and NaN or Inf
    in weights (a lambda may be inf: calibration sets it)."""
    for name, target in state.items():
        value = source.get(name)
        if value is None or not target.is_floating_point():
            continue
        if not value.is_floating_point():
            raise Ann2SnnError(f"{path}: tensor {name!r} has dtype {str(value.dtype).removeprefix('torch.')}, "
                               f"the model needs a floating dtype ({str(target.dtype).removeprefix('torch.')})")
        finite = value.isfinite() | (value == math.inf) if name.endswith(".clip") else value.isfinite()
        if not bool(finite.all()):
            raise Ann2SnnError(f"{path}: tensor {name!r} holds NaN or infinite values")
