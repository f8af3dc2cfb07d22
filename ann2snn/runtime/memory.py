"""Bounded memory: batch sizes picked from a model's activations, and running out of memory as bad input.

Everything that runs over a data set runs in batches, so peak memory depends on the batch size and
the model, never on the number of samples. The batch size of each stage follows from the model's
largest activation (and, where every activation is held, their sum) per sample, probed on the meta
device, and the activation budget (1 GiB, or ANN2SNN_MEMORY_BUDGET); `--batch-size` overrides it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, fx, nn

from ..errors import Ann2SnnError

# Bytes of activations one batch of a stage may hold (the weights come on top of this), unless the
# environment variable ANN2SNN_MEMORY_BUDGET says otherwise (bytes, or with a suffix K, M or G).
ACTIVATION_BUDGET = 1 << 30
BUDGET_VARIABLE = "ANN2SNN_MEMORY_BUDGET"
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# The most samples a batch holds, whatever the budget allows (a small model's batches stay as they were).
MAX_BATCH = 256
# What torch, numpy and onnxruntime say when an allocation fails.
_ALLOCATION_FAILURES = ("can't allocate memory", "failed to allocate memory", "bad_alloc", "bad allocation",
                        "out of memory", "cannot allocate memory")


class OutOfMemory(Ann2SnnError):
    """A stage ran out of memory: bad input for this machine (too large a batch), not a crash."""


def is_allocation_failure(err: BaseException) -> bool:
    """Whether `err` says an allocation failed (numpy's _ArrayMemoryError is a MemoryError; torch
    and onnxruntime raise their own types with these words)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return any(failure in str(err).lower() for failure in _ALLOCATION_FAILURES)


@contextlib.contextmanager
def stage(name: str, lower: str) -> Iterator[None]:
    """An allocation failure inside becomes OutOfMemory: one line naming the stage `name` and the
    options to lower (`lower`, e.g. "--batch-size or --verify-samples")."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as err:
        if not is_allocation_failure(err):
            raise
        raise OutOfMemory(f"{name}: out of memory; lower {lower}") from None


def activation_budget() -> int:
    """ANN2SNN_MEMORY_BUDGET in bytes, else ACTIVATION_BUDGET; refused unless a positive size."""
    text = os.environ.get(BUDGET_VARIABLE, "").strip()
    if not text:
        return ACTIVATION_BUDGET
    scale = _SUFFIXES.get(text[-1].upper(), 1)
    digits = text[:-1] if text[-1].upper() in _SUFFIXES else text
    try:
        budget = int(float(digits) * scale)
    except ValueError:
        budget = 0
    if budget <= 0:
        raise Ann2SnnError(f"{BUDGET_VARIABLE}={text!r} is not a size such as 512M or 2G")
    return budget


def on_meta(module: nn.Module) -> nn.Module:
    """A copy of `module` whose tensors live on the meta device (no memory, no copying of data)."""
    memo: dict[int, Any] = {}
    for tensor in module.parameters():
        memo[id(tensor)] = nn.Parameter(torch.empty_like(tensor, device="meta"), tensor.requires_grad)
    for tensor in module.buffers():
        memo[id(tensor)] = torch.empty_like(tensor, device="meta")
    return copy.deepcopy(module, memo)


class ShapeProbe(fx.Interpreter):
    """Runs a graph on meta tensors (shapes only, no arithmetic), recording the size of every
    node's output. A neuron's levels have the shape of its potential, so a neuron passes its
    input through."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.sizes: list[int] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor) and n.op != "get_attr":
            self.sizes.append(out.numel())
        return out

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        from .neuron import BitSerialIFNode

        if isinstance(self.fetch_attr(target), BitSerialIFNode):
            return args[0]
        return super().call_module(target, args, kwargs)


@dataclass(frozen=True)
class ActivationProfile:
    """Elements per sample: the largest activation of the graph, and all of them together."""

    largest: int
    total: int

    def batch(self, bytes_per_element: float, held: str = "largest", most: int = MAX_BATCH) -> int:
        """The batch size whose activations take at most `activation_budget()` bytes, at
        `bytes_per_element` of the largest activation (or, `held="total"`, of every activation: a
        run that keeps them all), and at most `most`."""
        per_sample = bytes_per_element * (self.largest if held == "largest" else self.total)
        return max(1, min(most, int(activation_budget() // max(per_sample, 1))))


def activation_profile(graph: fx.GraphModule, sample_shape: tuple[int, ...], dtype: torch.dtype) -> ActivationProfile:
    """The activation sizes of `graph` for one sample of `sample_shape`, probed on the meta device
    (or, for an op without a meta kernel, run once on a zero sample)."""
    probe = ShapeProbe(on_meta(graph))
    try:
        with torch.no_grad():
            probe.run(torch.empty((1, *sample_shape), dtype=dtype, device="meta"))
    except Exception:  # an op without a meta kernel: shape errors are RuntimeErrors, ValueErrors, ...
        probe = ShapeProbe(graph)
        with torch.no_grad():
            probe.run(torch.zeros((1, *sample_shape), dtype=dtype))
    sizes = probe.sizes or [math.prod(sample_shape)]
    return ActivationProfile(max(sizes), sum(sizes))


__all__ = ["ACTIVATION_BUDGET", "ActivationProfile", "activation_budget", "OutOfMemory", "ShapeProbe", "activation_profile",
           "is_allocation_failure", "on_meta", "stage"]
