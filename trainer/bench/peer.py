"""The peer our `lora` is measured against: `transformers.Trainer` + `peft`, as users would write it.

Same RunConfig as our lora run, read with the same loader: the backbone built
from the same HF config and seed, LoRA of the same rank on the same FFN linears
(gate/up/down, dropout 0, alpha = rank), the same streaming mixture of the same
MDS dirs, micro batch, gradient accumulation, steps, AdamW betas, clipping and
schedule. Optionally with DeepSpeed (`--deepspeed JSON`), where HF's integration
runs on this device.

Timing: the wall time between consecutive optimizer steps (`on_step_end`), so
it covers data fetch, forward, backward, step and HF's per-step logging, the
same span our trainer's `tokens_per_s` covers. Run as a subprocess by
`trainer bench`; writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def peer_model(cfg):
    """The backbone with peft LoRA via `get_peft_model`, sized as `extend_model` sizes ours."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..method.extend import LORA_TARGETS, lora_rank
    from ..engine.model import load_backbone
    from ..engine.rng import seed_everything

    seed_everything(cfg.train.seed)
    dtype = torch.float32 if cfg.model.dtype in ("auto", "float32") else getattr(torch, cfg.model.dtype)
    model = load_backbone(cfg, dtype)
    hf = model.config
    n = sum(p.numel() for p in model.parameters())
    r = cfg.method.lora_rank or lora_rank(cfg.method.extra_params, n, hf.num_hidden_layers, hf.hidden_size,
                                          hf.intermediate_size)
    lora = LoraConfig(r=r, lora_alpha=cfg.method.lora_alpha or r, lora_dropout=cfg.method.lora_dropout,
                      target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), r


def peer_dataset(cfg):
    """The trainer's mixture (same streams and proportions), as an iterable dataset."""
    from streaming import Stream, StreamingDataset

    from ..engine.data import stream_proportions
    from ..engine.shm import clean_stale_shm, registering

    clean_stale_shm()
    props = stream_proportions(cfg)
    streams = [Stream(local=s.train, proportion=props[s.domain]) for s in cfg.data.streams if s.domain in props]
    with registering():
        return StreamingDataset(streams=streams, batch_size=cfg.train.micro_batch_size, shuffle=cfg.data.shuffle,
                                shuffle_seed=cfg.train.seed, num_canonical_nodes=cfg.data.num_canonical_nodes)


def collate(samples: list[dict]) -> dict:
    import numpy as np
    import torch

    ids = torch.from_numpy(np.stack([s["input_ids"] for s in samples]).astype(np.int64))
    return {"input_ids": ids, "labels": ids}


def run_peer(cfg, device: str, out_dir: Path, deepspeed_json: str | None = None) -> dict:
    """Train with HF Trainer; returns per-step wall times and the parameter counts."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ..resources import resolve

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    model, rank = peer_model(cfg)
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=cfg.train.max_steps, per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        warmup_steps=cfg.train.warmup_steps, adam_beta1=cfg.train.betas[0], adam_beta2=cfg.train.betas[1],
        adam_epsilon=1e-8, weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.grad_clip,
        optim="adamw_torch", logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False, seed=cfg.train.seed,
        deepspeed=str(resolve(deepspeed_json)) if deepspeed_json else None)
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=peer_dataset(cfg), data_collator=collate,
                      callbacks=[clock])
    trainer.train()
    step_s = [b - a for a, b in zip(clock.times, clock.times[1:])]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": step_s, "lora_rank": rank, "trainable": trainable,
            "final_loss": losses[-1] if losses else None, "deepspeed": bool(deepspeed_json)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench.peer", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the bench's lora RunConfig YAML")
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--deepspeed", default=None,
                    help="run HF's DeepSpeed integration with this (resolved, no \"auto\") DeepSpeed JSON")
    args = ap.parse_args(argv)
    from ..config import load_config

    cfg = load_config(args.config)
    if args.deepspeed and "RANK" not in os.environ:
        # DeepSpeed falls back to MPI discovery without launcher variables: be a 1-rank job.
        from ..engine.dist import free_port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = run_peer(cfg, args.device, Path(cfg.run_dir), args.deepspeed)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
