"""`build`: raw text -> cleaned, deduplicated, tokenized, packed MDS samples for one domain.

One call is one task: the whole input (unsharded), or task I of K (sharded,
one SLURM array task each). Per block of input, in order:

    read -> clean/filter (workers) -> paragraph dedup -> val split by content hash
         -> tokenize + EOS (workers) -> pack to seq_len -> MDSWriter (train / val)

Nothing crosses a block boundary, and blocks do not depend on K (sources.py),
so K tasks + merge give the same samples as one task. Output appears only once
complete (layout.py); stats.json counts everything that was read, dropped,
skipped, deduplicated, packed or discarded (stats.py).
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

import numpy as np

from .clean import LangFilter, ParagraphDedup
from .errors import ConfigError, InputError, Skip
from .layout import DONE_JSON, HASHES_NPY, STATS_JSON, Layout
from .pack import Packer
from .pipeline import DocConfig, Executor, prepare, tokenize
from .readers import LineCounter, read_piece
from .sources import Block, ReadOptions, plan_blocks, resolve_inputs, shard_blocks
from .stats import InputStats, SplitStats, read_json, stats_json, write_json
from .tokenizer import TextTokenizer

COLUMNS = {"input_ids": "ndarray:uint32", "domain": "str", "num_bytes": "int"}
BATCH = 128                 # documents per unit of work sent to a worker
MAX_SKIP_WARNINGS = 10      # skipped records printed to stderr; all are counted in stats.json
FORMAT_VERSION = 1          # bump when the same settings would produce different samples


@dataclass
class BuildConfig:
    """Settings of one build task; field names are the CLI flags (`--seq-len` -> seq_len)."""
    inputs: list
    domain: str
    tokenizer: str
    seq_len: int
    out: str
    val_fraction: float = 0.0
    seed: int = 0
    num_shards: Optional[int] = None     # None: unsharded layout (OUT/train is the MDS dir)
    shard_index: Optional[int] = None
    workers: int = 1
    compression: Optional[str] = "zstd"
    # The trainer reads held-out sets with streaming's LocalDataset, which cannot decompress.
    val_compression: Optional[str] = None
    max_docs: Optional[int] = None       # per task: documents read
    max_tokens: Optional[int] = None     # per task: stop after the document that reaches it
    min_chars: int = 20
    dedup: bool = True
    dedup_min_chars: int = 20
    lang: Optional[str] = None
    lang_threshold: float = 0.5
    text_field: str = "text"
    txt_unit: str = "file"
    split: str = "train"                 # the datasets split to read (not the val split)
    hf_config: Optional[str] = None
    streaming: bool = False
    on_error: str = "fail"
    block_bytes: int = 256 << 20
    progress: Optional[bool] = None      # None: on when stderr is a terminal or under SLURM

    def __post_init__(self):
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.inputs = [str(i) for i in self.inputs]
        self.tokenizer, self.out = str(self.tokenizer), str(self.out)
        if self.compression in ("none", ""):
            self.compression = None
        if self.val_compression in ("none", ""):
            self.val_compression = None
        checks = [
            (bool(self.domain) and all(c.isalnum() or c in "_-." for c in self.domain),
             "--domain: use letters, digits, '_', '-' or '.'"),
            (self.seq_len >= 1, "--seq-len: must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction: must be in [0, 1)"),
            (self.workers >= 1, "--workers: must be >= 1"),
            (self.min_chars >= 0 and self.dedup_min_chars >= 1, "--min-chars / --dedup-min-chars: must be >= 0 / >= 1"),
            (0.0 <= self.lang_threshold <= 1.0, "--lang-threshold: must be in [0, 1]"),
            (self.max_docs is None or self.max_docs >= 1, "--max-docs: must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "--max-tokens: must be >= 1"),
            (self.on_error in ("fail", "skip"), "--on-error: must be fail or skip"),
            (self.txt_unit in ("file", "line"), "--txt-unit: must be file or line"),
            (self.block_bytes >= 1, "--block-bytes: must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if (self.num_shards is None) != (self.shard_index is None):
            raise ConfigError("--num-shards and --shard-index go together")
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index: must be in [0, {self.num_shards}) for --num-shards {self.num_shards}")
        for name in ("compression", "val_compression"):
            _check_compression(getattr(self, name), "--" + name.replace("_", "-"))

    @property
    def splits(self) -> tuple:
        return ("train", "val") if self.val_fraction > 0 else ("train",)

    def read_options(self) -> ReadOptions:
        return ReadOptions(text_field=self.text_field, txt_unit=self.txt_unit, split=self.split,
                           hf_config=self.hf_config, streaming=self.streaming, on_error=self.on_error)

    def doc_config(self) -> DocConfig:
        return DocConfig(tokenizer=self.tokenizer, min_chars=self.min_chars,
                         dedup_min_chars=self.dedup_min_chars if self.dedup else None, lang=self.lang,
                         lang_threshold=self.lang_threshold, val_fraction=self.val_fraction, seed=self.seed)


def _check_compression(name: Optional[str], flag: str) -> None:
    if name is None:
        return
    from streaming.base.compression import is_compression

    if not is_compression(name):
        raise ConfigError(f"{flag}: unknown compression {name!r} (e.g. zstd, zstd:7, gz, br, none)")


def fingerprint_config(cfg: BuildConfig, sources, tok: TextTokenizer) -> dict:
    """Everything that decides the samples (not workers, shard index or progress)."""
    read = cfg.read_options()
    return {
        "format": FORMAT_VERSION, "domain": cfg.domain, "inputs": [s.describe() for s in sources],
        "read": {"text_field": read.text_field, "txt_unit": read.txt_unit, "split": read.split,
                 "hf_config": read.hf_config, "streaming": read.streaming, "on_error": read.on_error},
        "tokenizer": {"path": os.path.abspath(cfg.tokenizer), "sha256": tok.fingerprint()},
        "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "num_shards": cfg.num_shards, "block_bytes": cfg.block_bytes, "min_chars": cfg.min_chars,
        "dedup": cfg.dedup, "dedup_min_chars": cfg.dedup_min_chars, "lang": cfg.lang,
        "lang_threshold": cfg.lang_threshold, "max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens,
        "compression": cfg.compression, "val_compression": cfg.val_compression,
    }


@dataclass
class BuildResult:
    """What a build task produced (also printed as the summary line)."""
    out: str
    task: str                     # "all" (unsharded) or "shard-0000I"
    splits: dict                  # split -> stats.json content
    paths: dict                   # split -> final MDS dir of this task
    skipped_existing: bool = False
    seconds: float = 0.0
    not_written: tuple = ()       # held-out splits with 0 samples: warned about, never published

    def summary(self) -> str:
        first = next(iter(self.splits.values()))
        inp = first["input"]
        parts = [f"data_prep build {first['domain']} {self.task}:",
                 "already complete, nothing to do;" if self.skipped_existing else "",
                 f"{inp['docs_read']} docs read, {inp['docs_kept']} kept "
                 f"({sum(inp['dropped'].values())} dropped, {sum(inp['skipped'].values())} skipped, "
                 f"{inp['paragraphs_deduplicated']} paragraphs deduplicated);"]
        parts += [f"{split}: {st['samples']} samples, {st['sample_tokens']} tokens;"
                  for split, st in self.splits.items() if split not in self.not_written]
        parts += [f"{split}: 0 samples, not written;" for split in self.not_written]
        if not self.skipped_existing:
            tokens = sum(st["tokens"] for st in self.splits.values())
            parts.append(f"{self.seconds:.1f} s, {tokens / max(self.seconds, 1e-9):,.0f} tokens/s;")
        parts.append(f"-> {self.paths['train'] if self.task != 'all' else self.out}")
        return " ".join(p for p in parts if p)


class _Task:
    """The state of one build task while it runs: writers, packers, counters."""

    def __init__(self, cfg: BuildConfig, layout: Layout, executor: Executor, progress):
        from streaming import MDSWriter

        self.cfg, self.executor, self.bar = cfg, executor, progress
        self.writers = {}
        for split in cfg.splits:
            comp = cfg.compression if split == "train" else cfg.val_compression
            self.writers[split] = MDSWriter(out=str(layout.staging(split)), columns=COLUMNS, compression=comp)
        self.inp = InputStats()
        self.split_stats = {s: SplitStats() for s in cfg.splits}
        self.block_hashes: list[np.ndarray] = []
        self.docs_seen = 0
        self.tokens_seen = 0
        self.stopped = False
        self.warnings = 0
        self.counter = LineCounter()

    @property
    def exhausted(self) -> bool:
        """--max-tokens or --max-docs reached: no more blocks."""
        return self.stopped or (self.cfg.max_docs is not None and self.docs_seen >= self.cfg.max_docs)

    # -- reading
    def _docs(self, block: Block) -> Iterator:
        for piece in block.pieces:
            for item in read_piece(piece, self.cfg.read_options(), self.counter):
                if not isinstance(item, Skip):
                    if self.cfg.max_docs is not None and self.docs_seen >= self.cfg.max_docs:
                        return
                    self.docs_seen += 1
                yield item

    # -- one block
    def run_block(self, block: Block) -> None:
        self.inp.blocks += 1
        dedup = ParagraphDedup(self.cfg.dedup_min_chars) if self.cfg.dedup else None
        packers = {s: Packer(self.cfg.seq_len) for s in self.cfg.splits}
        hashes: list[int] = []
        pending_a, pending_b = deque(), deque()
        items = self._docs(block)
        depth = self.executor.depth
        while not self.stopped:
            batch = list(islice(items, BATCH))
            if not batch:
                break
            texts = [it[0] for it in batch if not isinstance(it, Skip)]
            pending_a.append((batch, self.executor.submit(prepare, texts)))
            while len(pending_a) > depth:
                pending_b.append(self._dedup(*pending_a.popleft(), dedup))
            while len(pending_b) > depth and not self.stopped:
                self._consume(*pending_b.popleft(), packers, hashes)
        while pending_a and not self.stopped:
            pending_b.append(self._dedup(*pending_a.popleft(), dedup))
        while pending_b and not self.stopped:
            self._consume(*pending_b.popleft(), packers, hashes)
        for split, packer in packers.items():
            tail_tokens, tail_bytes = packer.finish()
            self.split_stats[split].tail_tokens_discarded += tail_tokens
            self.split_stats[split].tail_bytes_discarded += tail_bytes
        self.block_hashes.append(np.unique(np.array(hashes, dtype=np.uint64)))

    def _dedup(self, batch: list, handle, dedup: Optional[ParagraphDedup]):
        """Parent side of stage 1, in order: remove repeated paragraphs; then send stage 2."""
        outcomes, texts = [], []
        for res in handle.get():
            if res[0] == "drop":
                outcomes.append(res)
                continue
            _, paragraphs, seps, hashes, is_val = res
            if dedup is None:
                text, removed, kept = "".join(p + s for p, s in zip(paragraphs, seps + [""])), 0, []
            else:
                text, removed, kept = dedup.apply(paragraphs, seps, hashes)
            if not text:
                outcomes.append(("duplicate", len(paragraphs), removed))
                continue
            nbytes = len(text.encode("utf-8"))
            outcomes.append(("keep", len(paragraphs), removed, kept, nbytes, "val" if is_val else "train"))
            texts.append(text)
        return batch, outcomes, self.executor.submit(tokenize, texts)

    def _consume(self, batch: list, outcomes: list, handle, packers: dict, hashes: list) -> None:
        """Counts and packs one batch, strictly in input order; stops at --max-tokens."""
        ids_iter = iter(handle.get())
        outcome_iter = iter(outcomes)
        docs = 0
        for item in batch:
            if isinstance(item, Skip):
                self._skip(item)
                continue
            res = next(outcome_iter)
            self.inp.docs_read += 1
            docs += 1
            if res[0] == "drop":
                self.inp.dropped[res[1]] += 1
                continue
            self.inp.paragraphs += res[1]
            self.inp.paragraphs_deduplicated += res[2]
            if res[0] == "duplicate":
                self.inp.dropped["duplicate"] += 1
                continue
            _, _, _, kept, nbytes, split = res
            ids = next(ids_iter)
            self.inp.docs_kept += 1
            hashes.extend(kept)
            st = self.split_stats[split]
            st.docs += 1
            st.doc_bytes += nbytes
            st.tokens += len(ids)
            for sample, sample_bytes in packers[split].add(ids, nbytes):
                self.writers[split].write({"input_ids": sample, "domain": self.cfg.domain, "num_bytes": sample_bytes})
                st.samples += 1
                st.sample_tokens += len(sample)
                st.num_bytes += sample_bytes
            self.tokens_seen += len(ids)
            if self.cfg.max_tokens is not None and self.tokens_seen >= self.cfg.max_tokens:
                self.stopped = True
                break
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.tokens_seen / max(self.bar.format_dict['elapsed'], 1e-9):,.0f} tok/s",
                                     refresh=False)

    def _skip(self, item: Skip) -> None:
        self.inp.skipped[item.reason] += 1
        self.warnings += 1
        if self.warnings <= MAX_SKIP_WARNINGS:
            _warn(f"warning: {item.where}:{item.line}: {item.message} (skipped)", self.bar)
        elif self.warnings == MAX_SKIP_WARNINGS + 1:
            _warn("warning: more records skipped; all are counted in stats.json", self.bar)

    def empty_val(self, layout: Layout) -> tuple:
        """The held-out split when it got 0 samples (too few tokens to fill one sample) in an
        unsharded build: publishing it would only defer the failure to a trainer's final eval.
        A shard's val may be empty while the merged one is not, so `merge` decides for shards."""
        if layout.sharded or "val" not in self.cfg.splits or self.split_stats["val"].samples:
            return ()
        st = self.split_stats["val"]
        _warn(f"warning: {layout.final('val')}: 0 samples ({st.docs} documents, {st.tokens} tokens held out, "
              f"a sample needs --seq-len {self.cfg.seq_len}); no val split written: use a larger "
              "--val-fraction or more input", self.bar)
        return ("val",)

    def finish(self, layout: Layout, fp: str, not_written: tuple = ()) -> dict:
        for w in self.writers.values():
            w.finish()
        all_hashes = np.sort(np.concatenate(self.block_hashes)) if self.block_hashes else np.zeros(0, np.uint64)
        self.inp.cross_block_duplicate_paragraphs = count_repeats([all_hashes])
        result = {}
        for split in self.cfg.splits:
            d = layout.staging(split)
            stats = stats_json(self.cfg.domain, split, self.cfg.seq_len, self.split_stats[split], self.inp)
            result[split] = stats
            if split in not_written:
                continue
            write_json(d / STATS_JSON, stats)
            done = {"fingerprint": fp, "task": layout.name, "split": split}
            if split == "train":
                done["not_written"] = list(not_written)   # a re-run finds the build complete without them
            write_json(d / DONE_JSON, done)
        if layout.sharded:
            np.save(layout.staging("train") / HASHES_NPY, all_hashes)
        return result


def count_repeats(sorted_arrays: list) -> int:
    """Occurrences beyond the first of each value, over several sorted uint64 arrays.

    Hashes are bucketed by their top 4 bits so that merge holds 1/16 of them at a time."""
    total = 0
    for b in range(16):
        lo, hi = np.uint64(b << 60), np.uint64(((b + 1) << 60) - 1)
        parts = [a[np.searchsorted(a, lo, "left"):np.searchsorted(a, hi, "right")] for a in sorted_arrays]
        chunk = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        total += len(chunk) - len(np.unique(chunk))
    return total


def _warn(msg: str, bar) -> None:
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def _progress_bar(enabled: Optional[bool], desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty() or "SLURM_JOB_ID" in os.environ
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, unit=" docs", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30)


def build(cfg: Optional[BuildConfig] = None, **kwargs) -> BuildResult:
    """Runs one build task: `build(BuildConfig(...))` or `build(inputs=[...], domain=..., ...)`."""
    cfg = cfg or BuildConfig(**kwargs)
    start = time.time()
    sources = resolve_inputs(cfg.inputs)
    tok = TextTokenizer(cfg.tokenizer)
    lang = LangFilter(cfg.lang, cfg.lang_threshold) if cfg.lang else None
    blocks = plan_blocks(sources, cfg.read_options(), cfg.block_bytes)
    layout = Layout(cfg.out, cfg.splits, cfg.num_shards, cfg.shard_index or 0)
    fp = layout.claim(fingerprint_config(cfg, sources, tok))
    paths = {s: layout.final(s) for s in cfg.splits}
    if layout.is_done(fp):
        missing = layout.not_written()
        return BuildResult(cfg.out, layout.name,
                           {s: read_json(paths[s] / STATS_JSON) for s in cfg.splits if s not in missing},
                           {s: p for s, p in paths.items() if s not in missing}, skipped_existing=True,
                           not_written=missing)
    layout.clear()
    mine = shard_blocks(len(blocks), cfg.num_shards, cfg.shard_index) if cfg.num_shards else range(len(blocks))
    bar = _progress_bar(cfg.progress, f"{cfg.domain} {layout.name}")
    try:
        with Executor(cfg.doc_config(), cfg.workers, tok, lang) as executor:
            task = _Task(cfg, layout, executor, bar)
            for b in mine:
                if task.exhausted:
                    break
                task.run_block(blocks[b])
            if not layout.sharded and task.inp.docs_read == 0:
                skipped = sum(task.inp.skipped.values())
                raise InputError(cfg.inputs[0], 0, "the input set holds no documents"
                                 + (f" ({skipped} bad records skipped)" if skipped else ""))
            not_written = task.empty_val(layout)
            stats = task.finish(layout, fp, not_written)
    except BaseException:
        layout.discard_staging()   # a failed task leaves nothing behind; a killed one leaves staging only
        raise
    finally:
        if bar is not None:
            bar.close()
    layout.publish(skip=not_written)
    return BuildResult(cfg.out, layout.name, stats, {s: p for s, p in paths.items() if s not in not_written},
                       seconds=time.time() - start, not_written=not_written)
