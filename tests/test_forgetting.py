"""The held-out probe of the forgetting budget: which val samples it measures, on every rank."""
import numpy as np
import pytest
import torch
from streaming import MDSWriter

from mds_fixtures import COLUMNS
from trainer.engine.forgetting import PROBE_CHUNKS, HeldOutProbe


def write_numbered(out, n):
    """A val set of n samples whose first two token ids spell the sample's index."""
    with MDSWriter(out=str(out), columns=COLUMNS, compression=None) as w:
        for i in range(n):
            w.write({"input_ids": np.array([i % 100, i // 100] + [0] * 6, dtype=np.uint32),
                     "domain": "en", "num_bytes": 24})
    return str(out)


@pytest.fixture(scope="module")
def numbered_val(tmp_path_factory):
    return write_numbered(tmp_path_factory.mktemp("val"), 1000)


def probe_indices(path, rank, world_size, chunk):
    probe = HeldOutProbe(None, torch.device("cpu"), path, rank, world_size, chunk)
    out = []
    for batch in probe.chunks:
        ids = batch["input_ids"][batch["valid"]]
        out.append([int(r[0]) + 100 * int(r[1]) for r in ids])
    return out


def test_probe_spans_the_whole_val_set_in_every_chunk(numbered_val):
    """Val sets keep their documents' order: a probe from one end would measure other text."""
    chunks = probe_indices(numbered_val, 0, 1, chunk=8)
    assert len(chunks) == PROBE_CHUNKS and all(len(c) == 8 for c in chunks)
    flat = [i for c in chunks for i in c]
    assert len(set(flat)) == len(flat) == 8 * PROBE_CHUNKS
    gaps = np.diff(sorted(flat))
    assert gaps.min() >= 6 and gaps.max() <= 7  # evenly spaced: 1000 / 160
    assert all(max(c) - min(c) > 800 for c in chunks)  # each chunk, too, spans the set


def test_two_ranks_split_each_chunk_without_overlap(numbered_val):
    one = probe_indices(numbered_val, 0, 1, chunk=8)
    r0, r1 = probe_indices(numbered_val, 0, 2, chunk=8), probe_indices(numbered_val, 1, 2, chunk=8)
    for whole, a, b in zip(one, r0, r1):
        assert sorted(a + b) == sorted(whole) and not set(a) & set(b)


def test_a_val_set_smaller_than_the_probe_is_measured_whole(tmp_path):
    chunks = probe_indices(write_numbered(tmp_path / "val", 7), 0, 1, chunk=8)
    assert sorted(i for c in chunks for i in c) == list(range(7))
