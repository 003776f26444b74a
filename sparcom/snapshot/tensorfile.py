"""Safetensors files read and written one tensor at a time, so memory follows what is touched.

The format is the standard one (an 8-byte little-endian header length, a JSON header, then the
tensors' bytes back to back), so ``safetensors.safe_open`` reads these files too. Reading is
plain positioned file I/O into a fresh tensor: no memory map stays open, so reading every tensor
of a 5 GB file in turn never holds more than the largest tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}


class TensorFileError(ValueError):
    pass


def read_header(path: str | Path) -> tuple[dict, dict[str, dict], int]:
    """``(metadata, entries, data_start)``: entries map a name to dtype, shape and byte offsets."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path}: too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        size = os.fstat(handle.fileno()).st_size
        if length > size - 8:
            raise TensorFileError(f"{path}: header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TensorFileError(f"{path}: header is not JSON ({err})") from err
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end > size:
        raise TensorFileError(f"{path}: truncated ({size} bytes, the header promises {data_start + end})")
    return metadata, header, data_start


def read_tensor(path: str | Path, entry: dict, data_start: int, rows: slice | None = None) -> torch.Tensor:
    """One tensor (or a range of its first dimension, read alone) from an entry of ``read_header``."""
    dtype = DTYPES[entry["dtype"]]
    shape = list(entry["shape"])
    begin, end = entry["data_offsets"]
    if rows is not None:
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        start, stop, _ = rows.indices(shape[0])
        stop = max(stop, start)
        begin, end = begin + start * row_bytes, begin + stop * row_bytes
        shape[0] = stop - start
    out = torch.empty(shape, dtype=dtype)
    if end > begin:
        with open(path, "rb") as handle:
            handle.seek(data_start + begin)
            if handle.readinto(out.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise TensorFileError(f"{path}: truncated inside a tensor")
    return out


class LazyTensors(Mapping[str, torch.Tensor]):
    """``name -> tensor`` over one file, read from disk at each access (nothing is cached).

    ``prefix`` selects entries ``<prefix><name>``; ``cast`` converts each tensor after reading.
    """

    def __init__(
        self,
        path: str | Path,
        entries: dict[str, dict],
        data_start: int,
        prefix: str,
        names: list[str],
        cast: torch.dtype | None = None,
    ):
        self.path, self.data_start, self.prefix, self.cast = Path(path), data_start, prefix, cast
        self.entries = {name: entries[prefix + name] for name in names}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.rows(name, None)

    def rows(self, name: str, rows: slice | None) -> torch.Tensor:
        """Only a range of the first dimension of one tensor, read alone."""
        tensor = read_tensor(self.path, self.entries[name], self.data_start, rows)
        return tensor if self.cast is None else tensor.to(self.cast)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return self.cast or DTYPES[self.entries[name]["dtype"]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"LazyTensors({self.path.name}, {len(self)} tensors)"


# A tensor to write: its dtype and shape up front, its values produced when its turn comes.
Planned = tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write(path: str | Path, planned: dict[str, Planned], metadata: dict[str, str]) -> None:
    """Write tensors one at a time: each producer is called once, in turn, and its result freed
    before the next, so peak memory is the largest tensor, not the file."""
    # Widest dtypes first keeps every tensor naturally aligned (safetensors' own writer does this).
    names = sorted(planned, key=lambda n: (-planned[n][0].itemsize, n))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        dtype, shape, _ = planned[name]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            dtype, shape, produce = planned[name]
            tensor = produce()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise TensorFileError(
                    f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {tuple(shape)}"
                )
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor
        handle.flush()
        os.fsync(handle.fileno())
