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


def mixture(p, streams):
    from trainer.config import load_config
    from trainer.engine.data import stream_proportions

    return stream_proportions(load_config(data={"model": {"config": {"model_type": "llama"}},
                                                "data": {"p": p, "streams": streams}}))


def test_mixture_proportions_split_p_by_role_then_by_weight():
    props = mixture(0.25, [
        {"domain": "en", "train": "/en", "role": "original"},
        {"domain": "code", "train": "/code", "weight": 3.0},
        {"domain": "math", "train": "/math"},
        {"domain": "de", "val": "/de"},  # held-out only: no share of the mixture, no weight taken
    ])
    assert props == {"en": 0.25, "code": 0.75 * 3 / 4, "math": 0.75 * 1 / 4}
    assert sum(props.values()) == 1.0


def test_mixture_proportions_with_two_originals_and_the_edge_values_of_p():
    two = mixture(0.2, [{"domain": "en", "train": "/en", "role": "original"},
                        {"domain": "fr", "train": "/fr", "role": "original", "weight": 3.0},
                        {"domain": "code", "train": "/code"}])
    assert two == pytest.approx({"en": 0.05, "fr": 0.15, "code": 0.8})
    # p = 1 replays only the original domain: the new stream is left out, not sampled at rate 0.
    assert mixture(1.0, [{"domain": "en", "train": "/en", "role": "original"},
                         {"domain": "code", "train": "/code"}]) == {"en": 1.0}
