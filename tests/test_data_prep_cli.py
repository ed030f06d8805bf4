"""data_prep from the command line: one-line errors on bad input, --on-error skip counts,
merge checks, SLURM defaults, and a build killed by a signal then re-run.

Most runs call `data_prep.__main__.main(argv)` in-process (the CLI is that
function); real subprocesses are used where the process boundary is the point:
the exit status and stderr of `python -m data_prep`, and killing a build.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main, shard_from_env
from data_prep.build import build
from data_prep.stats import read_json
from data_prep.train_tokenizer import train_tokenizer
from test_data_prep import decoded_docs, make_docs, read_mds, tree_bytes, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"^error: (?P<where>.+):(?P<line>\d+): (?P<reason>.+)$")


@pytest.fixture(scope="module")
def docs():
    return make_docs(30, seed=11, tag="Item")


@pytest.fixture(scope="module")
def tok(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("cli_tok")
    write_jsonl(root / "t.jsonl", docs)
    train_tokenizer([str(root / "t.jsonl")], str(root / "tok"), vocab_size=300)
    return root / "tok"


def run_main(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def build_args(inputs, out, tok, *extra):
    return ["build", "--input", *inputs, "--domain", "en", "--tokenizer", tok, "--seq-len", 8, "--out", out,
            "--min-chars", 1, *extra]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def assert_one_error_line(err: str, where: str, line: int, reason: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = ERROR_LINE.match(lines[0])
    assert m, lines[0]
    assert m["where"] == where and int(m["line"]) == line, lines[0]
    assert re.search(reason, m["reason"]), lines[0]


def assert_nothing_published(out: Path) -> None:
    assert not (out / "train").exists() and not (out / "val").exists()
    assert not (out / ".staging").exists()


# ---------------------------------------------------------------- bad records

GOOD = json.dumps({"text": "A perfectly good document about rivers and stones."}).encode()
BAD_RECORDS = {
    # name: (lines of the file, 1-based line of the bad record, message pattern, stats.json reason)
    "malformed JSON": ([GOOD, GOOD, b'{"text": "unterminated', GOOD], 3, r"malformed JSON", "bad_json"),
    "not an object": ([GOOD, b'["text", "a list"]'], 2, r"expected a JSON object", "bad_json"),
    "missing field": ([GOOD, b'{"body": "no text field here"}'], 2, r'no "text" field \(keys: body\)',
                      "missing_field"),
    "null field": ([b'{"text": null}'], 1, r'"text" is null', "missing_field"),
    "non-string field": ([GOOD, GOOD, b'{"text": 42}'], 3, r"is int, not a string", "bad_type"),
    "undecodable bytes": ([GOOD, GOOD, GOOD, b'{"text": "caf\xe9 au lait"}'], 4, r"invalid UTF-8", "bad_utf8"),
    "lone surrogate": ([GOOD, b'{"text": "broken \\ud800 pair"}'], 2, r"lone surrogate", "bad_utf8"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_record_fails_with_file_and_line(tmp_path, capsys, tok, name):
    lines, bad_line, pattern, _ = BAD_RECORDS[name]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rc, out, err = run_main(capsys, *build_args([path], tmp_path / "out", tok))
    assert rc == 1 and out == ""
    assert_one_error_line(err, str(path.resolve()), bad_line, pattern)
    assert_nothing_published(tmp_path / "out")
    # Fixing the input and running again just works (the failed attempt published nothing).
    if len(lines) == 1:
        return
    path.write_bytes(b"\n".join(line for i, line in enumerate(lines, 1) if i != bad_line) + b"\n")
    rc, out, err = run_main(capsys, *build_args([path], tmp_path / "out", tok))
    assert rc == 0 and f"{len(lines) - 1} docs read" in out, err


def test_on_error_skip_counts_every_bad_record(tmp_path, capsys, tok, docs):
    good = docs[:6]
    bad = [records[n - 1] for records, n, *_ in BAD_RECORDS.values()]    # one of each kind, 7 in all
    lines = []
    for d, b in zip(good, bad):
        lines += [json.dumps({"text": d}).encode(), b]
    lines.append(bad[6])
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rc, out, err = run_main(capsys, *build_args([tmp_path / "in.jsonl"], tmp_path / "out", tok, "--on-error", "skip"))
    assert rc == 0, err
    warnings = [w for w in err.splitlines() if w.startswith("warning:")]
    assert len(warnings) == 7 and all(w.endswith("(skipped)") for w in warnings)
    stats = read_json(tmp_path / "out" / "train" / "stats.json")
    assert stats["input"]["skipped"] == {"bad_json": 2, "missing_field": 2, "bad_type": 1, "bad_utf8": 2}
    assert stats["input"]["docs_read"] == stats["input"]["docs_kept"] == 6
    assert "6 docs read" in out and "7 skipped" in out
    # Only the good documents reach the output, and no replacement characters.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok))
    ids = np.concatenate([s["input_ids"] for s in read_mds(tmp_path / "out" / "train")]).tolist()
    text = decoded_docs(hf, ids)
    assert text[:-1] == good[:len(text) - 1] and "\ufffd" not in "".join(text)


def test_bad_txt_gz_and_parquet_inputs(tmp_path, capsys, tok, docs):
    txt = tmp_path / "doc.txt"
    txt.write_bytes(b"first line\nsecond line\nthird \xff line\n")
    rc, _, err = run_main(capsys, *build_args([txt], tmp_path / "o1", tok))
    assert rc == 1
    assert_one_error_line(err, str(txt.resolve()), 3, r"invalid UTF-8 at byte 6")

    import zstandard

    raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)
    for suffix, data in (("gz", gzip.compress(raw)), ("zst", zstandard.ZstdCompressor().compress(raw))):
        cut = tmp_path / f"cut.jsonl.{suffix}"
        cut.write_bytes(data[:len(data) // 2])                # a download cut in half
        rc, _, err = run_main(capsys, *build_args([cut], tmp_path / "o2", tok))
        assert rc == 1 and f"cannot read jsonl.{suffix} data" in err and len(err.strip().splitlines()) == 1
        assert ERROR_LINE.match(err.strip()) and str(cut.resolve()) in err
        assert_nothing_published(tmp_path / "o2")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": docs[:5]}), pqf)
    rc, _, err = run_main(capsys, *build_args([pqf], tmp_path / "o3", tok))
    assert rc == 1
    assert_one_error_line(err, str(pqf.resolve()), 0, r'no column "text" \(columns: content\)')
    rc, _, err = run_main(capsys, *build_args([pqf], tmp_path / "o4", tok, "--on-error", "skip"))
    assert rc == 1 and err.strip().endswith("the input set holds no documents (5 bad records skipped)")
    pq.write_table(pa.table({"text": docs[5:8]}), tmp_path / "u.parquet")
    rc, _, err = run_main(capsys, *build_args([pqf, tmp_path / "u.parquet"], tmp_path / "o4", tok,
                                              "--on-error", "skip"))
    assert rc == 0
    inp = read_json(tmp_path / "o4" / "train" / "stats.json")["input"]
    assert inp["skipped"]["missing_field"] == 5 and inp["docs_kept"] == 3
    rc, _, err = run_main(capsys, *build_args([pqf], tmp_path / "o5", tok, "--text-field", "content"))
    assert rc == 0 and read_json(tmp_path / "o5" / "train" / "stats.json")["input"]["docs_kept"] == 5


# ---------------------------------------------------------------- bad paths

def test_unknown_tokenizer_and_empty_input_sets(tmp_path, capsys, tok, docs):
    good = write_jsonl(tmp_path / "good.jsonl", docs[:3])
    rc, _, err = run_main(capsys, *build_args([good], tmp_path / "o", tmp_path / "no_such_tokenizer"))
    assert rc == 1
    assert_one_error_line(err, str(tmp_path / "no_such_tokenizer"), 0, r"no such tokenizer")
    (tmp_path / "not_a_tok").mkdir()
    rc, _, err = run_main(capsys, *build_args([good], tmp_path / "o", tmp_path / "not_a_tok"))
    assert rc == 1
    assert_one_error_line(err, str(tmp_path / "not_a_tok"), 0, r"cannot load an HF tokenizer")

    pattern = str(tmp_path / "nothing" / "*.jsonl")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cases = [(pattern, r"no input files match"), (str(tmp_path / "empty_dir"), r"holds no input files"),
             (str(tmp_path / "empty.jsonl"), r"input set is empty"),
             (str(tmp_path / "missing.jsonl"), r"no such file"), (str(tmp_path / "x.csv"), r"unsupported")]
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    cases.append((str(tmp_path / "blank.jsonl"), r"holds no documents"))
    for spec, reason in cases:
        rc, _, err = run_main(capsys, *build_args([spec], tmp_path / "o", tok))
        assert rc == 1, spec
        assert_one_error_line(err, spec, 0, reason)
    assert_nothing_published(tmp_path / "o")


def test_bad_options_are_one_line_exit_2(tmp_path, capsys, tok, docs):
    good = write_jsonl(tmp_path / "good.jsonl", docs[:3])
    for extra in (["--val-fraction", "1.5"], ["--num-shards", "2"], ["--compression", "lzma9"]):
        rc, _, err = run_main(capsys, *build_args([good], tmp_path / "o", tok, *extra))
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --"), err
    with pytest.raises(SystemExit) as e:
        main(["build", "--input", str(good)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: the following arguments are required")


@pytest.mark.slow
def test_python_m_data_prep_reports_one_line_without_traceback(tmp_path, tok):
    """The real process: exit status 1 and a single stderr line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD + b"\n" + b"{oops\n")
    proc = subprocess.run([sys.executable, "-m", "data_prep", *map(str, build_args([bad], tmp_path / "o", tok))],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == f"error: {bad.resolve()}:2: malformed JSON: Expecting property name " \
                                  "enclosed in double quotes at column 2"
    help_ = subprocess.run([sys.executable, "-m", "data_prep", "--help"], cwd=ROOT, env=clean_env(),
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "train-tokenizer" in help_.stdout


@pytest.mark.parametrize("command,flags", [
    ("build", ["--input", "--domain", "--tokenizer", "--seq-len", "--out", "--val-fraction", "--seed",
               "--num-shards", "--shard-index", "--workers", "--compression", "--max-docs", "--max-tokens",
               "--lang", "--lang-threshold", "--on-error", "--text-field", "--split", "--streaming"]),
    ("merge", ["OUT"]),
    ("train-tokenizer", ["--input", "--vocab-size", "--out"]),
])
def test_help(capsys, command, flags):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out


def test_shards_default_to_the_slurm_array():
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert shard_from_env(None, None, env) == (4, 2)
    assert shard_from_env(8, 3, env) == (8, 3)                 # explicit flags win
    assert shard_from_env(None, None, {}) == (None, None)      # not an array task: unsharded
    assert shard_from_env(None, None, {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "1"}) == (3, 1)


# ---------------------------------------------------------------- merge and reruns

def test_merge_refuses_incomplete_or_foreign_outputs(tmp_path, capsys, tok, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    rc, _, err = run_main(capsys, "merge", tmp_path / "nothing_here")
    assert rc == 1
    assert_one_error_line(err, str(tmp_path / "nothing_here"), 0, r"no build.json")

    rc, out, _ = run_main(capsys, *build_args([inp], tmp_path / "one", tok, "--block-bytes", 500))
    assert rc == 0 and out.startswith("data_prep build en all:")
    rc, _, err = run_main(capsys, "merge", tmp_path / "one")
    assert rc == 1 and "unsharded build" in err

    sharded = tmp_path / "sharded"
    args = build_args([inp], sharded, tok, "--num-shards", 3, "--block-bytes", 500)
    for i in (0, 2):
        assert run_main(capsys, *args, "--shard-index", i)[0] == 0
    rc, _, err = run_main(capsys, "merge", sharded)
    assert rc == 1
    assert_one_error_line(err, str(sharded / "train" / "shard-00001"), 0, r"1 of 3 shards missing .*index 1\b")
    assert not (sharded / "train" / "index.json").exists()
    assert run_main(capsys, *args, "--shard-index", 1)[0] == 0
    rc, out, _ = run_main(capsys, "merge", sharded)
    assert rc == 0 and "from 3 shards" in out
    merged, one = read_json(sharded / "train" / "stats.json"), read_json(tmp_path / "one" / "train" / "stats.json")
    assert merged["tasks"] == 3 and {**merged, "tasks": 1} == one

    # Same --out, different settings: refused, naming what changed.
    rc, _, err = run_main(capsys, *build_args([inp], tmp_path / "one", tok, "--block-bytes", 500, "--seed", 5,
                                              "--val-fraction", 0.1))
    assert rc == 1
    assert_one_error_line(err, str(tmp_path / "one"), 0, r"different settings \(seed, val_fraction differ\)")


KILLED_AFTER_TWO_BLOCKS = r"""
import pathlib, sys, time
import data_prep.build as build

run_block, finished = build._Task.run_block, []

def run_block_then_wait(self, block):
    run_block(self, block)
    finished.append(block.index)
    if len(finished) == 2:                 # two blocks are in staging: wait here to be killed
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(600)

build._Task.run_block = run_block_then_wait
from data_prep.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def build_killed_midway(argv: list, marker: Path, sig: int) -> list:
    """Runs a build in a subprocess, kills it with `sig` after two blocks; returns its workers' pids."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_TWO_BLOCKS, str(marker), *map(str, argv)],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"build ended before it could be killed (rc {proc.returncode}): {proc.stderr.read()}")
            assert time.time() < deadline, "build never reached its second block"
            time.sleep(0.1)
        workers = [c.pid for c in psutil.Process(proc.pid).children()]
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -sig
    return workers


@pytest.mark.slow
def test_killed_shard_leaves_nothing_complete_and_rerun_is_identical(tmp_path, capsys, tok, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    common = ["--num-shards", 2, "--block-bytes", 400, "--val-fraction", 0.2, "--workers", 2]
    ref, out = tmp_path / "ref", tmp_path / "out"
    for i in range(2):
        assert run_main(capsys, *build_args([inp], ref, tok, *common, "--shard-index", i))[0] == 0
    assert run_main(capsys, "merge", ref)[0] == 0

    assert run_main(capsys, *build_args([inp], out, tok, *common, "--shard-index", 0))[0] == 0
    workers = build_killed_midway(build_args([inp], out, tok, *common, "--shard-index", 1), tmp_path / "marker",
                                  signal.SIGTERM)
    # Its tokenizer workers die with it (no orphans holding the CPUs of the next array task).
    import psutil

    assert len(workers) == 2
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=20)
    assert not alive
    # Killed: shard 1 exists only in staging; nothing says it is complete, and merge refuses.
    assert (out / ".staging" / "shard-00001" / "train").is_dir()
    assert not (out / "train" / "shard-00001").exists() and not (out / "val" / "shard-00001").exists()
    rc, _, err = run_main(capsys, "merge", out)
    assert rc == 1 and "shard index 1" in err and not (out / "train" / "index.json").exists()

    # Re-run both tasks: shard 0 is skipped untouched, shard 1 is redone from scratch.
    shard0 = tree_bytes(out / "train" / "shard-00000")
    rc, stdout, _ = run_main(capsys, *build_args([inp], out, tok, *common, "--shard-index", 0))
    assert rc == 0 and "already complete" in stdout
    rc, stdout, _ = run_main(capsys, *build_args([inp], out, tok, *common, "--shard-index", 1))
    assert rc == 0 and "already complete" not in stdout
    assert tree_bytes(out / "train" / "shard-00000") == shard0
    assert run_main(capsys, "merge", out)[0] == 0
    assert tree_bytes(out) == tree_bytes(ref)


def test_interrupted_unsharded_build_reruns_to_identical_output(tmp_path, capsys, monkeypatch, tok, docs):
    """What a kill leaves behind (half-written staging, no cleanup), made in-process; then a re-run."""
    import data_prep.build as build_module
    from data_prep.layout import Layout

    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    common = ["--block-bytes", 400, "--val-fraction", 0.2, "--workers", 2]
    assert run_main(capsys, *build_args([inp], tmp_path / "ref", tok, *common))[0] == 0

    run_block, finished = build_module._Task.run_block, []

    def run_block_then_die(self, block):
        run_block(self, block)
        finished.append(block.index)
        if len(finished) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(build_module._Task, "run_block", run_block_then_die)
    monkeypatch.setattr(Layout, "discard_staging", lambda self: None)     # a killed process cleans nothing
    assert run_main(capsys, *build_args([inp], tmp_path / "out", tok, *common))[0] == 130
    monkeypatch.undo()
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / "val").exists()
    assert (tmp_path / "out" / ".staging" / "all" / "train").is_dir()     # partial output, unpublished
    rc, stdout, _ = run_main(capsys, *build_args([inp], tmp_path / "out", tok, *common))
    assert rc == 0 and "already complete" not in stdout
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "ref")


def test_progress_bar_reports_docs_and_tokens_per_second(tmp_path, capsys, tok, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    rc, out, err = run_main(capsys, *build_args([inp], tmp_path / "o", tok, "--progress"))
    assert rc == 0 and "docs" in err and "tok/s" in err and f"{len(docs)} docs read" in out
    rc, out, err = run_main(capsys, *build_args([inp], tmp_path / "o2", tok, "--no-progress"))
    assert rc == 0 and err == ""


def test_build_and_train_tokenizer_through_main(tmp_path, capsys, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    rc, out, _ = run_main(capsys, "train-tokenizer", "--input", inp, "--out", tmp_path / "tok", "--vocab-size", 300)
    assert rc == 0 and "vocab 300" in out
    rc, out, _ = run_main(capsys, *build_args([inp], tmp_path / "o", tmp_path / "tok", "--val-fraction", 0.2))
    assert rc == 0 and re.search(r"train: \d+ samples, \d+ tokens; val: \d+ samples", out)
    r = build(inputs=[str(inp)], domain="en", tokenizer=str(tmp_path / "tok"), seq_len=8, min_chars=1,
              out=str(tmp_path / "o"), val_fraction=0.2)
    assert r.skipped_existing
    rc, _, err = run_main(capsys, "train-tokenizer", "--input", inp, "--out", tmp_path / "in.jsonl")
    assert rc == 2 and "not a tokenizer directory" in err


def test_a_val_split_without_samples_is_not_written(tmp_path, capsys, tok, docs):
    """Too little held-out text for one sample: a warning, and no empty OUT/val for a trainer to fail on."""
    inp = write_jsonl(tmp_path / "in.jsonl", docs[:6])
    argv = [*build_args([inp], tmp_path / "o", tok, "--val-fraction", 0.1), "--seq-len", 256]
    proc = subprocess.run([sys.executable, "-m", "data_prep", *map(str, argv)], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rf"warning: {tmp_path / 'o' / 'val'}: 0 samples \(\d+ documents, \d+ tokens held out, "
                        r"a sample needs --seq-len 256\); no val split written: .*\n", proc.stderr), proc.stderr
    assert "val: 0 samples, not written;" in proc.stdout
    assert (tmp_path / "o" / "train" / "index.json").is_file() and not (tmp_path / "o" / "val").exists()
    assert not (tmp_path / "o" / ".staging").exists()
    # The build is complete without it: a re-run does nothing.
    rc, out, _ = run_main(capsys, *argv)
    assert rc == 0 and "already complete" in out and "val: 0 samples, not written;" in out

    # Sharded: a shard's val may be empty; merge writes no val index when all of them are.
    for i in range(2):
        assert run_main(capsys, *build_args([inp], tmp_path / "s", tok, "--val-fraction", 0.1, "--num-shards", 2,
                                            "--shard-index", i, "--block-bytes", 300), "--seq-len", 256)[0] == 0
    rc, out, err = run_main(capsys, "merge", tmp_path / "s")
    assert rc == 0 and "train: " in out and "val: " not in out
    assert err.startswith(f"warning: {tmp_path / 's' / 'val'}: 0 samples in 2 shards"), err
    assert (tmp_path / "s" / "train" / "index.json").is_file() and not (tmp_path / "s" / "val" / "index.json").exists()
