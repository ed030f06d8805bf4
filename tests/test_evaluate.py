"""`python -m trainer eval`: bits per byte against a direct computation, run dirs, 1 vs 2 ranks, bad input."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from launch import free_port, run, write_config
from mds_fixtures import COLUMNS, tiny_run_config
from tiny_models import random_batch, tiny_model
from trained_runs import char_tokenizer, shared_runs
from trainer.evaluation import evaluate

TASK = [{"context": "def add(a, b): return", "choices": ["a + b", "a - b", "print"], "label": 0},
        {"context": "The cat sat on the", "choices": ["mat", "integer overflow"], "label": 0},
        {"context": "for i in", "choices": ["range(3):", "the morning"], "label": 0},
        {"context": "Hello", "choices": ["world", "x"], "label": 1},
        {"context": "x = [1, 2,", "choices": ["3]", "three"], "label": 0}]


def write_val(path, n=10, seq=32, seed=0):
    """An MDS val dir whose samples carry different byte counts (bpb must weight them right)."""
    from streaming import MDSWriter

    ids = random_batch(n, seq, seed=seed).numpy().astype(np.uint32)
    with MDSWriter(out=str(path), columns=COLUMNS, compression=None) as w:
        for i, row in enumerate(ids):
            w.write({"input_ids": row, "domain": "en", "num_bytes": 40 + 7 * i})
    return path


def write_task(path, items=TASK):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


@pytest.fixture
def hf_dir(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    char_tokenizer().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_bits_per_byte_equals_a_direct_computation_from_logits(tmp_path, hf_dir):
    from streaming import LocalDataset

    val = write_val(tmp_path / "val")
    out = tmp_path / "eval.json"
    assert evaluate.main([str(hf_dir), "--data", f"en={val}", "--batch-size", "4", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["domains"]["en"]

    model = tiny_model("llama")
    nll = nbytes = tokens = 0.0
    for sample in LocalDataset(local=str(val)):
        ids = torch.tensor(sample["input_ids"].astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
        nll -= sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1))
        tokens += len(ids) - 1
        nbytes += sample["num_bytes"] * (len(ids) - 1) / len(ids)  # the first token is never predicted
    assert got["tokens"] == tokens == 10 * 31
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_multiple_choice_from_the_cli(tmp_path, hf_dir, capsys):
    task = write_task(tmp_path / "tiny.jsonl")
    out = tmp_path / "eval.json"
    assert evaluate.main([str(hf_dir), "--tasks", str(task), "--fewshot", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"tiny"} and res["tasks"]["tiny"]["n"] == 5 and res["tasks"]["tiny"]["fewshot"] == 2
    assert res["domains"] == {}
    table = capsys.readouterr().out
    assert "acc_norm" in table and "tiny" in table


def _error(capsys, argv) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, hf_dir, capsys):
    val = write_val(tmp_path / "val", n=2)
    assert "no such directory" in _error(capsys, [str(tmp_path / "nope"), "--data", f"en={val}"])
    (tmp_path / "empty").mkdir()
    assert "neither a run directory" in _error(capsys, [str(tmp_path / "empty"), "--data", f"en={val}"])
    assert "DOMAIN=MDS_DIR" in _error(capsys, [str(hf_dir), "--data", str(val)])
    assert "not an MDS dataset" in _error(capsys, [str(hf_dir), "--data", f"en={tmp_path}"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TASK[0]) + "\n" + '{"context": "c", "choices": "ab", "label": 0}\n')
    assert f"{bad}:2: choices" in _error(capsys, [str(hf_dir), "--tasks", str(bad)])
    assert "nothing to evaluate" in _error(capsys, [str(hf_dir)])
    # No tokenizer anywhere: perplexity works, multiple choice says what is missing.
    tiny_model("llama").save_pretrained(tmp_path / "no_tok")
    assert evaluate.main([str(tmp_path / "no_tok"), "--data", f"en={val}"]) == 0
    capsys.readouterr()
    assert "--tokenizer" in _error(capsys, [str(tmp_path / "no_tok"), "--tasks", str(write_task(tmp_path / "t.jsonl"))])
    # A run dir that never saved a checkpoint.
    run_dir = tmp_path / "run"
    cfg = tiny_run_config(tmp_path, {"en": {}, "code": {}})
    write_config(cfg, run_dir / "config.yaml")
    assert "no complete checkpoint" in _error(capsys, [str(run_dir), "--data", f"en={val}"])
    # An export with its own modeling code needs the user's consent.
    cfg_json = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg_json, "auto_map": {"AutoConfig": "m.C"}}))
    assert "--trust-remote-code" in _error(capsys, [str(hf_dir), "--data", f"en={val}"])


@pytest.mark.parametrize("text,reason", [
    ("{'model_type': 'llama'", "/config.json: not valid JSON: Expecting property name enclosed in double quotes"),
    ("[1, 2]", "/config.json: not a Hugging Face model config (no model_type)"),
    ('{"hidden_size": 32}', "/config.json: not a Hugging Face model config (no model_type)"),
    ('{"model_type": "llama", "hidden_size": "wide"}', ": cannot load a causal LM: "),  # transformers' reason
])
def test_a_config_json_that_is_not_a_model_config_is_one_line(tmp_path, capsys, text, reason):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(text)
    err = _error(capsys, [str(model_dir), "--data", f"en={write_val(tmp_path / 'val', n=2)}"])
    assert err.startswith(f"error: {model_dir}{reason}"), err


def test_python_m_trainer_eval_of_a_broken_config_json(tmp_path):
    """The real process: exit 2 and one line naming the file, no traceback."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("not json")
    p = run([sys.executable, "-m", "trainer", "eval", str(tmp_path / "model"),
             "--data", f"en={write_val(tmp_path / 'val', n=2)}"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'model' / 'config.json'}: not valid JSON: Expecting value: line 1 column 1 (char 0)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.mark.slow
def test_eval_of_a_run_dir_reproduces_its_final_training_eval(runs, tmp_path):
    from trainer.evaluation.report import final_eval

    run_dir = runs["runs"]["neutral_residues"]
    out = tmp_path / "eval.json"
    assert evaluate.main([str(run_dir), "--out", str(out)]) == 0  # no --data: the run's own val sets
    logged = final_eval(run_dir)
    got = final_eval(out)  # what `report --backbone` reads
    assert set(got) == set(logged) == {"en", "code"}
    for d in got:
        for key in ("loss", "bpb", "tokens", "bytes"):
            assert got[d][key] == pytest.approx(logged[d][key], rel=1e-6), (d, key)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_one_rank_numbers(runs, tmp_path):
    task = write_task(tmp_path / "tiny.jsonl")
    args = [str(runs["backbone"]), "--data", *(f"{d}={p['val']}" for d, p in runs["data"].items()),
            "--tasks", str(task), "--fewshot", "1", "--batch-size", "3"]
    assert evaluate.main(args + ["--out", str(tmp_path / "one.json")]) == 0
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "trainer", "eval", *args, "--out", str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    for d, m in one["domains"].items():
        assert two["domains"][d]["tokens"] == m["tokens"] and two["domains"][d]["bytes"] == m["bytes"]
        assert two["domains"][d]["bpb"] == pytest.approx(m["bpb"], rel=1e-6)
    assert two["tasks"]["tiny"] == pytest.approx(one["tasks"]["tiny"])
