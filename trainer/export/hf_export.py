"""A full HF model directory for adapter methods, loadable without this repo.

Gated adapters (neutral_residues, sigmoid_gate) cannot be folded into the
backbone: the gate g(n) scales the adapter per token. They ship with the
standard `auto_map` mechanism instead: two files of this package,
`trainer/method/modeling_parallel_adapter.py` (one config/model class pair per
supported backbone, subclassing the backbone's own HF classes) and
`trainer/method/adapter.py` (the adapter's forward, which training runs too),
are copied byte for byte into the directory, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

works in plain `transformers`, lm-evaluation-harness or any HF-based stack, and
the logits are the trained model's because the forward is the same code, not a
copy of it. The model_type is new (`parallel_adapter_<backbone>`), so loading
WITHOUT trust_remote_code fails loudly instead of silently dropping the adapters.
Because nothing is generated, "is this our own export?" is a byte comparison
with the package's files (`is_own_export`), with no need for transformers' tables.

LoRA merges into the base weights (`merge_lora`), giving a plain model of the
backbone's class. Ungated adapters (method `adapters`) need no remote code either: the backbone MLP and
the adapter are both gated FFNs with the same activation, so concatenating
them along the hidden dimension gives one plain MLP with intermediate_size + h:

    down(act(gate n) * up n) + W_o(act(W_g n) * W_i n)
      = [down | W_o] (act([gate; W_g] n) * [up; W_i] n)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import MethodConfig
from ..method import adapter
from ..method import modeling_parallel_adapter as modeling
from ..method.modeling_parallel_adapter import CONFIG_KEY

MODEL_TYPE_PREFIX = "parallel_adapter_"


def remote_code_files() -> list[Path]:
    """The package's files a gated export ships, under the same names (the relative import needs it)."""
    return [Path(modeling.__file__), Path(adapter.__file__)]


def auto_map(base_model_type: str) -> dict:
    """config.json's auto_map for a backbone of `base_model_type` (KeyError if unsupported)."""
    config_cls, model_cls = modeling.CLASSES[base_model_type]
    module = Path(modeling.__file__).stem
    return {"AutoConfig": f"{module}.{config_cls.__name__}", "AutoModelForCausalLM": f"{module}.{model_cls.__name__}"}


def remote_model_type(model: nn.Module) -> str:
    return MODEL_TYPE_PREFIX + model.config.model_type


def is_own_export(hf_dir: str | Path) -> bool:
    """True if the dir's remote code is exactly what this exporter writes (so it is safe to run).

    `eval` uses it to load our own gated exports without --trust-remote-code. The
    auto_map must name the class pair of the recorded backbone, and the modeling file
    and the adapter.py it imports must be byte-equal to this package's: then the only
    code that runs is this package's own. Directories written by another version of
    those files (or by the older single generated file) are not recognised; they still
    load with an explicit trust_remote_code.
    """
    hf_dir = Path(hf_dir)
    try:
        cfg = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    model_type = str(cfg.get("model_type", ""))
    if not model_type.startswith(MODEL_TYPE_PREFIX):
        return False
    try:
        expected = auto_map(model_type[len(MODEL_TYPE_PREFIX):])
    except KeyError:
        return False
    if cfg.get("auto_map") != expected:
        return False
    return all(_same_bytes(hf_dir / src.name, src) for src in remote_code_files())


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _plain_config(model: nn.Module) -> None:
    """Drop traces of a previous remote-code load (exporting an exported model again)."""
    for key in ("auto_map", CONFIG_KEY):
        if hasattr(model.config, key):
            delattr(model.config, key)


def save_with_remote_code(model: nn.Module, method: MethodConfig, out: str | Path) -> Path:
    """Write `model` (extended with an adapter method) as an HF dir; returns `out`.

    Gated methods get the auto_map remote code (the package's modeling_parallel_adapter.py
    and adapter.py, copied as they are); `adapters` (no gate) is merged
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
    base = model.config.model_type
    try:
        classes = auto_map(base)
    except KeyError:
        raise ValueError(f"save_with_remote_code: no parallel-adapter classes for model_type {base!r}") from None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained wrote the backbone's config; replace it by the remote-code one.
    cfg = model.config.to_dict()
    cfg.update({
        "model_type": remote_model_type(model),
        "architectures": [classes["AutoModelForCausalLM"].rpartition(".")[2]],
        "auto_map": classes,
        CONFIG_KEY: {"adapter_size": ext.adapter_hidden_size, "gate": method.gate, "method": method.name},
    })
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for src in remote_code_files():
        shutil.copyfile(src, out / src.name)
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
