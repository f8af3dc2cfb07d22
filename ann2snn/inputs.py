"""The inputs a command runs a model on: samples of a data set, drawn at random across its classes,
and refused unless they have the ONNX model's input shape."""
from __future__ import annotations


def load_inputs(data: str, split: str, samples: int, seed: int = 0):
    """`samples` (images, labels) of DATA drawn at random with `seed`, across its classes."""
    import torch

    from .data import draw, load_dataset, make_loader

    batches = list(make_loader(draw(load_dataset(data, split=split, seed=seed), samples, seed),
                               batch_size=min(samples, 256)))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def model_inputs(model: str, data: str, split: str, samples: int):
    """`samples` images of DATA (`load_inputs`), refused unless they have the ONNX model's input shape."""
    from .data import check_input_shape
    from .onnx_import import inspect_onnx

    x = load_inputs(data, split, samples)[0]
    check_input_shape(data, tuple(x.shape[1:]), inspect_onnx(model)["input"]["shape"][1:])
    return x
