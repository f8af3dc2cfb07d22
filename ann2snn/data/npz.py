"""The arrays of an .npz file, read lazily where the format allows.

np.load(mmap_mode=...) maps no member of a zip file. A member that np.savez stored uncompressed
lies in the file as a .npy array, byte for byte: it is memory-mapped where it lies (copy-on-write,
so torch can wrap it), and a sample is read from disk when it is used. A compressed member
(np.savez_compressed) is read into memory. Nothing is unpickled: an object array is refused, as
np.load(allow_pickle=False) refuses it.
"""
from __future__ import annotations

import math
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError

_LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature, ..., file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz file `path` by name (np.load's names: the member's, less ".npy");
    an uncompressed one memory-mapped. DataError for a file that is no .npz of arrays."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
            return {info.filename.removesuffix(".npy"): _member(path, archive, file, info)
                    for info in archive.infolist()}
    except Exception as err:  # zipfile, pickle refusal, truncated file, not an npz
        raise DataError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from None


def _member(path: Path, archive: zipfile.ZipFile, file: BinaryIO, info: zipfile.ZipInfo) -> np.ndarray:
    stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1   # 0x1: encrypted
    mapped = _mapped(path, file, info) if stored else None
    if mapped is not None:
        return mapped
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _mapped(path: Path, file: BinaryIO, info: zipfile.ZipInfo) -> np.ndarray | None:
    """The stored member's array as a memory map of `path`; None where read_array must judge the
    member instead: no .npy, a header of version 3, an object or structured dtype, no values, or a
    size other than its header says."""
    file.seek(info.header_offset)
    local = file.read(_LOCAL_HEADER.size)
    if len(local) != _LOCAL_HEADER.size:
        return None
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(local)
    if signature != _LOCAL_SIGNATURE:
        return None
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    file.seek(start)
    try:
        reader = _HEADER_READERS.get(np.lib.format.read_magic(file))
        if reader is None:
            return None
        shape, fortran_order, dtype = reader(file)
    except ValueError:
        return None
    values = file.tell()
    if dtype.hasobject or dtype.fields is not None or math.prod(shape) == 0 \
            or values - start + dtype.itemsize * math.prod(shape) != info.file_size:
        return None
    return np.memmap(path, dtype=dtype, mode="c", offset=values, shape=shape, order="F" if fortran_order else "C")
