"""Launch `python -m trainer train` for the bench and read back what it logged.

The trainer's own `metrics.jsonl` is the measurement: per step `tokens_per_s`
(timed inside the loop, data fetch included, logging and eval excluded) and
`peak_mem_gb`; per checkpoint `save_s` and `bytes`; after a resume `load_s`.
Nothing here re-times training from the outside, except per-rank peak RSS of
multi-rank runs, which rank 0 cannot see and which we sample with psutil.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

from .. import compat
from .plan import TrainJob


class BenchRunError(RuntimeError):
    """A bench subprocess failed; the message names it and ends with its output's tail."""


def subprocess_env(device: str, threads: int) -> dict:
    """Environment of every bench child: pinned threads, no inherited ranks."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_command(config: Path, nproc: int, overrides=(), module: str = "trainer") -> list[str]:
    from ..engine.dist import free_port

    tail = ["-m", module] + (["train"] if module == "trainer" else []) + [str(config), *overrides]
    if nproc == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *tail]


class RssSampler:
    """Max RSS per rank of a launcher's process tree, sampled every `period` s.

    Ranks are told apart by the RANK variable in their environment. Sampling
    can miss a peak shorter than the period; the figure is a lower bound.
    """

    def __init__(self, pid: int, period: float = 0.1):
        import psutil

        self._root = psutil.Process(pid)
        self._psutil = psutil
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except self._psutil.Error:
                return
            for p in procs:
                try:
                    rank = p.environ().get("RANK")
                    rss = p.memory_info().rss
                except self._psutil.Error:
                    continue
                if rank is not None:
                    self.peak[int(rank)] = max(self.peak.get(int(rank), 0), rss)
            self._stop.wait(period)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return dict(sorted(self.peak.items()))


# streaming names its shared memory by the lowest free prefix; two processes starting at the
# same moment can both pick it, and one fails. Our own jobs take turns (shm.registering);
# another user's job on a shared machine can still collide with one.
SHM_RACE = ("FileExistsError", "_locals")


def launch(cmd: list[str], env: dict, log: Path, timeout: int, sample_rss: bool = False, retries: int = 2) -> dict:
    """Run `cmd` to completion; returns {seconds, rss_peak_bytes (per rank, if sampled)}.

    A start-up lost to streaming's shared-memory race is retried (it is not the
    code under test failing); any other failure raises with the log's tail.
    """
    for attempt in range(retries + 1):
        result, code = _launch_once(cmd, env, log, timeout, sample_rss)
        if code == 0:
            return result
        text = log.read_text()
        if code is None or not all(k in text for k in SHM_RACE) or attempt == retries:
            what = f"timed out after {timeout}s" if code is None else f"exited {code}"
            raise BenchRunError(f"{' '.join(cmd[1:])} {what} (log: {log})\n{text[-4000:]}")
        print(f"[bench]   streaming shared-memory race at start-up, retrying: {log.name}", file=sys.stderr, flush=True)
        time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _launch_once(cmd: list[str], env: dict, log: Path, timeout: int, sample_rss: bool):
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        # Own session: on a timeout the whole launcher + ranks tree is killed, not just the launcher.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = RssSampler(proc.pid) if sample_rss else None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        finally:
            peaks = sampler.stop() if sampler else {}
    return {"seconds": time.perf_counter() - t0, "rss_peak_bytes": peaks, "load_avg_end": os.getloadavg()[0]}, code


def run_job(job: TrainJob, work: Path, env: dict, timeout: int, sample_rss: bool = False) -> dict:
    cfg_path = write_config(job.config, work / "configs" / f"{job.name.replace('/', '_')}.yaml")
    cmd = train_command(cfg_path, job.nproc, job.overrides)
    return launch(cmd, env, work / "logs" / f"{job.name.replace('/', '_')}.log", timeout, sample_rss)


# ----------------------------------------------------------------------------- metrics.jsonl


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def segments(records: list[dict]) -> list[list[dict]]:
    """Split an appended metrics.jsonl into one list per process (a resume starts a new one)."""
    out: list[list[dict]] = [[]]
    for r in records:
        if "resumed_from" in r and out[-1]:
            out.append([])
        out[-1].append(r)
    return out


def paired_ratio(num: dict[int, float], den: dict[int, float]) -> tuple[float, list[float]]:
    """Median over the repeats both sides ran of num[r] / den[r], and those per-repeat ratios.

    Each pair ran side by side, so a machine whose speed drifts over the run moves both sides of a
    pair together and the pair's ratio stays true (a ratio of per-side medians would not).
    """
    ratios = [num[r] / den[r] for r in sorted(num) if r in den]
    if not ratios:
        raise ValueError("no repeat measured both sides of the ratio")
    return statistics.median(ratios), ratios


def window_rates(step_rates: list[float], window: int) -> list[float]:
    """tokens/s of consecutive windows of `window` steps (equal tokens per step).

    A window's rate is its tokens over its summed time, i.e. the harmonic mean
    of its steps' rates, not their mean (which a single fast step would inflate).
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    n = len(step_rates) // window
    return [window / sum(1.0 / r for r in step_rates[i * window:(i + 1) * window]) for i in range(n)]


def summarize_segment(seg: list[dict], warmup: int, window: int) -> dict:
    """Throughput, memory and checkpoint figures of one training process."""
    steps = [r for r in seg if "tokens_per_s" in r]
    timed = [r["tokens_per_s"] for r in steps[warmup:]]
    windows = window_rates(timed, window)
    if not windows:
        raise BenchRunError(f"only {len(steps)} steps logged, need {warmup} warm-up + {window} timed")
    # The median is the reported figure; the best window is the least disturbed by other
    # processes on a shared machine, and is kept to show how much the load moved things.
    out = {"tokens_per_s": statistics.median(windows), "tokens_per_s_best": max(windows),
           "windows": [round(w, 2) for w in windows],
           "steps_timed": len(windows) * window, "peak_mem_gb": max(r["peak_mem_gb"] for r in steps),
           "final_loss": steps[-1]["loss"]}
    shares = [r["budget"]["meter_share"] for r in steps[warmup:] if "meter_share" in r.get("budget", {})]
    if shares:  # under a forgetting budget: its meter's share of the step time, in the same run
        out["meter_share"] = statistics.mean(shares)
    params = next((r["params"] for r in seg if "params" in r), None)
    if params:
        out["params"] = params
    ckpt = [r for r in seg if "checkpoint" in r]
    if ckpt:
        out["checkpoint"] = {"tag": ckpt[-1]["checkpoint"], "save_s": ckpt[-1]["save_s"], "bytes": ckpt[-1]["bytes"]}
    resumed = next((r for r in seg if "resumed_from" in r), None)
    if resumed:
        out["load_s"] = resumed["load_s"]
        out["resumed_from"] = resumed["resumed_from"]
    return out


def checkpoint_contents(ckpt_dir: Path, trainable: int, moments: int = 2) -> dict:
    """What a checkpoint holds, file by file, and how many parameters its module state has.

    `frozen_params_saved` = saved module parameters beyond the trainable ones: it must
    be 0, or the checkpoint carries frozen backbone weights.
    """
    import torch

    files = {p.name: p.stat().st_size for p in sorted(Path(ckpt_dir).iterdir()) if p.is_file()}
    saved = 0
    for name in files:
        if name.endswith("model_states.pt"):
            with torch.serialization.safe_globals(compat.deepspeed_checkpoint_globals()):
                state = torch.load(Path(ckpt_dir) / name, map_location="cpu", weights_only=True)
            module = state.get("module") or {}
            saved += sum(t.numel() for t in module.values() if hasattr(t, "numel"))
    state_bytes = (1 + moments) * 4 * trainable  # fp32 params + the optimizer's moments (Adam: 2, plain SGD: 0)
    total = sum(files.values())
    return {"files": files, "bytes": total, "trainable_state_bytes": state_bytes,
            "ratio_to_trainable_state": total / state_bytes, "module_params_saved": saved,
            "frozen_params_saved": max(0, saved - trainable)}


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    return Path(run_dir) / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None
