"""Every ZeRO choice for one config and cluster: its DeepSpeed JSON, memory terms, micro batch and time.

A choice's JSON is the run's own `deepspeed.config` when it is of the same stage (offload keys
set as the choice says), else the shipped ds_configs/zero{1,2,3}.json: the terms then use the
buckets and thresholds a user would actually run with.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, RunConfig
from ..engine.ds_config import load_ds_json
from .memory import CHOICES, GIB, Choice, Knobs, Terms, memory_terms
from .shape import ModelFacts
from .timing import Hardware, StepTime, step_time
from .trace import activation_fit

OFFLOAD = {"device": "cpu", "pin_memory": True}


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    device_mem: float
    """Bytes per rank (GPU memory; on CPU, what one process may use)."""
    host_mem: Optional[float]
    """Bytes of host RAM per node (None: not checked)."""
    on_cpu: bool
    hardware: Hardware
    framework: dict
    """Stage -> bytes per rank the framework holds whatever the model (see measure.calibrate)."""
    host_framework: float
    """Bytes of host RAM per process of a GPU run (the Python process itself)."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Row:
    choice: Choice
    ds: dict
    knobs: Knobs
    terms: Terms
    """At `micro_batch`."""
    micro_batch: int
    """The largest micro batch that fits (or the configured one if none fits)."""
    fits: bool
    time: Optional[StepTime]
    host_per_node: float


def choice_ds(cfg: RunConfig, choice: Choice) -> dict:
    """The DeepSpeed JSON of `choice` (still with its "auto" values)."""
    own = load_ds_json(cfg.deepspeed.config)
    base = own if int(own.get("zero_optimization", {}).get("stage", 0)) == choice.stage else \
        load_ds_json(f"ds_configs/zero{choice.stage}.json")
    ds = copy.deepcopy(base)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = choice.stage
    for key, on in (("offload_optimizer", choice.offload_optimizer), ("offload_param", choice.offload_param)):
        if on:
            zero[key] = dict(zero.get(key) or OFFLOAD, device="cpu")
        else:
            zero.pop(key, None)
    return ds


def dtype_bytes(cfg: RunConfig, on_cpu: bool) -> tuple[str, int]:
    """The training dtype as build_ds_config picks it (auto: bf16 on GPUs, fp32 on CPU)."""
    name = cfg.model.dtype
    if name == "auto":
        name = "float32" if on_cpu else "bfloat16"
    return name, 4 if name == "float32" else 2


def micro_batches(global_batch: int, world: int) -> list[int]:
    """Micro batches the batch arithmetic accepts: global = micro x accumulation x world."""
    if global_batch % world:
        raise ConfigError(f"train.global_batch_size={global_batch} is not a multiple of the world size {world}")
    per_rank = global_batch // world
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


def evaluate(cfg: RunConfig, facts: ModelFacts, cluster: Cluster, seq_len: int,
             choices=CHOICES, micro_batch: Optional[int] = None) -> list[Row]:
    """One row per choice. `micro_batch`: evaluate at this one (else the largest that fits)."""
    import torch

    dtype_name, b = dtype_bytes(cfg, cluster.on_cpu)
    dtype = getattr(torch, dtype_name)
    W = cluster.world
    sizes = [micro_batch] if micro_batch else micro_batches(cfg.train.global_batch_size, W)
    rows = []
    for choice in choices:
        ds = choice_ds(cfg, choice)
        knobs = Knobs.from_ds(ds)
        act = activation_fit(facts.hf_config, facts.method, seq_len, choice.checkpointing, dtype)
        best = None
        for mb in sizes:
            terms = memory_terms(facts, knobs, act, mb, W, b, cluster.framework[choice.stage], cluster.on_cpu)
            if best is None or terms.peak <= cluster.device_mem:
                best = (mb, terms)
            if terms.peak > cluster.device_mem:
                break
        mb, terms = best
        host = cluster.gpus_per_node * (terms.host + (0 if cluster.on_cpu else cluster.host_framework))
        fits = terms.peak <= cluster.device_mem and (cluster.host_mem is None or host <= cluster.host_mem)
        t = step_time(facts, cfg.method.name, choice, knobs, seq_len, cfg.train.global_batch_size, mb, W,
                      cluster.nodes, b, cluster.hardware)
        rows.append(Row(choice, ds, knobs, terms, mb, fits, t, host))
    return rows


def recommend(rows: list[Row]) -> Optional[Row]:
    """The fastest choice that fits. Within 2% of it, the least communication (the time model assumes
    perfect overlap, which real ZeRO-3 rarely reaches), then no offload (host RAM and PCIe are
    shared by the node's ranks), then the most memory to spare."""
    ok = [r for r in rows if r.fits]
    if not ok:
        return None
    fastest = min(r.time.step_s for r in ok)
    near = [r for r in ok if r.time.step_s <= 1.02 * fastest]
    return min(near, key=lambda r: (r.time.comm_bytes, r.time.offload_s, r.terms.peak))


def cannot_fit(rows: list[Row], cluster: Cluster) -> str:
    """One line: the choice that comes closest, and which of its terms overflows."""
    best = min(rows, key=lambda r: r.terms.peak)
    t = best.terms
    if t.peak <= cluster.device_mem:  # the device fits, the host does not
        return (f"cannot fit: host memory {best.host_per_node / GIB:.1f} GiB per node > --cpu-mem "
                f"{cluster.host_mem / GIB:.1f} GiB even with {best.choice.label} (offloaded optimizer/params)")
    term = t.overflowing()
    return (f"cannot fit: even {best.choice.label} at micro batch {best.micro_batch} needs {t.peak / GIB:.1f} GiB "
            f"per rank > {cluster.device_mem / GIB:.1f} GiB; the largest term is {term.replace('_', ' ')} "
            f"({getattr(t, term) / GIB:.1f} GiB)")
