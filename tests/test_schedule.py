"""The learning-rate multiplier: linear warmup, cosine to the floor or constant, clamped past the end."""
import math

import pytest

from trainer.config import load_config
from trainer.engine.schedule import lr_lambda

BASE = {
    "model": {"config": {"model_type": "llama"}},
    "data": {"streams": [{"domain": "en", "train": "/a", "role": "original"}, {"domain": "fr", "train": "/b"}]},
}


def schedule(**train):
    return lr_lambda(load_config(data={**BASE, "train": train}))


def test_warmup_ramps_linearly_from_the_first_step():
    fn = schedule(warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_decays_from_one_to_the_floor():
    fn = schedule(warmup_steps=2, max_steps=12, min_lr_ratio=0.1)
    assert fn(2) == pytest.approx(1.0)  # first step after warmup: the full lr
    # Halfway through the 10 decay steps: cos(pi/2) = 0, so floor + (1 - floor) / 2.
    assert fn(7) == pytest.approx(0.55)
    # A quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2.
    assert fn(4.5) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert fn(12) == pytest.approx(0.1)
    values = [fn(s) for s in range(2, 13)]
    assert values == sorted(values, reverse=True)


def test_past_the_end_stays_at_the_floor():
    fn = schedule(warmup_steps=2, max_steps=12, min_lr_ratio=0.1)
    assert fn(13) == pytest.approx(0.1) and fn(100) == pytest.approx(0.1)


def test_constant_after_warmup():
    fn = schedule(warmup_steps=3, max_steps=10, schedule="constant")
    assert [fn(s) for s in (0, 1, 2, 3, 9, 50)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0, 1.0, 1.0]


def test_no_warmup_starts_at_the_full_lr():
    fn = schedule(warmup_steps=0, max_steps=4, min_lr_ratio=0.0)
    assert fn(0) == 1.0 and fn(2) == pytest.approx(0.5) and fn(4) == pytest.approx(0.0)
