"""Streaming's shared memory on a node shared by several jobs: clean only the dead, register one at a time.

A SIGKILLed or preempted run cannot unlink its POSIX shared memory:
- streaming's segments (`000003_barrier`, ...) then make a later run on the
  node fail with `FileExistsError`;
- DeepSpeed's CPU all-reduce buffers (`deepspeed_allreduce_buffer_*`, 66 MB
  per rank) stay in RAM until the node reboots.

streaming's own `clean_stale_shared_memory()` unlinks every streaming segment on
the node, a live job's included, and probes by briefly creating segments under
the names a starting job may be creating at that moment. Two jobs on one node
(SLURM packing small jobs, the demo running extensions side by side) could
break each other. Here a segment is stale only when no process maps it or
holds it open, which Linux shows in /proc, and only our own are touched.

streaming also races with itself: a starting dataset takes the lowest free
prefix, then creates it, so two jobs starting together can pick the same one
and one dies with `FileExistsError: ... _locals` (mosaicml/streaming#884,
#901). `registering` makes our jobs on a node take turns.
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .. import compat

SHM_DIR = Path("/dev/shm")


def _in_use(uid: int) -> set[str]:
    """Names under /dev/shm that some process we can inspect maps or has open."""
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        proc = Path("/proc", pid)
        try:
            if uid != 0 and proc.stat().st_uid != uid:
                continue  # our segments are mode 0600: only our processes can hold them
            for line in (proc / "maps").read_text().splitlines():
                if str(SHM_DIR) + "/" in line:
                    used.add(line.split(str(SHM_DIR) + "/", 1)[1].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(str(SHM_DIR) + "/"):
                    used.add(target[len(str(SHM_DIR)) + 1:])
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue  # the process exited while we looked, or is not ours to inspect
    return used


def clean_stale_shm() -> list[str]:
    """Unlink our streaming / DeepSpeed shared memory that no live process uses; returns the names.

    Safe to call from every rank of every job at any time: a live job's segments are mapped (or,
    while being created, open) in its processes, so they are never candidates. Off Linux there is
    no /proc to ask, so streaming's node-wide cleanup runs instead (single-job machines only).
    """
    if not (SHM_DIR.is_dir() and Path("/proc/self/maps").is_file()):
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return []
    pattern = re.compile(f"{compat.streaming_shm_pattern()}|{compat.deepspeed_shm_pattern()}")
    uid = os.getuid()
    candidates = []
    for entry in SHM_DIR.iterdir():
        try:
            if pattern.fullmatch(entry.name) and entry.stat().st_uid == uid:
                candidates.append(entry)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    used = _in_use(uid)
    removed = []
    for entry in candidates:
        if entry.name in used:
            continue
        try:
            entry.unlink()
            removed.append(entry.name)
        except FileNotFoundError:
            continue  # another rank of this job removed it first
    return sorted(removed)


@contextmanager
def registering() -> Iterator[None]:
    """Build a StreamingDataset inside this: no other job of this user on the node registers meanwhile.

    The node's local leader (the rank that registers the prefix) holds a lock in /dev/shm, which
    every job on the node sees, unlike a per-job $TMPDIR. Every rank searches for the prefix on its
    own and must find the leader's, so all of them wait at a barrier until the leader holds the
    lock (a no-op in a single process).
    One lock per user: another user's file in a sticky dir could not be opened for writing.
    """
    from filelock import FileLock

    from .dist import barrier

    lock = None
    if compat.streaming_registers_prefix():
        root = SHM_DIR if SHM_DIR.is_dir() else Path(tempfile.gettempdir())
        lock = FileLock(str(root / f"trainer-streaming-{os.getuid()}.lock"))
        lock.acquire()
    try:
        barrier()
        yield
    finally:
        if lock is not None:
            lock.release()
