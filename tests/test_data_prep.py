"""data_prep: round trips, sharded == unsharded, conservation of tokens and bytes, dedup and filters.

The expected output is computed here independently of data_prep's pipeline:
the test knows which documents each input file holds, tokenizes them with
`AutoTokenizer`, and packs them by hand. Only the block boundaries come from
`plan_blocks` (which has its own test below).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

from data_prep.build import BuildConfig, build
from data_prep.clean import normalize
from data_prep.merge import merge
from data_prep.pack import Packer
from data_prep.readers import read_docs
from data_prep.sources import ReadOptions, plan_blocks, resolve_inputs, shard_blocks
from data_prep.stats import read_json
from data_prep.train_tokenizer import train_tokenizer

WORDS = ("alpha beta gamma delta river stone light paper green quiet table ocean winter garden music "
         "letter orange silver window market bridge cloud forest").split()
UNICODE = ["café", "naïve", "Straße", "日本語", "🙂", "ﬁ", "Ωmega"]


def make_docs(n: int, seed: int = 0, tag: str = "Doc") -> list[str]:
    """Normalized documents (normalize() leaves them unchanged) with unique paragraphs."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        paras = []
        for p in range(rng.randint(1, 3)):
            sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(1, 3))]
            paras.append(f"{tag} {i} part {p}: " + ". ".join(sents) + ".")
        if i % 4 == 1:
            paras.append(f"def f_{i}(x):\n    return x + {i}")
        if i % 3 == 2:
            paras[0] += " " + UNICODE[i % len(UNICODE)]
        docs.append("\n\n".join(paras))
    return docs


def write_jsonl(path: Path, docs: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}, ensure_ascii=i % 2 == 0) + "\n")
    return path


def write_zst(path: Path, docs: list[str]) -> Path:
    import zstandard

    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One directory with every local format; `files` maps each file to its documents, in read order."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(44, seed=1)
    (root / "txt").mkdir()
    files = {
        write_jsonl(root / "a.jsonl", docs[0:12]): docs[0:12],
        write_jsonl(root / "b.jsonl.gz", docs[12:20], opener=gzip.open): docs[12:20],
        write_zst(root / "c.jsonl.zst", docs[20:28]): docs[20:28],
        write_parquet(root / "d.parquet", docs[28:40], row_group_size=4): docs[28:40],
    }
    for i, d in enumerate(docs[40:44]):
        p = root / "txt" / f"e{i}.txt"
        p.write_text(d + "\n", encoding="utf-8")
        files[p] = [d]
    return {"root": root, "docs": docs, "files": {str(k.resolve()): v for k, v in files.items()}}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(corpus["root"])], str(out), vocab_size=400, min_frequency=2)
    return out


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


_READ = {"n": 0}


def read_mds(path: Path) -> list[dict]:
    """All samples of an MDS dir in index order, read the way the trainer reads a stream."""
    from streaming import Stream, StreamingDataset

    from trainer.engine.shm import clean_stale_shm, registering

    clean_stale_shm()
    with registering():
        ds = StreamingDataset(streams=[Stream(local=str(path))], batch_size=1, shuffle=False, num_canonical_nodes=1)
    samples = [ds[i] for i in range(ds.num_samples)]
    del ds
    return samples


def tree_bytes(root: Path) -> dict:
    """relative path -> sha256 of every file under root (to compare two outputs byte for byte)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def piece_docs(piece, files: dict) -> list[str]:
    """The documents of one piece, worked out from what the test wrote (not with data_prep's readers)."""
    src = piece.source
    docs = files[src.path]
    if src.kind == "jsonl":
        starts, pos = [], 0
        for line in Path(src.path).read_bytes().splitlines(keepends=True):
            starts.append(pos)
            pos += len(line)
        return [d for d, s in zip(docs, starts) if piece.start <= s < piece.stop]
    if src.kind == "parquet":
        return docs[piece.start * 4:piece.stop * 4]
    return docs   # compressed or one-document .txt: the whole file


def expected_samples(blocks, files, tok, seq_len: int):
    """Per block: its documents, and its samples (token stream cut to whole samples)."""
    out = []
    for block in blocks:
        docs = [d for piece in block.pieces for d in piece_docs(piece, files)]
        stream = [t for d in docs for t in encode(tok, d)]
        n = len(stream) // seq_len
        out.append((docs, [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)], stream[n * seq_len:]))
    return out


def decoded_docs(tok, ids: list[int]) -> list[str]:
    """Split a token stream at EOS and decode each piece."""
    docs, cur = [], []
    for t in ids:
        if t == tok.eos_token_id:
            docs.append(tok.decode(cur, clean_up_tokenization_spaces=False))
            cur = []
        else:
            cur.append(t)
    docs.append(tok.decode(cur, clean_up_tokenization_spaces=False))
    return docs


# ---------------------------------------------------------------- tokenizer

def test_train_tokenizer_saves_loadable_hf_dir_that_round_trips(tmp_path, corpus, tok_dir, hf_tok):
    assert (tok_dir / "tokenizer.json").is_file()
    ids = {hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert len(hf_tok) == 400
    text = "Straße café 🙂\n\n    indented = {'x': 1}\n\ttab  two  spaces"
    assert hf_tok.decode(hf_tok.encode(text, add_special_tokens=False)) == text
    # Same inputs, same tokenizer, byte for byte.
    again = tmp_path / "again"
    r = train_tokenizer([str(corpus["root"])], str(again), vocab_size=400, min_frequency=2)
    assert r["used"] == len(corpus["docs"]) and r["skipped"] == 0
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------- planning

def test_blocks_split_files_without_losing_or_repeating_lines(tmp_path):
    docs = make_docs(60, seed=5)
    path = write_jsonl(tmp_path / "big.jsonl", docs)
    opts = ReadOptions()
    size = path.stat().st_size
    for block_bytes in (1, 97, 500, size // 3, size, 10 * size):
        blocks = plan_blocks(resolve_inputs([str(path)]), opts, block_bytes)
        assert all(b.size >= block_bytes for b in blocks[:-1])
        got = [item[0] for item in read_docs([p for b in blocks for p in b.pieces], opts)]
        assert got == docs, block_bytes
        lines = [item[2] for item in read_docs([p for b in blocks for p in b.pieces], opts)]
        assert lines == list(range(1, 61))
    # Shards take contiguous, disjoint ranges that cover every block, for any K.
    for n in (0, 1, 7, 40):
        for k in (1, 2, 3, 8):
            ranges = [shard_blocks(n, k, i) for i in range(k)]
            assert [b for r in ranges for b in r] == list(range(n))


# ---------------------------------------------------------------- round trips

def test_round_trip_unsharded_all_formats(tmp_path, corpus, tok_dir, hf_tok):
    seq_len = 32
    r = build(inputs=[str(corpus["root"])], domain="en", tokenizer=str(tok_dir), seq_len=seq_len,
              out=str(tmp_path / "out"), min_chars=1)
    st = r.splits["train"]
    assert st["input"]["blocks"] == 1 and st["input"]["docs_read"] == 44 and st["input"]["docs_kept"] == 44
    samples = read_mds(tmp_path / "out" / "train")
    assert len(samples) == st["samples"] > 0
    for s in samples:
        assert s["input_ids"].dtype == np.uint32 and s["input_ids"].shape == (seq_len,)
        assert s["domain"] == "en" and isinstance(s["num_bytes"], int)
    ids = np.concatenate([s["input_ids"] for s in samples]).tolist()

    docs = corpus["docs"]
    stream = [t for d in docs for t in encode(hf_tok, d)]
    assert ids == stream[:len(ids)]
    assert st["tokens"] == len(stream) and st["tail_tokens_discarded"] == len(stream) - len(ids) < seq_len
    got = decoded_docs(hf_tok, ids)
    assert got[:-1] == docs[:len(got) - 1]             # every complete document, in input order
    assert docs[len(got) - 1].startswith(got[-1])       # then the start of the one cut by the tail
    total_bytes = sum(len(d.encode()) for d in docs)
    assert st["doc_bytes"] == total_bytes
    assert sum(s["num_bytes"] for s in samples) == st["num_bytes"] == total_bytes - st["tail_bytes_discarded"]


def test_sharded_build_and_merge_equal_unsharded(tmp_path, corpus, tok_dir, hf_tok):
    seq_len, block_bytes = 16, 700
    common = dict(inputs=[str(corpus["root"])], domain="en", tokenizer=str(tok_dir), seq_len=seq_len,
                  min_chars=1, block_bytes=block_bytes, val_fraction=0.25, seed=3)
    one = build(out=str(tmp_path / "one"), **common)
    for i in range(3):
        r = build(out=str(tmp_path / "sharded"), num_shards=3, shard_index=i, **common)
        assert r.paths["train"] == tmp_path / "sharded" / "train" / f"shard-{i:05d}"
    assert not (tmp_path / "sharded" / "train" / "index.json").exists()   # not readable before merge
    merged = merge(str(tmp_path / "sharded"))

    for split in ("train", "val"):
        a, b = one.splits[split], merged[split]
        assert b["tasks"] == 3 and a["tasks"] == 1
        assert {k: v for k, v in a.items() if k != "tasks"} == {k: v for k, v in b.items() if k != "tasks"}
        assert read_json(tmp_path / "sharded" / split / "stats.json") == b

    one_train, sh_train = read_mds(tmp_path / "one" / "train"), read_mds(tmp_path / "sharded" / "train")
    one_val, sh_val = read_mds(tmp_path / "one" / "val"), read_mds(tmp_path / "sharded" / "val")

    def key(s):
        return s["input_ids"].tobytes(), s["domain"], s["num_bytes"]

    for x, y in ((one_train, sh_train), (one_val, sh_val)):
        assert len(x) == len(y) > 0
        assert sorted(map(key, x)) == sorted(map(key, y))      # the same multiset ...
        assert list(map(key, x)) == list(map(key, y))          # ... even in the same order

    # Tokens and bytes are conserved over both splits: nothing lost, nothing doubled.
    blocks = plan_blocks(resolve_inputs([str(corpus["root"])]), ReadOptions(), block_bytes)
    assert len(blocks) >= 6 and merged["train"]["input"]["blocks"] == len(blocks)
    all_docs = [d for docs, _, _ in expected_samples(blocks, corpus["files"], hf_tok, seq_len) for d in docs]
    assert all_docs == corpus["docs"]
    tr, va = merged["train"], merged["val"]
    assert tr["docs"] + va["docs"] == 44 and tr["docs"] > va["docs"] > 0
    assert tr["tokens"] + va["tokens"] == sum(len(encode(hf_tok, d)) for d in all_docs)
    assert tr["doc_bytes"] + va["doc_bytes"] == sum(len(d.encode()) for d in all_docs)
    for st, samples in ((tr, sh_train), (va, sh_val)):
        assert st["samples"] == len(samples) and st["sample_tokens"] == len(samples) * seq_len
        assert st["sample_tokens"] == st["tokens"] - st["tail_tokens_discarded"]
        assert sum(s["num_bytes"] for s in samples) == st["num_bytes"] == st["doc_bytes"] - st["tail_bytes_discarded"]


def test_sharded_round_trip_in_order_block_by_block(tmp_path, corpus, tok_dir, hf_tok):
    """K=3 + merge, read back: the exact samples of the hand-packed blocks, in input order."""
    seq_len, block_bytes = 16, 700
    for i in range(3):
        build(inputs=[str(corpus["root"])], domain="en", tokenizer=str(tok_dir), seq_len=seq_len, min_chars=1,
              block_bytes=block_bytes, out=str(tmp_path / "o"), num_shards=3, shard_index=i)
    merged = merge(str(tmp_path / "o"))["train"]
    blocks = plan_blocks(resolve_inputs([str(corpus["root"])]), ReadOptions(), block_bytes)
    exp = expected_samples(blocks, corpus["files"], hf_tok, seq_len)
    got = [s["input_ids"].tolist() for s in read_mds(tmp_path / "o" / "train")]
    assert got == [s for _, samples, _ in exp for s in samples]
    assert merged["tail_tokens_discarded"] == sum(len(tail) for _, _, tail in exp)
    # Round trip per block: its documents in order, the last one cut by the block's tail.
    pos = 0
    for docs, samples, tail in exp:
        ids = [t for s in got[pos:pos + len(samples)] for t in s]
        pos += len(samples)
        text = decoded_docs(hf_tok, ids)
        complete = text[:-1]
        assert complete == docs[:len(complete)]
        assert tail or text[-1] == ""
        if text[-1]:
            assert docs[len(complete)].startswith(text[-1])
    assert pos == len(got)


# ---------------------------------------------------------------- determinism, workers, reruns

def test_workers_and_reruns_give_identical_bytes(tmp_path, corpus, tok_dir):
    common = dict(inputs=[str(corpus["root"])], domain="en", tokenizer=str(tok_dir), seq_len=24,
                  min_chars=1, block_bytes=900, val_fraction=0.3, seed=7, lang="en", lang_threshold=0.0)
    a = build(out=str(tmp_path / "w1"), workers=1, **common)
    b = build(out=str(tmp_path / "w2"), workers=2, **common)
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2")
    assert a.splits == b.splits
    # Re-running a finished build does nothing and touches nothing.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "w1").rglob("*")}
    again = build(out=str(tmp_path / "w1"), workers=1, **common)
    assert again.skipped_existing and again.splits == a.splits
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "w1").rglob("*")}
    # The seed moves documents between train and val; it does not change what is kept.
    c = build(out=str(tmp_path / "seed8"), workers=1, **{**common, "seed": 8})
    shard = Path("val") / "shard.00000.mds"
    assert (tmp_path / "seed8" / shard).read_bytes() != (tmp_path / "w1" / shard).read_bytes()
    assert c.splits["train"]["input"] == a.splits["train"]["input"]


# ---------------------------------------------------------------- dedup and filters

def test_paragraph_dedup_within_blocks_and_counted_across(tmp_path, tok_dir, hf_tok):
    p1 = "The first paragraph is long enough to be deduplicated."
    p2 = "A second paragraph, also comfortably above twenty characters."
    p3 = "Third paragraph appears once in this block and that is fine."
    p4 = "Fourth paragraph: kept, it is new."
    docs = [
        f"{p1}\n\n{p2}\n\nShort.",                 # all new
        f"{p2}\n\n\n{p3}",                          # p2 repeated -> only p3 remains
        f"{p1}\n\n{p2}",                            # everything repeated -> document dropped
        f"Short.\n\n{p4}",                          # 'Short.' is under --dedup-min-chars: kept
    ]
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "b.jsonl", [f"{p3}\n\nA fifth paragraph, new in this other file."])
    size_a = (tmp_path / "a.jsonl").stat().st_size
    common = dict(domain="en", tokenizer=str(tok_dir), seq_len=8, min_chars=1, dedup_min_chars=20,
                  block_bytes=size_a)    # a.jsonl is one block, b.jsonl another
    r = build(inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], out=str(tmp_path / "o"), **common)
    inp = r.splits["train"]["input"]
    assert inp["blocks"] == 2
    assert inp["paragraphs"] == 3 + 2 + 2 + 2 + 2
    assert inp["paragraphs_deduplicated"] == 1 + 2
    assert inp["dropped"]["duplicate"] == 1 and inp["docs_kept"] == 4
    # p3 is in both blocks: kept twice (dedup does not cross blocks), and counted.
    assert inp["cross_block_duplicate_paragraphs"] == 1
    kept = [docs[0], p3, docs[3], f"{p3}\n\nA fifth paragraph, new in this other file."]
    assert r.splits["train"]["doc_bytes"] == sum(len(d.encode()) for d in kept)
    assert r.splits["train"]["tokens"] == sum(len(encode(hf_tok, d)) for d in kept)
    # Sharded (one block per shard) + merge counts the same cross-block repeat.
    for i in range(2):
        build(inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], out=str(tmp_path / "s"),
              num_shards=2, shard_index=i, **common)
    assert merge(str(tmp_path / "s"))["train"]["input"] == inp
    # --no-dedup keeps everything.
    r = build(inputs=[str(tmp_path / "a.jsonl")], out=str(tmp_path / "nodedup"), dedup=False, **common)
    assert r.splits["train"]["input"]["paragraphs_deduplicated"] == 0
    assert r.splits["train"]["doc_bytes"] == sum(len(d.encode()) for d in docs)


def test_normalize_keeps_code_and_fixes_whitespace_and_unicode():
    assert normalize("  cafe\u0301\r\nx\u00a0y\u202fz  \r\n\x00\x07end\x0c  ") == "café\nx y z\nend"
    code = "def f():\n    if x:\n\treturn 1\n\n\n\nclass A:\n    pass"
    assert normalize(code) == code
    assert normalize("para one   \n   \n\npara two") == "para one\n\n\npara two"


def test_length_and_language_filters_with_counts(tmp_path, tok_dir):
    en = ("The committee met on Tuesday to discuss the budget for next year. Several members argued that "
          "the school needs more teachers, while others wanted to repair the old library first.")
    fr = ("Le comité s'est réuni mardi pour discuter du budget de l'année prochaine. Plusieurs membres ont "
          "affirmé que l'école avait besoin de plus d'enseignants, tandis que d'autres voulaient d'abord "
          "rénover la vieille bibliothèque.")
    docs = [en, fr, "   \n\t  ", "tiny", en.replace("Tuesday", "Friday"), "\u00a0\r\n"]
    write_jsonl(tmp_path / "mixed.jsonl", docs)
    common = dict(inputs=[str(tmp_path / "mixed.jsonl")], tokenizer=str(tok_dir), seq_len=4, min_chars=10)
    r = build(domain="en", out=str(tmp_path / "en"), lang="en", lang_threshold=0.5, **common)
    inp = r.splits["train"]["input"]
    assert inp["docs_read"] == 6 and inp["docs_kept"] == 2
    assert inp["dropped"] == {"empty": 2, "too_short": 1, "lang": 1, "duplicate": 0}
    assert r.splits["train"]["doc_bytes"] == len(en.encode()) + len(en.replace("Tuesday", "Friday").encode())
    r = build(domain="fr", out=str(tmp_path / "fr"), lang="fr", **common)
    assert r.splits["train"]["input"]["dropped"]["lang"] == 2 and r.splits["train"]["docs"] == 1
    assert r.splits["train"]["doc_bytes"] == len(fr.encode())
    from data_prep.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown language"):
        build(domain="x", out=str(tmp_path / "x"), lang="xx-not-a-language", **common)


def test_max_docs_and_max_tokens(tmp_path, corpus, tok_dir, hf_tok):
    common = dict(inputs=[str(corpus["root"] / "a.jsonl")], domain="en", tokenizer=str(tok_dir), seq_len=8,
                  min_chars=1)
    r = build(out=str(tmp_path / "d"), max_docs=5, **common)
    assert r.splits["train"]["input"]["docs_read"] == 5 and r.splits["train"]["docs"] == 5
    lengths = [len(encode(hf_tok, d)) for d in corpus["docs"][:12]]
    limit = sum(lengths[:3]) + 1           # reached inside the 4th document, which is kept whole
    for workers in (1, 2):
        r = build(out=str(tmp_path / f"t{workers}"), max_tokens=limit, workers=workers, **common)
        assert r.splits["train"]["docs"] == 4 and r.splits["train"]["tokens"] == sum(lengths[:4])
    assert tree_bytes(tmp_path / "t1") == tree_bytes(tmp_path / "t2")


def test_packer_splits_bytes_proportionally_and_exactly():
    p = Packer(4)
    out = list(p.add(np.arange(10, dtype=np.uint32), 100))       # 10 tokens, 100 bytes
    assert [s.tolist() for s, _ in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [b for _, b in out] == [40, 40]
    out = list(p.add(np.arange(3, dtype=np.uint32) + 50, 7))    # 2 left + 3 new = 5 -> one sample
    assert out[0][0].tolist() == [8, 9, 50, 51] and out[0][1] == 20 + 7 * 2 // 3
    assert p.finish() == (1, 7 - 7 * 2 // 3)
    # Random documents: samples + tail always account for every token and byte.
    rng = np.random.default_rng(0)
    p, total_t, total_b, got_t, got_b = Packer(37), 0, 0, 0, 0
    for _ in range(200):
        n, b = int(rng.integers(1, 120)), int(rng.integers(0, 500))
        total_t, total_b = total_t + n, total_b + b
        for s, sb in p.add(np.zeros(n, np.uint32), b):
            assert len(s) == 37 and sb >= 0
            got_t, got_b = got_t + len(s), got_b + sb
    tail_t, tail_b = p.finish()
    assert (got_t + tail_t, got_b + tail_b) == (total_t, total_b)


# ---------------------------------------------------------------- other tokenizers and inputs

def test_sentencepiece_model_file(tmp_path, corpus):
    import sentencepiece as spm

    f = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus["docs"]), model_writer=f, vocab_size=500, model_type="bpe",
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        byte_fallback=True, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(f.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    docs = corpus["docs"][:12]
    r = build(inputs=[str(corpus["root"] / "a.jsonl")], domain="en", tokenizer=str(tmp_path / "sp.model"),
              seq_len=16, out=str(tmp_path / "o"), min_chars=1)
    ids = np.concatenate([s["input_ids"] for s in read_mds(tmp_path / "o" / "train")]).tolist()
    stream = [t for d in docs for t in sp.encode(d) + [sp.eos_id()]]
    assert ids == stream[:len(ids)] and r.splits["train"]["tokens"] == len(stream)
    first = ids[:ids.index(sp.eos_id())]
    assert sp.decode(first) == docs[0]


def test_datasets_inputs_saved_and_streamed(tmp_path, corpus, tok_dir):
    import datasets

    docs = corpus["docs"][:20]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl" / "part0.jsonl", docs[:10])
    write_jsonl(tmp_path / "jsonl" / "part1.jsonl", docs[10:])
    common = dict(domain="en", tokenizer=str(tok_dir), seq_len=8, min_chars=1, block_bytes=1500)
    ref = build(inputs=[str(tmp_path / "jsonl")], out=str(tmp_path / "ref"), block_bytes=1 << 30,
                **{k: v for k, v in common.items() if k != "block_bytes"})
    saved = build(inputs=[str(tmp_path / "saved")], out=str(tmp_path / "o1"), **common)
    streamed = build(inputs=[f"hf:{tmp_path / 'jsonl'}"], streaming=True, out=str(tmp_path / "o2"), **common)
    for r in (saved, streamed):
        st = r.splits["train"]
        assert st["input"]["docs_read"] == 20 and st["doc_bytes"] == ref.splits["train"]["doc_bytes"]
        assert st["tokens"] == ref.splits["train"]["tokens"]
    assert saved.splits["train"]["input"]["blocks"] > 1


def test_val_split_by_document_and_readable_by_local_dataset(tmp_path, corpus, tok_dir, hf_tok):
    """Each document goes whole to train or to val. The trainer reads held-out sets with
    LocalDataset, which cannot decompress, so val is written uncompressed."""
    from streaming import LocalDataset

    r = build(inputs=[str(corpus["root"])], domain="en", tokenizer=str(tok_dir), seq_len=16, min_chars=1,
              out=str(tmp_path / "o"), val_fraction=0.3)
    ds = LocalDataset(local=str(tmp_path / "o" / "val"))
    val = [ds[i] for i in range(len(ds))]
    assert len(val) == r.splits["val"]["samples"] > 0
    assert val[0]["input_ids"].shape == (16,) and val[0]["domain"] == "en"
    assert sum(s["num_bytes"] for s in val) == r.splits["val"]["num_bytes"]
    train = read_mds(tmp_path / "o" / "train")
    docs = corpus["docs"]
    splits = {}
    for name, samples in (("train", train), ("val", val)):
        got = decoded_docs(hf_tok, np.concatenate([s["input_ids"] for s in samples]).tolist())
        complete = [docs.index(d) for d in got[:-1]]
        assert complete == sorted(complete)                          # input order within a split
        cut = [i for i, d in enumerate(docs) if got[-1] and d.startswith(got[-1]) and i not in complete]
        splits[name] = set(complete) | set(cut[:1])
        assert len(splits[name]) == r.splits[name]["docs"]
    assert splits["train"] | splits["val"] == set(range(len(docs)))
    assert not splits["train"] & splits["val"]
    assert 0.1 < len(splits["val"]) / len(docs) < 0.5


def test_config_is_validated():
    from data_prep.errors import ConfigError

    base = dict(inputs=["x"], domain="en", tokenizer="t", seq_len=8, out="o")
    for bad in ({"seq_len": 0}, {"val_fraction": 1.0}, {"domain": "a b"}, {"num_shards": 2},
                {"num_shards": 2, "shard_index": 2}, {"compression": "lzma9"}, {"workers": 0}):
        with pytest.raises(ConfigError):
            BuildConfig(**{**base, **bad})
