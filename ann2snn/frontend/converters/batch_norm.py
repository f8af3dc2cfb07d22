"""BatchNormalization (inference) -> nn.BatchNorm1d / nn.BatchNorm2d in eval mode with running stats."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..registry import add_converter

_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}


@add_converter("BatchNormalization", 9)
@add_converter("BatchNormalization", 14)
@add_converter("BatchNormalization", 15)
def convert_batch_norm(ctx) -> list:
    x = ctx.dynamic(0)
    scale, bias, mean, var = (ctx.constant(i, what) for i, what in
                              enumerate(("scale", "B", "mean", "var"), start=1))
    if ctx.attr("training_mode", 0):
        ctx.unsupported("training_mode", 1, "only inference batch normalization")
    if any(ctx.output_used(i) for i in (1, 2)):
        ctx.fail("the running mean / variance outputs (training mode) are not supported")
    momentum = ctx.attr("momentum")  # only matters in training
    if not np.all(var + ctx.attr("epsilon") > 0):  # sqrt of a negative variance: NaN everywhere after it
        ctx.fail(f"var + epsilon must be positive; found {float(np.min(var + ctx.attr('epsilon'))):g}")
    rank = len(ctx.shape(x))
    if rank not in _NORMS:
        ctx.fail(f"a rank-{rank} input is not supported")
    norm = _NORMS[rank](scale.shape[0], eps=ctx.attr("epsilon"), momentum=1.0 - momentum)
    for tensor, array in ((norm.weight, scale), (norm.bias, bias), (norm.running_mean, mean),
                          (norm.running_var, var)):
        tensor.data = torch.from_numpy(array.reshape(-1).copy()).to(ctx.probe(x).dtype)
    return [ctx.call_module(norm.eval(), x)]
