"""RE-Adapt's recombination: base + a*Psi + b*Delta, written as a standard HF model directory.

Psi, the knowledge adapter trained on the *base* model, comes as one of
- a run directory (`config.yaml` + `checkpoints/`): loaded with export.load_trained;
- adapters-only files (`OUT/adapters` of an export, or that directory itself);
- a full HF model directory (`OUT/hf` of a finetune export, or any finetuned copy of
  the base): Psi is its difference to the base, dense.

How each method is scaled by `a`:
- finetune (dense):  W = base + a*(trained - base) + b*Delta
- lora:              W = base + a*(B A * scaling) + b*Delta, then the LoRA layers are removed
- adapter methods:   W = base + b*Delta, and the adapters stay attached with W_o scaled by a.
  The adapter output g*A is linear in W_o, so this scales the residual it adds by exactly a.

Every sum is formed in float64 and rounded once to the model's dtype, so a = 0, b = 1
reproduces the instruct weights exactly (see readapt_delta.py on precision).

Two checks guard against silently wrong models: the base weights must hash to the
fingerprint recorded with the delta, and Psi's frozen backbone (lora, adapters)
must equal the base tensor for tensor, which catches an adapter trained on the
instruct model instead of the base.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ADAPTER_METHODS, ConfigError, MethodConfig
from .delta import DeltaDir, Fingerprint, check_same_architecture, load_config
from .io import DTYPE_NAMES, Checkpoint, ReadaptError, dtype_name

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
"""Copied from the instruct model: the recombined model is meant to be chatted with like it."""


def resolve_dtype(name: str, base: Checkpoint) -> torch.dtype:
    """auto = the dtype holding most of the base's elements (bf16 for most 7-8B releases)."""
    if name != "auto":
        if name not in DTYPE_NAMES:
            raise ReadaptError(f"dtype {name!r}: expected auto or one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]
    counts: dict[torch.dtype, int] = {}
    for n in base.names:
        counts[base.dtype[n]] = counts.get(base.dtype[n], 0) + int(torch.Size(base.shape[n]).numel())
    return max(counts, key=counts.get)


def _from_pretrained(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    except (OSError, ValueError) as e:
        raise ReadaptError(f"{path}: cannot load a causal LM: {str(e).splitlines()[0]}") from None


def load_psi(psi: Optional[Path], base_dir: Path, dtype: torch.dtype, tag: Optional[str] = None,
             allow_other_weights: bool = False) -> tuple[nn.Module, Optional[MethodConfig], str]:
    """(model holding Psi, its method or None, a description): see the module docstring for the sources.

    A run or adapters trained on other backbone weights (another weights fingerprint) are
    refused unless `allow_other_weights`.
    """
    from ..export.adapters_io import CONFIG_NAME, load_adapters
    from ..export.export import load_trained

    if psi is None:
        return _from_pretrained(base_dir, dtype), None, "none"
    psi = Path(psi)
    if (psi / "config.yaml").is_file() and (psi / "checkpoints").is_dir():
        try:
            cfg, model = load_trained(psi, tag, dtype, allow_other_weights)
        except ConfigError as e:
            raise ReadaptError(str(e)) from None
        return model, cfg.method, f"run {psi} ({cfg.method.name})"
    for adapters in (psi, psi / "adapters"):
        if (adapters / CONFIG_NAME).is_file():
            model = _from_pretrained(base_dir, dtype)
            try:
                method = load_adapters(model, adapters, allow_other_weights)
            except ValueError as e:
                raise ReadaptError(str(e)) from None
            return model, method, f"adapters {adapters} ({method.name})"
    for hf in (psi, psi / "hf"):
        if (hf / "config.json").is_file():
            return _from_pretrained(hf, dtype), MethodConfig(name="finetune"), f"dense model {hf} (finetune)"
    raise ReadaptError(f"{psi}: not a run directory, an adapters directory, an export or a HF model directory")


def _hf_name(name: str, method: Optional[MethodConfig], lora_bases: dict[str, str]) -> str:
    """The checkpoint name of an extended model's backbone parameter (wrappers keep the original module)."""
    if method is not None and method.name in ADAPTER_METHODS:
        return name.replace(".mlp.mlp.", ".mlp.")  # ParallelAdapterMLP keeps the original MLP as `.mlp`
    module, _, leaf = name.rpartition(".")
    return f"{lora_bases[module]}.{leaf}" if module in lora_bases else name


def _lora_bases(model: nn.Module) -> dict[str, str]:
    """{module path of each Linear a LoRA layer wraps: its checkpoint path, where the LoRA layer now sits}."""
    path = {id(m): n for n, m in model.named_modules()}
    return {path[id(layer.get_base_layer())]: weight.removesuffix(".weight")
            for weight, layer in _lora_layers(model).items()}


def backbone_parameters(model: nn.Module, method: Optional[MethodConfig]) -> dict[str, nn.Parameter]:
    """{checkpoint name: parameter} of the backbone, tied names included; Psi's own parameters excluded."""
    from ..method.extend import trainable_named_parameters

    psi_ids = set()
    if method is not None and method.name != "finetune":
        psi_ids = {id(p) for _, p in trainable_named_parameters(model)}
    lora_bases = _lora_bases(model) if method is not None and method.name == "lora" else {}
    return {_hf_name(n, method, lora_bases): p for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) not in psi_ids}


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{checkpoint name of the wrapped weight: peft LoraLayer}."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _remove_lora(model: nn.Module) -> None:
    """Put each wrapped Linear back (its weight already holds base + a*BA*s + b*Delta)."""
    for name, module in list(_lora_layers(model).items()):
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())


@torch.no_grad()
def recombine(model: nn.Module, method: Optional[MethodConfig], base: Checkpoint, delta: DeltaDir,
              a: float, b: float) -> nn.Module:
    """In place: turn `model` (base + Psi, as loaded by load_psi) into base + a*Psi + b*Delta."""
    from ..method.extend import LORA_ADAPTER_NAME, adapter_blocks

    if set(base.names) != set(delta.names):
        extra = sorted(set(base.names) ^ set(delta.names))[0]
        where = "base" if extra in base.names else "delta"
        raise ReadaptError(f"tensor {extra} is only in the {where} ({base.path} vs {delta.path})")
    params = backbone_parameters(model, method)
    covered = {id(p) for n, p in params.items() if n in base.names}
    uncovered = [n for n, p in params.items() if id(p) not in covered]
    if uncovered:
        raise ReadaptError(f"the Psi model has backbone tensor {uncovered[0]}, which {base.path} lacks")
    lora = _lora_layers(model) if method is not None and method.name == "lora" else {}
    dense_psi = method is not None and method.name == "finetune"
    fingerprint, done = Fingerprint(), set()
    for name in base.names:
        if name not in params:
            raise ReadaptError(f"tensor {name} of {base.path} has no counterpart in the Psi model")
        p, w = params[name], base.read(name)
        fingerprint.start(name, tuple(w.shape), w.dtype)
        fingerprint.update(w)
        if id(p) in done:  # a tied weight stored under both names: update it once
            continue
        done.add(id(p))
        if tuple(p.shape) != tuple(w.shape) or tuple(w.shape) != delta.shape(name):
            raise ReadaptError(f"tensor {name}: shape {list(w.shape)} in the base, {list(p.shape)} in the Psi "
                               f"model, {list(delta.shape(name))} in the delta")
        if not dense_psi and not torch.equal(p, w.to(p.dtype)):
            raise ReadaptError(f"tensor {name}: the Psi model's backbone differs from {base.path}; Psi must "
                               "be trained on the base model the delta was computed from")
        new = w.double()
        if a != 0 and dense_psi:
            new += a * (p.double() - w.double())
        elif a != 0 and name in lora:
            new += a * lora[name].get_delta_weight(LORA_ADAPTER_NAME).double()
        if b != 0:
            new += b * delta.read(name).double()
        p.copy_(new.to(p.dtype))
    if fingerprint.hexdigest() != delta.meta["base"]["weights_sha256"]:
        raise ReadaptError(f"{base.path}: weights differ from the base the delta was computed from "
                           f"({delta.meta['base']['path']})")
    if lora:
        _remove_lora(model)
    for block in adapter_blocks(model):
        block.adapter.w_o.mul_(a)
    return model


def build(base_dir: Optional[str | Path], delta_dir: str | Path, psi: Optional[str | Path] = None,
          a: float = 0.5, b: float = 0.5, tag: Optional[str] = None,
          dtype: str = "auto", allow_other_weights: bool = False) -> tuple[nn.Module, Optional[MethodConfig], dict]:
    """(recombined model in memory, Psi's method or None, provenance). base_dir defaults to the delta's base."""
    delta = DeltaDir(delta_dir)
    base_dir = Path(base_dir or delta.meta["base"]["path"])
    base = Checkpoint(base_dir)
    torch_dtype = resolve_dtype(dtype, base)
    model, method, source = load_psi(Path(psi) if psi else None, base_dir, torch_dtype, tag, allow_other_weights)
    check_same_architecture(model.config, load_config(base_dir), "the Psi model", str(base_dir))
    recombine(model, method, base, delta, a, b)
    model.eval()
    info = {"base": str(base_dir.resolve()), "delta": str(delta.path.resolve()), "delta_kind": delta.kind,
            "psi": source, "method": method.name if method else None, "a": a, "b": b,
            "dtype": dtype_name(torch_dtype), "instruct": delta.meta["instruct"]["path"]}
    if delta.kind == "lore":
        info["tau"] = delta.meta["tau"]
    return model, method, info


def save(model: nn.Module, method: Optional[MethodConfig], out: Path) -> Path:
    """A directory AutoModelForCausalLM loads; adapter methods go through the export's remote-code writer."""
    out.mkdir(parents=True, exist_ok=True)
    if method is not None and method.name in ADAPTER_METHODS:
        try:
            from ..export.hf_export import save_with_remote_code
        except ImportError:
            raise ReadaptError("writing an adapter-method model as a HF directory needs trainer/export/hf_export.py, "
                               "which this checkout does not have yet") from None
        return save_with_remote_code(model, method, out)
    if hasattr(model, "_trainer_extension"):
        del model._trainer_extension  # lora was removed / finetune added nothing: a plain HF model again
    model.save_pretrained(out, safe_serialization=True)
    return out


def apply(base_dir: Optional[str | Path], delta_dir: str | Path, out: str | Path,
          psi: Optional[str | Path] = None, a: float = 0.5, b: float = 0.5, tag: Optional[str] = None,
          dtype: str = "auto", tokenizer: Optional[str | Path] = None, allow_other_weights: bool = False) -> dict:
    """base + a*Psi + b*Delta -> `out` (HF dir, plus readapt_apply.json); returns the provenance."""
    out = Path(out)
    model, method, info = build(base_dir, delta_dir, psi, a, b, tag, dtype, allow_other_weights)
    save(model, method, out)
    src = Path(tokenizer) if tokenizer else Path(info["instruct"])
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copyfile(src / f, out / f)
    info["tokenizer_files"] = {"from": str(src), "files": copied}
    (out / "readapt_apply.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
