"""A fingerprint of a backbone's weights, cheap enough to take at every start of a 70B run.

The backbone's identity (model.backbone_hash) is a hash of its HF config: it cannot
tell two checkpoints of one architecture apart, and adapters resumed or loaded onto
other weights produce plausible garbage, not an error. The fingerprint adds the weights:
  - header: every tensor's name, dtype and shape;
  - sample: CHUNKS evenly spaced CHUNK_BYTES-byte chunks of every tensor's bytes
    (the whole tensor when it is smaller), so a few KB per tensor are read, by seek.
It is written "<header>-<sample>" (16 hex digits each). Any change of a name, dtype or
shape changes the header; a change of weight values changes the sample only if it
touches a sampled chunk. That catches another checkpoint (another seed, a fine-tuned
copy: every value differs), not an edit of a single value.

From a model directory with safetensors files, it is read from the files (headers,
then seeks; the weights are never loaded). Otherwise (.bin files, a model built from
model.config) it is taken from the parameters in memory, one at a time, gathered
under ZeRO-3. Both give the same fingerprint for a model loaded in its stored dtype:
the in-memory names are the checkpoint's, seen through the extension's wrappers.

A bf16 copy of fp32 weights has other bytes, so another fingerprint. Where such a copy
must count as the same backbone (adapters trained in fp32, loaded onto a bf16 model),
compare `module_fingerprints(model, dtypes)`: the sampled elements cast to each dtype.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError
from .logger import log

CHUNKS = 16
CHUNK_BYTES = 64
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors' dtype codes, so that files and memory describe a tensor alike.
ST_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def chunk_starts(nbytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the sampled chunks of a tensor of `nbytes` bytes.

    Offsets are multiples of 8 bytes, so a chunk holds whole elements of any dtype:
    the same elements can then be sampled from a copy of the tensor in another dtype.
    """
    if nbytes <= CHUNKS * CHUNK_BYTES:
        return [(0, nbytes)]
    return [(i * (nbytes - CHUNK_BYTES) // (CHUNKS - 1) // 8 * 8, CHUNK_BYTES) for i in range(CHUNKS)]


class _Builder:
    """Collects (dtype, shape, sampled bytes) per tensor name; digests them in name order."""

    def __init__(self):
        self.tensors: dict[str, tuple[str, list[int], bytes]] = {}

    def add(self, name: str, dtype: str, shape, sample: bytes) -> None:
        self.tensors[name] = (dtype, [int(s) for s in shape], sample)

    def digest(self) -> str:
        header, sample = hashlib.sha256(), hashlib.sha256()
        for name in sorted(self.tensors):
            dtype, shape, data = self.tensors[name]
            header.update(f"{name}|{dtype}|{shape}\n".encode())
            sample.update(len(data).to_bytes(8, "little") + data)
        return f"{header.hexdigest()[:16]}-{sample.hexdigest()[:16]}"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a HF model directory in safetensors format ([] if it has none)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [model_dir / SINGLE_NAME] if (model_dir / SINGLE_NAME).is_file() else []


def dir_fingerprint(model_dir: str | Path) -> Optional[str]:
    """Fingerprint of the safetensors files of `model_dir`, read by seek; None if it has none."""
    files = safetensors_files(Path(model_dir))
    if not files:
        return None
    b = _Builder()
    for file in files:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data_start = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                parts = []
                for offset, length in chunk_starts(end - begin):
                    f.seek(data_start + begin + offset)
                    parts.append(f.read(length))
                b.add(name, info["dtype"], info["shape"], b"".join(parts))
    return b.digest()


def backbone_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{checkpoint name: parameter} of the backbone, without what the extension added.

    An adapter block keeps the original MLP as `.mlp` and a LoRA layer its Linear as
    `base_layer`: both are seen through, so the names are those of the HF checkpoint.
    Tied weights count once, under their first name (as save_pretrained writes them).
    """
    from ..method.adapter import ParallelAdapterMLP  # the shipped block, base of the training one
    from ..method.extend import unwrap

    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        while True:
            if isinstance(module, ParallelAdapterMLP):
                module = module.mlp
            elif isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "get_base_layer"):
                module = module.get_base_layer()  # a peft LoRA layer
            else:
                break
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params[prefix + name] = p
        for name, child in module.named_children():
            walk(child, f"{prefix}{name}.")

    walk(unwrap(model), "")
    return params


def module_fingerprints(model: nn.Module, dtypes=(None,)) -> dict:
    """{dtype: fingerprint of the backbone parameters in memory, as if cast to dtype} (None: as they are).

    The cast applies to floating-point tensors and only to the sampled elements, so a model
    in float32 gives the fingerprint its bfloat16 copy has (what `from_pretrained(dtype=...)`
    would load). Every rank must call it under ZeRO-3 (one gather per parameter).
    """
    from ..method.extend import gathered

    builders = {dt: _Builder() for dt in dtypes}
    for name, p in backbone_parameters(model).items():
        with gathered([p]):  # one param at a time: bounded memory under ZeRO-3
            flat = p.detach().reshape(-1)
            for dt, b in builders.items():
                target = dt if dt is not None and p.dtype.is_floating_point else p.dtype
                size = target.itemsize
                sample = torch.cat([flat[o // size:(o + n) // size] for o, n in chunk_starts(flat.numel() * size)])
                data = sample.to(target).contiguous().view(torch.uint8).cpu().numpy().tobytes()
                b.add(name, ST_CODES.get(target, str(target)), p.shape, data)
    return {dt: b.digest() for dt, b in builders.items()}


def module_fingerprint(model: nn.Module, dtype: Optional[torch.dtype] = None) -> str:
    """Fingerprint of the backbone parameters in memory (as if cast to `dtype`, if given)."""
    return module_fingerprints(model, (dtype,))[dtype]


def weights_fingerprint(model_path: Optional[str | Path], model: nn.Module) -> str:
    """From the safetensors files at `model_path` if there are any, else from `model`'s backbone.

    Call it on every rank: rank 0 reads the files and tells the others (a thousand ranks
    seeking into the same files at start is a burden on a shared filesystem).
    """
    from . import dist

    if model_path and Path(model_path).is_dir() and safetensors_files(Path(model_path)):
        return dist.broadcast_object(dir_fingerprint(model_path) if dist.detect_world().is_main else None)
    return module_fingerprint(model)


def check_same_weights(saved: Optional[str], actual: str, where: str, override: str, allowed: bool) -> None:
    """Refuse (ConfigError) weights other than those trained on, unless `allowed`.

    `saved` is None for files written before fingerprints existed: accepted, with a warning.
    `override` says how to allow it (a config key or a flag), for the one-line error.
    """
    if saved is None:
        log.warning("%s: no weights fingerprint (written by an older version): cannot check that the "
                    "backbone has the weights it was trained on", where)
    elif saved != actual:
        message = (f"{where}: trained on backbone weights with fingerprint {saved}, but this backbone's weights "
                   f"have fingerprint {actual} (other weights, or the same loaded in another dtype)")
        if not allowed:
            raise ConfigError(f"{message}; {override} to use them anyway")
        log.warning("%s; using them anyway, as allowed", message)
