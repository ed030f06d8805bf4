"""Turn a run's checkpoint into files people ship: adapters-only and a full HF model directory.

Export runs in one process without DeepSpeed: it rebuilds the backbone from the
run's config, re-applies the method, and fills the trainable weights with the
fp32 master copy from the ZeRO checkpoint (`zero_to_fp32` merges the per-rank
partitions of ZeRO-2 and ZeRO-3 alike). Frozen weights come from the backbone
itself, which is why checkpoints never need to store them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, RunConfig, load_config


def trained_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)


def load_trained(run_dir: Path, tag: Optional[str] = None, dtype: torch.dtype = torch.float32,
                 allow_other_weights: bool = False):
    """(cfg, model) with the trained weights of `tag` (default: the latest checkpoint).

    The backbone must have the weights trained on (its fingerprint in the checkpoint's
    meta), unless `allow_other_weights`.
    """
    from ..engine import checkpoint
    from ..engine.fingerprint import check_same_weights, weights_fingerprint
    from ..method.extend import extend_model
    from ..engine.model import backbone_hash, load_backbone
    from ..engine.rng import seed_everything

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(cfg_path)
    ckpt_dir = run_dir / "checkpoints"
    chosen = checkpoint.select(ckpt_dir, tag)  # verified: digests, and pickles that hold only data
    if chosen is None:
        raise ConfigError(f"{ckpt_dir}: no complete checkpoint")
    tag, meta = chosen.tag, chosen.meta
    frozen_random = cfg.model.config is not None and cfg.method.name != "finetune"
    if frozen_random and meta.get("zero_stage") == 3:
        # zero.Init draws the random init partition by partition: outside it the frozen weights differ.
        raise ConfigError(f"{ckpt_dir / tag}: this run trained adapters on a backbone built from model.config "
                          "under ZeRO-3, whose random frozen weights cannot be rebuilt here; save the backbone "
                          "(e.g. a finetune run + export) and train with model.path")
    # A randomly initialised backbone is rebuilt from the same seed, exactly as train() built it.
    seed_everything(cfg.train.seed)
    model = load_backbone(cfg, dtype)
    if backbone_hash(model.config) != meta["model_hash"]:
        raise ConfigError(f"{ckpt_dir / tag}: the backbone at model.path differs from the one trained")
    check_same_weights(meta.get("weights_fingerprint"), weights_fingerprint(cfg.model.path, model),
                       str(ckpt_dir / tag), "pass --allow-other-weights (export, readapt apply)", allow_other_weights)
    extend_model(model, cfg.method)
    state = trained_state(ckpt_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable - set(state):
        raise ConfigError(f"{ckpt_dir / tag}: checkpoint does not match the model "
                          f"(unexpected {sorted(unexpected)[:3]}, missing {sorted(trainable - set(state))[:3]})")
    model.eval()
    return cfg, model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def backbone_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the backbone was published in (its config.json), float32 for a config-built one."""
    config = Path(cfg.model.path or "") / "config.json"
    if cfg.model.path and config.is_file():
        spec = json.loads(config.read_text())
        return DTYPES.get(str(spec.get("dtype") or spec.get("torch_dtype")), torch.float32)
    return torch.float32


def export_full(cfg: RunConfig, model, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A directory that `AutoModelForCausalLM.from_pretrained` loads without this repo.

    Merges happen in float32 (the model as loaded), then the weights are cast to `dtype`.
    """
    out.mkdir(parents=True, exist_ok=True)
    if cfg.method.name == "lora":
        from .hf_export import merge_lora
        merge_lora(model)
    model.to(dtype)
    if cfg.method.name in ("lora", "finetune"):
        model.save_pretrained(out, safe_serialization=True)
        return out
    from .hf_export import save_with_remote_code
    return save_with_remote_code(model, cfg.method, out)


def copy_tokenizer(src: str, out: Path, required: bool) -> bool:
    """Save the tokenizer at `src` into `out` (so `pretrained=DIR` finds it); False if there is none."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
        return True
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise ConfigError(f"--tokenizer {src}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None
        return False  # the backbone dir has no tokenizer; the model itself is still complete


def export(run_dir: Path, out: Path, tag: Optional[str] = None, tokenizer: Optional[str] = None,
           only: Optional[str] = None, dtype: Optional[str] = None, allow_other_weights: bool = False) -> dict:
    """Write OUT/adapters (not for finetune) and OUT/hf; `only` = "adapters" | "hf" skips the other.

    The adapters file keeps the fp32 master weights (it is small); the HF dir is cast to
    `dtype` (default: the backbone's own, so an 8B bf16 model does not come out as 32 GB).
    """
    from .adapters_io import save_adapters

    out = Path(out)
    cfg, model = load_trained(run_dir, tag, allow_other_weights=allow_other_weights)
    written = {}
    if only == "adapters" and cfg.method.name == "finetune":
        raise ConfigError(f"{run_dir}: a finetune run has no adapters; export the full model (--only hf)")
    if cfg.method.name != "finetune" and only in (None, "adapters"):
        save_adapters(model, cfg.method, out / "adapters", base_model=cfg.model.path or "config")
        written["adapters"] = out / "adapters"
    if only in (None, "hf"):
        written["hf"] = export_full(cfg, model, out / "hf", DTYPES[dtype] if dtype else backbone_dtype(cfg))
        tok = tokenizer or cfg.model.path
        if tok and Path(tok).exists():
            copy_tokenizer(tok, out / "hf", required=tokenizer is not None)
        elif tokenizer:
            raise ConfigError(f"--tokenizer {tokenizer}: no such file or directory")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/hf (full model) and OUT/adapters")
    ap.add_argument("--tag", help="checkpoint tag (default: latest)")
    ap.add_argument("--tokenizer", help="tokenizer dir to copy into OUT/hf (default: the backbone's, if it has one)")
    ap.add_argument("--only", choices=("adapters", "hf"), help="write only the adapters-only files or the HF dir")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the HF dir (default: the backbone's)")
    ap.add_argument("--allow-other-weights", action="store_true",
                    help="export even if the backbone's weights are not those trained on (other fingerprint)")
    args = ap.parse_args(argv)
    try:
        written = export(args.run_dir, args.out, args.tag, args.tokenizer, args.only, args.dtype,
                         args.allow_other_weights)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
