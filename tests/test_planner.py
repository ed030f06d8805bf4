"""trainer/planner: the memory model's terms against the real engine and real tensors, the
one-line "cannot fit" answer, and `plan` on every shipped config through the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import MethodConfig, load_config
from trainer.planner.choices import Cluster, choice_ds, evaluate
from trainer.planner.memory import Choice, Knobs, memory_terms
from trainer.planner.shape import hf_config, model_facts
from trainer.planner.timing import Hardware
from trainer.planner.trace import ActivationFit, traced_peak

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}


def tiny_cfg(stage: int = 2, **model):
    return load_config(data={"run_dir": "unused", "model": {"config": {**TINY, **model}},
                             "method": {"name": "neutral_residues"},
                             "data": {"streams": [{"domain": "en", "role": "original"}, {"domain": "c", "role": "new"}]},
                             "train": {"global_batch_size": 2, "micro_batch_size": 2},
                             "deepspeed": {"config": f"ds_configs/zero{stage}.json"}})


def backbone_config(yaml_path: Path) -> list[str]:
    """--hf-config for a shipped YAML whose model.path is not on this machine: configs/backbones/<name>.json."""
    cfg = load_config(yaml_path)
    if cfg.model.path is None:
        return []
    found = ROOT / "configs" / "backbones" / f"{Path(cfg.model.path).name}.json"
    assert found.is_file(), f"{yaml_path.name}: ship {found.relative_to(ROOT)} so `plan` can read its shape"
    return ["--hf-config", str(found)]


def test_counts_are_the_extended_models():
    from trainer.method.extend import count_parameters, extend_model
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg()
    facts = model_facts(cfg)
    real = AutoModelForCausalLM.from_config(hf_config(cfg))
    extend_model(real, cfg.method)
    counts = count_parameters(real)
    assert (facts.frozen, facts.trainable) == (counts["backbone"], counts["trainable"])
    assert facts.largest_module == 128 * 32  # the embedding (and the untied head)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_trace_equals_the_same_trace_on_real_tensors(checkpointing):
    """The planner's activation term is measured on fake tensors; real ones must give the same bytes."""
    cfg = tiny_cfg()
    facts = model_facts(cfg)
    args = (hf_config(cfg), facts.method, 2, 32, checkpointing, torch.float32)
    torch.manual_seed(0)
    real = traced_peak(*args, fake=False)
    assert traced_peak(*args) == real
    assert real > 2 * 32 * 128 * 4  # at least the logits


def test_activation_fit_is_exact_at_a_depth_it_did_not_trace():
    from trainer.planner.shape import with_layers
    from trainer.planner.trace import activation_fit

    cfg = tiny_cfg()
    facts = model_facts(cfg)
    fit = activation_fit(facts.hf_config, facts.method, 32, False, torch.float32)
    assert isinstance(fit, ActivationFit)
    deep = traced_peak(with_layers(facts.hf_config, 5), facts.method, 3, 32, False, torch.float32)
    assert abs(fit.bytes(5, 3) - deep) / deep < 0.01


NO_PERSISTENCE = {"stage3_param_persistence_threshold": 0}


def _state_worker(out: str) -> None:
    """One rank: the real engine's state tensors after one step, per ZeRO stage, in bytes."""
    import deepspeed

    from trainer.engine import dist
    from trainer.engine.ds_config import build_ds_config
    from trainer.engine.model import build_model
    from trainer.method.extend import trainable_named_parameters

    dist.init_distributed()
    nbytes = lambda t: t.numel() * t.element_size()
    result = {}
    for stage in (2, 3):
        cfg = tiny_cfg(stage, hidden_size=64, intermediate_size=128)
        ds = build_ds_config(cfg, 1, on_gpu=False)
        ds["zero_optimization"].update(NO_PERSISTENCE)  # one rank: a partition is the whole param
        model, _keep, _ = build_model(cfg, ds, zero3=stage == 3)
        params = [p for _, p in trainable_named_parameters(model)]
        engine, opt, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
        ids = torch.randint(0, 128, (2, 16))
        engine.backward(engine(input_ids=ids).logits.float().mean())
        # Under ZeRO-3 a param is its partition (ds_tensor), plus its whole data if it persists.
        held = lambda p: nbytes(p.data) + (nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else 0)
        got = {"frozen": sum(held(p) for p in model.parameters() if not p.requires_grad)}
        if stage == 2:
            # After the last micro step's reduction the partition's gradients are handed over as views
            # of `grads_in_partition` (or, once it is released, as the averaged list it fed).
            held = opt.grads_in_partition
            got["gradients"] = nbytes(held) if held is not None else sum(
                nbytes(g) for grads in opt.averaged_gradients.values() for g in grads)
            got["trainable"] = sum(nbytes(t) for t in opt.bit16_groups_flat)
        else:
            got["gradients"] = nbytes(opt.grad_partitions_flat_buffer)
            got["trainable"] = sum(nbytes(t) for t in opt.fp16_partitioned_groups_flat) + sum(
                nbytes(p.data) for p in params if getattr(p, "ds_persist", False))
        engine.step()
        inner = opt.optimizer
        moments = sum(nbytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
        masters = opt.single_partition_of_fp32_groups if stage == 2 else opt.fp32_partitioned_groups_flat
        shared = stage == 3 and all(m.data_ptr() == f.data_ptr() for m, f in zip(masters, opt.fp16_partitioned_groups_flat))
        got["optimizer"] = moments + (0 if shared else sum(nbytes(m) for m in masters))
        result[stage] = got
        del engine, opt, model
    result["live"] = {name: _gathered_at_the_turn(knobs) for name, knobs in LIVE_CAPS.items()}
    Path(out).write_text(json.dumps(result))


LIVE_CAPS = {"default": {}, "capped": {"stage3_max_live_parameters": 20000, "stage3_max_reuse_distance": 0}}
"""zero_optimization values for the gathered-at-the-turn check: DeepSpeed's defaults, and a cap that binds."""


def _gathered_at_the_turn(knobs: dict) -> dict:
    """Between the forward and the backward of the third step, ZeRO-3: the elements gathered (not
    persistent), and the names of the params released."""
    import deepspeed

    from trainer.engine.ds_config import build_ds_config
    from trainer.engine.model import build_model
    from trainer.method.extend import trainable_named_parameters

    cfg = tiny_cfg(3, hidden_size=64, intermediate_size=128)
    ds = build_ds_config(cfg, 1, on_gpu=False)
    ds["zero_optimization"].update(NO_PERSISTENCE, **knobs)
    model, _keep, _ = build_model(cfg, ds, zero3=True)
    params = [p for _, p in trainable_named_parameters(model)]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(3):  # the first step records the trace; the walk runs from the second on
        logits = engine(input_ids=ids).logits
        found = {"gathered": sum(p.ds_numel for p in model.parameters()
                                 if p.ds_status.name == "AVAILABLE" and not p.ds_persist),
                 "released": sorted(n for n, p in model.named_parameters() if p.ds_status.name != "AVAILABLE")}
        engine.backward(logits.float().mean())
        engine.step()
    del engine, model
    return found


@pytest.mark.slow
def test_state_terms_equal_the_real_engines_tensors(tmp_path):
    """Frozen weights, trainable weights, gradients and optimizer states of the model, exactly
    (up to DeepSpeed's alignment padding), against deepspeed.initialize on one rank."""
    from launch import env, free_port

    out = tmp_path / "states.json"
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; import test_planner; "
            f"test_planner._state_worker({str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = json.loads(out.read_text())
    for stage in (2, 3):
        cfg = tiny_cfg(stage, hidden_size=64, intermediate_size=128)
        facts = model_facts(cfg)
        ds = choice_ds(cfg, Choice(stage))
        knobs = Knobs.from_ds({"zero_optimization": {**ds["zero_optimization"], **NO_PERSISTENCE}})
        t = memory_terms(facts, knobs, ActivationFit(0, 0, 0, 0), 2, 1, 4, 0.0, on_cpu=True)
        got = measured[str(stage)]
        for name, predicted in (("frozen", t.frozen_weights), ("trainable", t.trainable_weights),
                                ("gradients", t.gradients), ("optimizer", t.optimizer_states)):
            assert abs(got[name] - predicted) <= 64, (stage, name, got[name], predicted)
    # ZeRO-3's live params at the turn from forward to backward: what the prefetcher passed stays gathered,
    # up to max_live, and so does what is reused within the reuse distance (the module being computed on
    # top). By default that is everything the backward uses again: all but the input embedding and, without
    # checkpointing, the first layer's frozen attention and MLP (their input needs no gradient). Under a cap
    # that binds (and no reuse distance), the cap within one module.
    facts = model_facts(tiny_cfg(3, hidden_size=64, intermediate_size=128))
    for name, values in LIVE_CAPS.items():
        ds = choice_ds(tiny_cfg(3, hidden_size=64, intermediate_size=128), Choice(3))
        knobs = Knobs.from_ds({"zero_optimization": {**ds["zero_optimization"], **NO_PERSISTENCE, **values}})
        predicted = memory_terms(facts, knobs, ActivationFit(0, 0, 0, 0), 2, 1, 4, 0.0, on_cpu=True)
        predicted = predicted.zero3_live_params / 4
        got = measured["live"][name]["gathered"]
        assert got <= predicted, (name, got, predicted, facts.total)
    unused_in_backward = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                          "model.layers.0.post_attention_layernorm.weight"] + [
        f"model.layers.0.{m}.weight" for m in ("mlp.mlp.down_proj", "mlp.mlp.gate_proj", "mlp.mlp.up_proj",
                                               "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                               "self_attn.v_proj")]
    assert measured["live"]["default"]["released"] == sorted(unused_in_backward)
    cap = LIVE_CAPS["capped"]["stage3_max_live_parameters"]
    assert cap - facts.largest_module <= measured["live"]["capped"]["gathered"]


def _cluster(mem_gib: float, gpus: int = 8, nodes: int = 1) -> Cluster:
    hw = Hardware(989e12, 0.4, 200e9, 40e9, 25e9, 1e9)
    return Cluster(gpus, nodes, mem_gib * 2**30, None, False, hw, {1: 2**31, 2: 2**31, 3: 2**31}, 2**31)


def run_plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cannot_fit_is_one_line_naming_the_overflowing_term():
    yaml = ROOT / "configs" / "llama3_8b_fr.yaml"
    hf = backbone_config(yaml)
    proc = run_plan(str(yaml), *hf, "--gpus-per-node", "1", "--gpu-mem", "4GiB", "--seq-len", "1024")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("cannot fit: ") and "\n" not in last
    # The term it names is the largest one of the closest choice, as the model computes it.
    cfg = load_config(yaml)
    rows = evaluate(cfg, model_facts(cfg, hf[1]), _cluster(4, gpus=1), 1024)
    best = min(rows, key=lambda r: r.terms.peak)
    assert best.choice.offload_param and best.terms.peak > 4 * 2**30
    assert f"even {best.choice.label} at micro batch 1" in last
    assert f"largest term is {best.terms.overflowing().replace('_', ' ')}" in last


@pytest.mark.parametrize("yaml", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_plan_every_shipped_config(yaml, tmp_path, capsys):
    """In-process (the CLI's own `main`): the subprocess path is the cannot-fit test's."""
    from trainer.planner.cli import main

    out = tmp_path / "ds.json"
    code = main([str(yaml), *backbone_config(yaml), "--nodes", "4", "--seq-len", "512", "--write-ds-config", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-2000:] + captured.err[-2000:]
    assert out.is_file()
    lines = captured.out.splitlines()
    assert sum(line.startswith("| ZeRO-") for line in lines) == 10
    assert sum("(recommended)" in line for line in lines) == 1
    overrides = next(line for line in lines if line.startswith("overrides: ")).split()[1:]
    # The written JSON and the overrides make a config the trainer's own resolver accepts.
    from trainer.engine.ds_config import build_ds_config

    cfg = load_config(yaml, overrides)
    ds = build_ds_config(cfg, 32, on_gpu=True, bf16_ok=True)
    label = next(line for line in lines if "(recommended)" in line)
    assert f"ZeRO-{ds['zero_optimization']['stage']}" in label
    assert ("opt offload" in label) == ("offload_optimizer" in ds["zero_optimization"])


def test_terms_follow_the_ds_config_values():
    """Buckets, live parameters and persistence come from the JSON, not from constants."""
    cfg = tiny_cfg(3)
    facts = model_facts(cfg)
    base = {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 500,
            "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}
    small = memory_terms(facts, Knobs.from_ds({"zero_optimization": base}), ActivationFit(0, 0, 0, 0), 1, 2, 2,
                         0.0, on_cpu=False)
    big = memory_terms(facts, Knobs.from_ds({"zero_optimization": {
        **base, "reduce_bucket_size": 3000, "stage3_prefetch_bucket_size": 1500,
        "stage3_param_persistence_threshold": 100}}), ActivationFit(0, 0, 0, 0), 1, 2, 2, 0.0, on_cpu=False)
    assert big.buckets - small.buckets == 2 * 2000 * 2
    assert big.frozen_weights > small.frozen_weights  # the norms (32 elements) now stay whole
    # What the prefetcher passed stays gathered up to max_live, and what is reused within the reuse
    # distance (about half of it at the turn), plus the module being computed; never more than the model.
    live = lambda **z: memory_terms(facts, Knobs.from_ds({"zero_optimization": {"stage": 3, **z}}),
                                    ActivationFit(0, 0, 0, 0), 1, 2, 2, 0.0, on_cpu=False).zero3_live_params
    assert live() == facts.total * 2  # both 1e9 by default: a tiny model stays whole
    assert live(stage3_max_live_parameters=300) == facts.total * 2
    assert live(stage3_max_live_parameters=300, stage3_max_reuse_distance=0) == (300 + facts.largest_module) * 2
    assert live(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=400) == (200 + facts.largest_module) * 2
    # max_live bounds the prefetcher, not what the reuse distance keeps.
    assert live(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=400, stage3_max_live_parameters=100) \
        == (200 + facts.largest_module) * 2
