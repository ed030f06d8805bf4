"""A full HF model directory for adapter methods, loadable without this repo.

Gated adapters (neutral_residues, sigmoid_gate) cannot be folded into the
backbone: the gate g(n) scales the adapter per token. They ship with the
standard `auto_map` mechanism instead: a small modeling file written into the
directory subclasses the backbone's own HF classes (Llama, Mistral, Qwen2,
Gemma, Gemma2) and re-wraps each layer's MLP with the parallel gated adapter at
load time, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

works in plain `transformers`, lm-evaluation-harness or any HF-based stack. The
file imports only torch and transformers, and its forward is the trainer's
(`extend.GatedAdapter`, `extend.ParallelAdapterMLP` without the loss
bookkeeping), so logits match the trained model. The model_type is new
(`parallel_adapter_<backbone>`), so loading WITHOUT trust_remote_code fails
loudly instead of silently dropping the adapters.

LoRA merges into the base weights (`merge_lora`), giving a plain model of the
backbone's class. Ungated adapters (method `adapters`) need no remote code either: the backbone MLP and
the adapter are both gated FFNs with the same activation, so concatenating
them along the hidden dimension gives one plain MLP with intermediate_size + h:

    down(act(gate n) * up n) + W_o(act(W_g n) * W_i n)
      = [down | W_o] (act([gate; W_g] n) * [up; W_i] n)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import MethodConfig

MODELING_FILE = "modeling_parallel_adapter.py"
CONFIG_KEY = "parallel_adapter"

# The modeling file shipped in the export directory. `{...}` fields are filled per
# backbone; everything else is literal Python that must stay self-contained.
_MODELING_TEMPLATE = '''\
"""Parallel gated adapters on a {base_model} backbone (written by the extension trainer's export).

Self-contained: needs only torch and transformers. Each decoder layer's MLP becomes

    out = mlp(n) + g(n) * W_o(act(W_g n) * W_i n),   g(n) = relu(w_b . n) | sigmoid(w_b . n) | 1

where n is the MLP's (normalised) input and act the backbone MLP's own activation.
Load with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.
Adapter sizes live in config.json under "{config_key}".
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base_config} as _BaseConfig
from transformers import {base_model} as _BaseForCausalLM


class ParallelAdapterConfig(_BaseConfig):
    model_type = "{model_type}"

    def __init__(self, {config_key}=None, **kwargs):
        # {{"adapter_size": h, "gate": "relu" | "sigmoid" | "none", "method": name}}
        self.{config_key} = dict({config_key} or {{}})
        super().__init__(**kwargs)


class GatedAdapter(nn.Module):
    """A(n) = W_o(act(W_g n) * W_i n) scaled per token by the gate; returns g*A(n), (B, T, d)."""

    def __init__(self, hidden_size, adapter_size, gate):
        super().__init__()
        self.gate = gate
        self.w_g = nn.Parameter(torch.zeros(adapter_size, hidden_size))  # (h, d)
        self.w_i = nn.Parameter(torch.zeros(adapter_size, hidden_size))  # (h, d)
        self.w_o = nn.Parameter(torch.zeros(hidden_size, adapter_size))  # (d, h)
        self.w_b = nn.Parameter(torch.zeros(hidden_size)) if gate != "none" else None  # (d,)

    def forward(self, n, act):
        a = F.linear(act(F.linear(n, self.w_g)) * F.linear(n, self.w_i), self.w_o)
        if self.w_b is None:
            return a
        z = torch.matmul(n, self.w_b)  # (B, T): one gate value per token
        g = torch.relu(z) if self.gate == "relu" else torch.sigmoid(z)
        return g.unsqueeze(-1) * a


class ParallelAdapterMLP(nn.Module):
    """Holds the backbone MLP as `.mlp`, so checkpoint keys are model.layers.i.mlp.mlp.* and .mlp.adapter.*."""

    def __init__(self, mlp, adapter):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, n):
        y = self.adapter(n, self.mlp.act_fn)
        return self.mlp(n) + y


class ParallelAdapterForCausalLM(_BaseForCausalLM):
    config_class = ParallelAdapterConfig

    def __init__(self, config):
        super().__init__(config)
        spec = config.{config_key}
        for layer in self.model.layers:
            adapter = GatedAdapter(config.hidden_size, spec["adapter_size"], spec["gate"])
            layer.mlp = ParallelAdapterMLP(layer.mlp, adapter)
'''


MODEL_TYPE_PREFIX = "parallel_adapter_"
AUTO_MAP = {"AutoConfig": f"{MODELING_FILE[:-3]}.ParallelAdapterConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.ParallelAdapterForCausalLM"}


def modeling_source(model: nn.Module) -> str:
    """The modeling file's text for this backbone class."""
    return _source(type(model).__name__, type(model.config).__name__, model.config.model_type)


def _source(base_model: str, base_config: str, base_type: str) -> str:
    return _MODELING_TEMPLATE.format(base_model=base_model, base_config=base_config,
                                     model_type=MODEL_TYPE_PREFIX + base_type, config_key=CONFIG_KEY)


def remote_model_type(model: nn.Module) -> str:
    return MODEL_TYPE_PREFIX + model.config.model_type


def is_own_export(hf_dir: str | Path) -> bool:
    """True if the dir's remote code is exactly what this exporter writes (so it is safe to run).

    `eval` uses it to load our own gated exports without --trust-remote-code: the
    auto_map must point only at our classes and the modeling file must be byte-equal
    to the one regenerated from the template for the recorded backbone type.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    hf_dir = Path(hf_dir)
    try:
        cfg = json.loads((hf_dir / "config.json").read_text())
        code = (hf_dir / MODELING_FILE).read_text()
    except (OSError, ValueError):
        return False
    model_type = str(cfg.get("model_type", ""))
    base = model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else None
    if cfg.get("auto_map") != AUTO_MAP or base not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return code == _source(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base], CONFIG_MAPPING_NAMES[base], base)


def _plain_config(model: nn.Module) -> None:
    """Drop traces of a previous remote-code load (exporting an exported model again)."""
    for key in ("auto_map", CONFIG_KEY):
        if hasattr(model.config, key):
            delattr(model.config, key)


def save_with_remote_code(model: nn.Module, method: MethodConfig, out: str | Path) -> Path:
    """Write `model` (extended with an adapter method) as an HF dir; returns `out`.

    Gated methods get the auto_map modeling file; `adapters` (no gate) is merged
    into a plain model of the backbone's class instead. Modifies `model` in the
    merge case (it is an export copy).
    """
    from ..method.extend import adapter_blocks, get_extension

    out = Path(out)
    ext = get_extension(model)
    if ext is None or not adapter_blocks(model):
        raise ValueError("save_with_remote_code: the model has no parallel adapter blocks")
    if method.gate == "none":
        merge_ungated_adapters(model)
        _plain_config(model)
        model.save_pretrained(out, safe_serialization=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained wrote the backbone's config; replace it by the remote-code one.
    cfg = model.config.to_dict()
    cfg.update({
        "model_type": remote_model_type(model),
        "architectures": ["ParallelAdapterForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        CONFIG_KEY: {"adapter_size": ext.adapter_hidden_size, "gate": method.gate, "method": method.name},
    })
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / MODELING_FILE).write_text(modeling_source(model))
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold peft LoRA into the base weights and put the plain nn.Linear back (W += B A * scaling).

    For an unpartitioned model only (export runs without ZeRO). Kept here with the
    other merges; trainer.method.extend injects LoRA but does not undo it.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def _cat_linear(first: nn.Linear, weight: torch.Tensor, dim: int) -> nn.Linear:
    """A Linear whose weight is [first.weight, weight] along `dim` (0: more outputs, 1: more inputs).

    An existing bias (Llama's mlp_bias) gets zeros for the new outputs: the adapter has no bias.
    """
    w = torch.cat([first.weight.detach(), weight.detach().to(first.weight.dtype)], dim=dim)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=first.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if first.bias is not None:
            extra = w.shape[0] - first.bias.shape[0]
            lin.bias.copy_(torch.cat([first.bias.detach(), first.bias.new_zeros(extra)]))
    return lin


@torch.no_grad()
def merge_ungated_adapters(model: nn.Module) -> None:
    """Fold each ungated ParallelAdapterMLP into its backbone MLP; model becomes a plain HF model.

    Afterwards config.intermediate_size = ffn + h, so `from_pretrained` rebuilds the same shapes.
    """
    from ..method.extend import adapter_blocks

    blocks = adapter_blocks(model)
    if any(b.adapter.w_b is not None for b in blocks):
        raise ValueError("merge_ungated_adapters: gated adapters cannot be merged (the gate scales per token)")
    for layer in model.model.layers:
        block = layer.mlp
        mlp, a = block.mlp, block.adapter
        mlp.gate_proj = _cat_linear(mlp.gate_proj, a.w_g, dim=0)
        mlp.up_proj = _cat_linear(mlp.up_proj, a.w_i, dim=0)
        mlp.down_proj = _cat_linear(mlp.down_proj, a.w_o, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = mlp.gate_proj.out_features
        layer.mlp = mlp
    model.config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    del model._trainer_extension  # a plain HF model now: nothing extended is left
