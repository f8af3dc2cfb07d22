"""Triton device functions shared by the kernels.

The kernels call only Triton builtins and these functions, never triton.language's own jit-ted
library (tl.sum, tl.cdiv, tl.zeros): those are decorated when triton is imported, in the mode
of that moment, so a process that imported triton compiled (torch.export does) could not run
them in the interpreter. See kernels/dispatch.py.
"""
from __future__ import annotations

from .dispatch import lazy_jit

# triton.language, bound when a kernel is first launched (kernels/dispatch.py: LazyKernel)
tl = None


@lazy_jit
def tile_sum(x, axis: tl.constexpr):
    """x summed over one axis of a tile: tl.sum without its dtype promotion.

    It reduces with the combine function of tl.sum itself, which Triton's interpreter recognises
    and sums with numpy (any other combine function runs element by element in Python).
    """
    return tl.reduce(x, axis, tl.standard._sum_combine)


@lazy_jit
def round_to(x, dtype: tl.constexpr):
    """x (float32 or float64) rounded to nearest even in `dtype`, returned in x's dtype: the
    rounding of a torch op computed in that dtype.

    bfloat16 is rounded by hand on the bits: Triton's interpreter truncates a float32 -> bfloat16
    cast (the GPU rounds to nearest even), and the tests run the interpreter.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(x.dtype)
