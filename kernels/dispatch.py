"""When a kernel runs in Triton, and how its launcher is built.

A public function in this package runs its Triton kernel when `use_triton` says so and its
pure-PyTorch reference otherwise, so every CPU path works without a GPU. TRITON_INTERPRET=1 sends
CPU tensors through Triton's interpreter, which is how the tests check the kernels on a CPU.
"""
from __future__ import annotations

import importlib.util
import os
import types
from typing import Any, Callable

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(t: torch.Tensor) -> bool:
    """Whether `t` goes through a Triton kernel: on CUDA with triton installed, or in interpreter mode."""
    if not TRITON_AVAILABLE:
        return False
    return t.is_cuda or interpret_mode()


class LazyKernel:
    """A Triton kernel (or device function), decorated with `triton.jit` at first use in each mode.

    `triton.jit` fixes the interpreter mode when it decorates, so decorating at import would
    freeze the mode of whoever imported this package first. Here a kernel is decorated at its
    first launch in the mode TRITON_INTERPRET asks for then, so a test can send CPU tensors
    through the interpreter while the rest of the process keeps the reference path. Its module
    names `tl` but leaves it None (this package does not import triton, which CPU-only users may
    lack); decorating binds `tl` to triton.language and the LazyKernel helpers the kernel calls
    to their own decoration in the same mode (a compiled kernel cannot call an interpreted one).
    Kernels use builtins and kernels/device_functions.py only: triton.language's jit-ted library
    (tl.sum, tl.cdiv, tl.zeros) keeps the mode triton was imported in.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._by_mode: dict[bool, Any] = {}

    def in_mode(self, interpret: bool) -> Any:
        """The `triton.jit` function of this kernel for one mode."""
        if interpret not in self._by_mode:
            import triton  # imported here: the CPU reference path must not need triton

            scope = dict(self.fn.__globals__)
            scope["tl"] = triton.language
            for name in self.fn.__code__.co_names:   # the globals the kernel reads
                helper = scope.get(name)
                if isinstance(helper, LazyKernel) and helper is not self:
                    scope[name] = helper.in_mode(interpret)
            fn = types.FunctionType(self.fn.__code__, scope, self.fn.__name__, self.fn.__defaults__,
                                    self.fn.__closure__)
            for attribute in ("__module__", "__qualname__", "__doc__", "__annotations__", "__kwdefaults__"):
                setattr(fn, attribute, getattr(self.fn, attribute))
            self._by_mode[interpret] = triton.jit(fn)
        return self._by_mode[interpret]

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.in_mode(interpret_mode())[grid]


class SumCombine(LazyKernel):
    """The combine function of a sum, `a + b`, for `tl.reduce`.

    Compiled, it is this package's own `triton.jit` function: triton.language's `_sum_combine` is
    decorated in the mode of triton's import, and an interpreted one cannot be compiled (a process
    whose first kernel ran in the interpreter could then compile no sum). Interpreted, it is
    triton.language's own, which the interpreter recognises and sums with numpy instead of element
    by element in Python.
    """

    def in_mode(self, interpret: bool) -> Any:
        if interpret:
            import triton

            return triton.language.standard._sum_combine
        return super().in_mode(False)


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator: like `triton.jit`, with the interpreter mode chosen per launch (see LazyKernel)."""
    return LazyKernel(fn)
