"""Which inputs a build reads, cut into blocks that do not depend on the number of shards.

`--input` takes files, directories, globs and `hf:NAME` datasets. They are
resolved into an ordered list of sources, and the sources are cut into
*blocks* of about `block_bytes` each:

- a big uncompressed `.jsonl` / line-mode `.txt` is split at byte offsets
  (a line belongs to the piece its first byte is in);
- a `.parquet` file is split between row groups;
- a compressed file is one piece (it cannot be seeked);
- a `datasets` dataset is split by row range, or by source file when streamed;
- small consecutive pieces are grouped until the group reaches `block_bytes`.

A block is the unit of everything that crosses documents: paragraph dedup,
packing, and the discarded tail. Array task I of K takes a contiguous range of
blocks. Because the blocks are fixed by the inputs alone, K sharded runs
produce exactly the blocks, and so the samples, of one unsharded run.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import InputError, one_line

# Suffix -> reader kind. Longest suffixes first so ".jsonl.gz" wins over ".gz".
SUFFIXES = {
    ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".ndjson": "jsonl",
    ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt",
}
SEEKABLE = {"jsonl"}  # plus "txt" in line mode
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class ReadOptions:
    """How records are read, shared by every source of a build."""
    text_field: str = "text"
    txt_unit: str = "file"          # .txt: one document per "file" or per "line"
    split: str = "train"            # datasets split
    hf_config: Optional[str] = None
    streaming: bool = False         # datasets: stream instead of download-and-prepare
    on_error: str = "fail"          # "fail" | "skip"


@dataclass(frozen=True)
class Source:
    """One input: a local file, or a `datasets` dataset (kind "hf")."""
    kind: str
    path: str                      # absolute file path, or the dataset name / path
    size: int = 0                  # bytes on disk (0 for datasets)
    mtime_ns: int = 0
    from_disk: bool = False        # a `Dataset.save_to_disk` directory

    def describe(self) -> dict:
        """What identifies this input's content, for the build fingerprint."""
        if self.kind == "hf":
            return {"kind": "hf", "path": self.path, "from_disk": self.from_disk}
        return {"kind": self.kind, "path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Piece:
    """A slice of one source. start/stop are byte offsets (seekable files), row-group
    indices (parquet), row indices (map-style dataset) or a shard index (streamed dataset);
    whole-file pieces are [0, size)."""
    source: Source
    start: int
    stop: int
    size: int                      # approximate bytes, for grouping into blocks


@dataclass(frozen=True)
class Block:
    index: int
    pieces: tuple = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


def kind_of(path: str) -> Optional[str]:
    name = path.lower()
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def _file_source(path: str) -> Source:
    st = os.stat(path)
    return Source(kind=kind_of(path), path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or \
        ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _walk(root: str) -> list[str]:
    """Supported files under root, in sorted order, skipping hidden files and directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and kind_of(f)]
    return sorted(found, key=lambda f: Path(f).relative_to(root).parts)


def resolve_inputs(specs: list[str]) -> list[Source]:
    """Turns `--input` values into sources, in the order given (each directory or glob sorted)."""
    if not specs:
        raise InputError("--input", 0, "no input given")
    sources, seen = [], set()

    def add(src: Source):
        if src.path not in seen:
            seen.add(src.path)
            sources.append(src)

    for spec in specs:
        if spec.startswith(HF_PREFIX):
            name = spec[len(HF_PREFIX):]
            if not name:
                raise InputError(spec, 0, "empty dataset name after 'hf:'")
            add(Source(kind="hf", path=name))
            continue
        p = Path(spec)
        if p.is_dir():
            if _is_saved_dataset(p):
                add(Source(kind="hf", path=str(p.resolve()), from_disk=True))
                continue
            files = _walk(spec)
            if not files:
                raise InputError(spec, 0, f"directory holds no input files ({', '.join(SUFFIXES)})")
            for f in files:
                add(_file_source(f))
        elif p.is_file():
            if not kind_of(spec):
                raise InputError(spec, 0, f"unsupported input type (expected one of {', '.join(SUFFIXES)},"
                                          " a directory, a glob or hf:NAME)")
            add(_file_source(spec))
        elif any(c in spec for c in "*?["):
            files = [f for f in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(f) and kind_of(f)]
            if not files:
                raise InputError(spec, 0, "no input files match this pattern")
            for f in files:
                add(_file_source(f))
        else:
            raise InputError(spec, 0, "no such file or directory")
    if all(s.kind != "hf" and s.size == 0 for s in sources):
        raise InputError(specs[0], 0, "the input set is empty (every input file has 0 bytes)")
    return sources


# ---------------------------------------------------------------- datasets

_HF_CACHE: dict = {}


def hf_label(src: Source, opts: ReadOptions) -> str:
    """How a dataset is named in messages: `hf:NAME[split]`."""
    name = src.path if src.from_disk else HF_PREFIX + src.path
    return f"{name}[{opts.split}]"


def load_hf(src: Source, opts: ReadOptions):
    """The `datasets` object for a source (cached per process): load_dataset or load_from_disk."""
    key = (src, opts.split, opts.hf_config, opts.streaming)
    if key in _HF_CACHE:
        return _HF_CACHE[key]
    import datasets

    label = hf_label(src, opts)
    try:
        if src.from_disk:
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                if opts.split not in ds:
                    raise InputError(label, 0, f"no split {opts.split!r} (splits: {', '.join(ds)})")
                ds = ds[opts.split]
            if opts.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(src.path, opts.hf_config, split=opts.split, streaming=opts.streaming)
    except InputError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, DatasetNotFoundError...)
        raise InputError(label, 0, f"cannot load dataset: {one_line(e)}") from e
    _HF_CACHE[key] = ds
    return ds


def _hf_pieces(src: Source, opts: ReadOptions, block_bytes: int) -> list[Piece]:
    import datasets

    ds = load_hf(src, opts)
    if isinstance(ds, datasets.IterableDataset):
        # Streamed: the dataset's own source files are the pieces, one block each.
        return [Piece(src, i, i + 1, block_bytes) for i in range(max(1, ds.num_shards))]
    n = len(ds)
    if n == 0:
        return []
    nbytes = max(1, int(ds.data.nbytes))
    rows = max(1, block_bytes * n // nbytes)
    return [Piece(src, a, min(n, a + rows), nbytes * (min(n, a + rows) - a) // n) for a in range(0, n, rows)]


def _parquet_pieces(src: Source, block_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq

    try:
        md = pq.ParquetFile(src.path).metadata
    except Exception as e:
        raise InputError(src.path, 0, f"not a readable parquet file: {one_line(e)}") from e
    pieces, start, acc = [], 0, 0
    for i in range(md.num_row_groups):
        acc += md.row_group(i).total_byte_size
        if acc >= block_bytes:
            pieces.append(Piece(src, start, i + 1, acc))
            start, acc = i + 1, 0
    if start < md.num_row_groups or not pieces:
        pieces.append(Piece(src, start, md.num_row_groups, acc))
    return pieces


def source_pieces(src: Source, opts: ReadOptions, block_bytes: int) -> list[Piece]:
    if src.kind == "hf":
        return _hf_pieces(src, opts, block_bytes)
    if src.kind == "parquet":
        return _parquet_pieces(src, block_bytes)
    if src.kind in SEEKABLE or (src.kind == "txt" and opts.txt_unit == "line"):
        # n pieces of at least block_bytes each (so a file of 1.5 blocks stays one piece).
        n = max(1, src.size // block_bytes)
        cuts = [src.size * i // n for i in range(n + 1)]
        return [Piece(src, a, b, b - a) for a, b in zip(cuts, cuts[1:])]
    return [Piece(src, 0, src.size, src.size)]


def plan_blocks(sources: list[Source], opts: ReadOptions, block_bytes: int) -> list[Block]:
    """Groups consecutive pieces into blocks of at least block_bytes (the last may be smaller)."""
    blocks, current, acc = [], [], 0
    for src in sources:
        for piece in source_pieces(src, opts, block_bytes):
            current.append(piece)
            acc += piece.size
            if acc >= block_bytes:
                blocks.append(Block(len(blocks), tuple(current)))
                current, acc = [], 0
    if current:
        blocks.append(Block(len(blocks), tuple(current)))
    return blocks


def shard_blocks(n_blocks: int, num_shards: int, shard_index: int) -> range:
    """The contiguous range of blocks of task shard_index out of num_shards (balanced to +-1 block).

    Contiguous, so reading the merged shards in order reads the documents in input order."""
    return range(n_blocks * shard_index // num_shards, n_blocks * (shard_index + 1) // num_shards)
