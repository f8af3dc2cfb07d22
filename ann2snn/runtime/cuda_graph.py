"""Replay of a lowered graph from a captured CUDA graph: one launch per batch instead of one per layer.

A small network's batch is dozens of kernels, each launched from Python at a host cost above its
GPU time (resnet20 at batch 64 ran at 0.43x the float ANN on an H200, all of it launch overhead).
Replaying a CUDA graph runs the same kernels with the same inputs, so results are bit for bit those
of the eager run.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_map


class CudaGraphRunner:
    """Runs `fn(x)` on CUDA tensors by replaying a graph captured once per input layout.

    The first call with a new shape, stride or dtype runs `fn` twice on a side stream (Triton
    compiles, cuDNN picks its algorithms), then captures one run. Outputs are copied out of the
    graph's static buffers, so a result stays valid after the next call. At most `max_graphs`
    layouts are kept (least recently used first out): each holds its own memory pool.
    """

    def __init__(self, fn: Callable[[Tensor], Any], max_graphs: int = 4) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Any]] = OrderedDict()

    def _capture(self, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Any]:
        static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_x.copy_(x)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(static_x)
        return graph, static_x, static_out

    def __call__(self, x: Tensor) -> Any:
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = self._capture(x)
        graph, static_x, static_out = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, static_out)
