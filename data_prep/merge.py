"""`merge OUT`: join the K shard dirs of a sharded build into one MDS index per split.

Checks that every shard of the build recorded in OUT/build.json is complete
(done.json with the same fingerprint), then writes OUT/SPLIT/stats.json (the
shards' counts summed) and OUT/SPLIT/index.json (streaming's merge_index, so
shard files are referenced as `shard-0000I/shard.xxxxx.mds`). index.json is
written last, through a rename: a trainer never sees a half-merged dataset.

Cross-shard dedup, a documented limit: paragraph dedup runs within each block
of input (that is what keeps sharded == unsharded, see sources.py), so a
paragraph repeated in two blocks stays in both. Samples cannot lose text after
packing, so merge does not remove those repeats; it counts them exactly from
each shard's paragraph_hashes.npy as `input.cross_block_duplicate_paragraphs`
(the same number an unsharded build reports). A bigger --block-bytes widens
the dedup scope.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .build import count_repeats
from .errors import InputError
from .layout import BUILD_JSON, DONE_JSON, HASHES_NPY, STATS_JSON, shard_name
from .stats import read_json, sum_stats, write_json


def merge(out: str) -> dict:
    """Merges a sharded build in place; returns {split: merged stats} of the splits written
    (not val when it has 0 samples)."""
    out = Path(out)
    if not (out / BUILD_JSON).is_file():
        raise InputError(str(out), 0, "not the --out of a data_prep build (no build.json)")
    build = read_json(out / BUILD_JSON)
    fp, cfg = build["fingerprint"], build["config"]
    k = cfg.get("num_shards")
    if k is None:
        raise InputError(str(out), 0, "an unsharded build: OUT/train is already a complete MDS dir, "
                                      "nothing to merge")
    splits = ("train", "val") if cfg["val_fraction"] > 0 else ("train",)
    missing = sorted({i for split in splits for i in range(k) if not _complete(out / split / shard_name(i), fp)})
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(str(out / "train" / shard_name(missing[0])), 0,
                         f"{len(missing)} of {k} shards missing or incomplete (shard index {listed}); "
                         "re-run `build` with those --shard-index values, then merge")
    hashes = [np.load(out / "train" / shard_name(i) / HASHES_NPY, mmap_mode="r") for i in range(k)]
    cross = count_repeats(hashes)
    merged = {}
    for split in splits:
        dirs = [out / split / shard_name(i) for i in range(k)]
        stats = sum_stats([read_json(d / STATS_JSON) for d in dirs])
        stats["input"]["cross_block_duplicate_paragraphs"] = cross
        if split == "val" and stats["samples"] == 0:
            # As in an unsharded build: no empty held-out set for a trainer to fail on at its final eval.
            for name in ("index.json", STATS_JSON):
                (out / split / name).unlink(missing_ok=True)
            print(f"warning: {out / split}: 0 samples in {k} shards ({stats['docs']} documents, {stats['tokens']} "
                  f"tokens held out, a sample needs --seq-len {stats['seq_len']}); no val index written: "
                  "use a larger --val-fraction or more input", file=sys.stderr, flush=True)
            continue
        write_json(out / split / STATS_JSON, stats)
        _merge_index([d / "index.json" for d in dirs], out / split)
        merged[split] = stats
    return merged


def _complete(shard_dir: Path, fp: str) -> bool:
    done = shard_dir / DONE_JSON
    return done.is_file() and read_json(done).get("fingerprint") == fp and (shard_dir / "index.json").is_file()


def _merge_index(index_files: list, dest: Path) -> None:
    from streaming.base.util import merge_index

    tmp = dest / f".merge-tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)   # merge_index logs its temp folder on the root logger
    try:
        merge_index([str(f) for f in index_files], str(tmp))
    finally:
        logging.disable(previous)
    os.replace(tmp / "index.json", dest / "index.json")
    shutil.rmtree(tmp, ignore_errors=True)
