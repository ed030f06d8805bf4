"""Sharded DeepSpeed checkpoints that are complete-or-invisible, verified, and elastic.

Layout: run_dir/checkpoints/<tag>/ holds DeepSpeed's files (trainable params and
optimizer state only: frozen backbone weights are excluded) plus our meta.json.
Under ZeRO-1/2 the trainable params are stored once, as the optimizer's fp32
master; the module's own copy is left out (see `master_only`).

Complete-or-invisible: meta.json is written last, by rank 0, after every rank has
written and hashed its own files; it lists each file's size and digest (manifest.py).
A tag dir without meta.json is an unfinished save and is never loaded.

Verified: the checkpoint to load is the newest one whose files match their manifest and
hold nothing but data (`select`). `checkpoints/latest` is only a hint for people and
tools; if it is missing or names a damaged checkpoint, the newest verifying one is used,
loudly, and the damaged ones are renamed aside (`<tag>.damaged`), never deleted. If none
verifies, nothing is loaded and nothing is deleted: the run refuses to start.

Resuming on a different number of ranks: DeepSpeed's ZeRO optimizer state is
partitioned per rank, so we convert the checkpoint once to DeepSpeed's universal
format (its `ds_to_universal` command) and load it with `load_universal`. The data
position is stored as global samples per epoch, which is independent of the world size.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import dist, manifest
from .. import compat
from ..config import ConfigError
from .logger import log
from .manifest import Damaged

LATEST = "latest"
META = "meta.json"
TAG = re.compile(r"step_\d{8}")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """What `checkpoints/latest` names (a hint: loading goes through `select`)."""
    pointer = ckpt_dir / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a meta.json, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if TAG.fullmatch(p.name) and (p / META).is_file()),
                  reverse=True)


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    path = ckpt_dir / tag / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Damaged(f"{path}: unreadable ({e})") from None


def verify(ckpt_dir: Path, tag: str) -> dict:
    """The checkpoint's meta, once its files match the manifest and hold only data."""
    meta = read_meta(ckpt_dir, tag)
    tag_dir = ckpt_dir / tag
    if "files" not in meta:
        # Written before checkpoints had manifests: nothing to compare, but still never run its pickles.
        log.warning("%s has no manifest (an older version wrote it): its files are not verified", tag_dir)
        for path in sorted(tag_dir.glob("*.pt")):
            manifest.check_loadable(path)
        return meta
    manifest.verify(tag_dir, meta["files"])
    return meta


@dataclass
class Selected:
    tag: str
    meta: dict
    refused: list[str] = field(default_factory=list)  # newer complete tags that failed verification


def select(ckpt_dir: Path, tag: Optional[str] = None) -> Optional[Selected]:
    """The checkpoint to load: `tag` if given, else the newest complete one that verifies.

    None only when there is no complete checkpoint at all; complete ones that all fail
    verification are a refusal, never a fresh start over them.
    """
    tags = complete_tags(ckpt_dir)
    if tag is not None:
        if tag not in tags:
            raise ConfigError(f"{ckpt_dir / tag}: no such complete checkpoint; found: {', '.join(tags) or 'none'}")
        return Selected(tag, verify(ckpt_dir, tag))
    refused: list[tuple[str, str]] = []
    for candidate in tags:
        try:
            meta = verify(ckpt_dir, candidate)
        except Damaged as e:
            log.warning("checkpoint %s fails verification: %s", candidate, e)
            refused.append((candidate, str(e)))
            continue
        pointer = latest_tag(ckpt_dir)
        if refused:
            log.warning("falling back to %s, the newest checkpoint that verifies (refused: %s)",
                        candidate, ", ".join(t for t, _ in refused))
        elif pointer != candidate:
            log.warning("%s %s; using %s, the newest complete checkpoint, which verifies", ckpt_dir / LATEST,
                        f"names {pointer!r}" if pointer else "is missing", candidate)
        return Selected(candidate, meta, [t for t, _ in refused])
    if refused:
        raise ConfigError(f"{ckpt_dir}: none of its {len(tags)} checkpoints verifies, so nothing was loaded or "
                          f"deleted ({refused[0][1]}). Restore them, or train into a new run_dir")
    return None


def set_aside(ckpt_dir: Path, tags: list[str], why: str) -> None:
    """Rename checkpoints that must not be loaded or overwritten; they are kept for inspection."""
    for tag in tags:
        dest = ckpt_dir / f"{tag}.{why}"
        n = 1
        while dest.exists():
            dest, n = ckpt_dir / f"{tag}.{why}{n}", n + 1
        os.replace(ckpt_dir / tag, dest)
        log.warning("moved %s aside to %s", ckpt_dir / tag, dest.name)


def clean_interrupted(ckpt_dir: Path) -> None:
    """Remove what a kill between a write and its rename leaves: `.latest.tmp<pid>`, half conversions."""
    if not ckpt_dir.is_dir():
        return
    for path in list(ckpt_dir.glob(".*.tmp*")) + list(ckpt_dir.glob(f"*/.{META}.tmp*")):
        log.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_compatible(meta: dict, expected: dict, where: Path, allow_other_weights: bool = False) -> None:
    """Refuse to resume a checkpoint from another method or backbone, or onto other backbone weights
    (unless `allow_other_weights`; checkpoints older than weight fingerprints pass with a warning)."""
    from .fingerprint import check_same_weights

    for key in ("method", "model_hash", "trainable_params"):
        if meta.get(key) != expected.get(key):
            raise ConfigError(f"{where}: checkpoint has {key}={meta.get(key)!r} but this run has "
                              f"{expected.get(key)!r}; use a new run_dir or set checkpoint.resume=false")
    check_same_weights(meta.get("weights_fingerprint"), expected["weights_fingerprint"], str(where),
                       "set checkpoint.allow_other_weights=true", allow_other_weights)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _master_is_complete(engine) -> bool:
    """ZeRO-1/2 optimizers hold an fp32 master of every trainable param in their own state."""
    return engine.zero_optimization_stage() in (1, 2)


@contextmanager
def master_only(engine):
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
    would keep the module copy, which `master_only` did not save.
    """
    if _master_is_complete(engine):
        compat.copy_master_to_module(engine)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, meta: dict, keep_last: int) -> str:
    """Every rank writes and hashes its own files; rank 0 then writes meta.json (with the
    manifest), points `latest` at the tag and prunes. A kill before meta.json leaves an
    unfinished tag dir that is never loaded; the previous checkpoint stays the newest."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    world = dist.detect_world()
    if world.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if (tag_dir / META).is_file():  # a complete checkpoint of this step from another lineage
            set_aside(ckpt_dir, [tag], "replaced")
        shutil.rmtree(tag_dir, ignore_errors=True)  # an unfinished save of this step
    dist.barrier()
    digests: dict[Path, str] = {}

    def hashed(path):
        return manifest.hashed_while_written(Path(path).resolve(), digests)

    with master_only(engine), compat.recording_checkpoint_writes(engine, around=hashed) as written:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
    mine = manifest.describe([Path(p).resolve() for p in written], tag_dir.resolve(), known=digests)
    _atomic_write(tag_dir / f".files.rank{world.rank}.json", json.dumps(mine))
    dist.barrier()
    if world.is_main:
        parts = sorted(tag_dir.glob(".files.rank*.json"))
        files = {k: v for part in parts for k, v in json.loads(part.read_text()).items()}
        others = [p for p in sorted(tag_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")
                  and p.name != META and p.relative_to(tag_dir).as_posix() not in files]
        files.update(manifest.describe(others, tag_dir))  # e.g. scripts DeepSpeed copies in
        _atomic_write(tag_dir / META, json.dumps({**meta, "step": step, "tag": tag, "files": files}, indent=2))
        for part in parts:
            part.unlink()
        _atomic_write(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, current=tag)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and unfinished saves."""
    complete = sorted(complete_tags(ckpt_dir))
    unfinished = [p.name for p in ckpt_dir.iterdir() if TAG.fullmatch(p.name) and p.name not in complete]
    for old in (complete[:-keep_last] if keep_last > 0 else []) + unfinished:
        if old != current:
            # meta.json first: a kill in the middle of the rmtree leaves an invisible dir, not a damaged one.
            (ckpt_dir / old / META).unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)


def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / f"{tag}_universal"


UNIVERSAL_MANIFEST = ".manifest.json"


def convert_to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Rank 0 converts `tag` (already verified) to DeepSpeed's universal format, once; others wait.

    The conversion gets its own manifest, so a universal dir is verified like a checkpoint
    before each load; a damaged one is converted again from its (verified) source.
    """
    out = universal_dir(ckpt_dir, tag)
    if dist.detect_world().is_main and not _universal_ok(out):
        log.info("converting %s to a universal checkpoint (world size changed)", tag)
        tmp = ckpt_dir / f".{tag}_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _ds_to_universal(ckpt_dir / tag, tmp / tag)
        # DeepSpeed's loader wants <dir>/<tag>/ with the model-states files alongside.
        files = manifest.describe([p for p in sorted(tmp.rglob("*")) if p.is_file()], tmp)
        (tmp / UNIVERSAL_MANIFEST).write_text(json.dumps(files))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return out


def _universal_ok(out: Path) -> bool:
    try:
        manifest.verify(out, json.loads((out / UNIVERSAL_MANIFEST).read_text()))
        return True
    except (OSError, ValueError) as e:  # Damaged is a ValueError; no manifest: never converted
        if out.exists():
            log.warning("%s fails verification (%s): converting again", out, e)
        return False


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
