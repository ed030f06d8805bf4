"""clean_stale_shm: a killed job's shared memory goes, a live job's stays and keeps working.

Real processes and real segments: one job reads a streaming dataset epoch after
epoch while another is killed the way SLURM kills a step (the whole process
group, so Python's resource tracker dies too and cannot clean up).
"""
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import env
from mds_fixtures import write_mds
from trainer.engine.shm import SHM_DIR, clean_stale_shm

pytestmark = [pytest.mark.slow,  # each test starts several processes that import streaming (~10 s each)
              pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory is in /dev/shm on Linux only")]

# A streaming job: prints its segment names, then reads epochs until stdin closes (exit 0) or it is killed.
JOB = """
import os, sys, threading
from streaming import Stream, StreamingDataset
ds = StreamingDataset(streams=[Stream(local=sys.argv[1])], batch_size=2, shuffle=True, shuffle_seed=1)
prefix = f"{ds._shm_prefix_int:06}_"
print(" ".join(sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))), flush=True)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
epochs = 0
while not done.is_set():
    epochs += sum(1 for _ in ds) > 0
print("epochs", epochs, flush=True)
"""


def _start(data: Path) -> tuple[subprocess.Popen, list[str]]:
    p = subprocess.Popen([sys.executable, "-c", JOB, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    names = p.stdout.readline().split()
    assert names, p.stderr.read()
    return p, names


def _exists(names):
    return [n for n in names if (SHM_DIR / n).exists()]


def test_killed_jobs_segments_go_live_ones_stay(tmp_path):
    data = write_mds(tmp_path / "mds", "en", 1, 24, 16, 64, seed=1)
    live, live_names = _start(data)
    killed, killed_names = _start(data)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert _exists(killed_names) == killed_names  # leaked, as after a preemption

    stale_ds = SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_{os.getpid()}"
    stale_ds.write_bytes(b"\0" * 64)
    held_open = SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_2_{os.getpid()}"
    held_open.write_bytes(b"\0" * 64)
    mapped = SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_3_{os.getpid()}"
    mapped.write_bytes(b"\0" * mmap.PAGESIZE)
    unrelated = SHM_DIR / f"not_ours_to_judge_{os.getpid()}"
    unrelated.write_bytes(b"x")
    fd = os.open(held_open, os.O_RDONLY)
    with open(mapped, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    try:
        removed = clean_stale_shm()
        assert set(killed_names) | {stale_ds.name} <= set(removed)
        assert not _exists(killed_names) and not stale_ds.exists()
        assert _exists(live_names) == live_names
        assert held_open.exists() and mapped.exists() and unrelated.exists()

        # Cleaning over and over while the live job shares each new epoch's work must not disturb it.
        t0 = time.time()
        while time.time() - t0 < 3:
            assert not set(clean_stale_shm()) & set(live_names)
        out, err = live.communicate("", timeout=60)
        assert live.returncode == 0, err
        assert int(out.split()[-1]) > 1 and "No such file" not in err, (out, err)
        assert not _exists(live_names)  # it cleaned up after itself on a normal exit

        os.close(fd)
        mm.close()
        fd, mm = None, None
        assert {held_open.name, mapped.name} <= set(clean_stale_shm())  # nothing holds them any more
        assert unrelated.exists()
    finally:
        if fd is not None:
            os.close(fd)
        if mm is not None:
            mm.close()
        for path in (held_open, mapped, unrelated):
            path.unlink(missing_ok=True)
        if live.poll() is None:
            os.killpg(live.pid, signal.SIGKILL)


# Jobs starting together: each builds and drops datasets in a loop, all starting at the same instant.
# Without the lock, 3 of 4 such processes die with FileExistsError: '/0000NN_locals' (checked by hand).
REGISTER = """
import sys
from streaming import Stream, StreamingDataset
from trainer.engine.shm import registering
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    with registering():
        ds = StreamingDataset(streams=[Stream(local=sys.argv[1])], batch_size=2)
    del ds
print("registered", flush=True)
"""


def test_jobs_starting_together_take_turns(tmp_path):
    data = write_mds(tmp_path / "mds", "en", 1, 8, 16, 64, seed=1)
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, str(data), "30"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:  # go, all at once
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and "registered" in out, err[-3000:]
