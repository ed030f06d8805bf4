"""The local loss added to the LM loss: l1 on original-domain tokens and/or the gate BCE.

Call `local_loss(model, method)` after a training forward that followed
`set_domain(model, mask)`; the trainer then backpropagates `lm_loss + local`.

  l1  = mean over layers, original tokens and elements of |g(n) * A(n)|   (docs/method.md)
  bce = mean over layers and ALL tokens of BCE(sigmoid(w_b . n), new=1 / original=0)
  local = alpha * l1 (if method.uses_l1) + bce_weight * bce (if method.uses_bce)

alpha is `method.alpha`, or, under a forgetting budget, the multiplier the trainer passes
(budget.py): the l1 weight then changes from step to step.

The l1 is exactly 0 (never NaN) on a batch without original tokens. The BCE is not:
it is a two-class gate classifier, and new-only micro batches are where it sees the
positive class (with p = 0 it simply opens every gate, i.e. plain adapters).

Gradient path: the blocks already reduced their terms to scalars during the forward
and attached them to their outputs (extend._InjectLocalGrad). The tensor returned
here carries the value; its backward only records the upstream gradient scale,
which the blocks then inject. That works with no checkpointing, non-reentrant and
reentrant checkpointing alike, and respects DeepSpeed's loss scaling and 1/GAS.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import MethodConfig
from .extend import STAT_NAMES, adapter_blocks, current_pass, get_extension


class _LocalLossGrad(torch.autograd.Function):
    """Returns `value`; in backward, stores d(loss)/d(l1 sum) and d(loss)/d(bce sum) on the pass.

    `anchor` is a fresh leaf requiring grad so this node is part of the graph even when
    `value` has no graph (reentrant checkpointing); it never receives a gradient.
    """

    @staticmethod
    def forward(ctx, value, anchor, domain_pass, w_l1: float, w_bce: float):
        ctx.domain_pass, ctx.w = domain_pass, (w_l1, w_bce)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.domain_pass.grad_weights = (grad.float() * ctx.w[0], grad.float() * ctx.w[1])
        return None, None, None, None, None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def local_loss(model: nn.Module, method: MethodConfig,
               alpha: Optional[float] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(already weighted local loss, stats) for the last training forward; `alpha` overrides method.alpha.

    Stats are detached 0-dim tensors (no host sync here; `.item()` them when logging):
    l1 and bce (unweighted, when the method uses them), and per domain, pooled over
    layers: gate_active_* (fraction of tokens with g > 0), gate_mean_* (mean g) and
    residual_abs_* (mean |g*A| over elements). Methods without adapter blocks
    (lora, finetune) return (0, {}).
    """
    blocks = adapter_blocks(model)
    zero = torch.zeros((), device=_device(model))
    if not blocks:
        return zero, {}
    ext = get_extension(model)
    if (method.uses_l1, method.uses_bce) != (ext.method.uses_l1, ext.method.uses_bce):
        raise ValueError(f"local_loss: method {method.name} (l1={method.uses_l1}, bce={method.uses_bce}) does not "
                         f"match the one the model was extended with ({ext.method.name})")
    records = [b.record for b in blocks]
    if any(r is None for r in records):
        if method.uses_l1 or method.uses_bce:
            raise RuntimeError("local_loss: no training forward since set_domain(model, mask); call set_domain "
                               "before each forward, with the model in train mode")
        return zero, {}

    totals = torch.stack([r.stats for r in records]).sum(0)  # (8,), every layer sees the same tokens
    t = dict(zip(STAT_NAMES, totals))
    n_o, n_n = t["n_original"].clamp(min=1.0), t["n_new"].clamp(min=1.0)
    stats = {
        "gate_active_original": t["active_original"] / n_o, "gate_active_new": t["active_new"] / n_n,
        "gate_mean_original": t["gate_original"] / n_o, "gate_mean_new": t["gate_new"] / n_n,
        "residual_abs_original": t["residual_abs_original"] / n_o, "residual_abs_new": t["residual_abs_new"] / n_n,
    }
    alpha = method.alpha if alpha is None else float(alpha)
    value = zero
    if method.uses_l1:
        stats["l1"] = torch.stack([r.l1_share for r in records]).sum()
        value = value + alpha * stats["l1"]
    if method.uses_bce:
        stats["bce"] = torch.stack([r.bce_share for r in records]).sum()
        value = value + method.bce_weight * stats["bce"]
    if not (method.uses_l1 or method.uses_bce):
        return zero, stats
    domain_pass = current_pass(model)
    domain_pass.grad_weights = None  # only a backward through the value returned below sets it
    if not torch.is_grad_enabled():
        return value.float(), stats
    anchor = torch.zeros((), device=value.device, requires_grad=True)
    loss = _LocalLossGrad.apply(value.float(), anchor, domain_pass,
                                alpha if method.uses_l1 else 0.0,
                                method.bce_weight if method.uses_bce else 0.0)
    return loss, stats


def layer_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-layer gate statistics of the last training forward, each a (L,) tensor (diagnostics)."""
    records = [b.record for b in adapter_blocks(model)]
    if not records or any(r is None for r in records):
        return {}
    s = torch.stack([r.stats for r in records])  # (L, 8)
    n_o, n_n = s[:, 0].clamp(min=1.0), s[:, 1].clamp(min=1.0)
    return {"gate_active_original": s[:, 2] / n_o, "gate_active_new": s[:, 3] / n_n,
            "gate_mean_original": s[:, 4] / n_o, "gate_mean_new": s[:, 5] / n_n,
            "residual_abs_original": s[:, 6] / n_o, "residual_abs_new": s[:, 7] / n_n}


def replay_loss(nll: torch.Tensor, original: torch.Tensor, step_original_tokens: float) -> torch.Tensor:
    """This micro batch's share of the mean LM loss over the step's original-domain tokens.

    `nll` is the (B, T-1) per-token loss, `original` the (B, 1) mask of original-domain rows and
    `step_original_tokens` their predicted tokens per micro batch and rank, averaged over the
    whole step (as for the l1). DeepSpeed averages gradients over accumulation steps and ranks,
    so the shares add up to the mean over the step's original tokens whatever the world size.
    A forgetting budget weights it by its multiplier for the methods without an l1 (budget.py).
    """
    rows = original.to(device=nll.device, dtype=nll.dtype).reshape(-1, 1)
    return (nll * rows).sum() / max(step_original_tokens, 1.0)
