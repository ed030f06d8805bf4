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


def _from_slurm() -> None:
    """Fill torch's launcher variables from srun's, if no launcher set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    # `sbatch` alone also sets SLURM_PROCID=0 for the batch step; only trust it inside srun.
    if "SLURM_STEP_ID" not in os.environ and "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    tasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if not tasks_per_node and "SLURM_STEP_TASKS_PER_NODE" in os.environ:
        tasks_per_node = os.environ["SLURM_STEP_TASKS_PER_NODE"].split("(")[0].split(",")[0]
    os.environ["LOCAL_WORLD_SIZE"] = tasks_per_node or os.environ["WORLD_SIZE"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_world() -> World:
    _from_slurm()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    # A single process still needs a (1-rank) process group for DeepSpeed.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A lone process needs a 1-rank group too; a fixed port would clash with other jobs on the node.
        os.environ["MASTER_PORT"] = str(free_port()) if world_size == 1 else "29500"
    return World(rank, world_size, local_rank, local_world)


def init_distributed() -> World:
    """Detect ranks, pick the accelerator and start the process group (idempotent)."""
    world = detect_world()
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
