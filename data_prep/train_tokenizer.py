"""`train-tokenizer`: a small byte-level BPE tokenizer for a backbone built from scratch.

The CPU quickstart has no pretrained backbone to borrow a tokenizer from, so it
trains one on its own corpus. Byte-level BPE (HF `tokenizers`, in Rust) needs
no unknown token, decodes back to the exact input text, and trains on a few MB
in seconds. The inputs go through the same readers and clean-up as `build`, so
the tokenizer sees the text it will encode. The result is an HF tokenizer
directory: `AutoTokenizer.from_pretrained(out)` works, with <s>, </s>, <unk>
and <pad> as bos, eos, unk and pad.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from .clean import normalize
from .errors import ConfigError, InputError, Skip
from .readers import read_docs
from .sources import ReadOptions, plan_blocks, resolve_inputs

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _texts(inputs: list, opts: ReadOptions, min_chars: int, max_docs: Optional[int], counts: dict) -> Iterator[str]:
    blocks = plan_blocks(resolve_inputs(inputs), opts, 1 << 62)
    pieces = [p for b in blocks for p in b.pieces]
    for item in read_docs(pieces, opts):
        if isinstance(item, Skip):
            counts["skipped"] += 1
            continue
        if max_docs is not None and counts["docs"] >= max_docs:
            return
        counts["docs"] += 1
        text = normalize(item[0])
        if len(text) >= max(min_chars, 1):
            counts["used"] += 1
            yield text


def train_tokenizer(inputs: list, out: str, vocab_size: int = 8192, min_frequency: int = 2,
                    text_field: str = "text", txt_unit: str = "file", min_chars: int = 1,
                    max_docs: Optional[int] = None, on_error: str = "fail", split: str = "train",
                    hf_config: Optional[str] = None, streaming: bool = False) -> dict:
    """Trains byte-level BPE on the inputs and saves an HF tokenizer dir at `out` (atomically).

    Returns {"docs", "used", "skipped", "vocab_size", "out"}."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"--vocab-size: must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    if min_frequency < 1:
        raise ConfigError("--min-frequency: must be >= 1")
    if on_error not in ("fail", "skip"):
        raise ConfigError("--on-error: must be fail or skip")
    out_path = Path(out)
    if out_path.exists() and not (out_path / "tokenizer_config.json").is_file():
        raise ConfigError(f"--out: {out} exists and is not a tokenizer directory; not overwriting it")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    opts = ReadOptions(text_field=text_field, txt_unit=txt_unit, split=split, hf_config=hf_config,
                       streaming=streaming, on_error=on_error)
    counts = {"docs": 0, "used": 0, "skipped": 0}
    texts = _texts(list(inputs), opts, min_chars, max_docs, counts)
    first = next(texts, None)        # fail on bad inputs before the trainer starts
    if first is None:
        raise InputError(str(inputs[0]), 0, "no usable documents to train a tokenizer on")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def all_texts():
        yield first
        yield from texts

    tok.train_from_iterator(all_texts(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(str(tmp))
    if out_path.exists():
        shutil.rmtree(out_path)
    os.rename(tmp, out_path)
    return {**counts, "vocab_size": tok.get_vocab_size(), "out": str(out_path)}
