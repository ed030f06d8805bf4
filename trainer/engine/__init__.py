"""The engine: one DeepSpeed training loop for every method.

Read in this order: `train.py` (set-up, resume, the `fit` loop, save), `metrics.py` (what a
step logs), `schedule.py` (learning rate), `rng.py` (seeds and RNG state), `data.py` (the
domain mixture), `checkpoint.py` (complete-or-invisible sharded checkpoints), `ds_config.py`,
`dist.py`, `model.py`, `logger.py`, `perplexity.py` (per-domain bits per byte during
training) and `shm.py`. The engine imports the method (`trainer.method`); never the other
way round.
"""
