"""Load the backbone's tokenizer, an HF tokenizer directory or a SentencePiece `.model` file.

Documents are encoded without special tokens; build.py appends the EOS id
itself, so every document ends with exactly one EOS whatever the tokenizer's
post-processor would add.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import InputError, one_line

# Files that define a tokenizer in an HF directory; hashed for the build fingerprint
# (a model directory also holds weights, which must not be read for this).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


class TextTokenizer:
    """Encodes batches of documents to uint32 id arrays; `eos_id` ends every document."""

    def __init__(self, path: str):
        self.path = str(path)
        p = Path(path)
        if p.is_file() and p.suffix == ".model":
            self.kind = "sentencepiece"
            self._load_sentencepiece(p)
        elif p.is_dir():
            self.kind = "hf"
            self._load_hf(p)
        elif p.exists():
            raise InputError(self.path, 0, "not a tokenizer: expected an HF tokenizer directory or a "
                                           "SentencePiece .model file")
        else:
            raise InputError(self.path, 0, "no such tokenizer (expected an HF tokenizer directory or a "
                                           "SentencePiece .model file)")

    def _load_sentencepiece(self, p: Path) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(p))
        except Exception as e:
            raise InputError(self.path, 0, f"cannot load SentencePiece model: {one_line(e)}") from e
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise InputError(self.path, 0, "the SentencePiece model has no EOS piece (train it with eos_id >= 0)")
        self.vocab_size = int(self._sp.get_piece_size())

    def _load_hf(self, p: Path) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()   # no "sequence longer than model_max_length" warnings per document
        try:
            self._hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise InputError(self.path, 0, f"cannot load an HF tokenizer from this directory: {one_line(e)}") from e
        if self._hf.eos_token_id is None:
            raise InputError(self.path, 0, "the tokenizer has no eos_token; set one in tokenizer_config.json")
        self.eos_id = int(self._hf.eos_token_id)
        self.vocab_size = len(self._hf)
        self._backend = getattr(self._hf, "backend_tokenizer", None) if self._hf.is_fast else None
        if self._backend is not None:
            # A tokenizer.json may carry truncation/padding settings; documents must be encoded whole.
            self._backend.no_truncation()
            self._backend.no_padding()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text followed by EOS, as uint32 arrays."""
        if self.kind == "sentencepiece":
            ids = self._sp.encode(texts)
        elif self._backend is not None:
            # The _fast variant skips character offsets, which packing never reads (~9% faster).
            ids = [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            ids = [self._hf.encode(t, add_special_tokens=False) for t in texts]
        out = []
        for seq in ids:
            a = np.empty(len(seq) + 1, dtype=np.uint32)
            a[:-1] = seq
            a[-1] = self.eos_id
            out.append(a)
        return out

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def fingerprint(self) -> str:
        """sha256 of the files that define the tokenizer (not the whole directory)."""
        h = hashlib.sha256()
        p = Path(self.path)
        files = [p] if p.is_file() else [p / n for n in TOKENIZER_FILES if (p / n).is_file()]
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


def tokenizers_env() -> None:
    """Worker processes tokenize one batch at a time; HF's own thread pool would oversubscribe."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
