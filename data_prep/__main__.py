"""`python -m data_prep build | merge | train-tokenizer`: argument parsing over importable functions.

Bad input exits with status 1 and one line on stderr, `error: FILE:LINE: reason`
(LINE 0: the path as a whole); a bad option exits with status 2 and one line.
Heavy libraries are imported only by the command that runs, so --help is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _size(text: str) -> int:
    """'256M' -> 268435456; plain integers are bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 268435456, 256M, 1G)")


def _input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--input", "-i", nargs="+", action="extend", required=True, metavar="PATH",
                   help="files (.jsonl .jsonl.gz .jsonl.zst .parquet .txt), directories, globs, "
                        "a save_to_disk directory, or hf:NAME for datasets.load_dataset(NAME)")
    g.add_argument("--text-field", default="text", help="JSON key / column holding the text (default: text)")
    g.add_argument("--txt-unit", choices=("file", "line"), default="file",
                   help=".txt files: one document per file (default) or per line")
    g.add_argument("--split", default="train", help="datasets split to read (default: train)")
    g.add_argument("--hf-config", default=None, help="datasets config name")
    g.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    g.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad records (malformed JSON, missing field, bad UTF-8): stop with an error (default), "
                        "or skip them and count them in stats.json")
    g.add_argument("--max-docs", type=int, default=None, help="read at most N documents (per task)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m data_prep",
                     description="Offline data preparation: raw text -> tokenized, packed, domain-tagged MDS shards.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    b = sub.add_parser("build", help="raw text -> tokenized, packed, domain-tagged MDS dirs",
                       description="Clean, filter, dedup, tokenize and pack raw text into OUT/train (and OUT/val). "
                                   "With --num-shards K, run once per --shard-index (a SLURM array), then `merge OUT`.")
    _input_args(b)
    b.add_argument("--domain", required=True, help="domain name stored in every sample, e.g. en, fr, code")
    b.add_argument("--tokenizer", required=True, help="HF tokenizer directory or SentencePiece .model file")
    b.add_argument("--seq-len", type=int, required=True, help="tokens per sample")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of documents held out in OUT/val, chosen by a hash of (seed, text)")
    b.add_argument("--seed", type=int, default=0, help="seed of the val split (default 0)")
    sh = b.add_argument_group("sharding (defaults: SLURM_ARRAY_TASK_COUNT and the task's position in the array)")
    sh.add_argument("--num-shards", type=int, default=None, help="K tasks, each writing OUT/SPLIT/shard-0000I")
    sh.add_argument("--shard-index", type=int, default=None, help="this task's index I in [0, K)")
    sh.add_argument("--block-bytes", type=_size, default=256 << 20,
                    help="input bytes per block, the unit of sharding, dedup and packing (default 256M)")
    f = b.add_argument_group("filters")
    f.add_argument("--min-chars", type=int, default=20, help="drop documents shorter than this after clean-up")
    f.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep repeated paragraphs")
    f.add_argument("--dedup-min-chars", type=int, default=20, help="shorter paragraphs are never deduplicated")
    f.add_argument("--lang", default=None, help="keep only documents in this language (ISO 639-1, e.g. en)")
    f.add_argument("--lang-threshold", type=float, default=0.5, help="minimum probability of --lang (default 0.5)")
    f.add_argument("--max-tokens", type=int, default=None, help="stop after N tokens (per task)")
    o = b.add_argument_group("output")
    o.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any N)")
    o.add_argument("--compression", default="zstd", help="MDS compression of train shards (default zstd; none)")
    o.add_argument("--val-compression", default="none",
                   help="MDS compression of val shards (default none: LocalDataset readers cannot decompress)")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal or under SLURM)")

    m = sub.add_parser("merge", help="join the shards of a sharded build into one index per split",
                       description="Check that all K shards of the build in OUT are complete, then write "
                                   "OUT/train/index.json + stats.json (and OUT/val/...).")
    m.add_argument("out", metavar="OUT", help="the --out of the sharded build")

    t = sub.add_parser("train-tokenizer", help="train a small byte-level BPE tokenizer, saved as an HF directory",
                       description="Train byte-level BPE on the inputs; AutoTokenizer.from_pretrained(OUT) loads it.")
    _input_args(t)
    t.add_argument("--out", required=True, help="output tokenizer directory")
    t.add_argument("--vocab-size", type=int, default=8192,
                   help="vocabulary size, special tokens included (default 8192)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged pair (default 2)")
    t.add_argument("--min-chars", type=int, default=1, help="skip documents shorter than this")
    return parser


def shard_from_env(num_shards: Optional[int], shard_index: Optional[int], environ=os.environ):
    """Explicit flags win; otherwise a SLURM array task is shard (ID - MIN) of COUNT."""
    if num_shards is None and "SLURM_ARRAY_TASK_COUNT" in environ:
        num_shards = int(environ["SLURM_ARRAY_TASK_COUNT"])
    if shard_index is None and num_shards is not None and "SLURM_ARRAY_TASK_ID" in environ:
        shard_index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
    return num_shards, shard_index


def _build(args) -> int:
    from .build import BuildConfig, build

    num_shards, shard_index = shard_from_env(args.num_shards, args.shard_index)
    cfg = BuildConfig(
        inputs=args.input, domain=args.domain, tokenizer=args.tokenizer, seq_len=args.seq_len, out=args.out,
        val_fraction=args.val_fraction, seed=args.seed, num_shards=num_shards, shard_index=shard_index,
        workers=args.workers, compression=args.compression, val_compression=args.val_compression,
        max_docs=args.max_docs, max_tokens=args.max_tokens, min_chars=args.min_chars, dedup=args.dedup,
        dedup_min_chars=args.dedup_min_chars, lang=args.lang, lang_threshold=args.lang_threshold,
        text_field=args.text_field, txt_unit=args.txt_unit, split=args.split, hf_config=args.hf_config,
        streaming=args.streaming, on_error=args.on_error, block_bytes=args.block_bytes, progress=args.progress)
    print(build(cfg).summary(), flush=True)
    return 0


def _merge(args) -> int:
    from .merge import merge

    stats = merge(args.out)
    parts = [f"{split}: {s['samples']} samples, {s['sample_tokens']} tokens from {s['tasks']} shards"
             for split, s in stats.items()]
    dup = next(iter(stats.values()))["input"]["cross_block_duplicate_paragraphs"]
    print(f"data_prep merge: {'; '.join(parts)}; {dup} paragraphs repeated across blocks -> {args.out}", flush=True)
    return 0


def _train_tokenizer(args) -> int:
    from .train_tokenizer import train_tokenizer

    r = train_tokenizer(args.input, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                        text_field=args.text_field, txt_unit=args.txt_unit, min_chars=args.min_chars,
                        max_docs=args.max_docs, on_error=args.on_error, split=args.split,
                        hf_config=args.hf_config, streaming=args.streaming)
    print(f"data_prep train-tokenizer: {r['used']} of {r['docs']} docs ({r['skipped']} records skipped), "
          f"vocab {r['vocab_size']} -> {r['out']}", flush=True)
    return 0


COMMANDS = {"build": _build, "merge": _merge, "train-tokenizer": _train_tokenizer}


def main(argv: Optional[list] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from .errors import ConfigError, InputError

    try:
        return COMMANDS[args.command](args)
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, InputError) else 2
    except OSError as e:    # disk full, permission denied...: the system's reason, with the path
        where = f"{e.filename}:0: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
