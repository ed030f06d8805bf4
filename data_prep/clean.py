"""Text clean-up, paragraph dedup and the language filter: which text reaches the tokenizer.

- `normalize` makes equal-looking text byte-equal (Unicode NFC, one kind of
  newline and of space, no trailing blanks, no control characters) but keeps
  indentation and blank-line runs, so code stays code.
- Paragraphs are the runs of text between blank lines. `ParagraphDedup` drops
  a paragraph whose exact text was already seen in the same block (see
  sources.py for why the scope is the block), as the neutral-residues paper
  did for its corpora. Paragraphs shorter than `min_chars` are never dropped:
  a lone `return x` or `Thanks!` is not a duplicate document.
- `LangFilter` keeps a document when py3langid (model shipped in the wheel,
  works offline) gives the expected language a probability >= threshold.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Optional

# Control characters except tab and newline; they carry no text and break tokenizers' byte counts.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Unicode spaces other than the ASCII one (NBSP, narrow NBSP, em space, ...).
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_PARAGRAPH_BREAK = re.compile(r"(\n{2,})")


def normalize(text: str) -> str:
    """NFC, \\r\\n and \\r -> \\n, exotic spaces -> ' ', no control chars, no trailing blanks, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _SPACES.sub(" ", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text)
    return text.strip()


def split_paragraphs(text: str) -> tuple[list[str], list[str]]:
    """text == p[0] + s[0] + p[1] + ... + p[-1]; s[i] are the blank-line runs between paragraphs."""
    parts = _PARAGRAPH_BREAK.split(text)
    return parts[0::2], parts[1::2]


def paragraph_hash(paragraph: str) -> int:
    """64-bit content hash; stable across processes and runs (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(paragraph.encode("utf-8"), digest_size=8).digest(), "little")


def val_hash(text: str, seed: int) -> float:
    """Uniform in [0, 1) from (seed, document text): the val split is by content, so it does not
    depend on file names, order or sharding, and identical documents land in the same split."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()[:64])
    return int.from_bytes(h.digest(), "little") / 2.0 ** 64


class ParagraphDedup:
    """Exact paragraph dedup within one block. Not thread-safe; one per block, fed in order."""

    def __init__(self, min_chars: int):
        self.min_chars = min_chars
        self.seen: set[int] = set()

    def apply(self, paragraphs: list[str], seps: list[str], hashes: list[Optional[int]]):
        """Returns (text without repeated paragraphs, paragraphs removed, hashes kept).

        hashes[i] is None for paragraphs too short to dedup. The separator before a
        removed paragraph goes with it, so text is unchanged when nothing is removed."""
        out, removed, kept_hashes = [], 0, []
        for i, (p, h) in enumerate(zip(paragraphs, hashes)):
            if h is not None:
                if h in self.seen:
                    removed += 1
                    continue
                self.seen.add(h)
                kept_hashes.append(h)
            if out:
                out.append(seps[i - 1])
            out.append(p)
        return "".join(out), removed, kept_hashes


class LangFilter:
    """Keeps documents whose probability of being `lang` is >= threshold."""

    def __init__(self, lang: str, threshold: float):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if lang not in self.identifier.labels:
            from .errors import ConfigError

            raise ConfigError(f"--lang: unknown language code {lang!r} (py3langid knows "
                              f"{len(self.identifier.labels)} ISO 639-1 codes, e.g. en, fr, de)")
        self.lang, self.threshold = lang, threshold

    def prob(self, text: str) -> float:
        return dict(self.identifier.rank(text)).get(self.lang, 0.0)

    def keep(self, text: str) -> bool:
        return self.prob(text) >= self.threshold
