"""Held-out sets split over ranks: every sample counted once, the same samples on any number of ranks."""
import pytest

from mds_fixtures import write_mds
from trainer.engine.data import ValSet


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return str(write_mds(tmp_path_factory.mktemp("val"), "en", domain_seed=0, n=11, seq_len=8, vocab=32, seed=0))


def seen(val, world, batch_size, max_batches=None):
    """{sample bytes} evaluated over all ranks, and the batches per rank."""
    samples, batches = [], set()
    for rank in range(world):
        vs = ValSet(val, rank, world, batch_size, max_batches)
        batches.add(len(list(vs)))
        for b in vs:
            samples += [tuple(ids.tolist()) for ids, ok in zip(b["input_ids"], b["valid"]) if ok]
    assert len(batches) == 1  # ZeRO-3 lockstep: every rank runs the same number of forwards
    return samples


@pytest.mark.parametrize("max_batches", [None, 2])
def test_same_samples_once_on_any_number_of_ranks(val, max_batches):
    one = seen(val, 1, 2, max_batches)
    assert len(one) == (11 if max_batches is None else 4)
    for world in (2, 3):
        many = seen(val, world, 2, max_batches)
        assert sorted(many) == sorted(one)  # no sample padded in twice, none dropped
