"""Training mixture and held-out sets, read from the MDS shards that data_prep wrote.

Training uses one `streaming.Stream` per domain; the `proportion`s implement the
paper's mixture (a fraction p of sequences from the original domain). The
sample order depends only on the seed, `num_canonical_nodes` and the global
batch, never on the number of ranks, which is what makes resuming on a
different world size exact (streaming's elastic determinism).

Held-out sets are read with `LocalDataset` and split by index over ranks, with
no padding or duplication, so per-domain bits per byte are the same on any
number of ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import ConfigError, RunConfig, StreamConfig


def _is_remote(path: str) -> bool:
    return "://" in path


def check_mds_dir(path: str, key: str) -> None:
    if _is_remote(path):
        return
    if not (Path(path) / "index.json").is_file():
        hint = " (run `python -m data_prep merge` on a sharded build)" if Path(path).is_dir() else ""
        raise ConfigError(f"{key}: {path}: not an MDS dataset directory, no index.json{hint}")


def stream_proportions(cfg: RunConfig) -> dict[str, float]:
    """Per-domain sampling proportion: p shared by original streams, 1-p by new ones, by weight."""
    props = {}
    for role, total in (("original", cfg.data.p), ("new", 1.0 - cfg.data.p)):
        members = [s for s in cfg.data.streams if s.role == role and s.train]
        weight = sum(s.weight for s in members)
        for s in members:
            props[s.domain] = total * s.weight / weight if weight else 0.0
    return {d: p for d, p in props.items() if p > 0}


def default_cache_dir() -> str:
    job = os.environ.get("SLURM_JOB_ID") or f"pid{os.getppid()}"
    base = os.environ.get("TMPDIR", "/tmp")
    return os.path.join(base, f"ext-trainer-{job}", "streaming")


@dataclass
class LoaderState:
    """World-size-free position in the training stream (saved in checkpoints)."""
    epoch: int = 0
    sample_in_epoch: int = 0  # global samples consumed in this epoch, over all ranks


class TrainStream:
    """Endless iterator of micro batches over the configured mixture."""

    def __init__(self, cfg: RunConfig, micro_batch: int, world_size: int):
        from streaming import Stream, StreamingDataLoader, StreamingDataset

        from .shm import clean_stale_shm, registering

        clean_stale_shm()
        props = stream_proportions(cfg)
        cache = cfg.data.cache_dir or default_cache_dir()
        streams = []
        for s in cfg.data.streams:
            if s.domain not in props:
                continue
            check_mds_dir(s.train, f"data.streams[{s.domain}].train")
            if _is_remote(s.train):
                streams.append(Stream(remote=s.train, local=os.path.join(cache, s.domain, "train"),
                                      proportion=props[s.domain]))
            else:
                streams.append(Stream(local=s.train, proportion=props[s.domain]))
        self.micro_batch, self.world_size = micro_batch, world_size
        self.num_canonical_nodes = cfg.data.num_canonical_nodes
        self.seed = cfg.train.seed
        with registering():
            self.dataset = StreamingDataset(
                streams=streams, batch_size=micro_batch, shuffle=cfg.data.shuffle, shuffle_seed=cfg.train.seed,
                num_canonical_nodes=cfg.data.num_canonical_nodes)
        self.loader = StreamingDataLoader(self.dataset, batch_size=micro_batch, drop_last=True,
                                          num_workers=cfg.data.num_workers, collate_fn=collate)
        self.state = LoaderState()
        self._it: Optional[Iterator] = None

    def load_state(self, state: dict) -> None:
        self.state = LoaderState(**state)
        self.dataset.load_state_dict({
            "epoch": self.state.epoch, "sample_in_epoch": self.state.sample_in_epoch,
            "num_canonical_nodes": self.num_canonical_nodes, "shuffle_seed": self.seed})
        self._it = None

    def state_dict(self) -> dict:
        return vars(self.state).copy()

    def next_batch(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.state.sample_in_epoch += self.micro_batch * self.world_size
                return batch
            except StopIteration:
                self._it = None
                self.state = LoaderState(epoch=self.state.epoch + 1)
        raise ConfigError("training data yields no full micro batch: too few samples for the batch size")


def collate(samples: list[dict]) -> dict:
    ids = np.stack([s["input_ids"] for s in samples]).astype(np.int64)
    return {
        "input_ids": torch.from_numpy(ids),
        "domain": [s["domain"] for s in samples],
        "num_bytes": torch.tensor([int(s["num_bytes"]) for s in samples], dtype=torch.float64),
    }


def original_mask(domains: list[str], streams: list[StreamConfig]) -> torch.Tensor:
    """(B, 1) bool: True where the sample's domain has role `original`."""
    original = {s.domain for s in streams if s.role == "original"}
    return torch.tensor([[d in original] for d in domains], dtype=torch.bool)


class ValSet:
    """One domain's held-out samples, this rank's slice (index r, r+W, ...).

    Every rank yields the same number of batches (ZeRO-3 gathers parameters
    collectively, so a rank that stops early would hang the others); padding
    rows repeat sample 0 and carry `valid = False` so they are not counted.
    """

    def __init__(self, path: str, rank: int, world_size: int, batch_size: int, max_batches: Optional[int] = None):
        from streaming import LocalDataset

        check_mds_dir(path, "val")
        self.ds = LocalDataset(local=path)
        n = len(self.ds)
        if max_batches is not None:
            # Counted as on one rank: the same samples, hence the same figure, on any number of ranks.
            n = min(n, max_batches * batch_size)
        per_rank = -(-n // world_size)
        mine = list(range(rank, n, world_size))
        self.indices = mine + [-1] * (per_rank - len(mine))
        self.batch_size = batch_size

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[i:i + self.batch_size]
            batch = collate([self.ds[max(j, 0)] for j in chunk])
            batch["valid"] = torch.tensor([j >= 0 for j in chunk])
            yield batch

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)
