"""slurm/ templates: syntax, rendered commands, and their mechanics on a real scheduler.

Unmarked tests need no cluster: they render each template with DRY_RUN=1 and a fake
job environment and check the commands it would run. Tests marked `slurm` submit
real jobs to the local cluster (bash slurm/local_cluster.sh up) and skip without it;
here the trainer is a stub, so the signal/requeue logic of train.sbatch is tested on
its own (tests/test_slurm_e2e.py runs the real data_prep and trainer).
"""
import json
import os
import re
import signal as signal_module
import subprocess
import time
from pathlib import Path

import pytest

from slurm_fixtures import (LOCAL_CPU_OPTS, LOCAL_TRAIN_OPTS, SCRIPTS, SLURM_CONF_MARKER, SLURM_DIR, TEMPLATES,
                            cancel, job_env, job_records, metrics, read_log,
                            render, require_cluster, sbatch, sbatch_directives, shown_commands, stub_repo, wait_job,
                            wait_until)

# Options a user must look at before submitting: each needs an "EDIT" marker on its line.
MUST_EDIT = {
    "prep.sbatch": {"--account", "--partition", "--array", "--time"},
    "merge.sbatch": {"--account", "--partition", "--time"},
    "train.sbatch": {"--account", "--partition", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--time"},
    "eval.sbatch": {"--account", "--partition", "--gpus-per-node", "--time"},
}
# sbatch long options the templates may use (checked for typos without a cluster; the
# slurm-marked test below has the real sbatch parse them).
KNOWN_OPTIONS = {"--job-name", "--account", "--partition", "--array", "--nodes", "--ntasks", "--ntasks-per-node",
                 "--gpus-per-node", "--cpus-per-task", "--mem", "--time", "--output", "--error", "--open-mode",
                 "--requeue", "--signal", "--exclusive"}


# ----------------------------------------------------------------------------- no cluster


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    r = subprocess.run(["bash", "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", TEMPLATES)
def test_sbatch_header(name):
    path = SLURM_DIR / name
    directives = sbatch_directives(path)
    keys = [k for k, _ in directives]
    assert keys, f"{name}: no #SBATCH directives before the first command"
    assert set(keys) <= KNOWN_OPTIONS, f"{name}: unexpected options {set(keys) - KNOWN_OPTIONS}"
    assert len(keys) == len(set(keys)), f"{name}: duplicate options"
    edit_lines = {line.split("=")[0].split()[1] for line in path.read_text().splitlines()
                  if line.startswith("#SBATCH") and "EDIT" in line}
    assert MUST_EDIT[name] <= edit_lines, f"{name}: not marked EDIT: {MUST_EDIT[name] - edit_lines}"
    text = path.read_text()
    assert "ENVIRONMENT: EDIT slurm/env.sh" in text
    assert "sbatch " in text.split("\n#SBATCH")[0], f"{name}: the header must show the submit command"


def test_train_header_survives_preemption():
    d = dict(sbatch_directives(SLURM_DIR / "train.sbatch"))
    assert d["--open-mode"] == "append"
    assert "--requeue" in d
    sig, _, secs = d["--signal"].partition("@")
    assert sig == "B:USR1" and int(secs) >= 60
    assert d["--ntasks-per-node"] == d["--gpus-per-node"], "one task per GPU"


def test_render_train_gpu(tmp_path):
    r = render("train.sbatch", ["configs/big.yaml", "train.max_steps=10", "method.alpha=2 0"], {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_PER_NODE": "a100:8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NTASKS": "16",
        "SLURM_CPUS_PER_TASK": "8", "NODE_LOCAL_DIR": "/nvme", "RUN_DIR": "runs/big"},
        tmp_path, hostnames=("gpu001", "gpu002"))
    assert r.returncode == 0, r.stderr
    assert "MASTER_ADDR=gpu001 MASTER_PORT=14840 GPUS_PER_NODE=8" in r.stdout
    assert "DS_ACCELERATOR=auto" in r.stdout
    assert "=== train: job 4242 attempt 1 on gpu[001-002]" in r.stdout
    assert shown_commands(r.stdout) == [[
        "srun", "--kill-on-bad-exit=0", "--wait=120", "--cpus-per-task=8",
        "python", "-m", "trainer", "train", "configs/big.yaml", "data.cache_dir=/nvme/streaming-4242",
        "run_dir=runs/big", "train.max_steps=10", "method.alpha=2 0"]]


def test_render_train_cpu_requeued(tmp_path):
    # No GPU on the node: DeepSpeed's CPU accelerator; a requeued attempt gets a new port.
    r = render("train.sbatch", ["cfg.yaml"], {
        "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm", "SLURM_GPUS_PER_NODE": "0", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_RESTART_COUNT": "3", "TMPDIR": "/scratch"}, tmp_path, ("vm",))
    assert r.returncode == 0, r.stderr
    assert "MASTER_ADDR=vm MASTER_PORT=10143 GPUS_PER_NODE=0 NTASKS=2 DS_ACCELERATOR=cpu" in r.stdout
    assert "attempt 4" in r.stdout
    assert shown_commands(r.stdout) == [["srun", "--kill-on-bad-exit=0", "--wait=120", "python", "-m", "trainer",
                                         "train", "cfg.yaml", "data.cache_dir=/scratch/streaming-7"]]


def test_render_prep(tmp_path):
    build = ["--input", "raw/a b.jsonl", "--domain", "fr", "--tokenizer", "tok", "--seq-len", "64", "--out", "data/fr"]
    r = render("prep.sbatch", build, {"SLURM_JOB_ID": "11", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "3",
                                      "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4",
                                      "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_CPUS_PER_TASK": "6"}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert shown_commands(r.stdout) == [["python", "-m", "data_prep", "build", *build, "--num-shards", "4",
                                         "--shard-index", "2", "--workers", "6"]]


def test_render_prep_rejects_sparse_array(tmp_path):
    r = render("prep.sbatch", ["--out", "x"], {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0",
                                               "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_COUNT": "3"}, tmp_path)
    assert r.returncode == 2 and "contiguous" in r.stderr
    r = render("prep.sbatch", ["--out", "x"], {"SLURM_JOB_ID": "5"}, tmp_path)
    assert r.returncode == 2 and "--array" in r.stderr


def test_render_prep_redo_some_shards(tmp_path):
    # NUM_SHARDS=16 sbatch --array=3,7 ...: the task id is the shard index.
    env = {"NUM_SHARDS": "16", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3",
           "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_COUNT": "2"}
    r = render("prep.sbatch", ["--out", "x"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert shown_commands(r.stdout)[0][-6:] == ["--num-shards", "16", "--shard-index", "7", "--workers", "1"]
    r = render("prep.sbatch", ["--out", "x"], {**env, "NUM_SHARDS": "4"}, tmp_path)
    assert r.returncode == 2 and "out of range" in r.stderr


def test_render_merge_and_eval(tmp_path):
    r = render("merge.sbatch", ["data/fr"], {"SLURM_JOB_ID": "12"}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert shown_commands(r.stdout) == [["python", "-m", "data_prep", "merge", "data/fr"]]
    r = render("eval.sbatch", ["--run-dir", "runs/x"], {"SLURM_JOB_ID": "13", "SLURM_JOB_NODELIST": "g1",
                                                        "SLURM_GPUS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "4"},
               tmp_path, ("g1",))
    assert r.returncode == 0, r.stderr
    assert shown_commands(r.stdout) == [["srun", "--kill-on-bad-exit=1", "--cpus-per-task=4",
                                         "python", "-m", "trainer", "eval", "--run-dir", "runs/x"]]


def test_prep_sh_submits_array_then_merge(tmp_path):
    # A fake sbatch records its arguments and hands out job ids.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/bash\nn=$(( $(wc -l < "$LOG" 2>/dev/null || echo 0) + 100 ))\n'
                                   'printf "%s\\n" "$*" >> "$LOG"\necho "$n;cluster"\n')
    (bindir / "sbatch").chmod(0o755)
    log = tmp_path / "calls"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "LOG": str(log)}
    r = subprocess.run(["bash", str(SLURM_DIR / "prep.sh"), "--shards", "3", "--partition=cpu", "--",
                        "--input", "in.jsonl", "--domain", "fr", "--tokenizer", "tok", "--seq-len", "8",
                        "--out=data/fr"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["100", "101"]
    calls = log.read_text().splitlines()
    assert calls[0] == (f"--parsable --array=0-2 --partition=cpu {SLURM_DIR}/prep.sbatch "
                        "--input in.jsonl --domain fr --tokenizer tok --seq-len 8 --out=data/fr")
    assert calls[1] == (f"--parsable --dependency=afterok:100 --kill-on-invalid-dep=yes --partition=cpu "
                        f"{SLURM_DIR}/merge.sbatch data/fr")
    r = subprocess.run(["bash", str(SLURM_DIR / "prep.sh"), "--", "--input", "x"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--out" in r.stderr


# ----------------------------------------------------------------------------- on the cluster


@pytest.fixture
def cluster():
    require_cluster()
    submitted: list[str] = []
    yield submitted
    cancel(submitted)  # anything a failed test left running


@pytest.mark.slurm
def test_trivial_job(cluster, tmp_path):
    out = tmp_path / "hello.out"
    job = sbatch(["--partition=debug", "--time=00:01:00", f"--output={out}",
                  "--wrap", "echo hello from $SLURM_JOB_ID on $(hostname)"], tmp_path)
    cluster.append(job)
    (rec,) = wait_job(job, timeout=60)
    assert rec["JobState"] == "COMPLETED", read_log(out)
    assert f"hello from {job}" in out.read_text()


@pytest.mark.slurm
@pytest.mark.parametrize("name,opts,args", [
    ("prep.sbatch", ["--array=0-2"] + LOCAL_CPU_OPTS, ["--out", "x"]),
    ("merge.sbatch", LOCAL_CPU_OPTS, ["x"]),
    ("train.sbatch", LOCAL_TRAIN_OPTS, ["cfg.yaml"]),
    ("eval.sbatch", LOCAL_CPU_OPTS + ["--gpus-per-node=0"], []),
])
def test_sbatch_accepts_templates(cluster, tmp_path, name, opts, args):
    # The real sbatch parses every #SBATCH line (plus the local overrides) without running.
    r = subprocess.run(["sbatch", "--test-only", *opts, str(SLURM_DIR / name), *args], cwd=tmp_path,
                       env=job_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "to start at" in r.stderr


def _submit_stub(cluster, tmp_path, steps, extra_env=None, overrides=()):
    repo = stub_repo(tmp_path)
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    (tmp_path / "cfg.yaml").write_text("# the stub trainer reads only its overrides\n")
    env = job_env(REPO_DIR=repo, NODE_LOCAL_DIR=tmp_path / "local", **(extra_env or {}))
    job = sbatch([*LOCAL_TRAIN_OPTS, f"--output={log}", str(SLURM_DIR / "train.sbatch"), "cfg.yaml",
                  f"run_dir={run_dir}", f"train.max_steps={steps}", "stub.step_seconds=0.2", *overrides],
                 tmp_path, env)
    cluster.append(job)
    return job, run_dir, log


@pytest.mark.slurm
@pytest.mark.parametrize("signal", ["USR1", "TERM"])
def test_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, signal):
    job, run_dir, log = _submit_stub(cluster, tmp_path, steps=40)
    wait_until(lambda: len(metrics(run_dir)) >= 3, 60, what="training to start")
    subprocess.run(["scancel", f"--signal={signal}", "--batch", job], check=True, timeout=30)
    (rec,) = wait_job(job, timeout=120)
    text = read_log(log)
    assert rec["JobState"] == "COMPLETED", text
    assert rec["Restarts"] == "1", text
    # Every step exactly once: the second attempt resumed where the first stopped.
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 41)), text
    assert text.count(f"=== train: job {job} attempt") == 2, text
    assert f"=== train: job {job} attempt 2" in text
    assert f"SIG{signal}" in text and "requeueing job" in text
    assert "stub rank 0: SIGUSR1 -> checkpoint" in text and "stub rank 1: SIGUSR1 -> checkpoint" in text
    # What each rank saw: one task per rank, the rendezvous and the CPU accelerator.
    for attempt in (0, 1):
        for rank in (0, 1):
            seen = json.loads((run_dir / "ranks" / f"attempt{attempt}_rank{rank}.json").read_text())
            assert seen["local"] == rank and seen["world"] == 2
            assert seen["DS_ACCELERATOR"] == "cpu" and seen["MASTER_ADDR"]
            port = 10000 + (int(job) % 1000) * 20 + attempt
            assert seen["MASTER_PORT"] == str(port)
            assert f"data.cache_dir={tmp_path / 'local'}/streaming-{job}" in seen["argv"]
    assert not (tmp_path / "local" / f"streaming-{job}").exists(), "node-local cache not cleaned up"


@pytest.mark.slurm
def test_max_restarts_bounds_requeues(cluster, tmp_path):
    job, run_dir, log = _submit_stub(cluster, tmp_path, steps=40, extra_env={"MAX_RESTARTS": 0})
    wait_until(lambda: len(metrics(run_dir)) >= 2, 60, what="training to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    (rec,) = wait_job(job, timeout=60)
    text = read_log(log)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "75:0", text
    assert rec["Restarts"] == "0"
    assert "MAX_RESTARTS=0 requeues reached" in text
    assert (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.slurm
def test_uninterrupted_stub_run_completes(cluster, tmp_path):
    job, run_dir, log = _submit_stub(cluster, tmp_path, steps=5)
    (rec,) = wait_job(job, timeout=60)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "0", read_log(log)
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert "training step exited with code 0" in read_log(log)


@pytest.mark.slurm
def test_ranks_come_from_srun_not_from_the_submitting_shell(cluster, tmp_path):
    """sbatch exports the submitter's environment; a RANK/WORLD_SIZE there (a torchrun shell, a
    process group started in a notebook) must not make both tasks rank 0 of a world of 1."""
    job, run_dir, _ = _submit_stub(cluster, tmp_path, steps=1,
                                   extra_env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    (rec,) = wait_job(job, timeout=60)
    assert rec["JobState"] == "COMPLETED"
    seen = [json.loads((run_dir / "ranks" / f"attempt0_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["RANK"], s["WORLD_SIZE"]) for s in seen] == [(None, None), (None, None)]


@pytest.mark.slurm
def test_missing_config_fails_fast(cluster, tmp_path):
    log = tmp_path / "train.out"
    job = sbatch([*LOCAL_TRAIN_OPTS, f"--output={log}", str(SLURM_DIR / "train.sbatch"), "nope.yaml"], tmp_path)
    cluster.append(job)
    (rec,) = wait_job(job, timeout=60)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "2:0"
    assert "config nope.yaml not found" in read_log(log)


@pytest.mark.slurm
def test_signal_during_startup_still_requeues(cluster, tmp_path):
    # USR1 before the ranks have installed their handlers kills them: no new checkpoint, but
    # the job must still requeue and resume from the last complete one (here: none).
    job, run_dir, log = _submit_stub(cluster, tmp_path, steps=5, overrides=["stub.startup_seconds=3"])
    wait_until(lambda: len(list((run_dir / "started").glob("rank*"))) == 2, 60, what="the ranks to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    (rec,) = wait_job(job, timeout=90)
    text = read_log(log)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", text
    assert "treating it as a stop without checkpoint" in text
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5]


def _processes() -> dict[int, tuple[str, str]]:
    """pid -> (comm, command line) of every process."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            comm = (proc / "comm").read_text().strip()
            out[int(proc.name)] = comm, (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def _config_value(key: str) -> str:
    r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True)
    return re.search(rf"^{key}\s*=\s*(\S+)", r.stdout, re.M).group(1)


def _kill_cluster_like_a_lost_machine(marker: str) -> None:
    """SIGKILL the daemons, the job steps and the job's own process (its command line holds
    `marker`): what a killed session or a crashed machine leaves, state files included."""
    names = {"slurmctld", "slurmscriptd", "slurmd", "slurmstepd", "slurm_script"}
    victims = [pid for pid, (comm, cmdline) in _processes().items() if comm in names or marker in cmdline]
    for pid in victims:
        try:
            os.kill(pid, signal_module.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slurm
def test_up_after_a_crash_frees_the_node(cluster, tmp_path):
    """The saved state of a killed cluster lists its running job; recovered as RUNNING with no
    process behind it, it held the node until its time limit (a CI run failed so). `up` must
    come back with the node free."""
    if SLURM_CONF_MARKER not in Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text():
        pytest.fail("this test kills the cluster's daemons: run it on slurm/local_cluster.sh's cluster only")
    marker = "sleep 6011"
    job = sbatch(["--partition=debug", "--cpus-per-task=2", "--time=00:20:00", "--wrap", marker], tmp_path)
    cluster.append(job)  # cancelled by the fixture if the test fails before the crash: else it holds the node
    # RUNNING comes at allocation; the job's process a moment later.
    wait_until(lambda: any(marker in cmdline for _, cmdline in _processes().values()), 60, what=f"job {job} to run")
    # The crash must find the job saved as RUNNING. slurmctld saves job state after a change, and the last
    # change (the allocation) may have been saved already: change the job once more and wait for that save.
    seen = time.time()
    subprocess.run(["scontrol", "update", f"JobId={job}", "Comment=crash-test"], check=True, timeout=30)
    job_state = Path(_config_value("StateSaveLocation")) / "job_state"
    wait_until(lambda: job_state.exists() and job_state.stat().st_mtime > seen, 60, what="the job state to be saved")
    _kill_cluster_like_a_lost_machine(marker)
    up = subprocess.run(["bash", str(SLURM_DIR / "local_cluster.sh"), "up"], capture_output=True, text=True,
                        timeout=180)
    assert up.returncode == 0, up.stderr
    assert "no job step alive: the saved jobs are cleared" in up.stderr
    out = tmp_path / "after.out"
    after = sbatch(["--partition=debug", "--cpus-per-task=2", "--time=00:01:00", f"--output={out}",
                    "--wrap", "echo the node is free"], tmp_path)
    cluster.append(after)
    (rec,) = wait_job(after, timeout=30)
    assert rec["JobState"] == "COMPLETED", read_log(out)
