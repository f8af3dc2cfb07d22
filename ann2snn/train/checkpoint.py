"""Training checkpoints without pickle: tensors in safetensors, everything else JSON in its metadata.

One file holds what resuming needs to continue bit for bit: the model state, the optimizer state
(momentum buffers), the learning-rate scheduler state, the finished epoch count, the random
number generator states, the run's configuration and its history. It is written through a
temporary file and a rename, so a run killed while writing leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..runtime.artifact import write_atomically
from ..errors import Ann2SnnError

FORMAT = "ann2snn-checkpoint"
FORMAT_VERSION = 1


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Atomically write `tensors` with `meta` as JSON under the metadata key "ann2snn"."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(meta)
    try:
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"ann2snn": text}))
    except OSError as err:
        raise Ann2SnnError(f"{path}: cannot write ({err.strerror or err})") from None


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the JSON metadata of a file written by `save_tensors` (safetensors only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ann2snn", "{}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise Ann2SnnError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    return tensors, _metadata(path, raw)


def _metadata(path: str | os.PathLike, raw: str) -> dict[str, Any]:
    """The JSON object under the "ann2snn" metadata key; any other JSON, or none, is refused
    (RecursionError: JSON nested thousands deep)."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:
        reason = f"{err.msg} at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) \
            else type(err).__name__
        raise Ann2SnnError(f"{path}: its \"ann2snn\" metadata is not valid JSON ({reason})") from None
    if not isinstance(meta, dict):
        raise Ann2SnnError(f"{path}: its \"ann2snn\" metadata must be a JSON object, found {type(meta).__name__}")
    return meta


@dataclass
class Checkpoint:
    """The state of a run after `epoch` finished epochs."""

    epoch: int
    config: dict[str, Any]
    history: list[dict[str, Any]]
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """Every random stream training may draw from (dropout, augmentations): torch, CUDA, numpy, random."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def save_checkpoint(path: str | os.PathLike, *, epoch: int, config: dict[str, Any], history: list[dict[str, Any]],
                    model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    # Optimizer state: per-parameter tensors (momentum buffers) go to safetensors, the rest to JSON.
    optim = optimizer.state_dict()
    optim_state: dict[str, dict[str, Any]] = {}
    for index, entry in optim["state"].items():
        optim_state[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                optim_state[str(index)][key] = value
    rng = capture_rng()
    tensors["rng.torch"] = rng.pop("torch")
    for i, cuda_state in enumerate(rng.pop("cuda", [])):
        tensors[f"rng.cuda.{i}"] = cuda_state
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "epoch": epoch, "config": config,
        "history": history, "optimizer": {"state": optim_state, "param_groups": optim["param_groups"]},
        "scheduler": scheduler.state_dict(), "rng": rng,
    }
    save_tensors(path, tensors, meta)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise Ann2SnnError(f"{path}: not an ann2snn training checkpoint (format {meta.get('format')!r})")
    try:
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        state = {int(i): dict(entry) for i, entry in meta["optimizer"]["state"].items()}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state[int(index)][name] = value
        rng = dict(meta["rng"], torch=tensors["rng.torch"])
        cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if cuda:
            rng["cuda"] = [tensors[k] for k in cuda]
        # the types the trainer relies on before it restores anything (it compares config, counts history)
        if not (type(meta["epoch"]) is int and isinstance(meta["config"], dict) and isinstance(meta["history"], list)
                and all(isinstance(h, dict) for h in meta["history"])):
            raise TypeError("epoch must be an integer, config an object, history a list of objects")
        return Checkpoint(
            epoch=meta["epoch"], config=meta["config"], history=meta["history"], model=model,
            optimizer={"state": state, "param_groups": meta["optimizer"]["param_groups"]},
            scheduler=meta["scheduler"], rng=rng)
    # a hostile file's metadata can have any JSON shape: a list where a dict belongs, ...
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise Ann2SnnError(f"{path}: incomplete training checkpoint ({type(err).__name__}: {err})") from None
