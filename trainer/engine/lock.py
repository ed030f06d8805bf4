"""One trainer per run directory: a lock file in run_dir that names its holder.

Two trainers started on one run_dir would both write the same checkpoint tags and
log every step twice in metrics.jsonl. The first to create `run_dir/.trainer.lock`
(O_CREAT|O_EXCL: atomic on local disks, NFSv3+ and Lustre, so it also works across
nodes) holds the run; the file says who it is (host, pid, SLURM job, start time).
All ranks of a job are one holder: global rank 0 takes the lock and every rank gets
the same answer, so the other ranks exit with the same error instead of hanging.

A holder killed with SIGKILL, or lost with its node, leaves its lock behind. It is
stale, and taken over with a warning, when
  - it was taken on this host and its process is gone (same pid namespace), or
  - it was taken by an earlier instance of our own SLURM job (a requeued job keeps
    its id, and SLURM starts it again only once the old instance is dead), or
  - its heartbeat is old: the holder touches the file's mtime every HEARTBEAT_S from
    a daemon thread, and a lock untouched for STALE_AFTER_S belongs to a dead holder
    (the margin also covers NFS attribute caching and clocks a little apart).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from . import dist
from ..config import ConfigError
from .logger import log

LOCK_NAME = ".trainer.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

_held: dict[Path, "RunLock"] = {}  # locks this process holds, by lock path


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks since boot) of a process from /proc, None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rpartition(")")[2].split()  # the command name in (...) may hold spaces
    return fields[0], int(fields[19])


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int, started: Optional[int]) -> bool:
    """Whether `pid` still runs as the process that took the lock (not a zombie, not a reused pid)."""
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").is_file():
            return False  # procfs works: no such process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, ticks = stat
    # A SIGKILLed rank can stay a zombie until its (dead) launcher's orphans are reaped.
    return state not in ("Z", "X") and (started is None or ticks == started)


def whoami() -> dict:
    """What a lock file records about its holder."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"host": socket.gethostname(), "pid": pid, "job": os.environ.get("SLURM_JOB_ID"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started": stat[1] if stat else None,
            "pidns": _pid_namespace(), "token": uuid.uuid4().hex}


def describe(holder: dict) -> str:
    job = holder.get("job")
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"{f'SLURM job {job}' if job else 'no SLURM job'}, since {holder.get('time', '?')}")


def stale_reason(holder: dict, heartbeat_age_s: float, me: dict,
                 stale_after_s: float = STALE_AFTER_S) -> Optional[str]:
    """Why the lock of `holder` may be taken over by `me`, or None if its holder may be alive."""
    if holder.get("host") == me["host"] and holder.get("pidns") == me["pidns"]:
        if holder.get("pid") == me["pid"]:
            return "it was left by an earlier run in this process"
        if not _alive(int(holder.get("pid", -1)), holder.get("started")):
            return "its process is gone"
        return None
    if holder.get("job") and holder.get("job") == me["job"]:
        return f"it belongs to an earlier instance of this SLURM job ({me['job']}, requeued)"
    if heartbeat_age_s > stale_after_s:
        return f"its heartbeat is {heartbeat_age_s:.0f}s old (stale after {stale_after_s:.0f}s)"
    return None


class RunLock:
    """The lock of one run_dir, held by this process once `acquire()` returned."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.run_dir = Path(run_dir)
        self.path = Path(os.path.abspath(self.run_dir / LOCK_NAME))
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = whoami()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self, attempts: int = 5) -> "RunLock":
        """Take the lock, taking over a stale one; ConfigError naming the holder if it is alive."""
        if self.path in _held:
            raise ConfigError(f"run_dir {self.run_dir} is already in use by a trainer in this process")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self.me).encode()
        for _ in range(attempts):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            _held[self.path] = self
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise ConfigError(f"{self.path}: could not take the run lock ({attempts} tries; "
                          "other trainers keep starting on this run_dir)")

    def _read(self) -> tuple[str, float]:
        """(text, heartbeat age in seconds) of the lock file; FileNotFoundError if there is none."""
        with open(self.path) as f:
            text = f.read()
            age = time.time() - os.fstat(f.fileno()).st_mtime
        return text, age

    def _handle_existing(self) -> None:
        """Raise if the lock's holder may be alive; else set its lock aside (the caller retries)."""
        try:
            text, age = self._read()
        except FileNotFoundError:
            return  # released meanwhile
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if holder is None and age < 5:
            time.sleep(1.0)  # a holder between creating the file and writing it
            return
        holder = holder or {}
        reason = stale_reason(holder, age, self.me, self.stale_after_s) if holder else \
            (f"its content is unreadable and {age:.0f}s old" if age > self.stale_after_s else None)
        if reason is None:
            raise ConfigError(f"run_dir {self.run_dir} is in use by another trainer ({describe(holder)}; "
                              f"heartbeat {age:.0f}s ago); wait for it to end, or delete {self.path} if "
                              "that run is dead")
        log.warning("taking over the run lock %s of %s: %s", self.path, describe(holder), reason)
        self._set_aside(text)

    def _set_aside(self, seen: str) -> None:
        """Remove the stale lock whose content was `seen`, without removing one taken meanwhile.

        Renaming is atomic: whoever renames the file owns what it renamed. If that is no longer
        the stale lock (another starter took it over first), it is linked back in place.
        """
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text() != seen:
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass  # yet another lock is there: it stays
        finally:
            aside.unlink(missing_ok=True)

    def owned(self) -> bool:
        try:
            return json.loads(self._read()[0]).get("token") == self.me["token"]
        except (OSError, ValueError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.owned():
                    log.error("lost the run lock %s to another trainer: this run and that one now both "
                              "write to %s", self.path, self.run_dir)
                    return
                os.utime(self.path)  # no times given: the file server's clock sets the mtime
            except OSError as e:
                log.warning("cannot refresh the run lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours (idempotent)."""
        self._stop.set()
        if _held.pop(self.path, None) is None:
            return
        if self.owned():
            self.path.unlink(missing_ok=True)


def acquire(run_dir: Path, world: "dist.World") -> Optional[RunLock]:
    """Global rank 0 takes the lock of `run_dir`; every rank returns or raises the same way.

    Returns the lock on rank 0, None on the other ranks; raises ConfigError on every
    rank if the run_dir is held by a live trainer.
    """
    lock, error = None, None
    if world.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except ConfigError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - told to every rank first, then re-raised here
            error = f"{Path(run_dir) / LOCK_NAME}: cannot take the run lock: {e}"
            dist.broadcast_object(error)
            raise
    error = dist.broadcast_object(error)
    if error:
        raise ConfigError(error)
    return lock


def release(run_dir: Path) -> None:
    """Release the lock of `run_dir` if this process holds it (any rank may call it)."""
    lock = _held.get(Path(os.path.abspath(Path(run_dir) / LOCK_NAME)))
    if lock is not None:
        lock.release()


@atexit.register
def _release_all() -> None:
    """A run that ends on an uncaught error still frees its run_dir (SIGKILL cannot: see stale_reason)."""
    for lock in list(_held.values()):
        lock.release()
