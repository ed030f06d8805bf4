"""Rank-0 run logging: a progress bar, metrics.jsonl, tensorboard and (optionally) wandb.

metrics.jsonl is the source of truth (one JSON object per line, appended, so a
resumed run continues the same file); tensorboard and wandb are views of it.
Other ranks get a logger that does nothing, so the loop never branches on rank.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("trainer")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "streaming", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True, wandb: bool = False, progress: bool = True, config: Optional[dict] = None):
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
                self.wandb = wb.init(project="neutral-residues", dir=str(run_dir), config=config, resume="allow")
            except ImportError:
                log.warning("log.wandb is true but wandb is not installed; skipping it")
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        flat = dict(_flatten(record))
        if self.tb:
            for k, v in flat.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(flat, step=step)

    def progress(self, step: int, postfix: dict) -> None:
        if self.enabled and self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        self.file.close()


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v
