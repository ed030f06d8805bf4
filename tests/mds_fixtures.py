"""Tiny, learnable two-domain MDS datasets for trainer tests (same columns as data_prep writes).

Each domain is a different first-order Markov chain over a small vocabulary, so
a tiny model can learn the new domain in a few dozen steps and its loss on the
other domain visibly moves when it forgets.
"""
from pathlib import Path

import numpy as np
from streaming import MDSWriter

COLUMNS = {"input_ids": "ndarray:uint32", "domain": "str", "num_bytes": "int"}


def markov_samples(domain_seed: int, n: int, seq_len: int, vocab: int, seed: int) -> np.ndarray:
    chain_rng = np.random.default_rng(domain_seed)
    # Each token has 3 likely successors: easy to learn, distinct per domain.
    succ = chain_rng.integers(3, vocab, size=(vocab, 3))
    rng = np.random.default_rng(seed)
    out = np.zeros((n, seq_len), dtype=np.uint32)
    for i in range(n):
        tok = rng.integers(3, vocab)
        for t in range(seq_len):
            out[i, t] = tok
            tok = succ[tok, rng.integers(0, 3)] if rng.random() < 0.9 else rng.integers(3, vocab)
    return out


def write_mds(out: Path, domain: str, domain_seed: int, n: int, seq_len: int, vocab: int, seed: int) -> Path:
    out = Path(out)
    with MDSWriter(out=str(out), columns=COLUMNS, compression=None) as w:
        for row in markov_samples(domain_seed, n, seq_len, vocab, seed):
            w.write({"input_ids": row, "domain": domain, "num_bytes": int(3 * seq_len)})
    return out


def two_domain_data(root: Path, seq_len: int = 32, vocab: int = 128, n_train: int = 96, n_val: int = 16) -> dict:
    """root/{en,code}/{train,val}; 'en' is the original domain, 'code' the new one."""
    paths = {}
    for domain, dseed in (("en", 1), ("code", 2)):
        paths[domain] = {
            "train": str(write_mds(root / domain / "train", domain, dseed, n_train, seq_len, vocab, seed=10 + dseed)),
            "val": str(write_mds(root / domain / "val", domain, dseed, n_val, seq_len, vocab, seed=20 + dseed)),
        }
    return paths


def tiny_run_config(root: Path, data: dict, method: str = "neutral_residues", **train) -> dict:
    """A RunConfig dict for a 2-layer Llama built from a config (no download)."""
    cfg = {
        "run_dir": str(root / f"run_{method}"),
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 128, "max_position_embeddings": 64}},
        "method": {"name": method, "alpha": 1.0},
        "data": {"p": 0.25, "streams": [
            {"domain": "en", "role": "original", **data["en"]},
            {"domain": "code", "role": "new", **data["code"]}]},
        "train": {"max_steps": 8, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2},
        "deepspeed": {"config": "ds_configs/zero2.json"},
        "checkpoint": {"every": 4, "keep_last": 2},
        "log": {"tensorboard": True, "progress": False},
        "eval": {"batch_size": 8},
    }
    cfg["train"].update(train)
    return cfg
