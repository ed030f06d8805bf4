"""A backbone built partitioned under ZeRO-3 and saved as shards is the model a user would load.

The `scale` test takes the whole path at 1.1B parameters: build on 2 ranks, load through
`model.path`, train under ZeRO-3, checkpoint, resume on 1 rank, export adapters-only. It needs
~20 GB of RAM and ~7 min on 2 cores, so it runs only when asked: `pytest -m scale`.
"""
import json
import shutil
import sys

import pytest
import torch

from launch import ROOT, env, metrics, run, step_losses, train_cmd, write_config
from mds_fixtures import write_mds

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64,
        "tie_word_embeddings": True, "initializer_range": 0.05}


def build_cmd(spec_path, out, nproc: int, *extra) -> list[str]:
    from trainer.bench.runs import train_command

    return train_command(spec_path, nproc, overrides=[str(out), *extra], module="trainer.bench.backbone")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_build_equals_one_rank_build_and_loads_with_plain_transformers(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from trainer.engine.fingerprint import dir_fingerprint, module_fingerprint

    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY))
    for n in (1, 2):
        run(build_cmd(spec, tmp_path / f"b{n}", n, "--max-shard-size", "40KB", "--dtype", "float32"))
    index = json.loads((tmp_path / "b2" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # really sharded
    for name in shards:  # the gather put every slice back where it belongs
        assert (tmp_path / "b1" / name).read_bytes() == (tmp_path / "b2" / name).read_bytes(), name
    # As save_pretrained: the tensors' bytes (fp32 here), not the files' (which add a header each).
    n_elements = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "b1").parameters())
    assert index["metadata"]["total_size"] == 4 * n_elements

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b2", dtype=torch.float32)
    stored = {}
    for name in shards:
        with safe_open(str(tmp_path / "b2" / name), "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    # The tied head is stored once; everything the model holds came from the files.
    assert "lm_head.weight" not in stored and model.lm_head.weight is model.model.embed_tokens.weight
    assert set(stored) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(p, stored[n]), n
    # The model's own init, not torch's default (an N(0, 1) embedding): config.initializer_range.
    assert abs(model.model.embed_tokens.weight.std().item() - 0.05) < 0.005
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.05) < 0.005
    assert dir_fingerprint(tmp_path / "b2") == module_fingerprint(model)


def test_bad_config_file_is_one_line(tmp_path):
    import subprocess

    (tmp_path / "bad.json").write_text('{"hidden_size": 8}')
    p = subprocess.run([sys.executable, "-m", "trainer.bench.backbone", str(tmp_path / "bad.json"), str(tmp_path / "o")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'bad.json'}: no model_type"


@pytest.mark.scale
@pytest.mark.slow
@pytest.mark.distributed
def test_a_billion_parameter_backbone_end_to_end(tmp_path):
    from safetensors import safe_open

    from trainer.bench.plan import SIZES

    size = SIZES["1b"]
    spec = tmp_path / "1b.json"
    spec.write_text(json.dumps(size.model))
    run(build_cmd(spec, tmp_path / "backbone", 2), timeout=3600)

    seq, vocab = 512, size.model["vocab_size"]
    data = {d: {"train": str(write_mds(tmp_path / d, d, i, 16, seq, vocab, seed=10 + i))}
            for i, d in enumerate(("en", "code"), 1)}
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "backbone")},
           "method": {"name": "neutral_residues"},
           "data": {"p": 0.5, "streams": [{"domain": "en", "role": "original", **data["en"]},
                                          {"domain": "code", "role": "new", **data["code"]}]},
           "train": {"max_steps": 3, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-4, "warmup_steps": 1,
                     "activation_checkpointing": True},
           "deepspeed": {"config": "ds_configs/zero3.json"},
           "checkpoint": {"every": 2, "keep_last": 3},
           "log": {"every": 1, "tensorboard": False, "progress": False},
           "eval": {"every": 0, "at_start": False}}
    run(train_cmd(write_config(cfg, tmp_path / "run.yaml"), nproc=2), timeout=3 * 3600)
    params = next(m["params"] for m in metrics(tmp_path / "run") if "params" in m)
    assert params["backbone"] > 9e8 and params["trainable"] > 1.5e8, params

    # The checkpoint holds the trained state only (weights + Adam moments: 12 bytes per trainable
    # parameter), not the 3.8 GB of frozen weights.
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    size_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert 12 * params["trainable"] <= size_bytes < 12 * params["trainable"] + 0.2e9, size_bytes

    # Preempted at step 2, resumed on one rank: the same step 3.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed", ignore=shutil.ignore_patterns("step_00000003"))
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step_00000002")
    kept = [l for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= 2]
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    cfg["run_dir"] = str(tmp_path / "resumed")
    resumed = run(train_cmd(write_config(cfg, tmp_path / "resumed.yaml"), nproc=1), timeout=3 * 3600)
    assert "(world size 2 -> 1)" in resumed.stderr
    full, again = step_losses(tmp_path / "run"), step_losses(tmp_path / "resumed")
    assert sorted(again) == [1, 2, 3]
    assert again[3] == pytest.approx(full[3], rel=1e-5), (full, again)

    run([sys.executable, "-m", "trainer", "export", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
         "--only", "adapters"], timeout=3600)
    files = list((tmp_path / "out" / "adapters").glob("*.safetensors"))
    numel = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            numel += sum(torch.Size(st.get_slice(k).get_shape()).numel() for k in st.keys())
    assert numel == params["trainable"]
