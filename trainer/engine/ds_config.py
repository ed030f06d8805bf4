"""Resolve a plain DeepSpeed JSON against the run's YAML.

The JSON files stay pure DeepSpeed (users bring their own); any value the YAML
owns is written as "auto" and filled here, in one place, so batch sizes, the
learning rate and the precision can never disagree between the two files.
"""
from __future__ import annotations

import copy
import json

from ..config import ConfigError, RunConfig
from ..resources import resolve


def batch_arithmetic(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient accumulation steps such that micro * accum * world == global."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size={micro_batch} "
            f"x world size {world_size} = {per_step}; pick a global batch that is a multiple of {per_step}")
    return global_batch // per_step


def load_ds_json(path: str) -> dict:
    p = resolve(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: {path}: file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None


def _fill(node: dict, key: str, value) -> None:
    if node.get(key, "auto") == "auto":
        node[key] = value


def build_ds_config(cfg: RunConfig, world_size: int, on_gpu: bool, bf16_ok: bool = False) -> dict:
    """`bf16_ok`: the accelerator has native bf16 (`dist.bf16_supported()`). It defaults to False so
    that a caller who does not ask gets fp32, slow but correct, never bf16 on a GPU without it."""
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed.config))
    accum = batch_arithmetic(cfg.train.global_batch_size, cfg.train.micro_batch_size, world_size)
    for key, value in (("train_batch_size", cfg.train.global_batch_size),
                       ("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size),
                       ("gradient_accumulation_steps", accum)):
        _fill(ds, key, value)
    # A user JSON that hard-codes batch values must still agree with the YAML.
    if (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) != (
            cfg.train.global_batch_size, cfg.train.micro_batch_size, accum):
        raise ConfigError(f"{cfg.deepspeed.config}: batch sizes disagree with train.global_batch_size/"
                          f"micro_batch_size; set them to \"auto\"")
    _fill(ds, "gradient_clipping", cfg.train.grad_clip)

    # Precision (model.dtype=auto): bf16 on accelerators that have it natively, fp32 everywhere
    # else. On CPU, bf16 matmuls are slow and gloo lacks bf16 reductions on some builds; a GPU
    # without bf16 (V100) gets fp32 too, not fp16, whose loss scaling is a different training
    # regime that a user opts into with model.dtype=float16. An explicit dtype wins.
    dtype = cfg.model.dtype
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and on_gpu and bf16_ok)
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", use_bf16)
    if dtype == "float16":
        ds.setdefault("fp16", {})
        _fill(ds["fp16"], "enabled", True)

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", cfg.lr)
    if "betas" in params or any(k in opt.get("type", "").lower() for k in ("adam", "lamb", "lion")):
        _fill(params, "betas", list(cfg.train.betas))  # Adam, OneBitAdam, Lamb, Lion...; SGD and others take none
    _fill(params, "weight_decay", cfg.train.weight_decay)
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if not on_gpu and not offload and opt.get("type", "").lower().startswith("adam"):
        # FusedAdam is CUDA-only; torch's AdamW is the right kernel on CPU.
        params.setdefault("torch_adam", True)
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"{cfg.deepspeed.config}: no YAML value fills \"auto\" at {leftover}")
    return ds


def _find_auto(node, prefix="") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{prefix}{k}.")
            if found:
                return found
    elif node == "auto":
        return prefix.rstrip(".")
    return None


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
