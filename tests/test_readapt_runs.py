"""readapt apply with Psi from real training runs (every method), and its HF dirs loaded in a fresh process.

The runs are trained_runs' shared tiny runs (one `trainer.engine.train` per method on a
saved 2-layer Llama backbone), so this module costs little when the export/eval
tests already built them. The written directories are loaded by an interpreter
that cannot import this repo, like any user of an export would.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from launch import HIDE_PROJECT
from test_readapt_apply import load, logits
from test_readapt_delta import perturbed
from tiny_models import random_batch
from trained_runs import METHODS, shared_runs
from trainer.export.adapters_io import load_adapters, save_adapters
from trainer.export.export import load_trained
from trainer.readapt.apply import apply, build, save
from trainer.readapt.delta import compute_delta
from trainer.readapt.io import Checkpoint

pytestmark = pytest.mark.slow
IDS = random_batch(2, 16, seed=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shared = shared_runs(tmp_path_factory)
    root = tmp_path_factory.mktemp("readapt_runs")
    backbone, inst = shared["backbone"], root / "instruct"
    perturbed(load(backbone), seed=11).save_pretrained(inst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (backbone / f).is_file():
            shutil.copyfile(backbone / f, inst / f)
    compute_delta(backbone, inst, root / "delta")
    return {"root": root, "backbone": backbone, "inst": inst, "delta": root / "delta", "runs": shared["runs"]}


@pytest.mark.parametrize("method", METHODS)
def test_a_one_b_one_equals_applying_both(runs, method, tmp_path):
    run_dir = runs["runs"][method]
    model, got_method, info = build(runs["backbone"], runs["delta"], run_dir, a=1, b=1)
    assert got_method.name == method and info["psi"].startswith("run ")
    cfg, trained = load_trained(run_dir)
    if method == "finetune":  # trained + (instruct - base), weight by weight
        base, inst = Checkpoint(runs["backbone"]), Checkpoint(runs["inst"])
        params, tr = dict(model.named_parameters()), dict(trained.named_parameters())
        for name in base.names:
            assert torch.allclose(params[name], tr[name] + inst.read(name) - base.read(name), atol=1e-6), name
        return
    # The instruct model with the run's trained Psi attached (LoRA unmerged, through peft's forward).
    save_adapters(trained, cfg.method, tmp_path / "export" / "adapters", base_model=str(runs["backbone"]))
    reference = load(runs["inst"])
    # Trained on the base: onto the instruct weights only when allowed (what a = b = 1 amounts to).
    load_adapters(reference, tmp_path / "export" / "adapters", allow_other_weights=True)
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    # Psi from the adapters-only export gives the same model as from the run.
    from_export, _, _ = build(runs["backbone"], runs["delta"], tmp_path / "export", a=1, b=1)
    assert torch.equal(logits(from_export), logits(model))
    # And the trained Psi matters: without it the result is the instruct model, not this one.
    assert not torch.allclose(logits(model), logits(load(runs["inst"])), atol=1e-4)


LOADER = HIDE_PROJECT + r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(open(sys.argv[1]))
ids = torch.load(job["ids"])
out = {}
for name, d in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        out[name] = {"logits": model(ids).logits, "tokens": AutoTokenizer.from_pretrained(d)("hi")["input_ids"]}
torch.save(out, job["out"])
'''


def test_written_dirs_load_in_a_fresh_process(runs, tmp_path):
    dirs, expected = {}, {}
    for method in METHODS:
        model, got, info = build(None, runs["delta"], runs["runs"][method])  # defaults: a = b = 0.5, delta's base
        expected[method] = logits(model)
        dirs[method] = str(save(model, got, tmp_path / method))
    # apply() itself (tokenizer files from the instruct model, provenance file) for one gated method.
    info = apply(None, runs["delta"], tmp_path / "applied", runs["runs"]["neutral_residues"])
    assert "tokenizer.json" in info["tokenizer_files"]["files"]
    assert json.loads((tmp_path / "applied" / "readapt_apply.json").read_text())["a"] == 0.5
    dirs["applied"], expected["applied"] = str(tmp_path / "applied"), expected["neutral_residues"]
    for method in METHODS:  # save() wrote the model only; tokenizer files for the loader
        for f in info["tokenizer_files"]["files"]:
            shutil.copyfile(runs["inst"] / f, tmp_path / method / f)

    torch.save(IDS, tmp_path / "ids.pt")
    job = {"ids": str(tmp_path / "ids.pt"), "out": str(tmp_path / "out.pt"), "dirs": dirs}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")  # remote-code cache kept in tmp
    p = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "job.json")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")
    for name, want in expected.items():
        assert torch.allclose(got[name]["logits"], want, atol=1e-5), name
        assert got[name]["tokens"][0] == 1  # the char tokenizer (BOS first) came along
