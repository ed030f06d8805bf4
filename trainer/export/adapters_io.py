"""Adapters-only save/load: `adapter_config.json` + `adapters.safetensors`.

The file holds exactly the trainable tensors (adapter blocks, LoRA A/B, or every
weight for finetune) under their `model.named_parameters()` names, so loading is
"extend a fresh backbone the same way, then copy". The JSON records the resolved
sizes (not just extra_params, which depends on the backbone's count) and the
backbone's identity: its architecture and fingerprints of its weights
(trainer.engine.fingerprint) as if cast to float32, bfloat16 and float16. Loading onto a
different backbone is refused, because adapters silently applied to the wrong model
produce plausible garbage; a backbone of the same architecture must have the same
weights in one of these dtypes (so fp32-trained adapters load onto a bf16 copy), or
be allowed explicitly with `allow_other_weights=True`.

Under ZeRO-3 each param is gathered (a collective: every rank must call save)
and rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import MethodConfig
from ..method.extend import count_parameters, extend_model, gathered, get_extension, trainable_named_parameters, unwrap
from ..engine.fingerprint import check_same_weights, module_fingerprints
from ..engine.model import backbone_hash

FINGERPRINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Adapters load onto a backbone whose weights, cast to one of these, equal the trained-on one's cast alike."""
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT = "trainer-adapters/1"
IDENTITY_KEYS = ("model_class", "hidden_size", "num_layers", "config_sha256")


def backbone_identity(model: nn.Module) -> dict:
    """What must match between the backbone adapters were trained on and the one they load into.

    config_sha256 hashes the HF config minus volatile fields (dtype, paths, versions;
    see trainer.engine.model.backbone_hash), so a bf16 checkpoint loads onto an fp32 copy.
    """
    model = unwrap(model)
    cfg = model.config
    return {"model_class": type(model).__name__, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers, "config_sha256": backbone_hash(cfg)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_adapters(model: nn.Module, method: MethodConfig, out_dir: str | Path, base_model: str) -> Path:
    """Write the trainable tensors and their config to `out_dir`; returns out_dir. Call on every rank."""
    from safetensors.torch import save_file

    model = unwrap(model)
    ext = get_extension(model)
    if ext is None:
        raise ValueError("save_adapters: the model was not extended (extend_model)")
    out_dir = Path(out_dir)
    # The backbone trained on (a collective under ZeRO-3, like the gathers below). None for finetune:
    # its file holds every weight, so whatever backbone it is loaded onto is overwritten.
    fingerprints = None if method.name == "finetune" else \
        {dtype_name(dt): fp for dt, fp in module_fingerprints(model, FINGERPRINT_DTYPES).items()}
    tensors = {}
    for name, p in trainable_named_parameters(model):
        with gathered([p]):  # one param at a time: bounded memory even for finetune
            if _rank() == 0:
                tensors[name] = p.detach().to("cpu", copy=True).contiguous()
    if _rank() == 0:
        counts = count_parameters(model)
        config = {
            "format": FORMAT,
            "method": dataclasses.asdict(method),
            "adapter_hidden_size": ext.adapter_hidden_size,
            "lora_rank": ext.lora_rank,
            "gate": method.gate,
            "init": method.init,
            "base_model": base_model,
            "backbone": backbone_identity(model),
            "weights_fingerprints": fingerprints,
            "backbone_params": counts["backbone"],
            "trainable_params": counts["trainable"],
            "trainable_fraction": counts["fraction"],
            "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a crash never leaves a half-written file under the real name.
        save_file(tensors, str(out_dir / (WEIGHTS_NAME + ".tmp")), metadata={"format": FORMAT})
        os.replace(out_dir / (WEIGHTS_NAME + ".tmp"), out_dir / WEIGHTS_NAME)
        (out_dir / (CONFIG_NAME + ".tmp")).write_text(json.dumps(config, indent=2) + "\n")
        os.replace(out_dir / (CONFIG_NAME + ".tmp"), out_dir / CONFIG_NAME)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no adapter config (expected a directory written by save_adapters)")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown adapter format {config.get('format')!r} (expected {FORMAT})")
    return config


def check_backbone_weights(model: nn.Module, saved: dict | None, path, allow_other_weights: bool) -> None:
    """Refuse a backbone whose weights differ from those trained on in each of FINGERPRINT_DTYPES.

    `saved` ({dtype name: fingerprint}) is None in adapters saved before fingerprints: accepted, with a warning.
    """
    override = "pass allow_other_weights=True (readapt apply: --allow-other-weights)"
    known = {dtype_name(dt): dt for dt in FINGERPRINT_DTYPES}
    saved = {n: fp for n, fp in (saved or {}).items() if n in known}
    if not saved:
        check_same_weights(None, "", str(path), override, allow_other_weights)
        return
    ours = {dtype_name(dt): fp for dt, fp in module_fingerprints(model, [known[n] for n in saved]).items()}
    if any(ours[n] == fp for n, fp in saved.items()):
        return
    dtype = dtype_name(next(model.parameters()).dtype)  # named in the model's own dtype, if possible
    dtype = dtype if dtype in saved else next(iter(saved))
    check_same_weights(saved[dtype], ours[dtype], f"{path} (weights as {dtype})", override, allow_other_weights)


def load_adapters(model: nn.Module, path: str | Path, allow_other_weights: bool = False) -> MethodConfig:
    """Extend the fresh backbone `model` as saved in `path`, load the weights, return the method.

    Raises ValueError naming the first mismatch if `model` is not the saved backbone
    (class, hidden size, layer count, config hash) or the tensors do not fit, and
    a ConfigError (a ValueError) if its weights are not those the adapters were trained
    on in any of FINGERPRINT_DTYPES, unless `allow_other_weights`.
    Under ZeRO-3, call it inside the zero.Init context the model was built in.
    """
    from safetensors.torch import load_file

    model = unwrap(model)
    config = read_adapter_config(path)
    saved, actual = config["backbone"], backbone_identity(model)
    for key in IDENTITY_KEYS:
        if saved[key] != actual[key]:
            raise ValueError(f"{path}: adapters were trained on a backbone with {key} = {saved[key]!r}, "
                             f"but this model has {key} = {actual[key]!r} (base model: {config['base_model']})")
    if config["method"]["name"] != "finetune":
        check_backbone_weights(model, config.get("weights_fingerprints"), path, allow_other_weights)
    method = MethodConfig(**{**config["method"], "hidden_size": config["adapter_hidden_size"],
                             "lora_rank": config["lora_rank"]})
    extend_model(model, method)
    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    params = dict(trainable_named_parameters(model))
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path}: saved tensors do not match the extended model "
                         f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for name, p in params.items():
        with gathered([p], modifier_rank=0):
            if tuple(p.shape) != tuple(tensors[name].shape):
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(tensors[name])
    return method
