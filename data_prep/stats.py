"""The counts in each output's stats.json, and how merge sums them.

Per split (train or val): documents, tokens, samples, bytes and the tail
discarded at block ends. They obey, exactly:

    sample_tokens == samples * seq_len == tokens - tail_tokens_discarded
    num_bytes (sum over samples)       == doc_bytes - tail_bytes_discarded

`input` describes the whole build before the split (the same in train and
val): documents read, dropped by reason, skipped bad records by reason, and
paragraphs removed by dedup.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SKIP_REASONS

DROP_REASONS = ("empty", "too_short", "lang", "duplicate")


@dataclass
class InputStats:
    blocks: int = 0
    docs_read: int = 0                 # records parsed into a document (skipped records not included)
    docs_kept: int = 0
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    skipped: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    paragraphs: int = 0                # paragraphs of the documents that reached dedup
    paragraphs_deduplicated: int = 0   # removed as repeats within their block
    # Paragraphs kept in more than one block (dedup does not cross blocks); merge recounts it
    # over all shards. 0 when dedup is off.
    cross_block_duplicate_paragraphs: int = 0


@dataclass
class SplitStats:
    docs: int = 0
    doc_bytes: int = 0                 # UTF-8 bytes of the documents, as tokenized
    tokens: int = 0                    # their tokens, one EOS per document included
    samples: int = 0
    sample_tokens: int = 0
    num_bytes: int = 0                 # sum of the samples' num_bytes column
    tail_tokens_discarded: int = 0
    tail_bytes_discarded: int = 0


def stats_json(domain: str, split: str, seq_len: int, s: SplitStats, inp: InputStats) -> dict:
    """One output's stats.json; `tasks` is 1 per build task, so a merged output has K."""
    return {"domain": domain, "split": split, "seq_len": seq_len, "tasks": 1, **asdict(s), "input": asdict(inp)}


_SAME = {"domain", "split", "seq_len"}


def sum_stats(items: list[dict]) -> dict:
    """Adds numbers key by key; domain, split, seq_len (and any non-number) must agree."""
    out: dict = {}
    for item in items:
        for k, v in item.items():
            if k not in out:
                out[k] = sum_stats([v]) if isinstance(v, dict) else v
            elif isinstance(v, dict):
                out[k] = sum_stats([out[k], v])
            elif k in _SAME or isinstance(v, bool) or not isinstance(v, int):
                if out[k] != v:
                    raise ValueError(f"stats disagree on {k!r}: {out[k]!r} != {v!r}")
            else:
                out[k] += v
    return out


def write_json(path: Path, obj: dict) -> None:
    """Writes through a temp file and a rename, so a reader never sees half a file."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
