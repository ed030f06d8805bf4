"""The one training loop: setup -> fit -> evaluate -> save, for every method.

A method is a config value. Everything method-specific lives in extend.py (what
is added and trained) and losses.py (the local loss); this loop only sees
`loss = lm + local`. Read top to bottom, it is the whole life of a run:

  config -> ranks -> DeepSpeed config -> backbone + adapters -> engine
  -> mixture stream -> [micro batches -> backward -> step] x max_steps
  -> per-domain eval -> checkpoints (also on SIGTERM/SIGUSR1, then exit 75 to requeue)
"""
from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, dist
from ..config import ConfigError, RunConfig, load_config, save_config, to_dict
from .data import TrainStream, ValSet, check_mds_dir, original_mask
from .ds_config import build_ds_config, zero_stage
from .logger import RunLogger, log, setup_logging
from .perplexity import eval_domain, token_nll

EXIT_REQUEUE = 75  # "stopped on a signal after a checkpoint": the SLURM wrapper requeues on it


class StopFlag:
    """Set by SIGTERM/SIGUSR1; checked (and agreed across ranks) between optimizer steps."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        return dist.all_reduce_sum(flag).item() > 0


def lr_lambda(cfg: RunConfig):
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


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


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any process group or model exists, naming the bad key."""
    for s in cfg.data.streams:
        if s.train:
            check_mds_dir(s.train, f"data.streams[{s.domain}].train")
        if s.val:
            check_mds_dir(s.val, f"data.streams[{s.domain}].val")


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns the final per-domain eval metrics."""
    # Handlers first: a preemption signal during the (long) start-up must still end in a checkpoint.
    stop = StopFlag()
    check_inputs(cfg)
    world = dist.init_distributed()
    setup_logging(world.rank)
    if not dist.on_gpu():
        # The adapters' zero-initialised output projection makes subnormal floats in the first
        # dozen steps; x86 CPUs run those steps about a quarter slower (measured with `trainer
        # bench`; GPUs handle subnormals at full speed). Flushing them to zero changes nothing
        # above 1e-38.
        torch.set_flush_denormal(True)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    ds_config = build_ds_config(cfg, world.world_size, dist.on_gpu())
    stage = zero_stage(ds_config)
    resume_tag = checkpoint.latest_tag(ckpt_dir) if cfg.checkpoint.resume else None
    resume_meta = checkpoint.read_meta(ckpt_dir, resume_tag) if resume_tag else None
    elastic = resume_meta is not None and resume_meta["world_size"] != world.world_size
    if elastic:
        # DeepSpeed reads `load_universal` at initialize time, so decide before building the engine.
        ds_config.setdefault("checkpoint", {})["load_universal"] = True

    seed_everything(cfg.train.seed)
    from .model import build_model
    model, _keepalive, model_hash = build_model(cfg, ds_config, zero3=stage == 3)
    from ..method.extend import count_parameters, set_domain, trainable_named_parameters
    from ..method.losses import local_loss

    counts = count_parameters(model)
    meta = {"method": cfg.method.name, "model_hash": model_hash, "trainable_params": counts["trainable"],
            "world_size": world.world_size, "zero_stage": stage}
    if resume_meta:
        checkpoint.check_compatible(resume_meta, meta, ckpt_dir / resume_tag)
    log.info("method %s: %d trainable / %d backbone params (%.2f%%), world size %d, ZeRO-%d, grad accum %d",
             cfg.method.name, counts["trainable"], counts["backbone"], 100 * counts["fraction"], world.world_size,
             stage, ds_config["gradient_accumulation_steps"])

    import deepspeed
    params = [p for _, p in trainable_named_parameters(model)]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    device = dist.device()

    stream = TrainStream(cfg, cfg.train.micro_batch_size, world.world_size)
    val_sets = {s.domain: s.val for s in cfg.data.streams if s.val}

    step, tokens_seen, load_s = 0, 0, None
    if resume_tag:
        t_load = time.perf_counter()
        load_dir = checkpoint.convert_to_universal(ckpt_dir, resume_tag) if elastic else ckpt_dir
        _, client = engine.load_checkpoint(str(load_dir), tag=resume_tag, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise ConfigError(f"{ckpt_dir / resume_tag}: DeepSpeed could not load this checkpoint")
        checkpoint.restore_module(engine)
        step, tokens_seen = client["step"], client["tokens_seen"]
        stream.load_state(client["loader"])
        set_rng_state(client["rng"])
        load_s = time.perf_counter() - t_load
        log.info("resumed from %s at step %d%s", resume_tag, step,
                 f" (world size {resume_meta['world_size']} -> {world.world_size})" if elastic else "")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    logger = RunLogger(run_dir, world.is_main, cfg.train.max_steps, step, cfg.log.tensorboard, cfg.log.wandb,
                       cfg.log.progress, to_dict(cfg))
    if world.is_main and step == 0:
        logger.write({"params": counts, "world_size": world.world_size, "zero_stage": stage}, step)
    if load_s is not None:
        logger.write({"resumed_from": resume_tag, "world_size": world.world_size, "load_s": round(load_s, 3)}, step)
    accum = ds_config["gradient_accumulation_steps"]
    domains = [s.domain for s in cfg.data.streams]

    def save(at_step: int) -> None:
        client = {"step": at_step, "tokens_seen": tokens_seen, "loader": stream.state_dict(), "rng": rng_state()}
        t_save = time.perf_counter()
        tag = checkpoint.save(engine, ckpt_dir, at_step, client, meta, cfg.checkpoint.keep_last)
        save_s = time.perf_counter() - t_save
        size = sum(f.stat().st_size for f in (ckpt_dir / tag).iterdir()) if world.is_main else 0
        logger.write({"checkpoint": tag, "save_s": round(save_s, 3), "bytes": size}, at_step)
        log.info("checkpoint %s saved (%.1f MB, %.1fs)", tag, size / 1e6, save_s)

    def evaluate(at_step: int) -> dict:
        engine.eval()
        results = {}
        for domain, path in val_sets.items():
            vs = ValSet(path, world.rank, world.world_size, cfg.eval.batch_size, cfg.eval.max_batches)
            results[domain] = eval_domain(lambda ids: engine(input_ids=ids).logits, vs, device)
        engine.train()
        logger.write({"eval": results}, at_step)
        if world.is_main:
            log.info("eval step %d: %s", at_step,
                     "  ".join(f"{d} bpb {r['bpb']:.4f}" for d, r in results.items()))
        return results

    if cfg.log.frozen_checksum:
        from .model import frozen_checksum
        logger.write({"frozen_checksum": frozen_checksum(model), "when": "start"}, step)
    if step == 0 and cfg.eval.at_start and val_sets:
        evaluate(0)
    engine.train()
    last_saved = step
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        # Per-domain sums over the step, kept on the device (no host sync per micro batch):
        # rows = domains, columns = [lm nll, predicted tokens, samples].
        sums = torch.zeros(len(domains), 3, dtype=torch.float64, device=device)
        local_sum, stats_sum = torch.zeros((), device=device), {}
        micro_batches = [stream.next_batch() for _ in range(accum)]
        masks = [original_mask(b["domain"], cfg.data.streams) for b in micro_batches]
        # The l1 is a mean over the original tokens of the whole optimizer step (all ranks and
        # accumulation steps), so that it is the same loss on any number of ranks.
        seq_len = micro_batches[0]["input_ids"].shape[1]
        n_orig = dist.all_reduce_sum(torch.tensor([float(sum(m.sum() for m in masks) * seq_len)], device=device))
        l1_tokens = n_orig.item() / (world.world_size * accum)
        for batch, mask in zip(micro_batches, masks):
            ids = batch["input_ids"].to(device)
            set_domain(model, mask.to(device), l1_tokens=l1_tokens)
            logits = engine(input_ids=ids).logits
            nll = token_nll(logits, ids)
            lm = nll.mean()
            local, stats = local_loss(model, cfg.method)
            engine.backward(lm + local)
            engine.step()
            rows = torch.tensor([domains.index(d) for d in batch["domain"]], device=device)
            per_sample = torch.stack([nll.detach().sum(dim=1).double(),
                                      torch.full_like(rows, nll.shape[1], dtype=torch.float64),
                                      torch.ones_like(rows, dtype=torch.float64)], dim=1)
            sums.index_add_(0, rows, per_sample)
            local_sum += local.detach() / accum
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + torch.as_tensor(v, device=device).detach().float() / accum
        step += 1
        tokens_seen += cfg.train.global_batch_size * ids.shape[1]
        sums = dist.all_reduce_sum(sums).cpu()
        local_total = dist.all_reduce_sum(local_sum).item() / world.world_size
        stats_total = {k: round(v.item(), 6) for k, v in stats_sum.items()}
        dt = time.perf_counter() - t0
        if step % cfg.log.every == 0 or step == cfg.train.max_steps:
            lm_by_domain = {d: sums[j, 0].item() / sums[j, 1].item() for j, d in enumerate(domains) if sums[j, 1] > 0}
            total_tokens = sums[:, 1].sum().item()
            record = {
                "loss": sums[:, 0].sum().item() / max(total_tokens, 1) + local_total,
                "lm_loss": sums[:, 0].sum().item() / max(total_tokens, 1),
                "local_loss": local_total, "lm_loss_by_domain": lm_by_domain,
                "samples_by_domain": {d: int(sums[j, 2].item()) for j, d in enumerate(domains)},
                "lr": scheduler.get_last_lr()[0], "tokens_seen": tokens_seen,
                "tokens_per_s": cfg.train.global_batch_size * ids.shape[1] / dt,
                "peak_mem_gb": _peak_mem_gb(), **({"local": stats_total} if stats_total else {}),
            }
            logger.write(record, step)
            logger.progress(step, {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
            evaluate(step)
        if stop.agreed(device):
            log.warning("stop signal received: checkpointing at step %d and exiting for requeue", step)
            save(step)
            logger.close()
            return {"stopped": True, "step": step}
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.max_steps:
            save(step)
            last_saved = step

    results = evaluate(step) if val_sets else {}
    if last_saved != step or not checkpoint.latest_tag(ckpt_dir):
        save(step)
    if cfg.log.frozen_checksum:
        from .model import frozen_checksum
        logger.write({"frozen_checksum": frozen_checksum(model), "when": "end"}, step)
    logger.close()
    return {"stopped": False, "step": step, "eval": results}


def _peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer train",
                                     description="Train an extended model. Resumes from run_dir automatically.")
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 method.alpha=1")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.shutdown()
    return EXIT_REQUEUE if result.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
