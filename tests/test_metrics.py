"""One step's logged metrics, from hand-made micro batches (no process group: world size 1)."""
import pytest
import torch

from trainer.engine import dist
from trainer.engine.metrics import StepMetrics

CPU = torch.device("cpu")
KEYS = ["loss", "lm_loss", "local_loss", "lm_loss_by_domain", "samples_by_domain", "lr", "tokens_seen",
        "tokens_per_s", "peak_mem_gb"]


def two_micro_batches(world_size=1, stats=True) -> StepMetrics:
    """accum = 2 micro batches of 4 tokens per sample, mixing en and code; fr gets no sample."""
    m = StepMetrics(["en", "code", "fr"], accum=2, world_size=world_size, device=CPU)
    m.add(torch.tensor([[1.0, 1.0, 1.0, 1.0],     # en: 4
                        [2.0, 2.0, 2.0, 2.0]]),   # code: 8
          ["en", "code"], torch.tensor(0.5), {"l1": torch.tensor(0.2)} if stats else {})
    m.add(torch.tensor([[3.0, 3.0, 3.0, 3.0],     # code: 12
                        [0.5, 0.5, 0.5, 0.5],     # en: 2
                        [1.0, 2.0, 3.0, 2.0]]),   # code: 8
          ["code", "en", "code"], torch.tensor(0.25), {"l1": torch.tensor(0.4)} if stats else {})
    return m


def record(m: StepMetrics) -> dict:
    return m.record(lr=1e-3, tokens_seen=40, tokens_per_s=123.0, peak_mem_gb=0.5)


def test_lm_loss_is_a_mean_over_tokens_per_domain_and_overall():
    m = two_micro_batches()
    m.reduce()
    r = record(m)
    assert r["lm_loss_by_domain"] == {"en": 6 / 8, "code": 28 / 12}  # fr saw no token: absent, not 0 or nan
    assert r["lm_loss"] == 34 / 20
    assert r["samples_by_domain"] == {"en": 2, "code": 3, "fr": 0}


def test_local_loss_and_stats_are_means_over_the_accumulation_steps():
    m = two_micro_batches()
    m.reduce()
    r = record(m)
    assert r["local_loss"] == pytest.approx((0.5 + 0.25) / 2)
    assert r["loss"] == pytest.approx(34 / 20 + 0.375)
    assert r["local"] == {"l1": 0.3}  # (0.2 + 0.4) / 2, rounded to 6 digits in the log


def test_record_keys_and_pass_through_values():
    m = two_micro_batches()
    m.reduce()
    r = record(m)
    assert list(r) == KEYS + ["local"]  # metrics.jsonl keeps this order
    assert (r["lr"], r["tokens_seen"], r["tokens_per_s"], r["peak_mem_gb"]) == (1e-3, 40, 123.0, 0.5)


def test_methods_without_local_stats_log_no_local_key():
    m = two_micro_batches(stats=False)
    m.reduce()
    assert list(record(m)) == KEYS


def test_without_a_process_group_the_reduction_is_the_identity():
    assert not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1
    t = torch.tensor([1.5, 2.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]


def test_two_ranks_add_counts_and_average_the_local_loss(monkeypatch):
    """Two ranks that saw the same batches: twice the samples, the same losses."""
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t * 2)
    m = two_micro_batches(world_size=2)
    m.reduce()
    r = record(m)
    assert r["samples_by_domain"] == {"en": 4, "code": 6, "fr": 0}
    assert r["lm_loss_by_domain"] == {"en": 12 / 16, "code": 56 / 24}
    assert r["local_loss"] == pytest.approx(0.375)
