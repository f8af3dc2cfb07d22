"""The tensors of an .snn artifact: the dtypes a file may hold, the format version they need, and
each tensor checked against what its module expects (shape, dtype) before it is loaded.

Format version 2 adds integer tensors (int8 weights, int32 biases and thresholds, ...). A file is
written in the lowest version that describes it, so a float SNN stays readable by every reader of
version 1; a module declares the dtypes of its integer buffers in a class attribute
`BUFFER_DTYPES = {"weight": torch.int8, ...}`, which the reader holds the file to.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from torch import fx, nn

from ..errors import ArtifactError
from ..levels import check_levels_exact
from .neuron import BitSerialIFNode

# The dtypes a tensor of the file, or a dtype argument of a node, may have.
DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool)}
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What a version 1 file held: floating-point tensors and BatchNorm's int64 step counter.
VERSION_1_DTYPES = frozenset(_FLOATING + (torch.int64,))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_version_of(tensors: dict[str, torch.Tensor]) -> int:
    """1 for a file of version 1's dtypes only, else 2 (integer tensors)."""
    return 1 if all(t.dtype in VERSION_1_DTYPES for t in tensors.values()) else 2


def check_file_dtypes(tensors: dict[str, torch.Tensor], format_version: int) -> None:
    """Every tensor of a dtype of the format, and of version 1's dtypes in a version 1 file."""
    allowed = VERSION_1_DTYPES if format_version == 1 else frozenset(DTYPES.values())
    for name, tensor in tensors.items():
        if tensor.dtype not in allowed:
            where = "a version 1 artifact" if tensor.dtype in DTYPES.values() else "an artifact"
            raise ArtifactError(f"tensor {name} is {dtype_name(tensor.dtype)}, which {where} does not hold")


def declared_dtypes(gm: nn.Module) -> dict[str, tuple[torch.dtype, str]]:
    """Tensor name -> (dtype, module type) for every buffer a module declares in BUFFER_DTYPES."""
    declared = {}
    for prefix, module in gm.named_modules():
        for buffer, dtype in getattr(type(module), "BUFFER_DTYPES", {}).items():
            declared[f"{prefix}.{buffer}" if prefix else buffer] = (dtype, type(module).__name__)
    return declared


def most_common_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype | None:
    """The dtype most of `dtypes` are (what `save` writes for all floating-point tensors), or None."""
    counts = Counter(dtypes)
    return counts.most_common(1)[0][0] if counts else None


def check_tensors(gm: nn.Module, state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """Every tensor of the file as the graph description expects it, checked before load_state_dict
    (whose error names no tensor): the shape its module's configuration gives, and the dtype its
    module declares (BUFFER_DTYPES), else one floating-point dtype for all, that of most of them
    (what `save` writes), but for tensors that keep their own (BatchNorm's step counter). Returns
    that floating-point dtype (None: no such tensor)."""
    expected = gm.state_dict()
    declared = declared_dtypes(gm)
    dtype = most_common_dtype(state[name].dtype for name, t in expected.items() if t.is_floating_point()
                              and name not in declared)
    if dtype is not None and dtype not in _FLOATING:
        raise ArtifactError(f"the tensors are {dtype_name(dtype)}: an SNN's tensors share one floating-point dtype")
    for name, want in expected.items():
        got = state[name]
        want_dtype, owner = declared.get(name, (dtype if want.is_floating_point() else want.dtype, None))
        if got.shape != want.shape or got.dtype != want_dtype:
            raise ArtifactError(f"tensor {name} should be {dtype_name(want_dtype)}"
                                f"{f' (as {owner} declares)' if owner else ''} of shape {list(want.shape)}, "
                                f"the file holds {dtype_name(got.dtype)} of shape {list(got.shape)}")
    return dtype


def check_loaded(gm: fx.GraphModule, dtype: torch.dtype | None) -> None:
    """No tensor left on the meta device the modules were built on (a tensor the file does not
    hold), and every neuron's levels exact in the SNN's dtype (what the compiler checks)."""
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if t.is_meta:
            raise ArtifactError(f"the artifact lacks tensor {name}")
    for name, module in gm.named_modules():
        if isinstance(module, BitSerialIFNode) and dtype is not None:
            try:
                check_levels_exact(module.levels, dtype)
            except ValueError as err:
                raise ArtifactError(f"neuron {name}: {err}") from None
