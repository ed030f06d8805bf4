"""Tensor-by-tensor safetensors I/O for RE-Adapt: read HF checkpoints, write sharded outputs.

Why not `load_file` / `save_file`: a 7-8B base + instruct pair is ~32 GB in bf16,
and their delta as large again, so nothing here may hold a whole model.

Reading re-opens the shard for every read. `safe_open` memory-maps the file, and
pages touched through a mapping that stays open count in the process's RSS until
it is closed, so one long-lived handle grows RSS to the size of the checkpoint
even though only one tensor is in use. Re-opening costs a header parse (a few
tens of KB of JSON), nothing next to reading the tensor.

Writing streams too: `ShardWriter` appends each tensor's bytes (in chunks) to a
data file and, once a shard is full, writes the safetensors header followed by
that data. The header cannot be written first because it lists every tensor of
the shard, which is only known once the shard is full (LoRE ranks are found on
the fly).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

# safetensors dtype codes <-> torch dtypes (floating point and the common integer types).
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHUNK_ELEMENTS = 1 << 22
"""Rows of a tensor are processed in chunks of about this many elements (32 MB in float64)."""


class ReadaptError(ValueError):
    """A user-facing RE-Adapt input problem; the message is printed as is by the CLI."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Checkpoint:
    """The tensors of a HF model directory (one `model.safetensors` or an indexed set of shards).

    Shapes and dtypes are read from the headers up front (no tensor data is touched);
    `read` loads one tensor, or a range of its rows, at a time.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise ReadaptError(f"{self.path}: not a directory")
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise ReadaptError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints "
                               "are supported; re-save with save_pretrained(safe_serialization=True))")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise ReadaptError(f"{index}: lists shard {name}, which is missing")
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    code = sl.get_dtype()
                    if code not in ST_DTYPES:
                        raise ReadaptError(f"{file}: tensor {key} has unsupported dtype {code}")
                    self.file_of[key] = file
                    self.shape[key] = tuple(sl.get_shape())
                    self.dtype[key] = ST_DTYPES[code]
        if weight_map:
            missing = sorted(set(weight_map) - set(self.file_of))
            if missing:
                raise ReadaptError(f"{index}: tensor {missing[0]} is listed but not in its shard")
        self.names: list[str] = sorted(self.file_of)

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor `name`, or its rows [r0, r1) (first dimension) if `rows` is given."""
        from safetensors import safe_open

        with safe_open(str(self.file_of[name]), "pt") as f:  # closed at once: see the module docstring
            if rows is None:
                return f.get_tensor(name)
            return f.get_slice(name)[rows[0]:rows[1]]


def row_chunks(shape: tuple[int, ...], chunk_elements: int = CHUNK_ELEMENTS) -> list[Optional[tuple[int, int]]]:
    """Row ranges covering a tensor in pieces of about `chunk_elements`; [None] = read it whole."""
    if len(shape) < 2:
        return [None]
    row = math.prod(shape[1:])
    step = max(1, chunk_elements // max(row, 1))
    if step >= shape[0]:
        return [None]
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of `t` without a copy (bf16 has no numpy type, uint8 does)."""
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '64KB' / '1000' -> bytes (powers of 1000, like transformers' max_shard_size)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    s = text.strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            s, factor = s[:-len(unit)], mult
            break
    else:
        factor = 1
    try:
        value = int(float(s) * factor)
    except ValueError:
        raise ReadaptError(f"shard size {text!r}: expected a number with an optional KB/MB/GB suffix") from None
    if value <= 0:
        raise ReadaptError(f"shard size {text!r}: must be positive")
    return value


def _append(src, dst) -> None:
    """Copy file `src` to the end of `dst` in the kernel (sendfile): no user-space buffer, so no memory."""
    size, offset = os.fstat(src.fileno()).st_size, 0
    try:
        while offset < size:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, min(size - offset, 1 << 30))
            if sent == 0:
                raise OSError("sendfile made no progress")
            offset += sent
    except OSError:  # no sendfile between these files: a small buffer keeps the copy cheap anyway
        src.seek(offset)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 1 << 20)


class ShardWriter:
    """Write named tensors into `prefix-0000i-of-0000N.safetensors` shards of at most ~max_bytes.

    Use `begin(name, shape, dtype)`, then `write(chunk)` with row chunks in order, then
    `end()`; or `add(name, tensor)`. A tensor never spans shards (a shard exceeds
    max_bytes only if one tensor alone does). `close()` renames the shards to their
    final names and returns the weight map {tensor name: file name}.
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_bytes: int, metadata: Optional[dict] = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_bytes = prefix, max_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.shards: list[tuple[Path, list[str]]] = []  # (temp path, names) of finished shards
        self._entries: dict[str, dict] = {}  # current shard: name -> header entry
        self._data = None  # open data file of the current shard
        self._size = 0  # bytes in the current shard
        self._open: Optional[tuple[str, int]] = None  # (name, bytes still expected) of the tensor being written

    def _data_path(self) -> Path:
        return self.out_dir / f".{self.prefix}-{len(self.shards) + 1:05d}.data.tmp"

    def begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if self._open is not None:
            raise RuntimeError(f"ShardWriter: {self._open[0]} was not ended")
        if name in self._entries or any(name in names for _, names in self.shards):
            raise RuntimeError(f"ShardWriter: {name} written twice")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._entries and self._size + nbytes > self.max_bytes:
            self._finish_shard()
        if self._data is None:
            self._data = open(self._data_path(), "wb")
        self._entries[name] = {"dtype": ST_CODES[dtype], "shape": list(shape),
                               "data_offsets": [self._size, self._size + nbytes]}
        self._size += nbytes
        self._open = (name, nbytes)

    def write(self, chunk: torch.Tensor) -> None:
        name, left = self._open
        entry = self._entries[name]
        if ST_DTYPES[entry["dtype"]] != chunk.dtype:
            raise RuntimeError(f"ShardWriter: {name} is {entry['dtype']}, got a {chunk.dtype} chunk")
        data = tensor_bytes(chunk)
        if data.nbytes > left:
            raise RuntimeError(f"ShardWriter: {name} got more data than its shape {entry['shape']} holds")
        self._data.write(data)
        self._open = (name, left - data.nbytes)

    def end(self) -> None:
        name, left = self._open
        if left:
            raise RuntimeError(f"ShardWriter: {name} is missing {left} bytes")
        self._open = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.begin(name, tuple(tensor.shape), tensor.dtype)
        self.write(tensor)
        self.end()

    def _finish_shard(self) -> None:
        """Header (padded to 8 bytes, as safetensors does) + the data file -> a complete shard file."""
        self._data.close()
        header = dict(self._entries)
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        data_path = self._data_path()
        shard = self.out_dir / f".{self.prefix}-{len(self.shards) + 1:05d}.safetensors.tmp"
        with open(shard, "wb") as out, open(data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            out.flush()
            _append(data, out)
        data_path.unlink()
        self.shards.append((shard, list(self._entries)))
        self._entries, self._data, self._size = {}, None, 0

    def close(self) -> dict[str, str]:
        if self._open is not None:
            raise RuntimeError(f"ShardWriter: {self._open[0]} was not ended")
        if self._entries or not self.shards:
            if self._data is None:  # no tensors at all: still write one (empty) shard
                self._data = open(self._data_path(), "wb")
            self._finish_shard()
        weight_map = {}
        n = len(self.shards)
        for i, (tmp, names) in enumerate(self.shards, 1):
            final = f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.out_dir / final)
            weight_map.update({name: final for name in names})
        return weight_map
