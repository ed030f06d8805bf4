"""Run the real CLI in subprocesses: 1 process, or N ranks under torchrun (gloo on CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from trainer.engine.dist import free_port  # noqa: F401 - the tests import it from here, next to the launchers

ROOT = Path(__file__).resolve().parents[1]


# Prepended to scripts that a fresh interpreter runs to load exported directories: the project
# may be installed (editable) in that interpreter, so its packages are hidden, as on a machine that
# never had them, and any import of them by the exported code fails the test.
HIDE_PROJECT = r'''
import sys


class HideProject:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("trainer", "data_prep"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None


sys.meta_path.insert(0, HideProject())
try:
    import trainer
    raise AssertionError("the project is importable: the test would prove nothing")
except ModuleNotFoundError:
    pass
'''


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_cmd(config: Path, nproc: int = 1, overrides=(), launcher: str = "torchrun") -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "trainer", "train", str(config), *overrides]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--module", "trainer", "train", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "trainer", "train", str(config), *overrides]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start in its own session so the whole launcher + ranks tree can be signalled or killed."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, min_step: int, timeout: int = 300) -> int:
    latest = run_dir / "checkpoints" / "latest"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if latest.is_file():
            step = int(latest.read_text().strip().split("_")[1])
            if step >= min_step:
                return step
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before a checkpoint")
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def wait_for_step(run_dir: Path, proc, min_step: int, timeout: int = 300) -> None:
    """Until metrics.jsonl logs `min_step`: training has started and its signal handlers are in place."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                m = json.loads(line)
            except ValueError:
                continue  # the line being written
            if m.get("step", 0) >= min_step and "loss" in m:
                return
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {min_step}")
        time.sleep(0.1)
    raise AssertionError(f"no step {min_step} in time")


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Last logged loss per step (a resumed run re-logs the steps after its checkpoint)."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def evals(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m["eval"] for m in metrics(run_dir) if "eval" in m}


class Ranks:
    """N plain `python -m trainer train` processes with RANK/WORLD_SIZE set, the way srun starts
    tasks: each rank receives signals itself (no launcher in between)."""

    def __init__(self, config: Path, nproc: int, log: Path, overrides=()):
        port = str(free_port())
        self.procs = []
        self.log_paths = [log.with_name(f"{log.name}.rank{rank}") for rank in range(nproc)]
        for rank in range(nproc):
            e = dict(env(), RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                     LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            out = open(self.log_paths[rank], "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "trainer", "train", str(config), *overrides], cwd=ROOT, env=e,
                stdout=out, stderr=subprocess.STDOUT))
        self.pid = self.procs[0].pid

    def poll(self):
        codes = [p.poll() for p in self.procs]
        return None if any(c is None for c in codes) else max(codes)

    @property
    def returncode(self):
        return self.poll()

    def signal(self, sig) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def interrupt(self, sig) -> None:
        """Deliver `sig` to every rank while none can finish a step: frozen with SIGSTOP, signalled,
        then continued. Signalling running ranks races with the end of a short run (all its steps
        may be done before the signal lands, and it then rightly exits 0)."""
        for p in self.procs:
            p.send_signal(signal.SIGSTOP)
        assert self.poll() is None and all(p.poll() is None for p in self.procs), "a rank exited before the signal"
        for p in self.procs:
            p.send_signal(sig)
        for p in self.procs:
            p.send_signal(signal.SIGCONT)

    def wait(self, timeout: int = 300) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]

    def logs(self, tail: int = 3000) -> str:
        """The end of every rank's log, for an assertion message."""
        return "\n".join(f"--- rank {r}:\n" + path.read_text()[-tail:] for r, path in enumerate(self.log_paths))
