"""`python -m trainer bench --save-cost 190M`: what the checkpoint manifest adds to a save.

Our save = DeepSpeed's `save_checkpoint` (without the module's copy of the trainable params,
`checkpoint.master_only`), each rank hashing the files it writes while they are written, + meta.json
with the manifest.
The reference is the same DeepSpeed save without the manifest, i.e. our save before manifests.
Measured on one rank over a ZeRO-2 engine whose trainable state has the size of a 1B
backbone's neutral residues (about 190M parameters: fp32 master and two Adam moments,
2.3 GB on disk), after one optimizer step so that the Adam state exists. DeepSpeed's save
without and with the manifest alternate (in both orders, each after `sync`), so both see the same disk and page cache;
the figure is the median ratio of the pairs.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

WIDTH = 2048


def _engine(params: int):
    import deepspeed
    import torch
    from torch import nn

    from ..engine import dist

    dist.init_distributed()
    layers = max(1, round(params / (WIDTH * WIDTH)))
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    loss = engine(torch.randn(1, WIDTH)).square().mean()
    engine.backward(loss)
    engine.step()
    return engine, layers * WIDTH * WIDTH


def measure(params: int, repeats: int, work: Path) -> dict:
    from ..engine import checkpoint, manifest

    engine, n = _engine(params)
    plain_s, ours_s, digest_s, size = [], [], [], 0

    def plain(r):
        with checkpoint.master_only(engine):
            engine.save_checkpoint(str(work / "plain"), tag="t", save_latest=False, exclude_frozen_parameters=True)
        return work / "plain" / "t"

    def ours(r):
        return work / "ours" / checkpoint.save(engine, work / "ours", step=r, client_state={}, meta={}, keep_last=1)

    for r in range(repeats):
        # Alternate the order, and start each save with no dirty pages left by the other: a save
        # that runs while the previous one is flushed to disk is throttled by the kernel.
        for fn, times in ((plain, plain_s), (ours, ours_s)) if r % 2 == 0 else ((ours, ours_s), (plain, plain_s)):
            os.sync()
            t0 = time.perf_counter()
            out = fn(r)
            times.append(time.perf_counter() - t0)
            if fn is ours:
                files = sorted(p for p in out.iterdir() if p.suffix == ".pt")
                size = sum(p.stat().st_size for p in files)
                t0 = time.perf_counter()
                manifest.describe(files, out)  # hashing after the write instead, for the breakdown
                digest_s.append(time.perf_counter() - t0)
            shutil.rmtree(out.parent)
    ratios = [o / p for o, p in zip(ours_s, plain_s)]
    return {"trainable_params": n, "checkpoint_bytes": size, "repeats": repeats,
            "plain_save_s": statistics.median(plain_s), "our_save_s": statistics.median(ours_s),
            "digest_s": statistics.median(digest_s), "ratio_with_to_without_manifest": statistics.median(ratios),
            "ratios": [round(x, 4) for x in ratios]}


def report(res: dict) -> str:
    return (f"save of {res['trainable_params'] / 1e6:.0f}M trainable params ({res['checkpoint_bytes'] / 1e9:.2f} GB), "
            f"median of {res['repeats']}: without the manifest {res['plain_save_s']:.2f} s, with it "
            f"{res['our_save_s']:.2f} s (ratio {res['ratio_with_to_without_manifest']:.3f}; hashing the files "
            f"after the write instead would take {res['digest_s']:.2f} s)")
