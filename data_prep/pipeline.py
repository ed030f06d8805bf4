"""The per-document work that can run in parallel, and an executor that keeps input order.

Two stages run in worker processes (`--workers N`): `prepare` (clean, filter
by length and language, split into paragraphs and hash them, pick the split)
and `tokenize`. Dedup and packing carry state from one document to the next,
so they stay in the parent, which consumes results strictly in submission
order. The same functions run in-process when N == 1, which is why any N
gives byte-identical output.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from .clean import LangFilter, normalize, paragraph_hash, split_paragraphs, val_hash
from .tokenizer import TextTokenizer, tokenizers_env


@dataclass(frozen=True)
class DocConfig:
    """What the workers need (picklable)."""
    tokenizer: str
    min_chars: int
    dedup_min_chars: Optional[int]      # None: dedup off, no hashing
    lang: Optional[str]
    lang_threshold: float
    val_fraction: float
    seed: int


class _State:
    def __init__(self, cfg: DocConfig, tok: Optional[TextTokenizer] = None, lang: Optional[LangFilter] = None):
        self.cfg = cfg
        self.tok = tok or TextTokenizer(cfg.tokenizer)
        self.lang = lang or (LangFilter(cfg.lang, cfg.lang_threshold) if cfg.lang else None)


_STATE: Optional[_State] = None


def set_state(cfg: DocConfig, tok: Optional[TextTokenizer] = None, lang: Optional[LangFilter] = None) -> None:
    """Loads (or adopts the parent's) tokenizer and language model in this process."""
    global _STATE
    if _STATE is None or _STATE.cfg != cfg or (tok is not None and _STATE.tok is not tok):
        _STATE = _State(cfg, tok, lang)


def _init_worker(cfg: DocConfig) -> None:
    _die_with_parent()
    tokenizers_env()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C and tears the pool down
    set_state(cfg)                                 # no-op after fork: the parent's state is inherited


def _die_with_parent() -> None:
    """A killed parent must not leave workers behind (Linux; elsewhere the pool's own cleanup applies)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def prepare(texts: list[str]) -> list[tuple]:
    """Per text: ("drop", reason) or ("keep", paragraphs, separators, hashes, is_val)."""
    st, cfg = _STATE, _STATE.cfg
    out = []
    for raw in texts:
        text = normalize(raw)
        if not text:
            out.append(("drop", "empty"))
            continue
        if len(text) < cfg.min_chars:
            out.append(("drop", "too_short"))
            continue
        if st.lang is not None and not st.lang.keep(text):
            out.append(("drop", "lang"))
            continue
        paragraphs, seps = split_paragraphs(text)
        if cfg.dedup_min_chars is None:
            hashes = [None] * len(paragraphs)
        else:
            hashes = [paragraph_hash(p) if len(p) >= cfg.dedup_min_chars else None for p in paragraphs]
        is_val = cfg.val_fraction > 0 and val_hash(text, cfg.seed) < cfg.val_fraction
        out.append(("keep", paragraphs, seps, hashes, is_val))
    return out


def tokenize(texts: list[str]):
    return _STATE.tok.encode(texts)


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class Executor:
    """Runs stage functions inline (workers == 1) or in a process pool; `.get()` results in order."""

    def __init__(self, cfg: DocConfig, workers: int, tok: TextTokenizer, lang: Optional[LangFilter]):
        set_state(cfg, tok, lang)
        self.workers = workers
        self.pool = None
        if workers > 1:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(cfg,))

    @property
    def depth(self) -> int:
        """Batches kept in flight per stage: enough to keep every worker busy."""
        return 2 * self.workers if self.pool else 0

    def submit(self, fn: Callable, arg):
        if self.pool is None:
            return _Done(fn(arg))
        return self.pool.apply_async(fn, (arg,))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
