"""trainer bench: the counting and bookkeeping behind its ratios, and a tiny end-to-end smoke run.

The fast tests pin what a wrong benchmark would get wrong silently: the analytic
FLOPs (checked against a real model's parameter count and the issue's formula),
the window arithmetic, the split of an appended metrics.jsonl at a resume, the
frozen-weights check of a checkpoint, the targets' verdicts and the CLI's
refusals. The slow test runs `python -m trainer bench --size tiny` and checks
that every figure came out (not how fast anything was).
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import ROOT, env
from trainer.bench import cli as bench
from trainer.bench.flops import ModelShape, expected_speedup, flops_per_token, peak_matmul_flops
from trainer.bench.plan import BUDGET_EPS, BUDGET_METERS, METHODS, SIZES, budget_jobs, throughput_jobs, zero_jobs
from trainer.bench.profile import category, summarize
from trainer.bench.report import markdown, missing_figures, targets
from trainer.bench.runs import checkpoint_contents, segments, summarize_segment, window_rates
from trainer.config import load_config

TINY = SIZES["tiny"]


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_matmul_params_equal_the_models_linear_weights(size):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SIZES[size].model)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    shape = ModelShape.from_hf(SIZES[size].model)
    assert shape.matmul_params == linear
    assert shape.head_params == model.lm_head.weight.numel()


def test_flops_follow_the_issue_formula():
    shape = ModelShape.from_hf(TINY.model)
    n, nl, a = shape.matmul_params, shape.layer_matmul_params, shape.attention_flops(TINY.seq_len)
    na = 1234
    assert flops_per_token(shape, TINY.seq_len, "finetune", na, False) == 6 * n + 3 * a  # adapters ignored
    assert flops_per_token(shape, TINY.seq_len, "neutral_residues", na, False) == 4 * n + 3 * a + 6 * na
    assert flops_per_token(shape, TINY.seq_len, "lora", na, True) == 4 * n + 3 * a + 6 * na + 2 * nl + a + 2 * na
    assert flops_per_token(shape, TINY.seq_len, "finetune", 0, True) == 6 * n + 3 * a + 2 * nl + a
    # The issue's expectation: 6N / (4N + 1.2N) when attention is negligible (T -> 0).
    assert expected_speedup(shape, 0, round(0.2 * n), False) == pytest.approx(6 / 5.2, rel=1e-3)


def test_peak_matmul_is_a_rate_in_the_training_dtype():
    r = peak_matmul_flops("cpu", 128, reps=2)
    assert r["dtype"] == "float32" and r["n"] == 128
    assert 1e6 < r["flops_per_s"] < 1e14


# ----------------------------------------------------------------------------- metrics bookkeeping


def test_window_rate_is_tokens_over_time_not_mean_of_rates():
    # Two steps of equal tokens at 100 and 50 tokens/s take 1/100 + 1/50 s per token: 66.7 tokens/s.
    assert window_rates([100.0, 50.0], 2) == [pytest.approx(200 / 3)]
    assert window_rates([10.0, 10.0, 20.0, 20.0, 99.0], 2) == [pytest.approx(10.0), pytest.approx(20.0)]
    assert window_rates([5.0], 2) == []


def _step(i, tps, mem=1.0):
    return {"step": i, "tokens_per_s": tps, "peak_mem_gb": mem, "loss": 5.0}


def test_resumed_run_is_its_own_segment_with_load_time():
    off = [{"step": 0, "params": {"backbone": 100, "trainable": 20, "fraction": 0.2}}] + \
          [_step(i, 1.0 if i == 1 else 10.0) for i in (1, 2, 3)] + \
          [{"step": 3, "checkpoint": "step_00000003", "save_s": 0.5, "bytes": 999}]
    on = [{"step": 3, "resumed_from": "step_00000003", "world_size": 1, "load_s": 0.25}] + \
         [_step(i, 1.0 if i == 4 else 5.0, mem=2.0) for i in (4, 5, 6)]
    segs = segments(off + on)
    assert len(segs) == 2
    a = summarize_segment(segs[0], warmup=1, window=2)
    assert a["tokens_per_s"] == pytest.approx(10.0)  # the slow first step is warm-up, not timed
    assert a["params"]["trainable"] == 20 and a["checkpoint"]["bytes"] == 999 and "load_s" not in a
    b = summarize_segment(segs[1], warmup=1, window=2)
    assert b["tokens_per_s"] == pytest.approx(5.0) and b["load_s"] == 0.25 and b["peak_mem_gb"] == 2.0


def test_too_few_steps_is_an_error_not_a_zero():
    with pytest.raises(RuntimeError, match="need 2 warm-up"):
        summarize_segment([_step(1, 1.0), _step(2, 1.0)], warmup=2, window=1)


def test_checkpoint_contents_count_frozen_weights(tmp_path):
    torch.save({"module": {"adapter.w": torch.zeros(20), "backbone.w": torch.zeros(30)}},
               tmp_path / "mp_rank_00_model_states.pt")
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    c = checkpoint_contents(tmp_path, trainable=20)
    assert c["module_params_saved"] == 50 and c["frozen_params_saved"] == 30
    assert c["trainable_state_bytes"] == 240
    assert c["bytes"] == sum(c["files"].values()) and c["ratio_to_trainable_state"] == c["bytes"] / 240


# ----------------------------------------------------------------------------- pairing over repeats


def _bench(tmp_path, repeats):
    b = bench.Bench(TINY, "cpu", tmp_path, threads=1, repeats=repeats)
    b.data = {d: {"train": str(tmp_path / d), "val": str(tmp_path / d)} for d in ("en", "code")}
    return b


def _run(tps):
    seg = {"tokens_per_s": tps, "tokens_per_s_best": tps, "peak_mem_gb": 1.0, "params": {"trainable": 20}}
    return {"off": dict(seg), "on": dict(seg, tokens_per_s=tps / 2, tokens_per_s_best=tps / 2),
            "checkpoint": {"bytes": 10}}


def test_ratios_pair_runs_of_the_same_repeat_so_drift_cancels(tmp_path):
    # The machine runs 3x faster in repeat 1 and 2x in repeat 2; within each repeat neutral_residues is 1.1x
    # finetune, except repeat 0, where it ran while the machine sped up. Medians of the per-method figures
    # would say 250 / 200 = 1.25; the pairs say 1.1.
    b = _bench(tmp_path, 3)
    for r, (ft, nr, lora, hf) in enumerate([(100, 250, 120, 100), (300, 330, 360, 300), (200, 220, 240, 240)]):
        b.runs[(r, "finetune")], b.runs[(r, "neutral_residues")], b.runs[(r, "lora")] = _run(ft), _run(nr), _run(lora)
        b.peer_runs[(r, "hf")] = {"tokens_per_s": hf, "lora_rank": 4}
    b.runs[(3, "neutral_residues")] = _run(1000)  # its finetune failed: no pair, no vote
    b.collect_throughput()
    nr = b.res["train"]["neutral_residues"]
    assert nr["off"]["ratio_vs_finetune"] == pytest.approx(1.1)
    assert nr["off"]["ratio_vs_finetune_per_repeat"] == pytest.approx([2.5, 1.1, 1.1])
    assert nr["on"]["ratio_vs_finetune"] == pytest.approx(1.1)
    assert nr["off"]["tokens_per_s_per_repeat"] == [250, 330, 220, 1000]
    assert b.res["train"]["finetune"]["off"]["ratio_vs_finetune"] == 1.0
    peer = b.res["peer"]
    assert peer["ratio_per_repeat"] == pytest.approx([1.2, 1.2, 1.0]) and peer["ratio"] == pytest.approx(1.2)
    assert peer["hf"]["tokens_per_s"] == 240 and peer["hf"]["lora_rank"] == 4
    assert "ratio_vs_hf_deepspeed" not in peer  # not run, not invented
    with pytest.raises(ValueError, match="no repeat"):
        bench.paired_ratio({0: 1.0}, {1: 1.0})


def test_budget_cost_pairs_each_run_with_the_same_repeats_plain_run(tmp_path):
    b = _bench(tmp_path, 2)
    for r, speed in enumerate((1.0, 3.0)):  # the machine runs 3x faster in repeat 1
        b.runs[(r, "neutral_residues")] = _run(100 * speed)
        b.budget_runs[(r, "neutral_residues")] = {"tokens_per_s": 96 * speed, "meter_share": 0.03 + 0.01 * r}
    b.budget_runs[(0, "finetune")] = {"tokens_per_s": 50, "meter_share": 0.02}  # its plain run failed: no ratio
    b.collect_budget()
    nr = b.res["budget"]["neutral_residues"]
    assert nr["ratio_vs_off_per_repeat"] == pytest.approx([0.96, 0.96])
    assert nr["overhead"] == pytest.approx(0.04) and nr["measure"] == BUDGET_METERS["neutral_residues"]
    assert nr["meter_share"] == pytest.approx(0.035)  # the median of the in-run shares
    assert b.res["budget"]["finetune"] == {"measure": "heldout", "tokens_per_s": 50, "meter_share": 0.02}
    missing = missing_figures(b.res)
    assert "budget.finetune.overhead" in missing and "budget.neutral_residues.overhead" not in missing
    assert "budget.finetune.meter_share" not in missing


def test_budget_jobs_are_the_plain_runs_with_a_binding_budget(tmp_path):
    data = {d: {"train": str(tmp_path / d), "val": str(tmp_path / d)} for d in ("en", "code")}
    plain = {off.config["method"]["name"]: off.config for off, _ in throughput_jobs(TINY, data, tmp_path)}
    for job in budget_jobs(TINY, data, tmp_path):
        method = job.config["method"]
        assert method["forgetting_budget"] == BUDGET_EPS and method["budget_measure"] == BUDGET_METERS[method["name"]]
        assert job.config["train"] == plain[method["name"]]["train"] and job.run_dir != Path(plain[method["name"]]["run_dir"])


def test_each_repeat_runs_the_pairs_side_by_side_and_odd_repeats_reverse(tmp_path):
    names = [name for name, _ in _bench(tmp_path, 2).launches()]
    first = ([f"train {m} (repeat 0)" for m in METHODS] + [f"train {m}/budget (repeat 0)" for m in BUDGET_METERS]
             + ["peer: HF Trainer + PEFT (repeat 0)", "peer: HF Trainer + PEFT + DeepSpeed (repeat 0)"])
    assert names[:9] == first
    assert names[9:18] == [n.replace("repeat 0", "repeat 1") for n in first[::-1]]
    assert names[18:] == ["ZeRO-2 at 2 ranks", "ZeRO-3 at 2 ranks"]
    assert list(METHODS[:2]) == ["neutral_residues", "finetune"] and METHODS[-1] == "lora"


# ----------------------------------------------------------------------------- plan, targets, report


def test_throughput_jobs_share_the_work_and_on_resumes_off(tmp_path):
    data = {d: {"train": str(tmp_path / d), "val": str(tmp_path / d)} for d in ("en", "code")}
    pairs = throughput_jobs(TINY, data, tmp_path)
    assert [off.config["method"]["name"] for off, _ in pairs] == list(METHODS)
    for off, on in pairs:
        assert on.run_dir == off.run_dir  # `on` resumes `off`: load time + second figure from one launch
        a, b = off.config, on.config
        assert (a["train"]["activation_checkpointing"], b["train"]["activation_checkpointing"]) == (False, True)
        assert b["train"]["max_steps"] == 2 * a["train"]["max_steps"] == 2 * TINY.steps
        for key in ("model", "data", "deepspeed", "log", "eval"):
            assert a[key] == b[key] == pairs[0][0].config[key]
    stages = [j.config["deepspeed"]["config"] for j in zero_jobs(TINY, data, tmp_path)]
    assert stages == ["ds_configs/zero2.json", "ds_configs/zero3.json"]


def _result(nr_ratio):
    res = {"meta": {"size": "tiny", "device": "cpu", "threads": 2}, "train": {}, "checkpoint": {},
           "peer": {"ratio": 1.3, "hf": {"tokens_per_s": 10.0}}, "data": {"ratio": 0.5}, "loader": {"ratio": 40.0}}
    for m in METHODS:
        res["train"][m] = {ck: {"tokens_per_s": 100.0, "ratio_vs_finetune": nr_ratio if m == "neutral_residues"
                                else 1.0, "mfu": 0.1} for ck in ("off", "on")}
        res["checkpoint"][m] = {"ratio_to_trainable_state": 1.33, "frozen_params_saved": 0}
    return res


def test_targets_say_met_and_missed():
    rows = {t["name"]: t for t in targets(_result(1.2))}
    assert rows["neutral_residues / finetune tokens/s (checkpointing off)"]["met"] is True
    assert rows["our lora / HF Trainer+PEFT tokens/s"]["met"] is True
    assert rows["checkpoint bytes / trainable state (neutral_residues)"]["met"] is False
    assert rows["frozen params in adapter/LoRA checkpoints"]["met"] is True
    assert rows["data_prep / raw tokenizer tokens/s per worker"]["met"] is False
    assert rows["loader samples/s / training consumption"]["met"] is True
    slow = {t["name"]: t for t in targets(_result(1.1))}
    assert slow["neutral_residues / finetune tokens/s (checkpointing off)"]["met"] is False
    empty = targets({})
    assert all(t["met"] is None for t in empty)


def test_markdown_shows_every_target_and_missed_ones_stand_out():
    res = _result(1.1)
    res["targets"] = targets(res)
    text = markdown(res)
    for t in res["targets"]:
        assert t["name"] in text
    assert text.count("**missed**") == sum(t["met"] is False for t in res["targets"]) == 4


def test_missing_figures_names_what_is_absent():
    missing = missing_figures({})
    assert "train.finetune.on.tokens_per_s" in missing and "zero.3.rss_peak_gb.1" in missing
    res = {"train": {"finetune": {"on": {"tokens_per_s": 12.0}}}, "zero": {"3": {"skipped": "needs 2 GPUs"}}}
    missing = missing_figures(res)
    assert "train.finetune.on.tokens_per_s" not in missing and not any(p.startswith("zero.3") for p in missing)
    res["train"]["finetune"]["on"]["mfu"] = float("nan")
    assert "train.finetune.on.mfu" in missing_figures(res)


def test_profile_groups_ops_by_what_they_are():
    assert [category(n) for n in ("aten::mm", "aten::addmm", "aten::_foreach_mul_", "aten::mul",
                                  "aten::_scaled_dot_product_flash_attention_for_cpu", "Optimizer.step#AdamW.step",
                                  "aten::nll_loss_backward", "gloo:all_reduce", "aten::copy_", "ProfilerStep*",
                                  "torch::autograd::AccumulateGrad", "cpu_op")] == \
        ["matmul", "matmul", "optimizer", "elementwise", "attention", "optimizer", "loss", "communication",
         "copy/layout", "python (between ops)", "autograd bookkeeping", "other"]

    class Ev:
        def __init__(self, key, us, count=1, total=None):
            self.key, self.self_cpu_time_total, self.count = key, us, count
            self.cpu_time_total = us if total is None else total

    s = summarize([Ev("aten::mul", 1000), Ev("aten::mm", 3000, 4), Ev("aten::addmm", 1000),
                   Ev("Optimizer.step#AdamW.step", 100, total=2000)], top=2, wall_s=0.01)
    assert [o["op"] for o in s["top_ops"]] == ["aten::mm", "aten::mul"]
    assert s["categories"]["matmul"]["self_ms"] == pytest.approx(4.0)
    assert s["categories"]["matmul"]["share_of_wall"] == pytest.approx(0.4)
    assert s["spans"]["optimizer step"]["total_ms"] == pytest.approx(2.0)
    assert s["spans"]["data loader next"]["total_ms"] == 0


# ----------------------------------------------------------------------------- CLI


def test_1b_on_cpu_times_the_two_ends_of_the_ratio_on_a_backbone_loaded_from_disk(tmp_path, capsys):
    """At 1.1B on CPU only what the size is for: neutral_residues vs finetune, ZeRO-2 vs ZeRO-3, with SGD
    (finetune's Adam states do not fit), on a backbone that `model.path` loads."""
    import json

    assert bench.main(["--size", "1b", "--device", "cpu", "--plan", "--work", str(tmp_path)]) == 0
    launches = capsys.readouterr().out.strip().splitlines()
    names = [Path(line.split()[-1]).stem for line in launches]
    assert names == ["neutral_residues_off", "neutral_residues_on", "finetune_off", "finetune_on", "zero2", "zero3"]
    for name in names:
        cfg = load_config(tmp_path / "configs" / f"{name}.yaml")
        assert cfg.model.path == str(tmp_path / "backbone") and not cfg.model.config
        ds = json.loads(Path(cfg.deepspeed.config).read_text())
        assert ds["optimizer"] == {"type": "SGD", "params": {"lr": "auto"}}
        assert ds["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    # On a GPU the same size runs the whole matrix with the shipped (Adam) JSONs.
    gpu = SIZES["1b"].for_device("cuda")
    assert gpu.full_matrix and gpu.optimizer is None and gpu.methods is None and gpu.seq_len == 2048
    cpu = SIZES["1b"].for_device("cpu")
    assert cpu.global_batch % 2 == 0  # the 2-rank ZeRO runs split it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_refuses(tmp_path, capsys):
    assert bench.main(["--size", "tiny", "--device", "cuda", "--work", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_plan_prints_every_launch(tmp_path, capsys):
    assert bench.main(["--size", "small", "--plan", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * len(METHODS) + len(BUDGET_METERS) + 2
    assert sum(line.startswith("torchrun --nproc_per_node 2") for line in lines) == 2


# ----------------------------------------------------------------------------- smoke


@pytest.mark.slow
def test_tiny_bench_produces_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.time()
    # --jobs 3: launches overlap (the figures come out; their speeds are not the point here).
    p = subprocess.run([sys.executable, "-m", "trainer", "bench", "--size", "tiny", "--out", str(out),
                        "--work", str(tmp_path / "work"), "--jobs", "3"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    res = json.loads(out.read_text())
    assert res["errors"] == {} and res["missing"] == [], (res["errors"], res["missing"])
    assert all(t["value"] is not None for t in res["targets"]), res["targets"]
    assert "### Targets" in p.stdout and "### Data path" in p.stdout
    assert all(math.isfinite(res["train"][m][ck]["mfu"]) for m in METHODS for ck in ("off", "on"))
    print(f"tiny bench: {time.time() - t0:.0f}s")


def test_save_cost_times_our_save_against_deepspeeds_alone(tmp_path):
    out = tmp_path / "save.json"
    p = subprocess.run([sys.executable, "-m", "trainer", "bench", "--save-cost", "8M", "--repeats", "3",
                        "--out", str(out), "--work", str(tmp_path / "work")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    res = json.loads(out.read_text())
    assert res["trainable_params"] == 2 * 2048 * 2048 and res["repeats"] == 3 and len(res["ratios"]) == 3
    # fp32 master and two Adam moments of every parameter are on disk
    assert res["checkpoint_bytes"] > 12 * res["trainable_params"]
    assert all(x > 0 for x in res["ratios"]) and res["plain_save_s"] > 0 and res["digest_s"] > 0
    assert "save of 8M trainable params" in p.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_a_size_loaded_from_disk_trains_from_the_saved_backbone_with_its_optimizer(tmp_path):
    """The 1b size's path at the tiny shape: backbone built on 2 ranks and saved, JSONs with SGD, and a
    throughput job that loads it through model.path and trains (the 1b run itself is too big for CI)."""
    import dataclasses

    from trainer.bench.runs import read_metrics

    size = dataclasses.replace(SIZES["1b"].for_device("cpu"), model=TINY.model, seq_len=TINY.seq_len, timed=2)
    b = bench.Bench(size, "cpu", tmp_path, threads=2)
    b.write_data()
    assert b.data["model"] == {"path": str(tmp_path / "backbone")} and b.res["backbone"]["bytes"] > 0
    assert json.loads(Path(b.data["ds"]["3"]).read_text())["optimizer"]["type"] == "SGD"
    (off, _), = [pair for pair in throughput_jobs(size, b.data, tmp_path / "r") if pair[0].name == "finetune/off"]
    b.run_train(off)
    steps = [m for m in read_metrics(off.run_dir) if "loss" in m]
    assert len(steps) == size.steps and all(math.isfinite(m["loss"]) for m in steps)
    start = next(m for m in read_metrics(off.run_dir) if "params" in m)
    assert start["params"]["trainable"] == start["params"]["backbone"]  # finetune: every weight, from the files
