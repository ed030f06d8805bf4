"""The bench's data: synthetic training shards, and the data-path measurements.

Training shards: random token ids written with `streaming.MDSWriter` in the
columns data_prep writes (zstd train shards, uncompressed val shards, as
data_prep does), so the trainer reads them exactly as it reads real data.
Throughput does not depend on what the tokens say.

Data path, two ratios measured in this process:
- data_prep: `data_prep.build` (clean, dedup, tokenize, pack, write MDS) with one
  worker, over standard-library text, against the raw HF fast tokenizer
  encoding the same documents in batches. Both single-threaded
  (TOKENIZERS_PARALLELISM=false): the figure is per worker. Rates shown are the
  best of each; the ratio is the median of side-by-side pairs.
- loader: `trainer.engine.data.TrainStream`, the trainer's own StreamingDataLoader
  mixture, drained as fast as it goes, against what training consumes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .plan import BenchSize

COLUMNS = {"input_ids": "ndarray:uint32", "domain": "str", "num_bytes": "int"}
BYTES_PER_TOKEN = 3  # a plausible num_bytes, so bits per byte stays finite


def write_mds(out: Path, domain: str, n: int, seq_len: int, vocab: int, seed: int, compression) -> str:
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(out), columns=COLUMNS, compression=compression) as w:
        for _ in range(n):
            ids = rng.integers(3, vocab, size=seq_len, dtype=np.int64).astype(np.uint32)
            w.write({"input_ids": ids, "domain": domain, "num_bytes": BYTES_PER_TOKEN * seq_len})
    return str(out)


def training_data(root: Path, size: BenchSize) -> dict:
    """root/{en,code}/{train,val}; enough samples that no run wraps an epoch (the
    checkpointing-on run continues the off run, so 2 x steps x global batch)."""
    n_train = 2 * size.steps * size.global_batch + size.global_batch
    n_val = 2 * size.micro_batch
    vocab = size.model["vocab_size"]
    out = {}
    for i, domain in enumerate(("en", "code")):
        out[domain] = {
            "train": write_mds(root / domain / "train", domain, n_train, size.seq_len, vocab, 10 + i, "zstd"),
            "val": write_mds(root / domain / "val", domain, n_val, size.seq_len, vocab, 20 + i, None),
        }
    return out


# ----------------------------------------------------------------------------- data_prep vs raw tokenizer


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def raw_tokenizer_rate(tokenizer_dir: Path, texts: list[str], batch: int = 128) -> dict:
    """The HF fast tokenizer alone, batch-encoding `texts` (load time excluded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        ids = tok(texts[i:i + batch], add_special_tokens=False)["input_ids"]
        tokens += sum(len(x) + 1 for x in ids)  # +1: the EOS data_prep appends and counts
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def data_prep_rate(corpus: Path, tokenizer_dir: Path, out: Path, seq_len: int) -> dict:
    """One `data_prep build --workers 1` over the corpus, timed end to end by data_prep itself."""
    from data_prep.build import BuildConfig, build

    res = build(BuildConfig(inputs=[str(corpus)], domain="code", tokenizer=str(tokenizer_dir), seq_len=seq_len,
                            out=str(out), workers=1, progress=False))
    tokens = sum(st["tokens"] for st in res.splits.values())
    return {"tokens": tokens, "seconds": res.seconds, "tokens_per_s": tokens / res.seconds,
            "samples": sum(st["samples"] for st in res.splits.values())}


def data_path(root: Path, size: BenchSize, repeats: int = 5) -> dict:
    """data_prep and raw tokenizer rates, alternated `repeats` times; the ratio pairs each build
    with the tokenizer run just before it (each takes about a second, which a shared machine's
    load can change by 20%)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from data_prep.train_tokenizer import train_tokenizer

    from .runs import paired_ratio
    from ..demo.corpus import build_corpus

    corpus = build_corpus(root / "corpus", max_files=size.corpus_files)
    tok_dir = root / "tokenizer"
    train_tokenizer([str(corpus["en"]), str(corpus["code"])], str(tok_dir), vocab_size=size.tokenizer_vocab)
    texts = _docs(corpus["code"])
    raws, preps = [], []
    for r in range(repeats):
        raws.append(raw_tokenizer_rate(tok_dir, texts))
        preps.append(data_prep_rate(corpus["code"], tok_dir, root / f"prep{r}", size.seq_len))
    ratio, per_repeat = paired_ratio({r: x["tokens_per_s"] for r, x in enumerate(preps)},
                                     {r: x["tokens_per_s"] for r, x in enumerate(raws)})
    return {"corpus_bytes": corpus["code"].stat().st_size, "docs": len(texts),
            "raw_tokenizer": max(raws, key=lambda x: x["tokens_per_s"]),
            "data_prep": max(preps, key=lambda x: x["tokens_per_s"]), "ratio": ratio,
            "ratio_per_repeat": per_repeat}


# ----------------------------------------------------------------------------- loader


def loader_rate(config: dict, warmup_batches: int = 4, min_seconds: float = 2.0, max_batches: int = 2000) -> dict:
    """samples/s of the trainer's TrainStream over `config`'s data (one rank, its own settings).

    Drains micro batches for at least `min_seconds` (or `max_batches`), after a
    warm-up that pays for opening shards and the first shuffle.
    """
    from ..config import load_config
    from ..engine.data import TrainStream

    cfg = load_config(data=config)
    stream = TrainStream(cfg, cfg.train.micro_batch_size, 1)
    for _ in range(warmup_batches):
        stream.next_batch()
    n, t0 = 0, time.perf_counter()
    while n < max_batches and (time.perf_counter() - t0 < min_seconds):
        stream.next_batch()
        n += 1
    seconds = time.perf_counter() - t0
    samples = n * cfg.train.micro_batch_size
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}
