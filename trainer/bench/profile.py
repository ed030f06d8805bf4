"""`python -m trainer.bench.profile CONFIG --skip W --active K --out FILE`: where a training step's time goes.

Runs the real `trainer.engine.train.train(cfg)` under the PyTorch profiler. A global
optimizer-step hook advances the profiler's schedule, so it records exactly
the K optimizer steps after W warm-up steps (model build, DeepSpeed init, the
first steps, eval and the final checkpoint stay out of the figures), without
the training loop knowing it is profiled.

Ops are grouped by what they are (matmul, attention, optimizer, elementwise,
data, communication...), so the answer to "where does the time go" is a few
shares, with the top ops underneath as evidence.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CATEGORIES = (  # first match wins; matched against the lower-cased op name
    # The step's own span: its self time is the Python between ops (loop, DeepSpeed, hooks, logging).
    ("python (between ops)", ("profilerstep",)),
    ("autograd bookkeeping", ("accumulategrad", "autograd::engine", "backward0", "backwardbackward")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::dot", "aten::mv")),
    ("attention", ("scaled_dot_product", "flash", "attention")),
    ("optimizer", ("optimizer.step", "adam", "_foreach", "clip_grad", "zero_grad", "aten::_fused")),
    ("communication", ("gloo", "nccl", "all_reduce", "allreduce", "broadcast", "c10d", "record_param_comms")),
    ("data", ("dataloader", "streaming", "collate", "aten::from_numpy", "enumerate(")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("copy/layout", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::cat", "aten::clone",
                     "aten::index", "aten::embedding", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty")),
    ("elementwise", ("aten::mul", "aten::add", "aten::div", "aten::sub", "aten::silu", "aten::sigmoid", "aten::relu",
                     "aten::pow", "aten::rsqrt", "aten::mean", "aten::sum", "aten::neg", "aten::abs", "aten::sqrt",
                     "aten::exp", "aten::where", "aten::threshold", "aten::sign", "aten::max", "aten::norm",
                     "aten::lerp", "aten::addcmul", "aten::addcdiv", "aten::cos", "aten::sin", "aten::linalg")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


# Spans whose *total* time (children included) answers a question self times cannot: ZeRO flattens
# the trainable params, so AdamW is a handful of plain aten::mul_/add_ that land in "elementwise".
SPANS = {"optimizer step": "optimizer.step#", "data loader next": "enumerate(dataloader)"}


def summarize(events, top: int, wall_s: float) -> dict:
    """Top ops by self CPU time, self time per category and a few spans' total time, as shares of wall time."""
    events = list(events)
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events]
    rows.sort(key=lambda r: -r["self_ms"])
    total = sum(r["self_ms"] for r in rows)
    by_cat: dict[str, float] = {}
    for r in rows:
        by_cat[category(r["op"])] = by_cat.get(category(r["op"]), 0.0) + r["self_ms"]
    wall_ms = wall_s * 1e3
    return {
        "wall_ms": wall_ms, "self_ms_total": total,
        "categories": {k: {"self_ms": v, "share_of_wall": v / wall_ms if wall_ms else 0.0}
                       for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_ops": [{**r, "share_of_wall": r["self_ms"] / wall_ms if wall_ms else 0.0} for r in rows[:top]],
        "spans": {name: {"total_ms": t, "share_of_wall": t / wall_ms if wall_ms else 0.0}
                  for name, key in SPANS.items()
                  for t in [sum(e.cpu_time_total for e in events if e.key.lower().startswith(key)) / 1e3]},
    }


def profile_training(cfg, skip: int, active: int, top: int = 15) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from ..engine.train import train

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    marks: list[float] = []
    prof = profile(activities=activities, schedule=schedule(wait=max(skip - 1, 0), warmup=1 if skip else 0,
                                                            active=active, repeat=1))

    def on_step(optimizer, args, kwargs):
        marks.append(time.perf_counter())
        prof.step()

    handle = register_optimizer_step_post_hook(on_step)
    with prof:
        train(cfg)
    handle.remove()
    if len(marks) < skip + active:
        raise RuntimeError(f"only {len(marks)} optimizer steps ran; the profile needs {skip} + {active}")
    # The active window is optimizer steps skip+1 .. skip+active: from mark[skip-1] to mark[skip+active-1].
    wall = marks[skip + active - 1] - (marks[skip - 1] if skip else marks[0])
    return {"skip": skip, "active": active, **summarize(prof.key_averages(), top, wall)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="RunConfig YAML")
    ap.add_argument("--skip", type=int, default=2, help="optimizer steps before the profiled ones")
    ap.add_argument("--active", type=int, default=3, help="optimizer steps profiled")
    ap.add_argument("--top", type=int, default=15, help="ops listed")
    ap.add_argument("--out", required=True, help="JSON result file")
    args = ap.parse_args(argv)
    from ..config import load_config

    cfg = load_config(args.config)
    Path(args.out).write_text(json.dumps(profile_training(cfg, args.skip, args.active, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
