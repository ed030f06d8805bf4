"""Per-domain held-out loss and bits per byte, the paper's learn/forget measure.

Bits per byte = sum of token NLL / ln 2 / UTF-8 bytes behind those tokens. Packed
samples record `num_bytes` for all their T tokens, but the first token of a
sample has no context and is not predicted, so the bytes are scaled by (T-1)/T.
Sums (not means of means) are all-reduced, so the result does not depend on the
number of ranks or the batch size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import dist


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T-1) next-token NLL in nats, in float32.

    The targets are shifted, not the logits (as HF's own loss does): `logits[:, :-1]` would copy
    the largest activation of the step, forward and backward. The last position gets
    ignore_index and is dropped from the result.
    """
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return nll.view(input_ids.shape)[:, :-1]


def predicted_bytes(num_bytes: torch.Tensor, seq_len: int) -> torch.Tensor:
    return num_bytes * (seq_len - 1) / seq_len


@torch.no_grad()
def eval_domain(forward, batches, device) -> dict:
    """`forward(input_ids) -> logits`; `batches` yields {input_ids, num_bytes, valid}."""
    sums = torch.zeros(3, dtype=torch.float64)  # nll, tokens, bytes
    for batch in batches:
        ids = batch["input_ids"].to(device)
        valid = batch.get("valid", torch.ones(ids.shape[0], dtype=torch.bool))
        nll = token_nll(forward(ids), ids).sum(dim=1).double().cpu()
        sums[0] += nll[valid].sum()
        sums[1] += valid.sum() * (ids.shape[1] - 1)
        sums[2] += predicted_bytes(batch["num_bytes"][valid], ids.shape[1]).sum()
    sums = dist.all_reduce_sum(sums.to(device)).cpu()
    nll, tokens, nbytes = sums.tolist()
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": nll / math.log(2) / max(nbytes, 1),
            "tokens": int(tokens), "bytes": nbytes}
