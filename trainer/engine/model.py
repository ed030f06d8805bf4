"""Load or build the backbone, then extend it according to the method.

Under ZeRO-3 a large backbone must never be materialised whole on every rank:
keeping an `HfDeepSpeedConfig` alive makes `from_pretrained`/`from_config`
construct it inside `deepspeed.zero.Init` (partitioned as it is created), and
the adapters are added inside the same context so DeepSpeed owns them too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json

import torch

from ..config import ConfigError, RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, ds_config: dict) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def backbone_hash(hf_config) -> str:
    """Identity of a backbone architecture, stored with checkpoints and adapters."""
    d = hf_config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                     "architectures", "auto_map"):
        d.pop(volatile, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_backbone(cfg: RunConfig, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.model.path:
        try:
            return AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype,
                                                        trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: {cfg.model.path}: cannot load a causal LM: {str(e).splitlines()[0]}") from None
    spec = dict(cfg.model.config)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.config.model_type: required to build a model from a config")
    try:
        hf_config = AutoConfig.for_model(model_type, **spec)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.config: {e}") from None
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def build_model(cfg: RunConfig, ds_config: dict, zero3: bool):
    """Returns (model, hf_deepspeed_config_keepalive, backbone_hash)."""
    from ..method.extend import enable_activation_checkpointing, extend_model

    keepalive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig
        keepalive = HfDeepSpeedConfig(ds_config)  # must outlive model construction
    dtype = resolve_dtype(cfg.model.dtype, ds_config)
    model = load_backbone(cfg, dtype)
    ident = backbone_hash(model.config)
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed
        # No explicit dtype: with one, DeepSpeed 0.19 picks bf16 on CPU (operator-precedence bug in
        # Init._set_dtype); without, it follows the config's bf16/fp16 flags like the backbone did.
        ctx = deepspeed.zero.Init(config_dict_or_path=ds_config)
    with ctx:
        extend_model(model, cfg.method)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model, reentrant=False)
    return model, keepalive, ident


def frozen_checksum(model) -> str:
    """sha256 over every frozen parameter, gathered one at a time under ZeRO-3.

    Logged at the start and end of a run: equal values prove the backbone was
    not touched (a silent unfreeze is the worst bug an extension run can have).
    """
    import deepspeed

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
