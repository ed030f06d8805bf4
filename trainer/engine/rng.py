"""Seeding, and the random state that checkpoints carry.

The data order comes from the stream's own seed; these generators drive initialisation and
dropout. Saving their state with each checkpoint is what makes a resumed run draw the same
numbers as an uninterrupted one (the exact-resume tests compare losses to 1e-6).
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
