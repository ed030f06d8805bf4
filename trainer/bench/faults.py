"""`python -m trainer faults`: kill and damage a real training run again and again; count what survives.

A user trusts checkpoints only if they survive what clusters do to them. This sweep
trains a small model through the real CLI and, trial after trial:
  1. restarts the run and reads its decision (resumed from which tag, started fresh, refused);
  2. checks that decision against what it must be: the newest checkpoint that is complete
     (has meta.json) and that the sweep did not damage; a refusal only if every complete
     checkpoint is damaged; a fresh start only if there is none;
  3. SIGKILLs it at a random moment of a random step's save or of the step after it (a save
     writes DeepSpeed's files, hashes them, writes meta.json, moves `latest`, prunes);
  4. with probability `--corrupt`, damages a random file of a random complete checkpoint:
     random bytes overwritten, the file truncated or deleted, or `checkpoints/latest` deleted.
A run that reaches its last step (the last trial always does) is compared step by step with
an uninterrupted reference run (the last logged loss of every step); then a new run starts. "Data lost" counts every
restart that did not resume from the checkpoint it should have, and every finished run
whose losses differ from the reference: it must be 0.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import write_mds
from .runs import read_metrics, subprocess_env, write_config

TAG = re.compile(r"step_\d{8}")
MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}


@dataclass
class Tally:
    trials: int = 0
    resumes: int = 0
    fresh_starts: int = 0
    refusals: int = 0
    kills_inside_save: int = 0
    corruptions: int = 0
    runs_finished: int = 0
    losses_equal: int = 0
    data_lost: int = 0
    events: list = field(default_factory=list)


def run_config(work: Path, run_dir: Path, steps: int) -> Path:
    data = {}
    for i, domain in enumerate(("en", "code")):
        root = work / "data" / domain
        if not root.exists():
            write_mds(root / "train", domain, 4 * steps + 8, 32, 128, 10 + i, None)
        data[domain] = str(root / "train")
    cfg = {
        "run_dir": str(run_dir), "model": {"config": MODEL}, "method": {"name": "neutral_residues", "alpha": 1.0},
        "data": {"p": 0.25, "streams": [{"domain": "en", "role": "original", "train": data["en"]},
                                        {"domain": "code", "role": "new", "train": data["code"]}]},
        "train": {"max_steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"every": 1, "keep_last": 2},
        "log": {"tensorboard": False, "progress": False},
    }
    return write_config(cfg, work / f"{run_dir.name}.yaml")


def complete(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if TAG.fullmatch(p.name) and (p / "meta.json").is_file()),
                  reverse=True)


def expected(ckpt_dir: Path, damaged: set[str]) -> str:
    """'resume <tag>', 'refuse' or 'fresh': what a restart must do now."""
    tags = complete(ckpt_dir)
    intact = [t for t in tags if t not in damaged]
    return f"resume {intact[0]}" if intact else ("refuse" if tags else "fresh")


def damage(ckpt_dir: Path, rng: random.Random) -> tuple[str, str]:
    """(tag damaged or '', what was done)."""
    tags = complete(ckpt_dir)
    if not tags:
        return "", "nothing to damage"
    kind = rng.choice(["overwrite", "overwrite", "truncate", "delete", "latest"])
    if kind == "latest":
        (ckpt_dir / "latest").unlink(missing_ok=True)
        return "", "deleted checkpoints/latest"
    tag = rng.choice(tags)
    files = sorted(p for p in (ckpt_dir / tag).iterdir() if p.is_file())
    victim = rng.choice(files)
    size = victim.stat().st_size
    if kind == "delete":
        victim.unlink()
    elif kind == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(rng.randrange(size))
    else:
        n = min(4096, size)
        with open(victim, "r+b") as f:
            f.seek(rng.randrange(size - n + 1))
            f.write(rng.randbytes(n))
    return tag, f"{kind} {tag}/{victim.name}"


def decision(log_text: str) -> str:
    """What a trainer did with its run dir, from its log; '' if it had not decided yet."""
    if m := re.search(r"resumed from (step_\d{8})", log_text):
        return f"resume {m.group(1)}"
    if "none of its" in log_text and "verifies" in log_text:
        return "refuse"
    if "starting at step 0" in log_text:
        return "fresh"
    return ""


def start(config: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", str(config)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_decision(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        text = log.read_text()
        if got := decision(text):
            return got
        if proc.poll() is not None:
            return decision(log.read_text()) or f"exit {proc.returncode}: {text.strip().splitlines()[-1:]}"
        time.sleep(0.05)
    return "timeout"


def wait_for_save(proc: subprocess.Popen, tag_dir: Path, timeout: float = 600) -> None:
    """Until the save of `tag_dir` has begun (or the run ended)."""
    t0 = time.time()
    while not tag_dir.exists() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.005)


def final_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def sweep(work: Path, trials: int, seed: int, steps: int, corrupt: float) -> Tally:
    rng = random.Random(seed)
    env = subprocess_env("cpu", 1)
    work.mkdir(parents=True, exist_ok=True)
    ref_dir = work / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    proc = start(run_config(work, ref_dir, steps), work / "reference.log", env)
    if wait_decision(proc, work / "reference.log") != "fresh" or proc.wait() != 0:
        raise RuntimeError(f"the reference run failed: see {work / 'reference.log'}")
    # A kill falls at a random moment of a step's save, or of the step after it.
    save_s = 2 * max(r["save_s"] for r in read_metrics(ref_dir) if "save_s" in r) + 0.05
    reference = final_losses(ref_dir)
    tally, lineage, damaged = Tally(), 0, set()
    run_dir = work / f"run{lineage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    while tally.trials < trials:
        tally.trials += 1
        ckpt = run_dir / "checkpoints"
        want = expected(ckpt, damaged)
        log = work / f"trial{tally.trials}.log"
        proc = start(run_config(work, run_dir, steps), log, env)
        got = wait_decision(proc, log)
        ok = got == want
        tally.resumes += got.startswith("resume")
        tally.fresh_starts += got == "fresh"
        tally.refusals += got == "refuse"
        tally.data_lost += not ok
        event = {"trial": tally.trials, "expected": want, "got": got}
        target = None
        if got.startswith("resume") or got == "fresh":
            damaged = {t for t in damaged if (ckpt / t).is_dir()}  # the trainer set the damaged ones aside
            at = int(got.split("_")[-1]) if got.startswith("resume") else 0
            if at < steps and tally.trials < trials:  # the last restart runs to the end, for the losses
                target = ckpt / f"step_{rng.randint(at + 1, steps):08d}"
                wait_for_save(proc, target)
                time.sleep(rng.choice([0.0, rng.uniform(0, save_s)]))  # half of the kills right at its start
            else:
                proc.wait()  # nothing left to train: let it finish
        elif got == "refuse":
            proc.wait()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the trainer and everything it started
            proc.wait()
            # Inside the save: before meta.json, or before `latest` names it (hashing, pointer, pruning).
            pointer = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
            inside = target is not None and target.exists() and (
                not (target / "meta.json").exists() or pointer != target.name)
            tally.kills_inside_save += inside
            event["killed"] = f"inside the save of {target.name}" if inside else "between saves"
        elif proc.returncode == 0:
            tally.runs_finished += 1
            same = final_losses(run_dir) == reference
            tally.losses_equal += same
            tally.data_lost += not same
            event["finished"] = "losses equal" if same else "LOSSES DIFFER"
        if proc.returncode not in (0, -9) or got == "refuse" or event.get("finished"):
            lineage += 1  # a finished or refused run: the next trials start a new one
            run_dir, damaged = work / f"run{lineage}", set()
            shutil.rmtree(run_dir, ignore_errors=True)
        elif rng.random() < corrupt:
            tag, what = damage(run_dir / "checkpoints", rng)
            damaged |= {tag} if tag else set()
            tally.corruptions += 1
            event["damaged"] = what
        tally.events.append(event)
        print(json.dumps(event), file=sys.stderr, flush=True)
    return tally


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12, help="steps of each run (checkpointed every step)")
    ap.add_argument("--corrupt", type=float, default=0.5, help="probability of damaging a checkpoint after a kill")
    ap.add_argument("--work", type=Path, default=Path("runs/faults"))
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default: WORK/faults.json)")
    args = ap.parse_args(argv)
    tally = sweep(args.work, args.trials, args.seed, args.steps, args.corrupt)
    out = args.out or args.work / "faults.json"
    out.write_text(json.dumps(asdict(tally), indent=2))
    summary = {k: v for k, v in asdict(tally).items() if k != "events"}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0 if tally.data_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
