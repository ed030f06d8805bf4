"""Seeding, and the random state that checkpoints carry.

The data order comes from the stream's own seed; these generators drive initialisation and
dropout. Saving their state with each checkpoint is what makes a resumed run draw the same
numbers as an uninterrupted one (the exact-resume tests compare losses to 1e-6). Only the
model may draw from them during training: the training DataLoader has its own generator
(data.py), since it draws once per new iterator, and a resumed run starts one more iterator.

Every rank is seeded alike and draws alike, so the state of the rank that writes the
checkpoint (rank 0) is the state of every rank.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CPU generator and every CUDA device's


def rng_state() -> dict:
    # numpy's key array as a list of ints: a checkpoint then holds no numpy object, and torch's
    # restricted unpickler (manifest.check_loadable) needs no numpy global to read it.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Dropout on a GPU draws from the device's generator, not the CPU one.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]  # keys: a list, or an array (older checkpoints)
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this rank's device
