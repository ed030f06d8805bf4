"""What `trainer bench` runs: the size presets and the run configs built from them.

Every training measurement goes through `python -m trainer train CONFIG.yaml`,
so a bench job is just a RunConfig dict plus a launcher. All jobs of one size
share the backbone, sequence length, micro/global batch and step count; only
the method, activation checkpointing or ZeRO stage change, which is what makes
the ratios between them mean something.

Steps: `warmup` steps are discarded (allocator, lazy init, first loader fetch),
then `timed` steps are split into windows of `window` steps whose medians are
reported. The checkpointing-on run of each method resumes the checkpointing-off
run's final checkpoint (same method and backbone, so the trainer accepts it):
one process launch buys both the checkpoint load time and the second
throughput figure.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Also the order each repeat runs them in: the pairs whose ratio is a target side by side in time
# (neutral_residues with finetune; lora last, next to the HF peers that follow it).
METHODS = ("neutral_residues", "finetune", "adapters", "lora")


@dataclass(frozen=True)
class BenchSize:
    name: str
    model: dict
    """HF config of the backbone (random init: no download, same on every machine)."""
    seq_len: int
    micro_batch: int
    global_batch: int
    warmup: int
    """Steps discarded before timing, after each process start."""
    timed: int
    """Timed steps per run (a multiple of `window`)."""
    window: int
    """Steps per timed window; the reported tokens/s is the median over windows."""
    zero_timed: int
    """Timed steps of the 2-rank ZeRO-2/3 runs (memory is their point, not speed)."""
    matmul_n: int
    """Side of the square matmul that measures the device's peak FLOP/s."""
    corpus_files: Optional[int]
    """Standard-library files in the data-path corpus (None: all)."""
    tokenizer_vocab: int
    peer_deepspeed: bool = True
    """Also time HF Trainer + PEFT + DeepSpeed (one more launch; off in the CI smoke size)."""
    timeout_s: int = 3600
    methods: Optional[tuple] = None
    """Methods of the throughput matrix (None: all of METHODS)."""
    full_matrix: bool = True
    """Also the forgetting-budget runs, the HF peers, the data path and the loader; off where they would
    take hours and say nothing about the point of the size."""
    backbone_on_disk: bool = False
    """Build the backbone partitioned under ZeRO-3 on 2 ranks, save it as shards (bench/backbone.py) and
    load it through model.path, as a user's: the path a billion-parameter run takes."""
    ds_config: str = "ds_configs/zero2.json"
    """JSON of the 1-rank throughput runs."""
    optimizer: Optional[dict] = None
    """Replaces the JSON's optimizer in every run (e.g. SGD where Adam's states would not fit)."""
    cpu: Optional[dict] = None
    """Fields replaced on --device cpu (see `for_device`)."""

    @property
    def optimizer_moments(self) -> int:
        """fp32 tensors the optimizer keeps per parameter: Adam's 2, SGD's momentum buffer if it has one."""
        if self.optimizer is None:  # the shipped JSONs: AdamW
            return 2
        return 1 if self.optimizer.get("params", {}).get("momentum") else 0

    def for_device(self, device: str) -> "BenchSize":
        return dataclasses.replace(self, cpu=None, **self.cpu) if device == "cpu" and self.cpu else self

    @property
    def steps(self) -> int:
        return self.warmup + self.timed


def _llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, seq: int, **kw) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": seq, **kw}


SIZES = {
    # CI smoke: every figure is produced, none is meaningful.
    "tiny": BenchSize("tiny", _llama(64, 172, 2, 4, 2, 256, 64), seq_len=64, micro_batch=2, global_batch=4,
                      warmup=1, timed=4, window=2, zero_timed=2, matmul_n=512, corpus_files=20,
                      tokenizer_vocab=512, peer_deepspeed=False, timeout_s=900),
    # A realistic CPU measurement (~8 min per repeat on 2 idle cores, ~25 at load 3-5). The vocabulary keeps
    # the LM head at ~1/4 of the matmul parameters, about its share in a 1B Llama.
    "small": BenchSize("small", _llama(256, 688, 4, 4, 4, 4096, 256), seq_len=256, micro_batch=4, global_batch=8,
                       warmup=5, timed=15, window=3, zero_timed=3, matmul_n=2048, corpus_files=200,
                       tokenizer_vocab=4096),
    # 1.1B parameters: 940M frozen + 188M of neutral residues. On CPU (2 x ~12 GB), finetune's Adam states
    # (18 GB at 1 rank, 14 GB per rank at 2) do not fit: every run there uses SGD, so the ratio compares
    # forward + backward + update without moments, and says so in the result's meta.
    "1b": BenchSize("1b", _llama(2048, 5504, 16, 32, 32, 32000, 2048), seq_len=2048,
                    micro_batch=4, global_batch=16, warmup=3, timed=20, window=5, zero_timed=5, matmul_n=8192,
                    corpus_files=None, tokenizer_vocab=32000, timeout_s=4 * 3600, backbone_on_disk=True,
                    cpu=dict(seq_len=512, micro_batch=1, global_batch=2, warmup=1, timed=2, window=1, zero_timed=1,
                             matmul_n=2048, methods=("neutral_residues", "finetune"), full_matrix=False,
                             ds_config="ds_configs/zero3.json", optimizer={"type": "SGD", "params": {"lr": "auto"}},
                             timeout_s=3 * 3600)),
}


class PlanError(ValueError):
    """This size cannot run on this device; the message is one printable line."""


def check_device(size: BenchSize, device: str, cuda_available: bool, cuda_count: int) -> None:
    if device == "cuda" and not cuda_available:
        raise PlanError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    del cuda_count  # the 2-rank ZeRO runs check it themselves and are skipped with a reason


@dataclass
class TrainJob:
    """One `python -m trainer train` launch."""
    name: str
    config: dict
    nproc: int = 1
    overrides: tuple = ()

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])


def base_config(size: BenchSize, data: dict, run_dir: Path, method: str, max_steps: int) -> dict:
    """RunConfig dict shared by every job of a size; `data` maps domain -> {train, val} MDS dirs, and
    "model" to the saved backbone and "ds" to the JSONs ("throughput", "2", "3") when the bench wrote them."""
    return {
        "run_dir": str(run_dir),
        "model": copy.deepcopy(data.get("model") or {"config": size.model}),
        "method": {"name": method},
        "data": {"p": 0.1, "streams": [
            {"domain": "en", "role": "original", **data["en"]},
            {"domain": "code", "role": "new", **data["code"]}]},
        "train": {"max_steps": max_steps, "global_batch_size": size.global_batch,
                  "micro_batch_size": size.micro_batch, "activation_checkpointing": False},
        "deepspeed": {"config": data.get("ds", {}).get("throughput", size.ds_config)},
        # every=0: no periodic save, only the final one (whose time and size are measured).
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "eval": {"at_start": False, "max_batches": 1},
    }


def ds_jsons(size: BenchSize, out: Path) -> dict:
    """The size's JSONs with its optimizer in place of the shipped one: {"throughput", "2", "3"} -> path."""
    from ..engine.ds_config import load_ds_json

    paths = {}
    for key, src in (("throughput", size.ds_config), ("2", "ds_configs/zero2.json"), ("3", "ds_configs/zero3.json")):
        ds = load_ds_json(src)
        ds["optimizer"] = copy.deepcopy(size.optimizer)
        ds["zero_allow_untested_optimizer"] = True  # ZeRO refuses torch optimizers it has no test for, SGD included
        path = out / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ds, indent=2) + "\n")
        paths[key] = str(path)
    return paths


def run_inputs(size: BenchSize, work: Path) -> dict:
    """What the jobs load besides the data: the saved backbone ("model") and the size's JSONs ("ds", written
    here); empty for a size built from its config with the shipped JSONs. Merged into the `data` dict."""
    out = {}
    if size.backbone_on_disk:
        out["model"] = {"path": str(work / "backbone")}
    if size.optimizer:
        out["ds"] = ds_jsons(size, work / "ds")
    return out


def throughput_jobs(size: BenchSize, data: dict, root: Path) -> list[tuple[TrainJob, TrainJob]]:
    """Per method: (checkpointing off, checkpointing on resuming the former's run dir)."""
    pairs = []
    for method in size.methods or METHODS:
        run_dir = root / "runs" / method
        off = TrainJob(f"{method}/off", base_config(size, data, run_dir, method, size.steps))
        on_cfg = base_config(size, data, run_dir, method, 2 * size.steps)
        on_cfg["train"]["activation_checkpointing"] = True
        pairs.append((off, TrainJob(f"{method}/on", on_cfg)))
    return pairs


BUDGET_METERS = {"neutral_residues": "heldout", "lora": "train", "finetune": "heldout"}
"""The forgetting budget's cost is timed for each lever and each way of measuring forgetting: the held-out
probe (the default) under the l1 and the replay lever, and the reference forward with the adapters off."""

BUDGET_EPS = 0.03
"""Binding on every size (the methods forget more than this unconstrained), so the multiplier moves."""


def budget_jobs(size: BenchSize, data: dict, root: Path) -> list[TrainJob]:
    """Per metered method: the `off` throughput job with a forgetting budget, timed against that job."""
    jobs = []
    for method, meter in BUDGET_METERS.items():
        cfg = base_config(size, data, root / "runs" / f"budget_{method}", method, size.steps)
        cfg["method"].update(forgetting_budget=BUDGET_EPS, budget_measure=meter)
        jobs.append(TrainJob(f"{method}/budget", cfg))
    return jobs


def zero_jobs(size: BenchSize, data: dict, root: Path) -> list[TrainJob]:
    """neutral_residues at 2 ranks under ZeRO-2 and ZeRO-3: per-rank peak memory, save time, size."""
    jobs = []
    for stage in (2, 3):
        cfg = base_config(size, data, root / "runs" / f"zero{stage}", "neutral_residues",
                          size.warmup + size.zero_timed)
        cfg["deepspeed"]["config"] = data.get("ds", {}).get(str(stage), f"ds_configs/zero{stage}.json")
        jobs.append(TrainJob(f"zero{stage}", cfg, nproc=2))
    return jobs


def profile_jobs(size: BenchSize, data: dict, root: Path) -> list[TrainJob]:
    """The two ends of the target ratio, profiled: neutral_residues and finetune, no checkpointing."""
    return [TrainJob(f"profile/{m}", base_config(size, data, root / "runs" / f"profile_{m}", m, size.steps))
            for m in ("neutral_residues", "finetune")]
