"""Process-group setup that works the same under deepspeed, torchrun, srun or a plain `python`.

Launchers disagree on how they announce ranks: deepspeed/torchrun set RANK,
WORLD_SIZE and LOCAL_RANK; `srun` (one task per GPU) sets SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID. We translate SLURM's variables into the torch
ones when no launcher set them, because streaming and DeepSpeed both read the
torch names. The device and backend come from DeepSpeed's accelerator
(CUDA -> nccl, CPU -> gloo), so the same code runs on a laptop and on a cluster.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_env() -> dict[str, str]:
    """torch's launcher variables as this process should see them; srun's translated if no launcher set them.

    Pure: asking which rank we are (checkpoint selection, the weights fingerprint) must not
    change the environment that later child processes or `sbatch` submissions inherit.
    """
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                      "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    # `sbatch` alone also sets SLURM_PROCID=0 for the batch step; only trust it inside srun.
    in_srun = "SLURM_PROCID" in os.environ and ("SLURM_STEP_ID" in os.environ or "SLURM_NTASKS" in os.environ)
    if "RANK" not in env and in_srun:
        env["RANK"] = os.environ["SLURM_PROCID"]
        env["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        tasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if not tasks_per_node and "SLURM_STEP_TASKS_PER_NODE" in os.environ:
            tasks_per_node = os.environ["SLURM_STEP_TASKS_PER_NODE"].split("(")[0].split(",")[0]
        env["LOCAL_WORLD_SIZE"] = tasks_per_node or env["WORLD_SIZE"]
        env.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return env


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world(env: dict[str, str]) -> World:
    return World(*(int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")))


def detect_world() -> World:
    return _world(_launcher_env())


def init_distributed() -> World:
    """Detect ranks, pick the accelerator and start the process group (idempotent).

    The variables are written to the environment here, and only here: DeepSpeed's `env://`
    rendezvous and streaming read them from there.
    """
    env = _launcher_env()
    if "MASTER_PORT" not in env:
        # A lone process needs a 1-rank group too; a fixed port would clash with other jobs on the node.
        env["MASTER_PORT"] = str(free_port()) if env["WORLD_SIZE"] == "1" else "29500"
    os.environ.update(env)
    world = _world(env)
    if not torch.cuda.is_available():
        # DeepSpeed would otherwise probe for accelerators and may pick a wrong one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), verbose=False)
    return world


def shutdown() -> None:
    """Destroy the process group on a clean exit; left to interpreter teardown, torch warns and NCCL
    can hang there."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def bf16_supported() -> bool:
    """Whether the accelerator computes in bf16 natively (CUDA: compute capability 8.0+).

    Not `torch.cuda.is_bf16_supported()` as is, nor DeepSpeed's accelerator (which calls it):
    by default both answer True on a V100, which can only emulate bf16, without tensor cores.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.device_name() != "cpu" and bool(acc.is_bf16_supported())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]
    return obj
