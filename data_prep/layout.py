"""Where a build writes, and how it makes its output appear only once complete.

    OUT/build.json                 settings and fingerprint of the build that owns OUT
    OUT/train/, OUT/val/           unsharded: each an MDS dir (index.json, shards, stats.json, done.json);
                                   no OUT/val when it got 0 samples (train's done.json says so)
    OUT/train/shard-0000I/ ...     sharded: one MDS dir per array task, joined by `merge`
                                   into OUT/train/index.json + stats.json
    OUT/.staging/NAME/SPLIT/       where a task writes before publishing

A task writes everything into OUT/.staging, including a `done.json` holding
the build fingerprint, then renames each split dir into place (val first,
train last). A rename is atomic, so a final dir either is complete or does not
exist; a task killed at any point leaves only staging, which the next run of
the same task deletes before it starts again. A task whose final dirs all
carry done.json with the current fingerprint is skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from .errors import InputError
from .stats import read_json, write_json

BUILD_JSON = "build.json"
DONE_JSON = "done.json"
STATS_JSON = "stats.json"
HASHES_NPY = "paragraph_hashes.npy"
STAGING = ".staging"


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


class Layout:
    """Paths of one task's output (one shard, or the whole unsharded build)."""

    def __init__(self, out: str, splits: tuple, num_shards: Optional[int], shard_index: int = 0):
        self.out = Path(out)
        self.splits = splits
        self.sharded = num_shards is not None
        self.name = shard_name(shard_index) if self.sharded else "all"

    def final(self, split: str) -> Path:
        return self.out / split / self.name if self.sharded else self.out / split

    def staging(self, split: str) -> Path:
        return self.out / STAGING / self.name / split

    def claim(self, config: dict) -> str:
        """Records the build settings in OUT/build.json, or checks they match the ones there."""
        fp = fingerprint(config)
        path = self.out / BUILD_JSON
        if path.is_file():
            old = read_json(path)
            if old.get("fingerprint") != fp and self._published():
                keys = sorted(k for k in set(old.get("config", {})) | set(config)
                              if old.get("config", {}).get(k) != config.get(k))
                raise InputError(str(self.out), 0, "holds a build with different settings "
                                 f"({', '.join(keys) or 'format'} differ); remove it or choose another --out")
            if old.get("fingerprint") != fp:    # an earlier attempt that published nothing (e.g. bad input)
                write_json(path, {"fingerprint": fp, "config": config})
        else:
            for split in ("train", "val"):
                if (self.out / split).exists():
                    raise InputError(str(self.out / split), 0, "exists but was not written by data_prep build "
                                     "(no build.json); remove it or choose another --out")
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(path, {"fingerprint": fp, "config": config})
        return fp

    def _published(self) -> bool:
        """Whether any task of the build in OUT has published output (which settings must then match)."""
        return any((self.out / split / DONE_JSON).is_file() or any((self.out / split).glob(f"*/{DONE_JSON}"))
                   for split in ("train", "val"))

    def is_done(self, fp: str) -> bool:
        skip = self.not_written()
        for split in self.splits:
            if split in skip:
                continue
            done = self.final(split) / DONE_JSON
            if not done.is_file() or read_json(done).get("fingerprint") != fp:
                return False
        return True

    def not_written(self) -> tuple:
        """The splits the published task left out for having 0 samples (recorded in train's done.json)."""
        done = self.final("train") / DONE_JSON
        return tuple(read_json(done).get("not_written", ())) if done.is_file() else ()

    def clear(self) -> None:
        """Removes this task's staging and any partial final output, and a stale merged index."""
        self.discard_staging()
        for split in ("train", "val"):
            final = self.final(split)
            if final.exists():
                if not (final / DONE_JSON).is_file():
                    raise InputError(str(final), 0, "exists but was not written by data_prep build; "
                                                    "remove it or choose another --out")
                shutil.rmtree(final)
            if self.sharded:
                # A merged index over the old shard would now point at missing files.
                for name in ("index.json", STATS_JSON):
                    (self.out / split / name).unlink(missing_ok=True)

    def discard_staging(self) -> None:
        shutil.rmtree(self.out / STAGING / self.name, ignore_errors=True)
        self._remove_empty_staging()

    def _remove_empty_staging(self) -> None:
        for d in (self.out / STAGING / self.name, self.out / STAGING):
            try:
                d.rmdir()
            except OSError:
                pass    # not empty: another task is still staging

    def publish(self, skip: tuple = ()) -> None:
        for split in reversed(self.splits):     # val first: train's presence means the task finished
            if split in skip:
                shutil.rmtree(self.staging(split))
                continue
            final = self.final(split)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.staging(split), final)
        self._remove_empty_staging()
