"""Helpers for the SLURM template tests: render templates without a cluster, and submit,
poll and cancel real jobs on the local cluster (slurm/local_cluster.sh up).

There is no accounting on the local cluster (no sacct): job state comes from
`scontrol show job`, which keeps finished jobs for MinJobAge (600 s there).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
TEMPLATES = ["prep.sbatch", "merge.sbatch", "train.sbatch", "eval.sbatch"]
SCRIPTS = TEMPLATES + ["prep.sh", "local_cluster.sh", "common.sh", "env.sh"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

# Options for running the templates on the local 2-core CPU cluster: they override the
# site values of the #SBATCH lines, exactly as a user would on the command line.
LOCAL_TRAIN_OPTS = ["--partition=debug", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                    "--cpus-per-task=1", "--time=00:30:00"]  # > the @600 of --signal
LOCAL_CPU_OPTS = ["--partition=debug", "--cpus-per-task=1", "--mem=0", "--time=00:10:00"]


# ----------------------------------------------------------------------------- templates


def sbatch_directives(path: Path) -> list[tuple[str, Optional[str]]]:
    """The #SBATCH options of a script, parsed the way sbatch does: from the top, up to
    the first line that is neither blank nor a comment; `# ...` after an option is a comment."""
    out = []
    for line in Path(path).read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            words = shlex.split(stripped[len("#SBATCH"):], comments=True)
            for word in words:
                key, _, value = word.partition("=")
                out.append((key, value if _ else None))
        elif stripped and not stripped.startswith("#"):
            break
    return out


def python_env() -> dict:
    """VENV for slurm/env.sh: the environment running the tests (a fresh CI clone has no .venv)."""
    return {"VENV": sys.prefix} if Path(sys.prefix, "bin", "activate").is_file() else {}


def fake_scontrol_dir(tmp: Path, hostnames: list[str]) -> Path:
    """A bin dir with an `scontrol` that only answers `show hostnames` (for DRY_RUN renders)."""
    bindir = tmp / "fakebin"
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "scontrol"
    script.write_text("#!/bin/bash\n[[ $1 == show && $2 == hostnames ]] && printf '%s\\n' "
                      + " ".join(shlex.quote(h) for h in hostnames) + "\n")
    script.chmod(0o755)
    return bindir


def render(template: str, args: list[str], slurm_env: dict, tmp: Path,
           hostnames: tuple[str, ...] = ("node001",)) -> subprocess.CompletedProcess:
    """Run a template with DRY_RUN=1 and a fake job environment: it prints its commands."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("DS_ACCELERATOR", None)
    env.update(python_env())
    env.update(DRY_RUN="1", REPO_DIR=str(REPO),
               PATH=f"{fake_scontrol_dir(tmp, list(hostnames))}:{env['PATH']}", **slurm_env)
    return subprocess.run(["bash", str(SLURM_DIR / template), *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=60)


def shown_commands(stdout: str) -> list[list[str]]:
    """The commands a DRY_RUN printed ("+ cmd args..."), split into words."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


# ----------------------------------------------------------------------------- the cluster


def cluster_unavailable_reason() -> Optional[str]:
    """None if the local cluster takes jobs, else why not (for pytest.skip)."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "SLURM client tools not installed (bash slurm/local_cluster.sh up)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not reachable (bash slurm/local_cluster.sh up)"
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip() or r.returncode} (bash slurm/local_cluster.sh up)"
    states = set(r.stdout.split())
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return f"no usable node (sinfo states: {sorted(states) or 'none'})"
    return None


def require_cluster() -> None:
    """Skip the calling test without a cluster, or fail under REQUIRE_SLURM=1 (CI starts one)."""
    import pytest
    reason = cluster_unavailable_reason()
    if reason and os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


def job_env(**extra) -> dict:
    """Environment for sbatch (exported to the job): the test's, minus what the templates
    must set themselves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.pop("DS_ACCELERATOR", None)
    env.update(python_env())
    env["REPO_DIR"] = str(REPO)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sbatch(args: list[str], cwd: Path, env: Optional[dict] = None) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or job_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch {' '.join(args)} failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict]:
    """`scontrol show job -o` as dicts: one per job, or per task of an array job."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return []
    records = []
    for line in r.stdout.splitlines():
        if line.strip():
            records.append(dict(re.findall(r"(\w[\w:/]*)=(\S*)", line)))
    return records


def wait_until(pred, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_job(job_id: str, timeout: float = 180) -> list[dict]:
    """Wait until the job (every task of an array) is in a terminal state; return its records."""
    def done():
        recs = job_records(job_id)
        return recs if recs and all(r.get("JobState") in TERMINAL for r in recs) else None
    try:
        return wait_until(done, timeout, what=f"job {job_id} to finish")
    except TimeoutError:
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: "
                           f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in job_records(job_id)]}")


def cancel(job_ids) -> None:
    for job_id in job_ids:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def read_log(path: Path) -> str:
    return Path(path).read_text(errors="replace") if Path(path).exists() else "<no log>"


# ----------------------------------------------------------------------------- stub trainer

# Plays the trainer's side of the contract with train.sbatch, in a fraction of a second
# per step and without torch: ranks from SLURM_PROCID/NTASKS/LOCALID, SIGUSR1/SIGTERM ->
# finish the step, checkpoint, exit 75; resume from run_dir/checkpoints/latest. It tests
# the template's signal, requeue and restart logic on its own.
STUB_TRAINER = r'''
import json, os, signal, sys, time
from pathlib import Path

assert sys.argv[1] == "train", sys.argv
config, overrides = sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
run = Path(overrides["run_dir"])
steps = int(overrides.get("train.max_steps", 20))
delay = float(overrides.get("stub.step_seconds", 0.2))
rank, world, local = (int(os.environ[k]) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
(run / "started").mkdir(parents=True, exist_ok=True)
(run / "started" / f"rank{rank}").touch()
time.sleep(float(overrides.get("stub.startup_seconds", 0)))  # a signal now kills the process
stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: stop.append(signal.Signals(s).name))
attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
(run / "ranks").mkdir(parents=True, exist_ok=True)
keys = ("MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "SLURM_NTASKS", "SLURM_RESTART_COUNT", "RANK", "WORLD_SIZE")
(run / "ranks" / f"attempt{attempt}_rank{rank}.json").write_text(json.dumps(
    {"argv": sys.argv[1:], "local": local, "world": world, **{k: os.environ.get(k) for k in keys}}))
latest = run / "checkpoints" / "latest"
start = int(latest.read_text()) if latest.exists() else 0
print(f"stub rank {rank}/{world}: starting at step {start}", flush=True)

def checkpoint(step):
    if rank == 0:
        latest.parent.mkdir(parents=True, exist_ok=True)
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(str(step))
        tmp.replace(latest)

for step in range(start + 1, steps + 1):
    time.sleep(delay)
    if rank == 0:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    if stop:
        checkpoint(step)
        print(f"stub rank {rank}: {stop[0]} -> checkpoint at step {step}, exit 75", flush=True)
        sys.exit(75)
checkpoint(steps)
print(f"stub rank {rank}: done", flush=True)
'''


def stub_repo(tmp: Path) -> Path:
    """A REPO_DIR with the real slurm/ and the stub trainer package."""
    repo = tmp / "stub_repo"
    (repo / "trainer").mkdir(parents=True)
    (repo / "trainer" / "__init__.py").write_text("")
    (repo / "trainer" / "__main__.py").write_text(STUB_TRAINER)
    (repo / "slurm").symlink_to(SLURM_DIR)
    return repo


def metrics(run_dir: Path) -> list[dict]:
    import json
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
