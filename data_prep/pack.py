"""Concatenate documents (each ending in EOS) and cut the stream into seq_len samples.

Each sample also carries `num_bytes`, the UTF-8 bytes of the text behind its
tokens, for bits per byte. A document of B bytes and T tokens that is cut at
token t gives floor(B*t/T) bytes to what comes before the cut: the shares of
one document add up to exactly B, so per-domain byte sums are exact. What is
left at the end of a block (fewer than seq_len tokens) is the discarded tail,
counted in tokens and bytes.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np


class Packer:
    """Feed documents in order with `add`; it yields (input_ids[seq_len] uint32, num_bytes) samples."""

    def __init__(self, seq_len: int):
        if seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        self.seq_len = seq_len
        self._docs: deque = deque()   # [ids, num_bytes, tokens already packed]
        self._avail = 0               # tokens buffered, not yet in a sample

    def add(self, ids: np.ndarray, num_bytes: int) -> Iterator[tuple[np.ndarray, int]]:
        if len(ids) == 0:
            return
        self._docs.append([ids, num_bytes, 0])
        self._avail += len(ids)
        while self._avail >= self.seq_len:
            yield self._take()

    def _take(self) -> tuple[np.ndarray, int]:
        need, parts, nbytes = self.seq_len, [], 0
        while need:
            doc = self._docs[0]
            ids, total_bytes, off = doc
            n = min(need, len(ids) - off)
            parts.append(ids[off:off + n])
            nbytes += total_bytes * (off + n) // len(ids) - total_bytes * off // len(ids)
            need -= n
            if off + n == len(ids):
                self._docs.popleft()
            else:
                doc[2] = off + n
        self._avail -= self.seq_len
        sample = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return np.ascontiguousarray(sample, dtype=np.uint32), nbytes

    def finish(self) -> tuple[int, int]:
        """Drops the partial sample left over; returns its (tokens, bytes)."""
        tokens = self._avail
        nbytes = sum(b - b * off // len(ids) for ids, b, off in self._docs)
        self._docs.clear()
        self._avail = 0
        return tokens, nbytes
