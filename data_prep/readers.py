"""Read one piece of an input into documents, locating every bad record by file and line.

Each reader yields `(text, where, line)` for a document, or a `Skip` for a bad
record under `--on-error skip`; with `--on-error fail` a bad record raises
`InputError`. Bytes are decoded as strict UTF-8 (a lone surrogate escaped in
JSON counts as bad UTF-8 too), so a non-UTF-8 line is either an error or a
counted skip, never garbage in the output.
"""
from __future__ import annotations

import gzip
import json
import zlib
from typing import Iterator, Union

from .errors import InputError, Skip, one_line
from .sources import Piece, ReadOptions, Source, hf_label, load_hf

Item = Union[tuple, Skip]   # (text, where, line) or Skip


class LineCounter:
    """Line number at a byte offset, counting newlines once per file and task (offsets only grow)."""

    def __init__(self):
        self._known: dict[str, tuple[int, int]] = {}   # path -> (offset, newlines before it)

    def line_at(self, path: str, offset: int) -> int:
        pos, count = self._known.get(path, (0, 0))
        if pos > offset:
            pos, count = 0, 0
        with open(path, "rb") as f:
            f.seek(pos)
            while pos < offset:
                chunk = f.read(min(1 << 20, offset - pos))
                if not chunk:
                    break
                count += chunk.count(b"\n")
                pos += len(chunk)
        self._known[path] = (pos, count)
        return count + 1


def _check_text(value, where: str, line: int, field: str) -> str:
    """A record's text value, or InputError(reason=...) saying why it is not usable."""
    if value is None:
        raise InputError(where, line, f'field "{field}" is null', "missing_field")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(where, line, f"invalid UTF-8 at byte {e.start} of field \"{field}\"", "bad_utf8")
    if not isinstance(value, str):
        raise InputError(where, line, f'field "{field}" is {type(value).__name__}, not a string', "bad_type")
    return value


def _json_text(raw: bytes, where: str, line: int, field: str) -> str:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(where, line, f"invalid UTF-8 at byte {e.start} of the line", "bad_utf8")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise InputError(where, line, f"malformed JSON: {e.msg} at column {e.colno}", "bad_json")
    if not isinstance(obj, dict):
        raise InputError(where, line, f"expected a JSON object, got {type(obj).__name__}", "bad_json")
    if field not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        raise InputError(where, line, f'no "{field}" field (keys: {keys}); set --text-field', "missing_field")
    text = _check_text(obj[field], where, line, field)
    # JSON may escape a lone surrogate (\ud800), which no UTF-8 encoder accepts later.
    if b"\\ud" in raw or b"\\uD" in raw:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(where, line, f"lone surrogate {text[e.start]!a} in a JSON string (not valid Unicode)",
                             "bad_utf8")
    return text


def _guard(parse, opts: ReadOptions, *args) -> Item:
    """Runs one record parser; under --on-error skip turns its record-level error into a Skip."""
    try:
        return parse(*args)
    except InputError as e:
        if opts.on_error == "skip" and e.reason:
            return Skip(e.reason, e.where, e.line, e.message)
        raise


def _zst_lines(path: str) -> Iterator[bytes]:
    """Lines of a .zst file, frame after frame. A stream reader would end quietly at a cut
    (a truncated download); here a frame left unfinished at end of file is an error."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, rest = dctx.decompressobj(), False, b""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            while chunk:
                in_frame = True
                out = rest + dobj.decompress(chunk)
                *lines, rest = out.split(b"\n")
                yield from (line + b"\n" for line in lines)
                chunk = b""
                if dobj.eof:                           # frame done; the next one may start in this chunk
                    chunk, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise EOFError("zstd data ends in the middle of a frame (truncated file?)")
    if rest:
        yield rest


def _compressed_lines(src: Source) -> Iterator[bytes]:
    if src.kind == "jsonl.zst":
        yield from _zst_lines(src.path)
    else:
        with gzip.open(src.path, "rb") as f:
            yield from f


def _stream_errors():
    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError)


def _lines(piece: Piece, counter: LineCounter) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for the lines that start inside the piece."""
    src = piece.source
    if src.kind not in ("jsonl", "txt"):          # compressed: one piece per file, read as a stream
        yield from enumerate(_compressed_lines(src), 1)
        return
    with open(src.path, "rb") as f:
        pos = piece.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":                 # mid-line: that line belongs to the previous piece
                pos += len(f.readline())
        line = counter.line_at(src.path, pos) if pos > 0 else 1
        while pos < piece.stop:
            raw = f.readline()
            if not raw:
                break
            yield line, raw
            pos += len(raw)
            line += 1


def _read_lines(piece: Piece, opts: ReadOptions, counter: LineCounter) -> Iterator[Item]:
    src = piece.source
    is_json = src.kind.startswith("jsonl")
    line = 0
    try:
        for line, raw in _lines(piece, counter):
            if not raw.strip():
                continue                               # blank lines separate nothing: not documents
            if is_json:
                item = _guard(_json_text, opts, raw, src.path, line, opts.text_field)
            else:
                item = _guard(_txt_line, opts, raw, src.path, line)
            yield item if isinstance(item, Skip) else (item, src.path, line)
    except _stream_errors() as e:
        if isinstance(e, InputError):
            raise
        raise InputError(src.path, line + 1, f"cannot read {src.kind} data: {one_line(e)}") from e


def _txt_line(raw: bytes, where: str, line: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise InputError(where, line, f"invalid UTF-8 at byte {e.start} of the line", "bad_utf8")


def _txt_file(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise InputError(path, line, f"invalid UTF-8 at byte {col} of the line", "bad_utf8")


def _read_parquet(piece: Piece, opts: ReadOptions) -> Iterator[Item]:
    import pyarrow.parquet as pq

    path, field = piece.source.path, opts.text_field
    pf = pq.ParquetFile(path)
    md = pf.metadata
    row = sum(md.row_group(i).num_rows for i in range(piece.start)) + 1
    if field not in pf.schema_arrow.names:
        n_rows = sum(md.row_group(i).num_rows for i in range(piece.start, piece.stop))
        err = InputError(path, 0, f'no column "{field}" (columns: {", ".join(pf.schema_arrow.names[:8])});'
                                  " set --text-field", "missing_field")
        if opts.on_error != "skip":
            raise err
        for r in range(row, row + n_rows):
            yield Skip(err.reason, path, r, err.message)
        return
    groups = list(range(piece.start, piece.stop))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[field]):
        for value in batch.column(0).to_pylist():
            item = _guard(_check_text, opts, value, path, row, field)
            yield item if isinstance(item, Skip) else (item, path, row)
            row += 1


def _read_hf(piece: Piece, opts: ReadOptions) -> Iterator[Item]:
    import datasets

    src, field = piece.source, opts.text_field
    ds, where = load_hf(src, opts), hf_label(src, opts)
    if isinstance(ds, datasets.IterableDataset):
        n = max(1, ds.num_shards)
        part = ds.shard(num_shards=n, index=piece.start) if n > 1 else ds
        if n > 1:
            where = f"{where}#shard{piece.start}"
        for row, ex in enumerate(part, 1):
            if field not in ex:
                item = _guard(_missing, opts, where, row, field, list(ex))
            else:
                item = _guard(_check_text, opts, ex[field], where, row, field)
            yield item if isinstance(item, Skip) else (item, where, row)
        return
    if field not in ds.column_names:
        for row in range(piece.start + 1, piece.stop + 1):
            item = _guard(_missing, opts, where, row, field, ds.column_names)
            yield item
        return
    col = ds.select_columns([field])
    for a in range(piece.start, piece.stop, 1000):
        values = col[a:min(piece.stop, a + 1000)][field]
        for row, value in enumerate(values, a + 1):
            item = _guard(_check_text, opts, value, where, row, field)
            yield item if isinstance(item, Skip) else (item, where, row)


def _missing(where: str, row: int, field: str, keys: list):
    raise InputError(where, row, f'no "{field}" field (keys: {", ".join(map(str, keys[:8])) or "none"});'
                                 " set --text-field", "missing_field")


def read_piece(piece: Piece, opts: ReadOptions, counter: LineCounter) -> Iterator[Item]:
    """Documents (and skips) of one piece, in file order."""
    kind = piece.source.kind
    if kind == "hf":
        yield from _read_hf(piece, opts)
    elif kind == "parquet":
        yield from _read_parquet(piece, opts)
    elif kind == "txt" and opts.txt_unit == "file":
        item = _guard(_txt_file, opts, piece.source.path)
        yield item if isinstance(item, Skip) else (item, piece.source.path, 1)
    else:
        yield from _read_lines(piece, opts, counter)


def read_docs(pieces, opts: ReadOptions) -> Iterator[Item]:
    """Documents of several pieces in order (used by train-tokenizer and tests)."""
    counter = LineCounter()
    for piece in pieces:
        yield from read_piece(piece, opts, counter)
