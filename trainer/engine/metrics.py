"""What one optimizer step logs: the LM loss per domain, the local loss and its statistics,
and under a forgetting budget its multiplier, measured degradation and slack (`budget/...`).

`local_loss` is everything added to the LM loss: the adapters' l1/BCE and, for the methods a
budget drives through replay, the multiplier times the original tokens' LM loss.

The sums stay on the device while the micro batches run: reading a loss back with `.item()`
after every forward would make the host wait for the accelerator each time. They cross
ranks once per step, in `reduce`, so every rank logs the same global figures.
"""
from __future__ import annotations

import torch

from . import dist

# Columns of the per-domain sums.
NLL, TOKENS, SAMPLES = 0, 1, 2


class StepMetrics:
    """Sums over one optimizer step's micro batches; `reduce` on every rank, then `record`."""

    def __init__(self, domains: list[str], accum: int, world_size: int, device: torch.device):
        self.domains, self.accum, self.world_size, self.device = list(domains), accum, world_size, device
        # float64: a step sums up to millions of per-token losses; float32 would lose the last digits.
        self.sums = torch.zeros(len(self.domains), 3, dtype=torch.float64, device=device)
        self.local = torch.zeros((), device=device)
        self.stats: dict = {}

    def add(self, nll: torch.Tensor, domains: list[str], local: torch.Tensor, stats: dict) -> None:
        """One micro batch: `nll` is (batch, tokens) per-token loss, `domains` each row's domain."""
        rows = torch.tensor([self.domains.index(d) for d in domains], device=self.device)
        per_sample = torch.stack([nll.detach().sum(dim=1).double(),
                                  torch.full_like(rows, nll.shape[1], dtype=torch.float64),
                                  torch.ones_like(rows, dtype=torch.float64)], dim=1)
        self.sums.index_add_(0, rows, per_sample)
        # The local loss and its stats are means over the step, like the gradient they produce.
        self.local += local.detach() / self.accum
        for k, v in stats.items():
            mean = torch.as_tensor(v, device=self.device).detach().float() / self.accum
            self.stats[k] = self.stats.get(k, 0.0) + mean

    def reduce(self) -> None:
        """Sum over ranks (a collective: every rank calls it, every step, logged or not)."""
        self.sums = dist.all_reduce_sum(self.sums).cpu()
        # Each rank's local loss is already its mean; the step's is the mean over ranks.
        self.local_total = dist.all_reduce_sum(self.local).item() / self.world_size
        # The stats are this rank's own (rank 0's, in the log), not reduced.
        self.stats_total = {k: round(v.item(), 6) for k, v in self.stats.items()}

    def record(self, *, lr: float, tokens_seen: int, tokens_per_s: float, peak_mem_gb: float,
               budget: dict | None = None) -> dict:
        """The metrics.jsonl line for this step (without `step` and `time`, which the logger adds).

        `budget` is ForgettingBudget.record() after this step's dual update: lambda, eps_bpb, the
        estimated degradation and slack (bits per byte), and the last measurement alone.
        """
        sums = self.sums
        # The LM loss is a mean over tokens, not over domains or micro batches: a domain's weight
        # in it is its share of the step's tokens, as in the gradient.
        lm_by_domain = {d: sums[j, NLL].item() / sums[j, TOKENS].item()
                        for j, d in enumerate(self.domains) if sums[j, TOKENS] > 0}
        total_tokens = sums[:, TOKENS].sum().item()
        lm_loss = sums[:, NLL].sum().item() / max(total_tokens, 1)
        return {
            "loss": lm_loss + self.local_total, "lm_loss": lm_loss, "local_loss": self.local_total,
            "lm_loss_by_domain": lm_by_domain,
            "samples_by_domain": {d: int(sums[j, SAMPLES].item()) for j, d in enumerate(self.domains)},
            "lr": lr, "tokens_seen": tokens_seen, "tokens_per_s": tokens_per_s, "peak_mem_gb": peak_mem_gb,
            **({"local": self.stats_total} if self.stats_total else {}),
            **({"budget": budget} if budget is not None else {}),
        }


def peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
