"""Offline data preparation: raw text -> tokenized, packed, domain-tagged MDS shards.

Run it as `python -m data_prep build | merge | train-tokenizer` (see --help),
or call `data_prep.build.build`, `data_prep.merge.merge` and
`data_prep.train_tokenizer.train_tokenizer`. A sample's way through, one file each:

    sources.py   inputs -> blocks (the unit of sharding, dedup and packing)
    readers.py   a block's pieces -> documents, bad records located by file:line
    clean.py     normalize, paragraph dedup, language filter
    tokenizer.py HF directory or SentencePiece .model -> ids + EOS
    pack.py      documents -> seq_len samples with exact num_bytes
    pipeline.py  the parallel stages, kept in input order
    build.py     one task: all of the above -> MDSWriter, stats.json
    layout.py    output paths, staging and atomic publish, done markers
    merge.py     K shard dirs -> one index per split
"""
