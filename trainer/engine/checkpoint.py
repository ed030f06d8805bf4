"""Sharded DeepSpeed checkpoints that are complete-or-invisible, and elastic resume.

Layout: run_dir/checkpoints/<tag>/ holds DeepSpeed's files (trainable params and
optimizer state only: frozen backbone weights are excluded) plus our meta.json.
Under ZeRO-1/2 the trainable params are stored once, as the optimizer's fp32
master; the module's own copy is left out (see `_master_only`).
`checkpoints/latest` names the newest tag and is replaced atomically only after
every rank has finished writing, so a job killed mid-save resumes from the
previous checkpoint instead of a half-written one.

Resuming on a different number of ranks: DeepSpeed's ZeRO optimizer state is
partitioned per rank, so we convert the checkpoint once to DeepSpeed's universal
format (its `ds_to_universal` command) and load it with `load_universal`. The data
position is stored as global samples per epoch, which is independent of the world size.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from . import dist
from .. import compat
from ..config import ConfigError
from .logger import log

LATEST = "latest"
META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag / META).is_file():
        raise ConfigError(f"{pointer}: points to {tag!r}, which has no {META}; the checkpoint dir is damaged")
    return tag


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / META).read_text())


def check_compatible(meta: dict, expected: dict, where: Path) -> None:
    """Refuse to resume a checkpoint from another method or backbone."""
    for key in ("method", "model_hash", "trainable_params"):
        if meta.get(key) != expected.get(key):
            raise ConfigError(f"{where}: checkpoint has {key}={meta.get(key)!r} but this run has "
                              f"{expected.get(key)!r}; use a new run_dir or set checkpoint.resume=false")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _master_is_complete(engine) -> bool:
    """ZeRO-1/2 optimizers hold an fp32 master of every trainable param in their own state."""
    return engine.zero_optimization_stage() in (1, 2)


@contextmanager
def _master_only(engine):
    """Leave the module's copy of the trainable params out of model_states under ZeRO-1/2.

    DeepSpeed saves them twice there: in the module state dict and as the optimizer's
    fp32 master (a third more bytes than params + Adam moments in fp32). The master is
    the one resume restores, so the module copy is rebuilt from it (`restore_module`);
    `zero_to_fp32` (export) and the universal conversion read the master too. ZeRO-3
    saves no module weights at all, and without ZeRO the module *is* the master.
    """
    if not _master_is_complete(engine):
        yield
        return
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    with compat.module_state_dict_without(engine, trainable):
        yield


def restore_module(engine) -> None:
    """After a load, set the module's trainable params from the fp32 master (all ranks).

    DeepSpeed does the same after a universal load; after a plain ZeRO-1/2 load it
    would keep the module copy, which `_master_only` did not save.
    """
    if _master_is_complete(engine):
        compat.copy_master_to_module(engine)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, meta: dict, keep_last: int) -> str:
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with _master_only(engine):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
    dist.barrier()
    if dist.detect_world().is_main:
        _atomic_write(ckpt_dir / tag / META, json.dumps({**meta, "step": step, "tag": tag}, indent=2))
        _atomic_write(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, current=tag)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith("_universal"))
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old != current:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)


def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / f"{tag}_universal"


def convert_to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Rank 0 converts `tag` to DeepSpeed's universal format (once); others wait."""
    out = universal_dir(ckpt_dir, tag)
    if dist.detect_world().is_main and not (out / ".done").exists():
        log.info("converting %s to a universal checkpoint (world size changed)", tag)
        tmp = ckpt_dir / f".{tag}_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _ds_to_universal(ckpt_dir / tag, tmp / tag)
        # DeepSpeed's loader wants <dir>/<tag>/ with the model-states files alongside.
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        (out / ".done").touch()
    dist.barrier()
    return out


def _ds_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's converter, run as the command its documentation gives (its Python `main`
    takes an argparse namespace, not a public signature). Strict checks stay on (the default)."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(dst), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"converting {src} to a universal checkpoint failed (exit {p.returncode}): "
                           f"{' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    log.debug("ds_to_universal output:\n%s", p.stdout)
