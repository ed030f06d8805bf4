"""The backbone and its extension, sized without loading a weight.

The model is built on the meta device through the same `extend_model` the trainer uses, so the
trainable count is the method's own (adapter width or LoRA rank derived from `extra_params`),
tied embeddings are counted once, and ZeRO-3's per-module facts (largest module, parameters
under the persistence threshold) come from the real module tree.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, MethodConfig, RunConfig


@dataclass(frozen=True)
class ModelFacts:
    hf_config: object = None
    """The backbone's transformers config (what the trainer would build)."""
    frozen: int = 0
    """Parameters that do not train."""
    trainable: int = 0
    """Parameters the optimizer updates."""
    method: Optional[MethodConfig] = None
    """The method with its width pinned (adapter hidden size / LoRA rank), for depth-reduced traces."""
    largest_module: int = 0
    """Most direct parameters of one module: what ZeRO-3 gathers at once at least."""
    largest_layer: int = 0
    """Parameters of the largest decoder layer (adapters included)."""
    param_sizes: tuple = ()
    """(numel, trains) of every parameter, for ZeRO-3's persistence threshold."""

    @property
    def total(self) -> int:
        return self.frozen + self.trainable

    def persistent(self, threshold: int, trainable: Optional[bool] = None) -> int:
        """Elements ZeRO-3 keeps whole on every rank (params of at most `threshold` elements), on
        top of their partition; `trainable` restricts to the trainable (True) or frozen (False) ones."""
        return sum(n for n, trains in self.param_sizes if n <= threshold and trainable in (None, trains))


def hf_config(cfg: RunConfig, hf_config_file: Optional[str] = None):
    """The backbone's config: `--hf-config FILE`, else model.path/config.json, else model.config."""
    from transformers import AutoConfig

    if hf_config_file:
        path = Path(hf_config_file)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--hf-config {hf_config_file}: no such config.json")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    elif cfg.model.path:
        path = Path(cfg.model.path) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.path: {cfg.model.path}: no config.json here; plan reads only the config, "
                              f"so pass --hf-config FILE (e.g. the backbone's config.json) on a machine without it")
        spec = json.loads(path.read_text())
    else:
        spec = dict(cfg.model.config)
    spec = {k: v for k, v in spec.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ConfigError("model_type: missing from the backbone's config")
    try:
        return AutoConfig.for_model(model_type, **spec)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model config: {e}") from None


def with_layers(config, layers: int):
    """A copy of `config` with `layers` decoder layers (per-layer lists cut to match)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:layers]
    return small


def build_meta(config, method: MethodConfig, dtype: torch.dtype = torch.float32):
    """The extended model on the meta device: real module tree, no memory."""
    from transformers import AutoModelForCausalLM

    from ..method.extend import extend_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        extend_model(model, method)
    return model


def model_facts(cfg: RunConfig, hf_config_file: Optional[str] = None) -> ModelFacts:
    from ..method.extend import get_extension

    config = hf_config(cfg, hf_config_file)
    try:
        model = build_meta(config, cfg.method)
    except ValueError as e:  # extend_model: an unsupported class
        raise ConfigError(f"model: {e}") from None
    ext = get_extension(model)
    pinned = copy.deepcopy(cfg.method)
    pinned.hidden_size, pinned.lora_rank = ext.adapter_hidden_size or pinned.hidden_size, ext.lora_rank or pinned.lora_rank
    params = list(model.parameters())  # unique: tied weights appear once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    return ModelFacts(config, sum(p.numel() for p in params) - trainable, trainable, pinned, largest_module,
                      largest_layer, tuple((p.numel(), p.requires_grad) for p in params))
