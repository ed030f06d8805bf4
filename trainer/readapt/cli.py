"""`python -m trainer readapt {delta,lore,apply}`: RE-Adapt and LoRE-Adapt from the command line.

    python -m trainer readapt delta BASE INSTRUCT --out DELTA          # Delta = instruct - base
    python -m trainer readapt lore DELTA --out LORE --tau 0.5           # low-rank Delta
    python -m trainer readapt apply --delta DELTA|LORE --psi RUN|EXPORT --out OUT [--a 0.5 --b 0.5]

A thin layer over readapt_delta.compute_delta, readapt_lore.compress and
readapt_apply.apply; bad input prints one `error: ...` line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .io import DTYPE_NAMES, ReadaptError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer readapt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("delta", help="instruction adapter Delta = instruct - base, streamed tensor by tensor")
    d.add_argument("base", type=Path, help="HF dir of the base (pretrained) model")
    d.add_argument("instruct", type=Path, help="HF dir of its instruct release")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                   help="stored dtype (default: twice each tensor's precision, for an exact round trip)")
    d.add_argument("--max-shard-size", default="2GB")

    lo = sub.add_parser("lore", help="LoRE: truncated-SVD factors of Delta's block matrices")
    lo.add_argument("delta", type=Path, help="a directory written by `readapt delta`")
    lo.add_argument("--out", type=Path, required=True)
    lo.add_argument("--tau", type=float, default=0.5, help="explained variance each matrix keeps (default 0.5)")
    lo.add_argument("--max-shard-size", default="2GB")
    lo.add_argument("--quiet", action="store_true", help="print only the overall fraction, not every rank")

    a = sub.add_parser("apply", help="base + a*Psi + b*Delta as a HF model directory")
    a.add_argument("--delta", type=Path, required=True, help="delta or LoRE directory")
    a.add_argument("--base", type=Path, help="base HF dir (default: the one the delta was computed from)")
    a.add_argument("--psi", type=Path, help="run dir, export dir, adapters dir or finetuned HF dir (default: none)")
    a.add_argument("--tag", help="checkpoint tag when --psi is a run dir (default: latest)")
    a.add_argument("--a", type=float, default=0.5, help="knowledge adapter scale (default 0.5)")
    a.add_argument("--b", type=float, default=0.5, help="instruction delta scale (default 0.5)")
    a.add_argument("--dtype", default="auto", help="auto (the base's) | " + " | ".join(DTYPE_NAMES))
    a.add_argument("--tokenizer", type=Path, help="dir to copy tokenizer files from (default: the instruct model)")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--allow-other-weights", action="store_true",
                   help="use Psi even if it was trained on other base weights (another weights fingerprint)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "delta":
            from .delta import compute_delta
            meta = compute_delta(args.base, args.instruct, args.out, args.dtype, args.max_shard_size)
            print(f"delta: {meta['tensor_count']} tensors, {meta['num_elements']} elements -> {args.out}")
            print(f"round trip: {meta['inexact_elements']} elements not exact"
                  + ("" if meta["inexact_elements"] == 0 else " (use --dtype float64 for an exact delta)"))
        elif args.command == "lore":
            from .lore import compress, rank_table
            meta = compress(args.delta, args.out, args.tau, args.max_shard_size)
            print(rank_table(meta).splitlines()[-1] if args.quiet else rank_table(meta))
        else:
            from .apply import apply
            info = apply(args.base, args.delta, args.out, args.psi, args.a, args.b, args.tag, args.dtype,
                         args.tokenizer, args.allow_other_weights)
            print(json.dumps(info, indent=2))
    except ReadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
