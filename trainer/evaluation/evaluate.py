"""`python -m trainer eval`: per-domain bits per byte and multiple-choice accuracy of one model.

The model is any of what a user has at hand:
  - a run directory (config.yaml + checkpoints/): its latest (or --tag) checkpoint,
    rebuilt exactly as `export` does; without --data it evaluates the run's val sets;
  - an exported HF directory (our own gated-adapter exports load as they are; other
    models that ship modeling code need --trust-remote-code);
  - the bare backbone (an HF directory), to get the reference numbers `report --backbone` reads.

Perplexity reuses the trainer's own code (data.ValSet, perplexity.eval_domain), so
eval numbers are the training log's numbers. MDS shards hold token ids, so it needs
no tokenizer; multiple-choice tasks do (the HF dir's own, or --tokenizer).

Runs on 1 rank or N (torchrun/srun): every rank holds the whole model, data are
split by rank and sums are all-reduced, so results do not depend on N.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalError(ValueError):
    """Bad input to eval; printed as `error: <message>`."""


# ----------------------------------------------------------------------------- inputs


def parse_data(specs: list[str]) -> dict[str, str]:
    """["en=/data/en/val", ...] -> {"en": "/data/en/val"}; each dir must be an MDS dataset."""
    from ..engine.data import check_mds_dir

    out = {}
    for spec in specs:
        domain, sep, path = spec.partition("=")
        if not sep or not domain or not path:
            raise EvalError(f"--data {spec!r}: expected DOMAIN=MDS_DIR")
        check_mds_dir(path, f"--data {domain}")
        out[domain] = path
    return out


def model_kind(source: Path) -> str:
    """run | hf, from what the directory holds."""
    if not source.exists():
        raise EvalError(f"{source}: no such directory")
    if (source / "config.yaml").is_file():
        return "run"
    if (source / "config.json").is_file():
        return "hf"
    raise EvalError(f"{source}: neither a run directory (config.yaml) nor an HF model directory (config.json)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_dir(path: Optional[str]) -> Optional[str]:
    """`path` if it is a directory holding a tokenizer, else None."""
    if path and Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return str(path)
    return None


def read_hf_config(source: Path) -> dict:
    """An HF directory's config.json, checked before transformers reads it: a file that is not JSON,
    or JSON that is not a model config, would otherwise fail deep inside `from_pretrained`."""
    path = source / "config.json"
    try:
        config = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise EvalError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise EvalError(f"{path}: not a Hugging Face model config (no model_type)")
    return config


def load_model(source: Path, dtype: torch.dtype, tag: Optional[str] = None, trust_remote_code: bool = False):
    """(model in eval mode, info) where info has kind, tokenizer (a default path or None) and val sets."""
    kind = model_kind(source)
    if kind == "run":
        from ..export.export import load_trained

        cfg, model = load_trained(source, tag, dtype)
        tok = tokenizer_dir(cfg.model.path)
        val = {s.domain: s.val for s in cfg.data.streams if s.val}
        return model, {"kind": "run", "tokenizer": tok, "val": val, "method": cfg.method.name}
    config = read_hf_config(source)
    if "auto_map" in config and not trust_remote_code:
        from ..export.hf_export import is_own_export

        if not is_own_export(source):
            raise EvalError(f"{source}: the model ships its own modeling code (auto_map in config.json); "
                            "pass --trust-remote-code to load it")
        trust_remote_code = True  # byte-equal to the code `trainer export` writes: nothing foreign runs
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:  # e.g. a field of the wrong type in config.json
        raise EvalError(f"{source}: cannot load a causal LM: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, {"kind": "hf", "tokenizer": tokenizer_dir(source), "val": {}, "method": None}


def load_tokenizer(path: Optional[str], required_for: str):
    if path is None:
        raise EvalError(f"{required_for} need a tokenizer: the model directory has none, pass --tokenizer DIR")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise EvalError(f"{path}: cannot load a tokenizer for {required_for} (use --tokenizer DIR): "
                        f"{str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- evaluation


def context_length(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def evaluate(model, domains: dict[str, str], tasks: list[str], tokenizer=None, batch_size: int = 8,
             max_batches: Optional[int] = None, fewshot: int = 0, fewshot_file: Optional[str] = None,
             seed: int = 0, device: Optional[torch.device] = None) -> dict:
    """{"domains": {d: {loss, ppl, bpb, tokens, bytes}}, "tasks": {name: {acc, acc_norm, n, fewshot}}}.

    Call on every rank (collectives inside); ranks come from torch.distributed if initialised.
    """
    from ..engine.data import ValSet
    from .mc import evaluate_task
    from ..engine.perplexity import eval_domain

    device = device or next(model.parameters()).device
    initialized = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if initialized else 0
    world = torch.distributed.get_world_size() if initialized else 1

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    results: dict = {"domains": {}, "tasks": {}}
    for domain, path in domains.items():
        vs = ValSet(path, rank, world, batch_size, max_batches)
        results["domains"][domain] = eval_domain(forward, vs, device)
    names = [Path(t).stem for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"--tasks: two task files share a name ({', '.join(names)}); results are keyed by file name")
    for name, path in zip(names, tasks):
        results["tasks"][name] = evaluate_task(forward, tokenizer, path, device, fewshot, fewshot_file, seed,
                                               batch_size, context_length(model))
    return results


def format_table(results: dict) -> str:
    lines = []
    if results.get("domains"):
        lines.append(f"{'domain':<16} {'loss':>8} {'ppl':>10} {'bpb':>8} {'tokens':>10}")
        for d, m in results["domains"].items():
            lines.append(f"{d:<16} {m['loss']:>8.4f} {m['ppl']:>10.3f} {m['bpb']:>8.4f} {m['tokens']:>10d}")
    if results.get("tasks"):
        if lines:
            lines.append("")
        lines.append(f"{'task':<16} {'n':>6} {'shots':>6} {'acc':>8} {'acc_norm':>9}")
        for t, m in results["tasks"].items():
            lines.append(f"{t:<16} {m['n']:>6d} {m['fewshot']:>6d} {m['acc']:>8.4f} {m['acc_norm']:>9.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def run(args) -> dict:
    from .mc import load_items

    domains = parse_data(args.data)
    for path in args.tasks + ([args.fewshot_file] if args.fewshot_file else []):
        load_items(path)  # fail on a malformed file before loading any model
    if args.fewshot < 0:
        raise EvalError("--fewshot must be >= 0")
    from ..engine import dist

    if _distributed():
        world = dist.init_distributed()
        device = dist.device()
    else:
        world, device = None, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and dist.bf16_supported() else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    model, info = load_model(args.model, dtype, args.tag, args.trust_remote_code)
    model.to(device)
    if not domains and not args.tasks:
        domains = {d: p for d, p in info["val"].items()}
        if not domains:
            raise EvalError("nothing to evaluate: give --data DOMAIN=MDS_DIR and/or --tasks FILE.jsonl")
        parse_data([f"{d}={p}" for d, p in domains.items()])
    tokenizer = load_tokenizer(args.tokenizer or info["tokenizer"], "--tasks") if args.tasks else None
    results = evaluate(model, domains, args.tasks, tokenizer, args.batch_size, args.max_batches, args.fewshot,
                       args.fewshot_file, args.seed, device)
    results.update(model=str(args.model), kind=info["kind"], method=info["method"],
                   world_size=world.world_size if world else 1)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer eval", description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="run dir (latest checkpoint), exported HF dir, or backbone HF dir")
    ap.add_argument("--data", nargs="+", default=[], metavar="DOMAIN=MDS_DIR",
                    help="held-out MDS dirs for loss/ppl/bits per byte (default for a run dir: its val sets)")
    ap.add_argument("--tasks", nargs="+", default=[], metavar="FILE.jsonl",
                    help='multiple-choice tasks, one {"context", "choices", "label"} per line')
    ap.add_argument("--fewshot", type=int, default=0, metavar="K", help="solved examples before each item")
    ap.add_argument("--fewshot-file", help="draw few-shot examples from this JSONL (default: the task file, "
                                           "never the scored item)")
    ap.add_argument("--seed", type=int, default=0, help="few-shot sampling seed")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the model's, or the run's backbone)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward, per rank")
    ap.add_argument("--max-batches", type=int,
                    help="cap on val batches per domain, counted as on one rank (the same samples on any number of ranks)")
    ap.add_argument("--tag", help="checkpoint tag of a run dir (default: latest)")
    ap.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow modeling code shipped in the HF dir")
    ap.add_argument("--out", type=Path, help="write the results as JSON (report --backbone reads it)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    from ..engine import dist
    from .mc import TaskError

    try:
        results = run(args)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(format_table(results))
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")
                print(f"\nwrote {args.out}")
    except (EvalError, ConfigError, TaskError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        # Left to interpreter exit, the gloo group's threads can abort a rank whose peer is still
        # writing the results ("terminate called without an active exception", SIGABRT).
        dist.shutdown()
    return 0
