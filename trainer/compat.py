"""The other libraries' internals we rely on, in one place.

The rule: code outside this module uses only the public, documented API of DeepSpeed,
mosaicml-streaming, transformers and peft. Where we need something they do not offer
publicly (a method their own code calls, a naming scheme, a behaviour only their source
describes), it lives here as one small function that
- says which version it was checked against and exactly what it relies on;
- has a test in tests/test_compat.py that exercises the real library, so a version bump
  that changes the internal fails that one test, with a message naming this function,
  instead of a training run hours later.
When a library grows a public way to do the same thing, the function goes and its call
site uses the public API.

This module sits at the bottom layer: it imports third-party libraries only (lazily, so
importing it is cheap), never other trainer modules.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

# ----------------------------------------------------------------------------- DeepSpeed


@contextmanager
def module_state_dict_without(engine, names: Iterable[str]) -> Iterator[None]:
    """Inside this, `engine.save_checkpoint` leaves the params `names` out of the model-states file.

    Checked against deepspeed 0.19.8. `DeepSpeedEngine._save_checkpoint` takes the "module"
    entry of mp_rank_*_model_states.pt from `self.module_state_dict(exclude_frozen_parameters=...)`,
    looked up on the instance, so an instance attribute shadows the method for one save.
    (Its MoE path calls `DeepSpeedEngine.module_state_dict(self, ...)` directly and would
    ignore this; we have no MoE layers.) save_checkpoint has no argument for it:
    `exclude_frozen_parameters` only drops params that do not train.
    """
    leave_out = set(names)
    full = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        return OrderedDict((k, v) for k, v in full(*args, **kwargs).items() if k not in leave_out)

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict


def copy_master_to_module(engine) -> None:
    """Set the module's trainable params from the ZeRO-1/2 optimizer's fp32 master (all ranks).

    Checked against deepspeed 0.19.8: `DeepSpeedZeroOptimizer.update_lp_params()` copies each
    rank's fp32 partition into the low-precision (module) params and all-gathers them.
    `engine.load_checkpoint` calls it itself only after a universal load; a plain ZeRO-1/2
    load restores the module from the model-states file instead, and there is no public
    call for "module from master" (`refresh_fp32_params` goes the other way).
    """
    engine.optimizer.update_lp_params()


@contextmanager
def recording_checkpoint_writes(engine, around=None) -> Iterator[list[str]]:
    """Inside this, the paths of the files this rank's `engine.save_checkpoint` writes are collected,
    and each write runs inside `around(path)` if given (a context manager: the digest is computed
    during the write).

    Checked against deepspeed 0.19.8: every checkpoint file (model states, ZeRO optimizer
    shards, MoE experts) is written through `engine.checkpoint_engine.save(state_dict, path)`,
    looked up on the instance. Each rank writes its own shards, so each rank learns exactly
    which files it must hash, with no assumption about DeepSpeed's file names.
    """
    written: list[str] = []
    ce = engine.checkpoint_engine
    save = ce.save

    def recording_save(state_dict, path, *args, **kwargs):
        with around(path) if around else nullcontext():
            out = save(state_dict, path, *args, **kwargs)
        written.append(str(path))
        return out

    ce.save = recording_save
    try:
        yield written
    finally:
        del ce.save


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor types DeepSpeed's checkpoint files hold, for torch's `weights_only` loader.

    Checked against deepspeed 0.19.8 by `torch.serialization.get_unsafe_globals_in_checkpoint`
    on ZeRO-1/2/3 and universal checkpoints of every method (tests/test_compat.py): the
    optimizer shards pickle the loss scaler, the ZeRO stage enum and the fragment addresses
    of flattened params. numpy's array reconstruction is there for checkpoints written before
    our RNG state was stored as plain lists (engine/rng.py); new ones need no numpy global.
    All are plain data: building them runs no code of the file's choosing.
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address,
            np.ndarray, np.dtype, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]


# DeepSpeed's CPU all-reduce buffers in /dev/shm, one per rank (66 MB each); a killed job leaves them.
# Checked against deepspeed 0.19.8, ops/csrc/cpu/comm/shm.cpp: shm_initialize() names them
# "%s_%d_%s_%s_%d" % (SHM_BUFFER_NAME = "deepspeed_allreduce_buffer", getuid(), MASTER_ADDR, MASTER_PORT, rank).
_DEEPSPEED_BUFFER = r"deepspeed_allreduce_buffer_\d+_.*_\d+"


def deepspeed_shm_pattern() -> str:
    """A regex that fullmatches the names of DeepSpeed's CPU all-reduce buffers under /dev/shm."""
    return _DEEPSPEED_BUFFER


# ----------------------------------------------------------------------------- mosaicml-streaming


def streaming_shm_pattern() -> str:
    """A regex that fullmatches the names of a StreamingDataset's shared memory under /dev/shm.

    Checked against mosaicml-streaming 0.13.0: every segment is named
    f"{prefix_int:06}_{name}" (`streaming.base.shared.prefix._get_path`) with `name` one of
    `streaming.base.constant.SHM_TO_CLEAN` (locals, barrier, next_epoch, ...). Neither is
    public; the only public cleanup, `streaming.base.util.clean_stale_shared_memory()`,
    unlinks live jobs' segments too.
    """
    from streaming.base.constant import SHM_TO_CLEAN

    return rf"\d{{6,}}_({'|'.join(SHM_TO_CLEAN)})"


def streaming_registers_prefix() -> bool:
    """Whether this process is the one of its node that registers a StreamingDataset's shm prefix.

    Checked against mosaicml-streaming 0.13.0: `StreamingDataset.__init__` calls
    `get_shm_prefix(..., World.detect())`, where only `world.is_local_leader` creates the
    prefix's `locals` segment and the other ranks look it up. `World.detect()` reads RANK,
    WORLD_SIZE and LOCAL_WORLD_SIZE from the environment (and the DataLoader worker info).
    """
    from streaming.base.world import World

    return World.detect().is_local_leader
