"""RE-Adapt's instruction adapter: Delta = instruct - base, streamed tensor by tensor, and its reader.

A delta directory holds `delta-0000i-of-0000N.safetensors` shards and `readapt.json`,
which describes both source models (paths, config hashes, dtypes, a fingerprint of
the base weights) and every tensor. `apply` uses the fingerprint to refuse a base
other than the one the delta was taken from: a delta added to the wrong model
yields plausible garbage, not an error.

Precision. The difference is taken in float64 and stored, by default, at twice the
tensor's precision (float32 weights -> float64, bf16/fp16 -> float32): the
difference of two floats needs more bits than either, and with the wider dtype
`base + Delta`, rounded back, gives the instruct weights bit for bit except where
|base| / |instruct| is astronomically large. Every element is checked while
writing; the count of those that do not round-trip is `inexact_elements` in
readapt.json (0 means `base + Delta == instruct` exactly).

A LoRE directory (readapt_lore.py) has the same layout with `kind: lore`; its
block matrices are stored as factors `NAME.lore_us` (m x k) and `NAME.lore_vt`
(k x n), and `DeltaDir.read` multiplies them back.
"""
from __future__ import annotations

import hashlib
import math
import json
from pathlib import Path
from typing import Optional

import torch

from ..engine.model import backbone_hash
from .io import (CHUNK_ELEMENTS, DTYPE_NAMES, Checkpoint, ReadaptError, ShardWriter, dtype_name,
                         parse_size, row_chunks, tensor_bytes)

FORMAT = "trainer-readapt/1"
META_NAME = "readapt.json"
US, VT = ".lore_us", ".lore_vt"
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
             "hidden_act", "hidden_activation")
"""config.json fields that must agree between models a delta is taken between or applied to.
Everything else (eos ids, dtype, rope scaling added for chat) may differ between a base and
its instruct release."""
WIDER = {torch.float32: torch.float64, torch.float64: torch.float64, torch.bfloat16: torch.float32,
         torch.float16: torch.float32}


def load_config(path: Path):
    """The HF config of a model dir, with transformers' defaults filled in (so absent keys compare right)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ReadaptError(f"{path}: cannot read config.json: {str(e).splitlines()[0]}") from None


def check_same_architecture(a, b, a_name: str, b_name: str) -> None:
    """Raise naming the first ARCH_KEYS field on which HF configs `a` and `b` differ.

    A field missing or None on one side is not compared: a model built from a config
    dict has no `architectures`, one loaded from a directory does.
    """
    a, b = a.to_dict(), b.to_dict()
    for key in ARCH_KEYS:
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise ReadaptError(f"architecture mismatch: config.json {key} is {a[key]!r} in {a_name} "
                               f"but {b[key]!r} in {b_name}")


class Fingerprint:
    """sha256 over (name, shape, raw bytes) of tensors fed in name order, in any chunking."""

    def __init__(self):
        self.h = hashlib.sha256()

    def start(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.h.update(f"{name}|{list(shape)}|{dtype_name(dtype)}|".encode())

    def update(self, chunk: torch.Tensor) -> None:
        self.h.update(tensor_bytes(chunk))

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:32]


def describe(ckpt: Checkpoint, config) -> dict:
    dtypes = sorted({dtype_name(ckpt.dtype[n]) for n in ckpt.names})
    return {"path": str(ckpt.path.resolve()), "config_sha256": backbone_hash(config),
            "model_type": config.model_type, "dtypes": dtypes, "tensor_count": len(ckpt.names),
            "num_elements": sum(math.prod(ckpt.shape[n]) for n in ckpt.names)}


def _check_tensors(base: Checkpoint, inst: Checkpoint) -> None:
    only_base, only_inst = sorted(set(base.names) - set(inst.names)), sorted(set(inst.names) - set(base.names))
    if only_base:
        raise ReadaptError(f"tensor {only_base[0]} is in {base.path} but not in {inst.path}")
    if only_inst:
        raise ReadaptError(f"tensor {only_inst[0]} is in {inst.path} but not in {base.path}")
    for name in base.names:
        if base.shape[name] != inst.shape[name]:
            raise ReadaptError(f"tensor {name}: shape {list(base.shape[name])} in {base.path} but "
                               f"{list(inst.shape[name])} in {inst.path}")
        for ck in (base, inst):
            if not ck.dtype[name].is_floating_point:
                raise ReadaptError(f"tensor {name} in {ck.path} has dtype {dtype_name(ck.dtype[name])}: "
                                   "deltas need floating-point weights")


def compute_delta(base_dir: str | Path, instruct_dir: str | Path, out_dir: str | Path,
                  dtype: Optional[str] = None, max_shard_size: str = "2GB",
                  chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """Write Delta = instruct - base to `out_dir`; returns the readapt.json contents.

    `dtype`: the stored dtype (float64|float32|bfloat16|float16), default twice each
    tensor's precision. Memory: a few row chunks of one tensor, never a whole model.
    """
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ReadaptError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    base, inst = Checkpoint(base_dir), Checkpoint(instruct_dir)
    base_cfg, inst_cfg = load_config(base.path), load_config(inst.path)
    check_same_architecture(base_cfg, inst_cfg, str(base.path), str(inst.path))
    _check_tensors(base, inst)
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, "delta", parse_size(max_shard_size), {"format": FORMAT, "kind": "delta"})
    fingerprint = Fingerprint()
    tensors, inexact_total = {}, 0
    for name in base.names:
        shape, target = base.shape[name], inst.dtype[name]
        out_dtype = DTYPE_NAMES[dtype] if dtype else WIDER[target]
        writer.begin(name, shape, out_dtype)
        fingerprint.start(name, shape, base.dtype[name])
        inexact = 0
        for rows in row_chunks(shape, chunk_elements):
            b, i = base.read(name, rows), inst.read(name, rows)
            fingerprint.update(b)
            # In place where possible: the float64 temporaries dominate the peak memory.
            d = i.to(torch.float64, copy=True)  # a copy even for float64 weights: d is modified
            d -= b
            d = d.to(out_dtype)  # no copy when storing float64
            writer.write(d)
            # The round trip apply performs (in float64, rounded to the model's dtype) must give i back.
            back = d if d.dtype == torch.float64 else d.double()  # d is written: free to reuse
            back += b
            back = back.to(target)
            inexact += int(((back != i) & ~(back.isnan() & i.isnan())).sum())
            del b, i, d, back
        writer.end()
        inexact_total += inexact
        tensors[name] = {"shape": list(shape), "dtype": dtype_name(out_dtype), "inexact": inexact}
    weight_map = writer.close()
    meta = {
        "format": FORMAT, "kind": "delta",
        "base": {**describe(base, base_cfg), "weights_sha256": fingerprint.hexdigest()},
        "instruct": describe(inst, inst_cfg),
        "dtype": dtype or "auto",
        "tensor_count": len(tensors),
        "num_elements": sum(math.prod(t["shape"]) for t in tensors.values()),
        "inexact_elements": inexact_total,
        "tensors": tensors,
        "weight_map": weight_map,
    }
    write_meta(out_dir, meta)
    return meta


def write_meta(out_dir: Path, meta: dict) -> None:
    tmp = out_dir / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir / META_NAME)  # readapt.json appears last: its presence means the dir is complete


class DeltaDir:
    """A delta or LoRE directory, read one (dense) tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            raise ReadaptError(f"{self.path}: no {META_NAME} (not a directory written by `readapt delta` "
                               "or `readapt lore`, or it was interrupted)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ReadaptError(f"{meta_path}: unknown format {self.meta.get('format')!r} (expected {FORMAT})")
        self.kind: str = self.meta["kind"]
        self.names: list[str] = sorted(self.meta["tensors"])
        for file in sorted(set(self.meta["weight_map"].values())):
            if not (self.path / file).is_file():
                raise ReadaptError(f"{self.path}: shard {file} is missing")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta["tensors"][name]["shape"])

    def rank(self, name: str) -> Optional[int]:
        """LoRE rank of `name`, or None if it is stored dense."""
        return self.meta["tensors"][name].get("rank")

    def _raw(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / self.meta["weight_map"][key]), "pt") as f:
            return f.get_tensor(key)

    def read(self, name: str) -> torch.Tensor:
        """Delta for `name`, dense, in its stored dtype (LoRE factors are multiplied back in float32)."""
        if self.rank(name) is None:
            return self._raw(name)
        return self._raw(name + US).float() @ self._raw(name + VT).float()
