"""Zero-copy reading of safetensors files: every tensor is a numpy view of one memory map.

The ``safetensors`` package's numpy loader cannot return bfloat16 (numpy has no such dtype), and the released
Qwen checkpoints are bfloat16. The format is simple enough to read directly: an 8-byte little-endian header length,
a JSON header (``{name: {dtype, shape, data_offsets}}``), then the raw little-endian data. Memory-mapping it means a
converter touches one tensor at a time and never holds a second copy of the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from qv_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class SafetensorsFile:
    """One ``.safetensors`` file, opened lazily as a read-only memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                header_len = int.from_bytes(raw_len, "little")
                if header_len > self.path.stat().st_size - 8:
                    raise CheckpointError(
                        f"{self.path}: not a safetensors file (its first 8 bytes announce a {header_len}-byte header)"
                    )
                header_bytes = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from e
        if len(header_bytes) != header_len:
            raise CheckpointError(f"{self.path}: truncated safetensors header")
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        size = self.path.stat().st_size
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = _DTYPES.get(entry.get("dtype"))
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header entry {name!r} ({e})") from e
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or self._data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name} has inconsistent offsets (truncated file?)")
            self._entries[name] = (dtype, shape, begin, end)
        self._map: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor ``name`` (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(dtype).reshape(shape)


def open_checkpoint(model_dir: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it, for a sharded (index json) or single-file safetensors checkpoint."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from e
        files: dict[str, SafetensorsFile] = {}
        where: dict[str, SafetensorsFile] = {}
        for name, filename in weight_map.items():
            if filename not in files:
                if not (model_dir / filename).is_file():
                    raise CheckpointError(f"{index}: lists {filename}, which is missing from {model_dir}")
                files[filename] = SafetensorsFile(model_dir / filename)
            if name not in files[filename]._entries:
                raise CheckpointError(f"{index}: tensor {name} is not in {filename}")
            where[name] = files[filename]
        return where
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (only safetensors checkpoints are supported)")
    where = {}
    for path in paths:
        f = SafetensorsFile(path)
        for name in f.keys():
            if name in where:
                raise CheckpointError(
                    f"{model_dir}: tensor {name} appears in both {where[name].path.name} and {path.name}"
                )
            where[name] = f
    return where
