"""The inputs a command runs a model on: samples of a data set, drawn at random across its classes,
and refused unless they have the ONNX model's input shape."""
from __future__ import annotations

from typing import Callable


def load_inputs(data: str, split: str, samples: int, seed: int = 0,
                takes: Callable[[tuple[int, ...]], bool] | None = None):
    """`samples` (images, labels) of DATA drawn at random with `seed`, across its classes; (C, L)
    signals rather than one-channel images where the model `takes` those (data.fit_sample_rank)."""
    import torch

    from .data import draw, fit_sample_rank, load_dataset, make_loader

    dataset = load_dataset(data, split=split, seed=seed)
    if takes is not None:
        fit_sample_rank(dataset, takes)
    batches = list(make_loader(draw(dataset, samples, seed), batch_size=min(samples, 256)))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def model_inputs(model: str, data: str, split: str, samples: int):
    """`samples` images of DATA (`load_inputs`), refused unless they have the ONNX model's input shape."""
    from .data import check_input_shape, sample_fits
    from .onnx_import import inspect_onnx

    expected = inspect_onnx(model)["input"]["shape"][1:]
    x = load_inputs(data, split, samples, takes=lambda shape: sample_fits(shape, expected))[0]
    check_input_shape(data, tuple(x.shape[1:]), expected)
    return x
