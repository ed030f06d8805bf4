"""The random state a checkpoint carries: it restores every generator, and it is plain data."""
import random

import numpy as np
import torch

from trainer.engine.rng import rng_state, seed_everything, set_rng_state


def draws():
    return random.random(), np.random.rand(), torch.rand(1).item(), np.random.standard_normal()


def test_restored_state_draws_the_same_numbers(tmp_path):
    seed_everything(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draws()
    seed_everything(4)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_state_needs_no_global_outside_torch(tmp_path):
    """torch's restricted unpickler reads it as is: no numpy array, so no numpy global to allow."""
    torch.save(rng_state(), tmp_path / "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []


def test_older_checkpoints_with_a_numpy_array_still_restore():
    seed_everything(5)
    old = dict(rng_state(), numpy=np.random.get_state())  # the format before the list
    expected = draws()
    seed_everything(6)
    set_rng_state(old)
    assert draws() == expected
