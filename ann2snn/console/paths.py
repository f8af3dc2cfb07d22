"""Checks on the paths and devices a command is given, made before any long work starts."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import Ann2SnnError


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse, with one line, an output that would replace one of `inputs` (symlinks and hard links
    included), that is a folder, or whose folder cannot be written; returns it as a Path."""
    out = Path(path)
    for source in inputs:
        if source is not None and _same_file(out, Path(source)):
            raise Ann2SnnError(f"{out}: the output would overwrite the input {source}; choose another with -o")
    if out.is_dir():
        raise Ann2SnnError(f"{out}: the output is a folder, not a file")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:   # created at write time
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise Ann2SnnError(f"{out}: cannot write there, {ancestor} is not a folder")
    try:   # os.access says yes to root everywhere, also in /proc: try it
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise Ann2SnnError(f"{out}: cannot write in {ancestor} ({err.strerror})") from None
    return out


def check_device(device: str) -> torch.device:
    """A torch device that exists here: `cpu`, `cuda` or `cuda:N` with a GPU present."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise Ann2SnnError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise Ann2SnnError(f"--device {device!r}: only cpu and cuda are supported")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise Ann2SnnError(f"--device {device}: no CUDA device is available")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise Ann2SnnError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return parsed
