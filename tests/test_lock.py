"""One trainer per run_dir: the lock refuses live holders, takes over dead ones, and the real CLI uses it."""
import json
import logging
import os
import signal
import socket
import subprocess
import time

import pytest

from launch import Ranks, metrics, run, start, train_cmd, write_config
from mds_fixtures import tiny_run_config, two_domain_data
from trainer.config import ConfigError
from trainer.engine import lock
from trainer.engine.lock import LOCK_NAME, RunLock


def held_by(run_dir, age_s=0.0, **holder):
    """A lock file as another trainer would have left it, its heartbeat `age_s` seconds old."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fields = {"host": socket.gethostname(), "pid": 1, "job": None, "time": "2025-01-01T00:00:00+0000",
              "started": None, "pidns": lock.whoami()["pidns"], "token": "theirs", **holder}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(fields))
    mtime = time.time() - age_s
    os.utime(path, (mtime, mtime))
    return path


def holder_of(path):
    return json.loads(path.read_text())


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def test_a_live_holder_is_refused_naming_host_pid_and_job(tmp_path, sleeper, no_slurm):
    started = lock._proc_stat(sleeper.pid)[1]
    path = held_by(tmp_path, pid=sleeper.pid, started=started, job="8812")
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"host {socket.gethostname()}, pid {sleeper.pid}, SLURM job 8812" in msg and str(path) in msg
    assert holder_of(path)["token"] == "theirs"


def test_a_dead_process_on_this_host_is_taken_over(tmp_path, no_slurm, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = held_by(tmp_path, pid=gone.pid)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        held = RunLock(tmp_path).acquire()
    try:
        assert holder_of(path)["pid"] == os.getpid() and held.owned()
        assert f"pid {gone.pid}" in caplog.text and "its process is gone" in caplog.text
    finally:
        held.release()
    assert not path.exists()


def test_a_reused_pid_is_not_the_holder(tmp_path, sleeper, no_slurm):
    """The pid runs, but as a process started at another time than the holder's: the holder is dead."""
    path = held_by(tmp_path, pid=sleeper.pid, started=lock._proc_stat(sleeper.pid)[1] - 1)
    RunLock(tmp_path).acquire().release()
    assert not path.exists()


def test_an_earlier_instance_of_our_slurm_job_is_taken_over(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    path = held_by(tmp_path, host="node-b", pid=999, job="4242")  # fresh heartbeat, other node
    with caplog.at_level(logging.WARNING, logger="trainer"):
        held = RunLock(tmp_path).acquire()
    assert holder_of(path)["job"] == "4242" and holder_of(path)["host"] == socket.gethostname()
    assert "requeued" in caplog.text
    held.release()


def test_a_stale_heartbeat_from_another_host_is_taken_over(tmp_path, no_slurm, caplog):
    path = held_by(tmp_path, age_s=lock.STALE_AFTER_S + 60, host="node-b", pid=999, job="77")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        held = RunLock(tmp_path).acquire()
    assert holder_of(path)["token"] == held.me["token"]
    assert "heartbeat" in caplog.text and "node-b" in caplog.text
    held.release()


def test_a_fresh_heartbeat_from_another_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "5000")  # another job than the holder's
    path = held_by(tmp_path, age_s=lock.STALE_AFTER_S - 60, host="node-b", pid=999, job="77")
    with pytest.raises(ConfigError, match="host node-b, pid 999, SLURM job 77"):
        RunLock(tmp_path).acquire()
    assert holder_of(path)["token"] == "theirs"


def test_heartbeat_refreshes_the_lock_and_release_leaves_others_locks(tmp_path, no_slurm):
    held = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (1, 1))
    deadline = time.time() + 10
    while path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > time.time() - 60
    # Taken over meanwhile (e.g. judged stale): releasing must not delete the new holder's lock.
    held_by(tmp_path, host="node-b", pid=999)
    held.release()
    assert holder_of(path)["host"] == "node-b"


def test_setting_aside_a_stale_lock_keeps_a_lock_taken_meanwhile(tmp_path, no_slurm):
    path = held_by(tmp_path, host="node-b", pid=999, token="new")
    RunLock(tmp_path)._set_aside(seen='{"token": "the stale one"}')
    assert holder_of(path)["token"] == "new"
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


# ----------------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return two_domain_data(tmp_path_factory.mktemp("data"))


def wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"training exited with {proc.poll()} before taking the lock"
        assert time.time() - t0 < timeout, "no lock file in time"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_trainer_on_a_running_run_dir_exits_2_naming_the_first(tmp_path, data):
    cfg = tiny_run_config(tmp_path, data, max_steps=8)
    cfg["run_dir"] = str(tmp_path / "run")
    path = write_config(cfg, tmp_path / "run.yaml")
    first = start(train_cmd(path), tmp_path / "first.log")
    try:
        wait_for(tmp_path / "run" / LOCK_NAME, first)
        os.kill(first.pid, signal.SIGSTOP)  # alive but paused: it surely still holds the run_dir
        second = run(train_cmd(path), check=False, timeout=300)
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: run_dir ") and "in use by another trainer" in last, last
        assert f"host {socket.gethostname()}, pid {first.pid}, " in last, last
        assert "Traceback" not in second.stderr
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    steps = [m["step"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert steps == list(range(1, 9))
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_of_a_refused_job_exits_2_with_the_same_error(tmp_path, data, no_slurm):
    cfg = tiny_run_config(tmp_path, data)
    cfg["run_dir"] = str(tmp_path / "run")
    # Held by this (live) test process.
    held_by(tmp_path / "run", pid=os.getpid(), started=lock._proc_stat(os.getpid())[1], job="31337")
    ranks = Ranks(write_config(cfg, tmp_path / "run.yaml"), 2, tmp_path / "ranks.log")
    assert ranks.wait(timeout=300) == [2, 2], ranks.logs()
    lines = [(tmp_path / f"ranks.log.rank{r}").read_text().strip().splitlines()[-1] for r in range(2)]
    assert lines[0] == lines[1], lines
    assert f"pid {os.getpid()}, SLURM job 31337" in lines[0] and lines[0].startswith("error: "), lines
    assert not (tmp_path / "run" / "config.yaml").exists()
