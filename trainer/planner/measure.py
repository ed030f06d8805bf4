"""Predicted vs measured: run a configuration for a few steps on this machine's CPU ranks.

A measurement is a real `python -m trainer train` launched as the bench launches it
(trainer.bench.runs: pinned threads, DS_ACCELERATOR=cpu, torchrun for 2 ranks, per-rank RSS
sampled), on synthetic MDS shards of the model's vocabulary, with the run's own `peak_mem_gb`
(rank 0's peak RSS on CPU, logged at every step) as the figure. No eval (its logits are not
the training peak), one final checkpoint (after the last logged step).

On CPU a rank's "device memory" is its whole process, so the framework term is the process
itself (Python, torch, DeepSpeed, transformers, gloo, the data loader). `calibrate` measures it:
the same launch with a model of a few thousand parameters, whose other terms are below 1 MB;
it writes cpu_baseline.json next to this file, with the versions and the machine it came from.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

from ..bench.plan import SIZES as BENCH_SIZES
from ..config import RunConfig, load_config
from .memory import GIB, Choice

BASELINE = Path(__file__).with_name("cpu_baseline.json")


def llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, seq: int) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": seq}


# Validation shapes: (HF config, sequence length, micro batch). 1b is the bench's 1.1B shape (940M frozen +
# 188M neutral residues; ~9 GB per rank under ZeRO-2, about all this 23 GB machine holds for 2 ranks: run
# it on a quiet machine).
SIZES = {
    "calib": (llama(16, 32, 1, 2, 2, 64, 16), 16, 1),
    "10m": (llama(256, 688, 4, 4, 4, 16000, 256), 256, 4),
    "100m": (llama(768, 2048, 8, 12, 12, 32000, 512), 512, 2),
    "1b": (BENCH_SIZES["1b"].model, 512, 1),
}


def synthetic_data(root: Path, vocab: int, seq_len: int, n: int) -> dict:
    from ..bench.data import write_mds

    out = {}
    for i, domain in enumerate(("en", "code")):
        path = root / domain / "train"
        if not (path / "index.json").is_file():
            write_mds(path, domain, n, seq_len, vocab, 10 + i, None)
        out[domain] = {"train": str(path)}
    return out


def run_dict(cfg: RunConfig, data: dict, run_dir: Path, ds_path: Path, choice: Choice, micro_batch: int,
             nproc: int, steps: int) -> dict:
    """`cfg` with synthetic data, `choice`'s JSON and checkpointing, accumulation 1, no eval."""
    from ..config import to_dict

    d = to_dict(cfg)
    d["run_dir"] = str(run_dir)
    d["data"] = {"p": 0.5, "streams": [{"domain": "en", "role": "original", **data["en"]},
                                       {"domain": "code", "role": "new", **data["code"]}]}
    d["train"].update(max_steps=steps, global_batch_size=micro_batch * nproc, micro_batch_size=micro_batch,
                      activation_checkpointing=choice.checkpointing, warmup_steps=1)
    d["deepspeed"] = {"config": str(ds_path)}
    d["checkpoint"] = {"every": 0, "keep_last": 1, "resume": False}
    d["log"] = {"every": 1, "tensorboard": False, "wandb": False, "progress": False, "frozen_checksum": False}
    d["eval"] = {"every": 0, "at_start": False, "max_batches": 1, "batch_size": 1}
    return d


def measure_run(cfg: RunConfig, choice: Choice, ds: dict, seq_len: int, micro_batch: int, nproc: int,
                work: Path, steps: int = 3, timeout: int = 3 * 3600, reuse: bool = False) -> dict:
    """Train `steps` steps; returns {peak_gib (rank 0's peak_mem_gb), rss_gib {rank: peak RSS}, s_per_step}.

    `reuse`: return the result a previous identical run (same run config and JSON) left in `work`,
    so that a changed prediction can be compared again without training again.
    """
    import os

    from ..bench.runs import launch, read_metrics, subprocess_env, train_command, write_config

    vocab = _vocab(cfg)
    data = synthetic_data(work / f"data_v{vocab}_s{seq_len}", vocab, seq_len, 4 * steps * micro_batch * nproc)
    name = f"zero{choice.stage}{'_optoff' if choice.offload_optimizer else ''}{'_paramoff' if choice.offload_param else ''}" \
           f"_ckpt{'on' if choice.checkpointing else 'off'}_mb{micro_batch}_n{nproc}"
    run_dir = work / "runs" / name
    ds_path = work / "ds" / f"{name}.json"
    spec = run_dict(cfg, data, run_dir, ds_path, choice, micro_batch, nproc, steps)
    saved = work / "results" / f"{name}.json"
    key = json.dumps({"run": spec, "ds": ds}, sort_keys=True, default=str)
    if reuse and saved.is_file() and json.loads(saved.read_text())["key"] == key:
        return json.loads(saved.read_text())["result"]
    shutil.rmtree(run_dir, ignore_errors=True)
    ds_path.parent.mkdir(parents=True, exist_ok=True)
    ds_path.write_text(json.dumps(ds, indent=2))
    config = write_config(spec, work / "configs" / f"{name}.yaml")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    result = launch(train_command(config, nproc), subprocess_env("cpu", threads), work / "logs" / f"{name}.log",
                    timeout, sample_rss=nproc > 1)
    steps_logged = [r for r in read_metrics(run_dir) if "peak_mem_gb" in r]
    rate = [r["tokens_per_s"] for r in steps_logged[1:]] or [steps_logged[-1]["tokens_per_s"]]
    tokens = micro_batch * nproc * seq_len
    out = {"peak_gib": max(r["peak_mem_gb"] for r in steps_logged),
           "rss_gib": {k: v / GIB for k, v in result["rss_peak_bytes"].items()},
           "s_per_step": tokens / (sum(rate) / len(rate)), "params": next(
               (r["params"] for r in read_metrics(run_dir) if "params" in r), None)}
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"key": key, "result": out}, indent=2))
    return out


def _vocab(cfg: RunConfig) -> int:
    if cfg.model.config:
        return int(cfg.model.config["vocab_size"])
    return int(json.loads((Path(cfg.model.path) / "config.json").read_text())["vocab_size"])


def size_config(size: str, method: str = "neutral_residues") -> RunConfig:
    spec, _, _ = SIZES[size]
    return load_config(data={"run_dir": "unused", "model": {"config": dict(spec)}, "method": {"name": method},
                             "data": {"streams": [{"domain": "en", "role": "original"},
                                                  {"domain": "code", "role": "new"}]}})


def load_baseline() -> Optional[dict]:
    return json.loads(BASELINE.read_text()) if BASELINE.is_file() else None


def framework_bytes(stage: int) -> float:
    """The calibrated CPU process baseline for `stage` (0 if `plan calibrate` never ran)."""
    base = load_baseline()
    if not base:
        return 0.0
    return float(base["bytes"][f"zero{3 if stage == 3 else 2}"])


def calibrate(work: Path, nproc: int = 2, out: Path = BASELINE) -> dict:
    """Measure the framework term: the calibration shape under ZeRO-2 and ZeRO-3, minus its (tiny) model terms."""
    import deepspeed
    import torch
    import transformers

    from .cli import cpu_cluster, predict

    cfg = size_config("calib")
    _, seq, mb = SIZES["calib"]
    found = {}
    for stage in (2, 3):
        choice = Choice(stage)
        row = predict(cfg, None, cpu_cluster(nproc, framework=0.0), seq, choice, mb)
        measured = measure_run(cfg, choice, row.ds, seq, mb, nproc, work)
        found[f"zero{stage}"] = round(measured["peak_gib"] * GIB - row.terms.peak)
        print(f"[plan] calibrate ZeRO-{stage}: peak {measured['peak_gib']:.3f} GiB, model terms "
              f"{row.terms.peak / 2**20:.1f} MiB -> framework {found[f'zero{stage}'] / GIB:.3f} GiB", flush=True)
    result = {"bytes": found, "ranks": nproc, "command": "python -m trainer plan calibrate",
              "measured": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "machine": platform.machine()}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
