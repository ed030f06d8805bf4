"""The one training loop: set-up -> resume -> fit (evaluate, save), for every method.

A method is a config value. Everything method-specific lives in extend.py (what
is added and trained) and losses.py (the local loss); this loop only sees
`loss = lm + local`. Read top to bottom, `train()` is the whole life of a run:

  Trainer(cfg): ranks -> DeepSpeed config -> backbone + adapters -> engine -> mixture stream
  .resume():    step, tokens seen, data position and RNG from the latest checkpoint
  .open_logs(): config.yaml, metrics.jsonl, tensorboard, progress bar
  .fit():       [micro batches -> backward -> step -> metrics] x max_steps
                -> per-domain eval -> checkpoints (also on SIGTERM/SIGUSR1, then exit 75 to requeue)

The steps share state that changes as the run goes (the step, the tokens seen, the
engine), so they are methods of one object; `save` and `evaluate` can then be called
from anywhere in the loop without capturing its locals.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint, dist
from . import lock as run_lock
from ..config import ConfigError, RunConfig, load_config, save_config, to_dict
from ..method.extend import count_parameters, set_domain, trainable_named_parameters
from ..method.budget import ForgettingBudget
from ..method.losses import local_loss, replay_loss
from .data import TrainStream, ValSet, check_mds_dir, original_mask
from .ds_config import build_ds_config, zero_stage
from .fingerprint import weights_fingerprint
from .forgetting import meter
from .logger import RunLogger, log, setup_logging
from .metrics import NLL, StepMetrics, peak_mem_gb
from .model import build_model, frozen_checksum
from .perplexity import eval_domain, token_nll
from .rng import rng_state, seed_everything, set_rng_state
from .schedule import lr_lambda

EXIT_REQUEUE = 75  # "stopped on a signal after a checkpoint": the SLURM wrapper requeues on it


class NonFinite(ConfigError):
    """Training produced a non-finite loss or gradient norm; nothing of it was saved."""


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


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any process group or model exists, naming the bad key: a dataset that is
    missing, empty (a val set is evaluated only at the end) or of another domain (step 1)."""
    for s in cfg.data.streams:
        if s.train:
            check_mds_dir(s.train, f"data.streams[{s.domain}].train", s.domain)
        if s.val:
            check_mds_dir(s.val, f"data.streams[{s.domain}].val", s.domain)


def flush_denormals() -> None:
    """Flush subnormal floats to zero on CPU.

    The adapters' zero-initialised output projection makes subnormal floats in the first
    dozen steps; x86 CPUs run those steps about a quarter slower (measured with `trainer
    bench`; GPUs handle subnormals at full speed). Flushing them changes nothing above 1e-38.
    """
    # numpy builds a dtype's `finfo` on first use and compares the (correct, stored) smallest
    # subnormal with zero. Once denormals are flushed, the CPU reads subnormal inputs as zero,
    # the comparison is true, and numpy warns "The value of the smallest subnormal ... is zero"
    # for each float type used later (by transformers, DeepSpeed...). Built now, they are cached.
    for t in (np.float16, np.float32, np.float64, np.longdouble):
        np.finfo(t)
    torch.set_flush_denormal(True)


@dataclass
class ResumePoint:
    """The checkpoint to resume from, chosen before the engine exists: DeepSpeed reads
    `load_universal` at initialize time, and a checkpoint of another method or backbone
    must be refused before anything is loaded."""
    tag: str
    meta: dict
    elastic: bool  # saved on another number of ranks: loaded through the universal format


def find_resume_point(cfg: RunConfig, ckpt_dir: Path, world_size: int) -> Optional[ResumePoint]:
    """Rank 0 picks the newest checkpoint that verifies (checkpoint.select) and tells the others.

    Checkpoints that will not be loaded are renamed aside, never deleted and never overwritten
    by this run's saves: newer ones that fail verification (`.damaged`), newer ones than an
    explicit `checkpoint.resume_from` and all of them under `checkpoint.resume=false` (`.superseded`).
    """
    choice: dict = {}
    if dist.detect_world().is_main:
        try:
            checkpoint.clean_interrupted(ckpt_dir)
            if not cfg.checkpoint.resume:
                checkpoint.set_aside(ckpt_dir, checkpoint.complete_tags(ckpt_dir), "superseded")
            else:
                chosen = checkpoint.select(ckpt_dir, cfg.checkpoint.resume_from)
                if chosen:
                    checkpoint.set_aside(ckpt_dir, chosen.refused, "damaged")
                    newer = [t for t in checkpoint.complete_tags(ckpt_dir) if t > chosen.tag]
                    checkpoint.set_aside(ckpt_dir, newer, "superseded")
                    choice = {"tag": chosen.tag, "meta": chosen.meta}
        except ConfigError as e:
            choice = {"error": str(e)}
    choice = dist.broadcast_object(choice)
    if "error" in choice:
        raise ConfigError(choice["error"] if dist.detect_world().is_main else "rank 0 refused to resume (see its error)")
    if not choice:
        return None
    return ResumePoint(choice["tag"], choice["meta"], elastic=choice["meta"]["world_size"] != world_size)


class Trainer:
    """One run's state. `__init__` is the set-up; then `resume()`, `open_logs()`, `fit()` (see `train`)."""

    def __init__(self, cfg: RunConfig):
        check_inputs(cfg)
        self.cfg = cfg
        self.world = dist.init_distributed()
        setup_logging(self.world.rank)
        # Before anything reads or writes run_dir: a second trainer on it exits here, on every rank.
        self.lock = run_lock.acquire(Path(cfg.run_dir), self.world)
        if not dist.on_gpu():
            flush_denormals()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

        self.ds_config = build_ds_config(cfg, self.world.world_size, dist.on_gpu(), dist.bf16_supported())
        self.stage = zero_stage(self.ds_config)
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.resume_point = find_resume_point(cfg, self.ckpt_dir, self.world.world_size)
        if self.resume_point and self.resume_point.elastic:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

        seed_everything(cfg.train.seed)
        # The DeepSpeed config handle must outlive the model's construction under ZeRO-3.
        self.model, self._hf_ds_config, model_hash = build_model(cfg, self.ds_config, zero3=self.stage == 3)
        self.counts = count_parameters(self.model)
        self.meta = {"method": cfg.method.name, "model_hash": model_hash, "trainable_params": self.counts["trainable"],
                     "world_size": self.world.world_size, "zero_stage": self.stage,
                     "weights_fingerprint": weights_fingerprint(cfg.model.path, self.model)}
        if self.resume_point:
            checkpoint.check_compatible(self.resume_point.meta, self.meta, self.ckpt_dir / self.resume_point.tag,
                                        cfg.checkpoint.allow_other_weights)
        log.info("method %s: %d trainable / %d backbone params (%.2f%%), world size %d, ZeRO-%d, grad accum %d",
                 cfg.method.name, self.counts["trainable"], self.counts["backbone"], 100 * self.counts["fraction"],
                 self.world.world_size, self.stage, self.accum)

        import deepspeed
        params = [p for _, p in trainable_named_parameters(self.model)]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self.device = dist.device()

        self.stream = TrainStream(cfg, cfg.train.micro_batch_size, self.world.world_size)
        self.val_sets = {s.domain: s.val for s in cfg.data.streams if s.val}
        self.domains = [s.domain for s in cfg.data.streams]
        self.step, self.tokens_seen = 0, 0
        self.load_s: Optional[float] = None
        self.logger: Optional[RunLogger] = None
        # The forgetting budget (method.forgetting_budget): its multiplier and the meter that measures forgetting.
        self.budget = self.forgetting = None
        self.meter_s = self.window_s = 0.0
        """Seconds spent measuring forgetting, and in whole steps, since the last logged step."""
        if cfg.method.forgetting_budget is not None:
            self.forgetting = meter(cfg, self.engine, self.device, self.world.rank, self.world.world_size, self.stage)
            self.budget = ForgettingBudget.from_config(cfg.method, self.forgetting.ema)

    def resume(self) -> None:
        """Continue from the checkpoint found at set-up, if any: step, tokens seen, data position, RNG."""
        point = self.resume_point
        if point is None:
            log.info("starting at step 0: no checkpoint to resume in %s", self.ckpt_dir)
            return
        t_load = time.perf_counter()
        load_dir = checkpoint.convert_to_universal(self.ckpt_dir, point.tag) if point.elastic else self.ckpt_dir
        _, client = self.engine.load_checkpoint(str(load_dir), tag=point.tag, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise ConfigError(f"{self.ckpt_dir / point.tag}: DeepSpeed could not load this checkpoint")
        checkpoint.restore_module(self.engine)
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.stream.load_state(client["loader"])
        set_rng_state(client["rng"])
        if self.budget is not None and "budget" in client:
            self.budget.load_state_dict(client["budget"])
        self.load_s = time.perf_counter() - t_load
        log.info("resumed from %s at step %d%s", point.tag, self.step,
                 f" (world size {point.meta['world_size']} -> {self.world.world_size})" if point.elastic else "")

    def open_logs(self) -> None:
        """Write config.yaml and start the run logger. Only after `resume()`: a checkpoint that
        fails to load must leave run_dir untouched, and the progress bar starts at the resumed step."""
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        log_cfg = self.cfg.log
        self.logger = RunLogger(self.run_dir, self.world.is_main, self.cfg.train.max_steps, self.step,
                                log_cfg.tensorboard, log_cfg.wandb, log_cfg.progress, to_dict(self.cfg))
        if self.world.is_main and self.step == 0:
            self.logger.write({"params": self.counts, "world_size": self.world.world_size,
                               "zero_stage": self.stage}, self.step)
        if self.load_s is not None:
            self.logger.write({"resumed_from": self.resume_point.tag, "world_size": self.world.world_size,
                               "load_s": round(self.load_s, 3)}, self.step)

    def fit(self, stop: StopFlag) -> dict:
        """Train up to max_steps, evaluating and checkpointing on the way.

        A stop signal is honoured between steps, once all ranks agree, so that the checkpoint is
        of one consistent step; `main` then exits 75 and the SLURM wrapper requeues the job.
        """
        cfg = self.cfg
        if cfg.log.frozen_checksum:
            self.logger.write({"frozen_checksum": frozen_checksum(self.model), "when": "start"}, self.step)
        if self.step == 0 and cfg.eval.at_start and self.val_sets:
            self.evaluate(0)
        self.engine.train()
        last_saved = self.step
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            metrics, step_tokens = self.train_step()
            self.step += 1
            self.check_finite(metrics)
            self.tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            self.window_s += dt
            if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps:
                self.log_step(metrics, step_tokens / dt)
            before_end = self.step < cfg.train.max_steps  # the end has its own eval and save
            if cfg.eval.every and self.step % cfg.eval.every == 0 and before_end:
                self.evaluate(self.step)
            if stop.agreed(self.device):
                log.warning("stop signal received: checkpointing at step %d and exiting for requeue", self.step)
                self.save(self.step)
                self.logger.close()
                return {"stopped": True, "step": self.step}
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and before_end:
                self.save(self.step)
                last_saved = self.step

        # Saved before the final eval: an eval that fails must not cost the training.
        if last_saved != self.step or not checkpoint.complete_tags(self.ckpt_dir):
            self.save(self.step)
        results = self.evaluate(self.step) if self.val_sets else {}
        if cfg.log.frozen_checksum:
            self.logger.write({"frozen_checksum": frozen_checksum(self.model), "when": "end"}, self.step)
        self.logger.close()
        return {"stopped": False, "step": self.step, "eval": results}

    def train_step(self) -> tuple[StepMetrics, int]:
        """One optimizer step over `accum` micro batches; returns its metrics and its token count.

        The metrics are reduced over ranks at every step, logged or not: it is a collective.
        """
        micro_batches = [self.stream.next_batch() for _ in range(self.accum)]
        masks = [original_mask(b["domain"], self.cfg.data.streams) for b in micro_batches]
        seq_len = micro_batches[0]["input_ids"].shape[1]
        l1_tokens = self.l1_tokens(masks, seq_len)
        metrics = StepMetrics(self.domains, self.accum, self.world.world_size, self.device)
        budget = self.budget
        if budget is not None:
            self.forgetting.start_step(budget, self.step)
            if budget.lr_scale != 1:
                # Set on the optimizer, not in the schedule: the scheduler re-sets the plain lr after
                # every step, so the scaled one never reaches a checkpoint, and a resume re-scales it
                # from the restored multiplier.
                for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                    group["lr"] = lr * budget.lr_scale
        for batch, mask in zip(micro_batches, masks):
            ids = batch["input_ids"].to(self.device)
            set_domain(self.model, mask.to(self.device), l1_tokens=l1_tokens)
            nll = token_nll(self.engine(input_ids=ids).logits, ids)
            local, stats = local_loss(self.model, self.cfg.method, alpha=budget.l1_weight if budget else None)
            if budget is not None and budget.replay_weight:
                # The Lagrangian's constraint term: the multiplier times the original tokens' LM loss.
                local = local + budget.replay_weight * replay_loss(nll, mask, l1_tokens * (seq_len - 1) / seq_len)
            self.engine.backward(nll.mean() + local)
            self.engine.step()
            metrics.add(nll, batch["domain"], local, stats)
            if budget is not None:
                self.forgetting.add(ids, mask, nll, batch["num_bytes"])
        metrics.reduce()  # synchronises the device, so the meter's clock below starts after the step's work
        if budget is not None:
            t_meter = time.perf_counter()
            sums = self.forgetting.finish_step(self.step + 1)
            if sums is not None:
                budget.measure(*sums)
            budget.step()
            self.meter_s += time.perf_counter() - t_meter
        return metrics, self.cfg.train.global_batch_size * ids.shape[1]

    def check_finite(self, metrics: StepMetrics) -> None:
        """Stop before a non-finite state can be saved (and prune a good checkpoint).

        Both figures are global (reduced over ranks), so every rank stops at the same step.
        """
        loss = metrics.sums[:, NLL].sum().item() + metrics.local_total
        # Under fp16 loss scaling an overflowing step is skipped by design while the scale settles.
        # In fp32/bf16 DeepSpeed skips a non-finite step too, silently: a run that does that is broken.
        skipped_by_design = self.engine.fp16_enabled() and not self.engine.was_step_applied()
        norm = None if skipped_by_design else self.engine.get_global_grad_norm()
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", norm))
               if value is not None and not math.isfinite(float(value))]
        if bad:
            tags = checkpoint.complete_tags(self.ckpt_dir)
            msg = (f"step {self.step}: non-finite {' and '.join(bad)}; stopped without saving. The newest checkpoint "
                   f"({tags[0] if tags else 'none'}) is untouched: lower train.lr, or pick an earlier one with "
                   "checkpoint.resume_from")
            self.logger.write({"error": msg}, self.step)
            self.logger.close()
            raise NonFinite(msg)

    def l1_tokens(self, masks: list[torch.Tensor], seq_len: int) -> float:
        """Original-domain tokens per micro batch and rank, averaged over the whole step.

        The l1 is a mean over the original tokens of the whole optimizer step (all ranks and
        accumulation steps), so that it is the same loss on any number of ranks.
        """
        local = torch.tensor([float(sum(m.sum() for m in masks) * seq_len)], device=self.device)
        return dist.all_reduce_sum(local).item() / (self.world.world_size * self.accum)

    def log_step(self, metrics: StepMetrics, tokens_per_s: float) -> None:
        lr = self.scheduler.get_last_lr()[0] * (self.budget.lr_scale if self.budget else 1.0)
        budget = None
        if self.budget is not None:
            # The meter's share of the wall time since the last log, every step counted (the held-out
            # probe runs every few steps only, so the logged step's own tokens/s says little about it).
            budget = {**self.budget.record(), "meter_share": self.meter_s / self.window_s}
        self.meter_s = self.window_s = 0.0
        record = metrics.record(lr=lr, tokens_seen=self.tokens_seen,
                                tokens_per_s=tokens_per_s, peak_mem_gb=peak_mem_gb(), budget=budget)
        self.logger.write(record, self.step)
        self.logger.progress(self.step, {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"})

    def evaluate(self, at_step: int) -> dict:
        """Bits per byte on every domain's held-out set; every rank takes part (ZeRO-3 gathers)."""
        self.engine.eval()
        results = {}
        for domain, path in self.val_sets.items():
            vs = ValSet(path, self.world.rank, self.world.world_size, self.cfg.eval.batch_size,
                        self.cfg.eval.max_batches)
            results[domain] = eval_domain(lambda ids: self.engine(input_ids=ids).logits, vs, self.device)
        self.engine.train()
        self.logger.write({"eval": results}, at_step)
        if self.world.is_main:
            log.info("eval step %d: %s", at_step,
                     "  ".join(f"{d} bpb {r['bpb']:.4f}" for d, r in results.items()))
        return results

    def save(self, at_step: int) -> None:
        """A checkpoint that resumes exactly: DeepSpeed's state plus the step, data position and RNG."""
        client = {"step": at_step, "tokens_seen": self.tokens_seen, "loader": self.stream.state_dict(),
                  "rng": rng_state()}
        if self.budget is not None:
            client["budget"] = self.budget.state_dict()
        t_save = time.perf_counter()
        tag = checkpoint.save(self.engine, self.ckpt_dir, at_step, client, self.meta, self.cfg.checkpoint.keep_last)
        save_s = time.perf_counter() - t_save
        size = sum(f.stat().st_size for f in (self.ckpt_dir / tag).iterdir()) if self.world.is_main else 0
        self.logger.write({"checkpoint": tag, "save_s": round(save_s, 3), "bytes": size}, at_step)
        log.info("checkpoint %s saved (%.1f MB, %.1fs)", tag, size / 1e6, save_s)


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns the final per-domain eval metrics."""
    # Handlers first: a preemption signal during the (long) start-up must still end in a checkpoint.
    stop = StopFlag()
    try:
        trainer = Trainer(cfg)
        trainer.resume()
        trainer.open_logs()
        return trainer.fit(stop)
    finally:  # also after a stop for requeue, and on errors (a SIGKILL leaves it: see lock.py)
        run_lock.release(Path(cfg.run_dir))


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
        # Ranks refused together (the run lock, a damaged checkpoint...) must still tear the group
        # down in order: left to interpreter exit, a rank whose peer is already gone can abort (SIGABRT).
        dist.shutdown()
        return 2
    dist.shutdown()
    return EXIT_REQUEUE if result.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
