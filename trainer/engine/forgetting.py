"""What a forgetting budget measures during training: the trained model's loss on original-domain
tokens against the backbone's on the same tokens (trainer/method/budget.py turns it into a multiplier).

Two meters (`method.budget_measure`). The default is the second wherever the original stream has a val set:
it measures what the report checks, the same way for every method. finetune, which cannot switch back
to its backbone, has only the second:

- `ReferenceForward` (train; adapter methods and LoRA): the step's training forwards already give the trained
  model's loss on its original-domain rows; after them, one no-grad forward over those rows with the
  adapters switched off (extend.backbone_only) gives the backbone's loss on the same tokens. No second
  copy of the backbone, and the cost is one forward over a fraction p of the step's rows.
- `HeldOutProbe` (heldout): a fixed probe of the original domain's held-out samples. The backbone's
  loss on it is measured once, before the first step (when the model still is the backbone) and kept
  in the budget's state; the trained model's, one chunk of it in turn, every `PROBE_EVERY` steps.
  The probe is spread evenly over the whole val set, like a capped eval, so the two measure the same text.

Both return sums over all ranks, [trained nats, backbone nats, bytes], so every rank derives the
same multiplier. Every rank runs the same number of forwards whatever its rows (ZeRO-3 gathers
parameters collectively).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import dist
from ..config import ConfigError, RunConfig
from ..method.budget import ForgettingBudget
from ..method.extend import backbone_only
from .data import collate, evenly_spaced
from .perplexity import predicted_bytes, token_nll

STEP_EMA = 0.9
"""Smoothing of the per-step measurements (about the last 10 steps): a step holds a few original rows."""

PROBE_EVERY = 5
"""Steps between two chunks of the held-out probe (each one forward over half a global batch)."""

PROBE_CHUNKS = 20
"""Chunks in the held-out probe: 10 global batches of samples, each chunk re-measured every 100 steps."""


class ReferenceForward:
    """The step's original-domain rows, through the trained model (training forwards) and the backbone."""

    ema = STEP_EMA

    def __init__(self, engine, device: torch.device, zero_stage: int):
        self.engine, self.device, self.zero_stage = engine, device, zero_stage
        self.start_step(None, 0)

    def start_step(self, budget: ForgettingBudget, step: int) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # trained nats, backbone nats, bytes
        self.rows: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, original: torch.Tensor, nll: torch.Tensor, num_bytes: torch.Tensor) -> None:
        """One training micro batch: `nll` (B, T-1) from its forward, `original` its (B, 1) row mask."""
        rows = original.reshape(-1).to(self.device)
        self.sums[0] += (nll.detach().sum(dim=1).double() * rows).sum()
        self.sums[2] += predicted_bytes(num_bytes.to(self.device)[rows], ids.shape[1]).sum()
        self.rows.append(ids[rows])

    @torch.no_grad()
    def finish_step(self, step: int) -> Optional[list[float]]:
        ids = torch.cat(self.rows)
        # Under ZeRO-3 a rank without original rows still forwards (one dummy row, not counted):
        # the other ranks' forwards gather parameters from it.
        dummy = ids.shape[0] == 0
        if not dummy or self.zero_stage == 3:
            batch = torch.zeros(1, 2, dtype=torch.long, device=self.device) if dummy else ids
            self.engine.eval()
            with backbone_only(self.engine):
                nll = token_nll(self.engine(input_ids=batch).logits, batch)
            self.engine.train()
            if not dummy:
                self.sums[1] += nll.sum().double()
        return dist.all_reduce_sum(self.sums).tolist()


class HeldOutProbe:
    """The trained model vs the backbone on a fixed held-out probe, one chunk at a time (the default meter).

    The probe is PROBE_CHUNKS chunks of half a global batch each, spread over the original domain's
    val set. The backbone's loss on every chunk is measured once, before the first step;
    then every PROBE_EVERY steps the next chunk, in turn, is measured again with the trained model.
    A small fixed probe would be cheap but biased (which few samples it holds decides the figure);
    rotating over a large one costs the same per step and its smoothed estimate covers all of it.
    """

    # About the last 5 chunks (2.5 global batches of samples, the last 25 steps). 0.9 lagged the model by
    # 50 steps, and the multiplier went on repairing what had already been repaired.
    ema = 0.8

    def __init__(self, engine, device: torch.device, path: str, rank: int, world_size: int, chunk: int):
        from streaming import LocalDataset

        self.engine, self.device = engine, device
        ds = LocalDataset(local=path)
        n = len(ds)
        chunk = max(1, min(chunk, n // PROBE_CHUNKS))
        # Evenly spaced over the whole val set, like a capped eval (data.evenly_spaced).
        probe = evenly_spaced(n, chunk * PROBE_CHUNKS)
        # Interleaved into chunks, so that each chunk, too, spans the whole set.
        probe = [probe[i] for c in range(PROBE_CHUNKS) for i in range(c, len(probe), PROBE_CHUNKS)]
        self.chunks = []
        for c in range(0, len(probe), chunk):
            ids = probe[c:c + chunk]
            mine, per_rank = ids[rank::world_size], -(-len(ids) // world_size)
            # Every rank forwards the same number of rows; padding rows repeat one sample and are not counted.
            batch = collate([ds[j] for j in mine + ids[:1] * (per_rank - len(mine))])
            batch["valid"] = torch.tensor([True] * len(mine) + [False] * (per_rank - len(mine)))
            self.chunks.append(batch)

    @torch.no_grad()
    def measure(self, k: int) -> list[float]:
        """[nats, bytes] of the current model on chunk k, summed over ranks."""
        batch = self.chunks[k]
        ids = batch["input_ids"].to(self.device)
        self.engine.eval()
        nll = token_nll(self.engine(input_ids=ids).logits, ids).sum(dim=1).double().cpu()
        self.engine.train()
        valid = batch["valid"]
        sums = torch.stack([nll[valid].sum(), predicted_bytes(batch["num_bytes"][valid], ids.shape[1]).sum()])
        return dist.all_reduce_sum(sums.to(self.device)).tolist()

    def start_step(self, budget: ForgettingBudget, step: int) -> None:
        self.budget = budget
        if budget.reference is None:
            if step > 0:
                raise ConfigError("method.budget_measure: this run was started without a budget or with the train "
                                  "meter, so its backbone's loss on the held-out probe was never measured: resume it "
                                  "with method.budget_measure=train (or without a budget), or start a new run_dir")
            # Before any update the model is the backbone.
            budget.reference = [self.measure(k) for k in range(len(self.chunks))]

    def add(self, ids, original, nll, num_bytes) -> None:
        pass  # the probe, not the training rows, measures forgetting

    def finish_step(self, step: int) -> Optional[list[float]]:
        if step % PROBE_EVERY:
            return None
        k = (step // PROBE_EVERY - 1) % len(self.chunks)
        nats, nbytes = self.measure(k)
        ref_nats, ref_bytes = self.budget.reference[k]
        assert math.isclose(nbytes, ref_bytes), (nbytes, ref_bytes)
        return [nats, ref_nats, nbytes]


def meter(cfg: RunConfig, engine, device: torch.device, rank: int, world_size: int, zero_stage: int):
    """The meter for this run's method.budget_measure (only called with a budget set)."""
    if cfg.method.budget_measure == "train":
        return ReferenceForward(engine, device, zero_stage)
    val = next(s.val for s in cfg.data.streams if s.role == "original" and s.train and s.val)
    return HeldOutProbe(engine, device, val, rank, world_size, max(world_size, cfg.train.global_batch_size // 2))
