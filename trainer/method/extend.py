"""Extend a frozen HF causal LM in place: parallel gated adapters, LoRA, or full finetune.

One job: given a loaded `LlamaForCausalLM`-like model and a `MethodConfig`, add
the trainable parameters the method needs, freeze everything else, and record
what was done (`get_extension`). The model stays its own HF class: no wrapper
model, no subclassing, so DeepSpeed, `generate` and export see a normal model.

Adapter methods (neutral_residues, sigmoid_gate, adapters) replace each
`layer.mlp` by a `ParallelAdapterMLP` that keeps the original as `.mlp`:

    out = mlp(n) + g(n) * A(n),   A(n) = W_o(act(W_g n) * W_i n),   g = relu|sigmoid(w_b . n) or 1

That forward has one definition, `trainer/method/adapter.py`, which exports copy
byte for byte into the model directory (trainer/export/hf_export.py). The classes
here subclass it and add only what training needs: initialisation and the local
loss's bookkeeping. So what was trained is, by construction, what an export runs.

Local losses (l1 on original-domain tokens, gate BCE) are computed inside the
block while the activations are at hand, reduced to scalars, and their gradient
is injected back into the block's output (see `_InjectLocalGrad`); this is what
makes them work under both reentrant and non-reentrant activation checkpointing.
`trainer/method/losses.py` turns the per-block records into the loss the trainer adds.

ZeRO-3: counts use `ds_numel`; new tensors are sized from the HF config, never
from (partitioned, shape [0]) weights; adapter params are initialised inside
their module's `__init__`, which `deepspeed.zero.Init` runs before partitioning
(and then broadcasts from rank 0), and LoRA's zero B is written inside
`GatheredParameters`. Call `extend_model` inside the same `zero.Init` context
the backbone was built in (trainer/engine/model.py does); outside it, plain tensors
are created and `deepspeed.initialize` partitions them (rank 0's values win).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ADAPTER_METHODS, MethodConfig
from . import adapter as shipped

SUPPORTED_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM",
                     "Gemma2ForCausalLM")
LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")
LORA_ADAPTER_NAME = "default"


# ----------------------------------------------------------------------------- ZeRO-3 helpers


def numel(p: torch.Tensor) -> int:
    """Full element count, also for a ZeRO-3 partitioned param (whose .numel() is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params, modifier_rank: Optional[int] = None):
    """Full tensors of ZeRO-3 params inside the block (a no-op for ordinary params).

    With modifier_rank=0, rank 0's in-place edits are re-partitioned on exit. Every
    rank must enter with the same params in the same order (it is a collective).
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


# ----------------------------------------------------------------------------- sizing


def adapter_hidden_size(extra_params: float, backbone_params: int, num_layers: int, hidden_size: int) -> int:
    """h = round(extra * N / (L * 3 * d)): each layer adds 3*d*h (+ d for the gate) params (docs/method.md)."""
    return max(1, round(extra_params * backbone_params / (num_layers * 3 * hidden_size)))


def lora_rank(extra_params: float, backbone_params: int, num_layers: int, hidden_size: int,
              intermediate_size: int) -> int:
    """Rank r such that LoRA on gate/up/down adds ~extra * N params: each layer adds 3*r*(d + ffn)."""
    return max(1, round(extra_params * backbone_params / (num_layers * 3 * (hidden_size + intermediate_size))))


# ----------------------------------------------------------------------------- the adapter block


class _DomainPass:
    """State shared by all blocks for one set_domain() -> forward -> backward cycle.

    `mask` is the caller's bool tensor (True = original-domain token), (B, 1) or (B, T).
    `grad_weights` is filled by the local-loss node during backward (losses.py) with
    d(total loss)/d(sum of l1 shares) and d(total loss)/d(sum of bce shares).
    """

    def __init__(self, mask: Optional[torch.Tensor], l1_tokens: Optional[float] = None):
        self.mask = mask
        self.l1_tokens = l1_tokens
        self.grad_weights: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class _InjectLocalGrad(torch.autograd.Function):
    """Identity on the block output whose backward also feeds the local-loss gradient.

    Under reentrant checkpointing the first forward runs without autograd, so a loss
    stashed during it has no graph. Attaching the block's l1/BCE scalars to its own
    output instead means the recomputed forward (which does build a graph) carries
    them: when the output's gradient arrives, we also send the local loss's upstream
    gradient into the scalars. The upstream gradient (including DeepSpeed's 1/GAS and
    fp16 loss scale) is recorded by the node `local_loss` returns, which autograd
    runs first: it is created after the whole forward, and autograd executes ready
    nodes newest-first. No checkpointing and non-reentrant checkpointing use the same
    path, so all three modes give the same gradients.
    """

    @staticmethod
    def forward(ctx, out, domain_pass, l1_share, bce_share):
        ctx.domain_pass = domain_pass
        ctx.has = (l1_share is not None, bce_share is not None)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        weights = ctx.domain_pass.grad_weights  # None: local loss not part of this backward
        grads = [None, None]
        if weights is not None:
            grads = [w if has else None for w, has in zip(weights, ctx.has)]
        return grad_out, None, grads[0], grads[1]


@dataclass
class BlockRecord:
    """What one block's forward leaves for the loss: detached values and statistics."""

    stats: torch.Tensor
    """(8,) float32 sums: [n_orig, n_new, active_orig, active_new, gate_orig, gate_new, |y|_orig, |y|_new]."""
    l1_share: Optional[torch.Tensor]
    """This layer's mean |y| over original tokens and elements, divided by L (so shares sum to the l1)."""
    bce_share: Optional[torch.Tensor]
    """This layer's mean per-token gate BCE (new = 1), divided by L."""


STAT_NAMES = ("n_original", "n_new", "active_original", "active_new", "gate_original", "gate_new",
              "residual_abs_original", "residual_abs_new")


class GatedAdapter(shipped.GatedAdapter):
    """The shipped adapter plus its training initialisation.

    Initialised here, in __init__, because ZeRO-3's zero.Init partitions a module's
    params when its (most derived) __init__ returns and broadcasts rank 0's values:
    initialising later would write into empty local shards.
    """

    def __init__(self, hidden_size: int, adapter_size: int, gate: str, init: str, num_layers: int,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__(hidden_size, adapter_size, gate, dtype=dtype, device=device)
        self.init, self.num_layers = init, num_layers
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.hidden_size
        # low_variance: N(0, 1/(d*L)), much smaller than He's 2/d (docs/method.md).
        std = math.sqrt(1.0 / (d * self.num_layers)) if self.init == "low_variance" else math.sqrt(2.0 / d)
        self.w_g.normal_(0.0, std)
        self.w_i.normal_(0.0, std)
        self.w_o.zero_()  # extended model == backbone at step 0
        if self.w_b is not None:
            self.w_b.normal_(0.0, math.sqrt(2.0 / d))  # He

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init}"


class ParallelAdapterMLP(shipped.ParallelAdapterMLP):
    """The shipped block plus the local-loss bookkeeping of a training forward.

    In training mode, once `set_domain` gave a mask, it also records the local-loss
    terms and gate statistics of this forward (`.record`). Every rank runs exactly the
    same ops whatever its batch's domains (ZeRO-3 lockstep): domains only enter as a
    multiplicative mask. The output itself is the shipped forward's, untouched.
    """

    def __init__(self, mlp: nn.Module, adapter: GatedAdapter, uses_l1: bool, uses_bce: bool):
        super().__init__(mlp, adapter)
        self.uses_l1, self.uses_bce = uses_l1, uses_bce
        self.domain_pass: Optional[_DomainPass] = None
        self.record: Optional[BlockRecord] = None
        self.backbone_only = False
        """Set by `backbone_only(model)`: the block is the backbone's MLP alone, and records nothing."""

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        if self.backbone_only:
            return self.mlp(n)
        p = self.domain_pass
        if not self.training or p is None or p.mask is None:
            return super().forward(n)
        out, y, z, g = self.forward_parts(n)
        orig = _token_mask(p.mask, n)  # (B, T) float32, 1 = original-domain token
        new = 1.0 - orig
        L = self.adapter.num_layers
        n_orig = orig.sum()
        l1_share = bce_share = None
        res = y.abs().float().mean(-1) if self.uses_l1 else None  # (B, T) mean |y|: the l1 and a statistic
        if self.uses_l1:
            # Mean |y| over elements, then over original tokens; clamp keeps 0/0 = 0 exactly.
            # The trainer passes l1_tokens = original tokens per micro batch averaged over the
            # whole optimizer step (all ranks, all accumulation steps), so the l1 is a mean over the
            # step's original tokens whatever the world size or the grouping into micro batches.
            denom = n_orig if p.l1_tokens is None else torch.as_tensor(p.l1_tokens, device=n_orig.device)
            l1_share = (res * orig).sum() / denom.clamp(min=1.0) / L
        if self.uses_bce:
            bce_share = F.binary_cross_entropy_with_logits(z.float(), new) / L
        with torch.no_grad():
            res = res.detach() if res is not None else y.detach().abs().float().mean(-1)
            gd = g.detach().float() if g is not None else torch.ones_like(orig)
            active = (gd > 0).float()
            stats = torch.stack([n_orig, new.sum(), (active * orig).sum(), (active * new).sum(),
                                 (gd * orig).sum(), (gd * new).sum(), (res * orig).sum(), (res * new).sum()])
        self.record = BlockRecord(stats, _detach(l1_share), _detach(bce_share))
        needs_grad = [t for t in (l1_share, bce_share) if t is not None and t.requires_grad]
        if needs_grad:
            out = _InjectLocalGrad.apply(out, p, l1_share, bce_share)
        return out


def _detach(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def _token_mask(mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    B, T = n.shape[:2]
    if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] not in (1, T):
        raise ValueError(f"set_domain mask has shape {tuple(mask.shape)}, expected ({B}, 1) or ({B}, {T}) "
                         "for this batch: call set_domain(model, mask) before each training forward")
    return mask.to(device=n.device, dtype=torch.float32).expand(B, T)


# ----------------------------------------------------------------------------- extension


@dataclass
class Extension:
    """What extend_model did; stored on the model as `_trainer_extension`."""

    method: MethodConfig
    backbone_params: int
    num_layers: int
    hidden_size: int
    adapter_hidden_size: Optional[int] = None
    lora_rank: Optional[int] = None
    blocks: list = field(default_factory=list, repr=False)
    """The ParallelAdapterMLP blocks (adapter methods), in layer order."""


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model behind a DeepSpeed engine (or the model itself).

    Tested by type, not by attribute: DeepSpeedEngine forwards unknown attributes to
    its module, so `hasattr(engine, ...)` cannot tell the two apart.
    """
    from transformers import PreTrainedModel

    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def get_extension(model: nn.Module) -> Optional[Extension]:
    return getattr(unwrap(model), "_trainer_extension", None)


def _check_supported(model: nn.Module) -> None:
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise ValueError(f"{name}: model class not supported for extension "
                         f"(supported: {', '.join(SUPPORTED_CLASSES)})")


def extend_model(model: nn.Module, method: MethodConfig) -> list[nn.Module]:
    """Extend `model` in place for `method`; freeze the rest; return the added modules.

    Returns the ParallelAdapterMLP blocks (adapter methods), the peft `lora.Linear`
    layers (lora), or [] (finetune). Sizes come from `method.extra_params` unless
    `method.hidden_size` / `method.lora_rank` are set.
    """
    _check_supported(model)
    if get_extension(model) is not None:
        raise ValueError(f"{type(model).__name__} is already extended")
    cfg = model.config
    layers = model.model.layers
    L, d = len(layers), cfg.hidden_size
    n_backbone = sum(numel(p) for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(method.name == "finetune")
    ext = Extension(method=method, backbone_params=n_backbone, num_layers=L, hidden_size=d)

    added: list[nn.Module] = []
    if method.name in ADAPTER_METHODS:
        h = method.hidden_size or adapter_hidden_size(method.extra_params, n_backbone, L, d)
        ext.adapter_hidden_size = h
        ref = layers[0].mlp.down_proj.weight  # new params follow the backbone's dtype and device
        for layer in layers:
            adapter = GatedAdapter(d, h, method.gate, method.init, L, dtype=ref.dtype, device=ref.device)
            block = ParallelAdapterMLP(layer.mlp, adapter, method.uses_l1, method.uses_bce)
            layer.mlp = block
            added.append(block)
        ext.blocks = list(added)
    elif method.name == "lora":
        r = method.lora_rank or lora_rank(method.extra_params, n_backbone, L, d, cfg.intermediate_size)
        ext.lora_rank = r
        added = _inject_lora(model, r, method)
    model._trainer_extension = ext
    return added


def _inject_lora(model: nn.Module, r: int, method: MethodConfig) -> list[nn.Module]:
    """peft LoRA on the FFN linears only, injected in place (no PeftModel wrapper)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    lora_cfg = LoraConfig(r=r, lora_alpha=method.lora_alpha if method.lora_alpha is not None else r,
                          lora_dropout=method.lora_dropout, target_modules=list(LORA_TARGETS), bias="none")
    inject_adapter_in_model(lora_cfg, model, adapter_name=LORA_ADAPTER_NAME)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        a = m.lora_A[LORA_ADAPTER_NAME].weight
        b = m.lora_B[LORA_ADAPTER_NAME].weight
        # Under zero.Init peft's zero-init of B hits the empty local shard and is lost:
        # B would keep nn.Linear's random init. Zero it on the gathered tensor.
        with gathered([b], modifier_rank=0):
            with torch.no_grad():
                b.zero_()
        a.requires_grad_(True)
        b.requires_grad_(True)
    return layers


# ----------------------------------------------------------------------------- training-time API


def adapter_blocks(model: nn.Module) -> list[ParallelAdapterMLP]:
    ext = get_extension(model)
    return ext.blocks if ext is not None else []


def set_domain(model: nn.Module, original_mask: Optional[torch.Tensor], l1_tokens: Optional[float] = None) -> None:
    """Declare which tokens of the NEXT training forward are original-domain (True).

    `original_mask`: bool, (B, 1) per sample or (B, T) per token; None disables the
    local loss and statistics. `l1_tokens`: what the l1 sum is divided by (default:
    this batch's original-token count); the trainer passes the step-wide average so
    the loss does not depend on how samples are split over ranks and micro batches.
    Call it before every training forward (it also clears the previous forward's
    records). Eval-mode forwards ignore it. A no-op for lora and finetune, which have
    no local loss.
    """
    if original_mask is not None and original_mask.dtype != torch.bool:
        raise TypeError(f"set_domain: original_mask must be a bool tensor, got {original_mask.dtype}")
    p = _DomainPass(original_mask, l1_tokens)
    for block in adapter_blocks(model):
        block.domain_pass = p
        block.record = None


def current_pass(model: nn.Module) -> Optional[_DomainPass]:
    blocks = adapter_blocks(model)
    return blocks[0].domain_pass if blocks else None


@contextlib.contextmanager
def backbone_only(model: nn.Module):
    """Inside the block, the extended model computes the backbone's own function.

    Adapter blocks return their frozen MLP's output alone; LoRA layers their base layer's
    (peft's own switch, `disable_adapters`, set on the layers: `enable_adapters(False)` would
    also flip requires_grad on parameters the optimizer holds). The forget budget's reference
    forward uses it: the backbone's loss without a second copy of the backbone. finetune
    changed the backbone's own weights and has no such switch.
    """
    ext = get_extension(model)
    if ext is None or ext.method.name == "finetune":
        raise ValueError("backbone_only: finetune trains the backbone itself; only adapter methods and lora "
                         "can switch back to it")
    switches = list(ext.blocks)
    if ext.method.name == "lora":
        from peft.tuners.lora import LoraLayer

        switches = [m for m in unwrap(model).modules() if isinstance(m, LoraLayer)]
    attr = "backbone_only" if ext.blocks else "_disable_adapters"
    for m in switches:
        setattr(m, attr, True)
    try:
        yield
    finally:
        for m in switches:
            setattr(m, attr, False)


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) of everything that trains: the optimizer's params and what is saved."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> dict:
    """{backbone, trainable, fraction = trainable / backbone}; ZeRO-3 safe (ds_numel)."""
    model = unwrap(model)
    ext = get_extension(model)
    total = sum(numel(p) for p in model.parameters())
    backbone = ext.backbone_params if ext is not None else total
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return {"backbone": backbone, "trainable": trainable, "fraction": trainable / backbone}


def enable_activation_checkpointing(model: nn.Module, reentrant: bool) -> None:
    """HF gradient checkpointing that still trains adapters behind a frozen backbone.

    Reentrant checkpointing only backpropagates into a layer if one of its tensor
    inputs requires grad; with a frozen embedding none does, so no adapter would get
    a gradient. `enable_input_require_grads` makes the embedding output require grad.
    Non-reentrant checkpointing does not need it.
    """
    model = unwrap(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.config.use_cache = False
    if reentrant and getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()
