"""Add, Sub, Mul, Div -> operator.add / sub / mul / truediv; constant operands become get_attr buffers."""
from __future__ import annotations

import operator
from typing import Callable

from ..registry import add_converter
from .utils import check_batch_broadcast


def _binary(ctx, fn: Callable) -> list:
    operands = [ctx.input(0), ctx.input(1)]
    ranks = [len(ctx.shape(v)) if ctx.is_dynamic(i) else v.ndim for i, v in enumerate(operands)]
    data_rank = max(r for i, r in enumerate(ranks) if ctx.is_dynamic(i))
    # numpy broadcasting aligns trailing dimensions: an operand of higher rank than the data, or a
    # second data operand of lower rank, would shift the batch out of dimension 0
    for i, rank in enumerate(ranks):
        if rank > data_rank or (ctx.is_dynamic(i) and rank != data_rank):
            ctx.fail(f"operand ranks {ranks} broadcast across the batch dimension")
        if not ctx.is_dynamic(i):
            check_batch_broadcast(ctx, operands[i], data_rank)
    if not ctx.is_dynamic(0) or not ctx.is_dynamic(1):
        ctx.constant(0 if not ctx.is_dynamic(0) else 1)  # refuses batch-dependent operands
    return [ctx.call_function(fn, *(ctx.tensor(v) for v in operands))]


@add_converter("Add", 7)
@add_converter("Add", 13)
@add_converter("Add", 14)
def convert_add(ctx) -> list:
    return _binary(ctx, operator.add)


@add_converter("Sub", 7)
@add_converter("Sub", 13)
@add_converter("Sub", 14)
def convert_sub(ctx) -> list:
    return _binary(ctx, operator.sub)


@add_converter("Mul", 7)
@add_converter("Mul", 13)
@add_converter("Mul", 14)
def convert_mul(ctx) -> list:
    return _binary(ctx, operator.mul)


@add_converter("Div", 7)
@add_converter("Div", 13)
@add_converter("Div", 14)
def convert_div(ctx) -> list:
    return _binary(ctx, operator.truediv)
