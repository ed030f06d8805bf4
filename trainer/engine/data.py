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

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import ConfigError, RunConfig, StreamConfig


def _is_remote(path: str) -> bool:
    return "://" in path


COLUMNS = ("input_ids", "domain", "num_bytes")  # what every sample carries (data_prep writes them)


def check_mds_dir(path: str, key: str, domain: Optional[str] = None) -> None:
    """Refuse at start-up, naming `key`, a dataset that would only fail later (at step 1, or at
    the final eval after hours of training): no index.json, 0 samples, a missing column, or
    samples of another domain than `domain`. Reads the index and one small file or one sample.
    A remote dataset is not checked here: streaming reads its index when it downloads it."""
    if _is_remote(path):
        return
    index = Path(path) / "index.json"
    if not index.is_file():
        hint = " (run `python -m data_prep merge` on a sharded build)" if Path(path).is_dir() else ""
        raise ConfigError(f"{key}: {path}: not an MDS dataset directory, no index.json{hint}")
    try:
        shards = json.loads(index.read_text())["shards"]
        samples = sum(int(shard["samples"]) for shard in shards)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}: {index}: not an MDS index ({type(e).__name__}: {e})") from None
    if samples == 0:
        raise ConfigError(f"{key}: {path}: 0 samples")
    for column in COLUMNS:
        if any(column not in shard.get("column_names", COLUMNS) for shard in shards):
            raise ConfigError(f"{key}: {path}: no {column!r} column (samples need {', '.join(COLUMNS)})")
    if domain is not None:
        try:
            found = dataset_domain(path, shards)
        except (OSError, ValueError, KeyError, IndexError) as e:  # a shard missing or damaged
            raise ConfigError(f"{key}: {path}: cannot read the domain of its first sample ({e})") from None
        if found != domain:
            raise ConfigError(f"{key}: {path}: its samples have domain {found!r}, not the stream's {domain!r}")


def dataset_domain(path: str, shards: list[dict]) -> str:
    """The `domain` column of an MDS dir, read as cheaply as is reliable.

    A dir holds one domain: data_prep writes one output dir per (domain, split), the contract
    in DESIGN.md. data_prep also writes that domain into the dir's stats.json, which appears in
    the same rename as the shards (and which `merge` keeps), so one small JSON file answers for
    every sample, whatever the size and compression of the shards. A dir written another way
    has no stats.json; its first sample is read instead: directly from an uncompressed shard,
    or after decompressing that one shard into a temporary dir (LocalDataset cannot decompress).
    """
    stats = Path(path) / "stats.json"
    if stats.is_file():
        try:
            recorded = json.loads(stats.read_text()).get("domain")
        except (ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str):
            return recorded
    return str(_first_sample(path, shards)["domain"])


def _first_sample(path: str, shards: list[dict]) -> dict:
    from streaming import LocalDataset
    from streaming.base.compression import decompress

    shard = next(s for s in shards if int(s["samples"]) > 0)
    raw = shard["raw_data"]["basename"]
    if (Path(path) / raw).is_file():
        return LocalDataset(local=path)[0]
    zipped = Path(path) / shard["zip_data"]["basename"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / raw).parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / raw).write_bytes(decompress(shard["compression"], zipped.read_bytes()))
        (Path(tmp) / "index.json").write_text(json.dumps({"version": 2, "shards": [shard]}))
        return LocalDataset(local=tmp)[0]


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
        # A DataLoader draws a worker base seed from its generator each time an iterator starts
        # (the first batch, each new epoch, and the first batch after a resume). From the global
        # torch RNG, that extra draw after a resume shifted every later dropout mask; its own
        # generator leaves the global RNG (dropout, restored from checkpoints) to the model alone.
        self.loader = StreamingDataLoader(self.dataset, batch_size=micro_batch, drop_last=True,
                                          num_workers=cfg.data.num_workers, collate_fn=collate,
                                          generator=torch.Generator().manual_seed(cfg.train.seed))
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


def evenly_spaced(n: int, k: int) -> list[int]:
    """k sample indices spread evenly over 0..n-1 (all n when k >= n).

    A capped eval or probe reads a subset: val sets keep their documents' order, so their first k
    samples can be one kind of text (the quickstart's English val holds a stretch at a third of the
    rest's bits per byte) and measure something else than the whole set.
    """
    k = min(n, k)
    return [i * n // k for i in range(k)]


class ValSet:
    """One domain's held-out samples, this rank's slice (index r, r+W, ...).

    Every rank yields the same number of batches (ZeRO-3 gathers parameters
    collectively, so a rank that stops early would hang the others); padding
    rows repeat the first sample and carry `valid = False` so they are not counted.
    """

    def __init__(self, path: str, rank: int, world_size: int, batch_size: int, max_batches: Optional[int] = None):
        from streaming import LocalDataset

        check_mds_dir(path, "val")
        self.ds = LocalDataset(local=path)
        n = len(self.ds)
        # Counted as on one rank: the same samples, hence the same figure, on any number of ranks.
        chosen = evenly_spaced(n, n if max_batches is None else max_batches * batch_size)
        per_rank = -(-len(chosen) // world_size)
        mine = chosen[rank::world_size]
        self.indices = mine + [-1] * (per_rank - len(mine))
        self.pad = chosen[0]  # what padding rows repeat (a rank can have no sample of its own)
        self.batch_size = batch_size

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[i:i + self.batch_size]
            batch = collate([self.ds[j if j >= 0 else self.pad] for j in chunk])
            batch["valid"] = torch.tensor([j >= 0 for j in chunk])
            yield batch

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)
