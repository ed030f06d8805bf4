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
    for world in (2, 3, 12):  # 12 ranks for 11 samples: one rank has only padding
        many = seen(val, world, 2, max_batches)
        assert sorted(many) == sorted(one)  # no sample padded in twice, none dropped


def test_a_capped_eval_spans_the_whole_set(val):
    """Val sets keep their documents' order: a capped eval must not read only the first documents."""
    from streaming import LocalDataset

    ds = LocalDataset(local=val)
    position = {tuple(ds[i]["input_ids"].tolist()): i for i in range(len(ds))}
    read = sorted(position[s] for s in seen(val, 2, 2, max_batches=2))
    assert read == [0, 2, 5, 8]  # 4 of 11, evenly spaced: the last third of the set is read too


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


# ---------------------------------------------------------------- start-up checks of a dataset dir

def _check(path, domain="en"):
    from trainer.config import ConfigError
    from trainer.engine.data import check_mds_dir

    try:
        check_mds_dir(str(path), "data.streams[en].train", domain)
    except ConfigError as e:
        return str(e)
    return None


def test_check_refuses_an_empty_dir_a_missing_column_and_another_domain(tmp_path, val):
    import numpy as np
    from streaming import MDSWriter

    assert _check(val) is None
    assert _check(val, "code") == f"data.streams[en].train: {val}: its samples have domain 'en', not the stream's 'code'"
    with MDSWriter(out=str(tmp_path / "empty"), columns={"input_ids": "ndarray:uint32", "domain": "str",
                                                          "num_bytes": "int"}, compression=None):
        pass
    assert _check(tmp_path / "empty") == f"data.streams[en].train: {tmp_path / 'empty'}: 0 samples"
    with MDSWriter(out=str(tmp_path / "nodomain"), columns={"input_ids": "ndarray:uint32", "num_bytes": "int"}) as w:
        w.write({"input_ids": np.zeros(4, np.uint32), "num_bytes": 4})
    assert "no 'domain' column" in _check(tmp_path / "nodomain")


def test_domain_of_a_compressed_dir_from_stats_json_or_its_first_sample(tmp_path):
    """data_prep's dirs answer from stats.json without reading a shard; others from one decompressed shard."""
    import json
    import shutil

    import numpy as np
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "z"), columns={"input_ids": "ndarray:uint32", "domain": "str",
                                                      "num_bytes": "int"}, compression="zstd") as w:
        for _ in range(3):
            w.write({"input_ids": np.arange(8, dtype=np.uint32), "domain": "code", "num_bytes": 8})
    assert not list((tmp_path / "z").glob("*.mds"))  # compressed only: LocalDataset alone cannot read it
    assert _check(tmp_path / "z", "code") is None
    assert "have domain 'code', not the stream's 'en'" in _check(tmp_path / "z", "en")

    shutil.copytree(tmp_path / "z", tmp_path / "prep")
    (tmp_path / "prep" / "stats.json").write_text(json.dumps({"domain": "code", "samples": 3}))
    for shard in (tmp_path / "prep").glob("*.zstd"):
        shard.write_bytes(b"")  # stats.json must answer alone
    assert _check(tmp_path / "prep", "code") is None
    assert "have domain 'code'" in _check(tmp_path / "prep", "en")


def test_the_training_loader_leaves_the_global_rng_to_dropout(tmp_path):
    """Starting an iterator (first batch, new epoch, first batch after a resume) must not draw from
    torch's global RNG: a resumed run starts one more iterator, which shifted every dropout mask."""
    import torch

    from mds_fixtures import tiny_run_config, two_domain_data
    from trainer.config import load_config
    from trainer.engine.data import TrainStream

    cfg = load_config(data=tiny_run_config(tmp_path, two_domain_data(tmp_path, n_train=8, n_val=2)))
    cfg.data.cache_dir = str(tmp_path / "cache")
    stream = TrainStream(cfg, micro_batch=2, world_size=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in range(12):  # 16 samples: past the end of an epoch, so a second iterator starts too
        stream.next_batch()
    assert stream.state.epoch >= 1
    assert torch.equal(torch.get_rng_state(), before)
