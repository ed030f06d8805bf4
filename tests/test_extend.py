"""extend_model on tiny Llama/Mistral/Qwen2/Gemma: exact start, budget, freezing, checkpointing, ZeRO-3."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import FAMILIES, one_thread, random_batch, tiny_model, train_steps  # noqa: F401
from trainer.config import METHODS, MethodConfig
from trainer.method.extend import (ParallelAdapterMLP, adapter_blocks, count_parameters, enable_activation_checkpointing,
                            extend_model, set_domain, trainable_named_parameters)
from trainer.method.losses import local_loss

ROOT = Path(__file__).resolve().parents[1]
MIXED = torch.tensor([[True], [False], [True], [False]])  # samples 0, 2 original; 1, 3 new
ALL_FAMILIES = FAMILIES + ("gemma2",)  # Gemma2 is supported too: the same block, then its post-FFN norm


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_step0_logits_equal_backbone_exactly(family, method):
    backbone, model = tiny_model(family), tiny_model(family)
    added = extend_model(model, MethodConfig(name=method))
    ids = random_batch(2, 16)
    assert torch.equal(logits(model, ids), logits(backbone, ids))
    assert (len(added) == 0) == (method == "finetune")
    # Training mode with a domain mask set takes the local-loss path: still the backbone's function.
    model.train(), backbone.train()
    set_domain(model, torch.tensor([[True], [False]]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, backbone(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["neutral_residues", "adapters", "lora"])
@pytest.mark.parametrize("extra", [0.05, 0.2, 0.5])
def test_trainable_fraction_matches_extra_params(family, method, extra):
    model = tiny_model(family)
    n_backbone = sum(p.numel() for p in model.parameters())
    extend_model(model, MethodConfig(name=method, extra_params=extra))
    counts = count_parameters(model)
    assert counts["backbone"] == n_backbone
    assert counts["trainable"] == sum(p.numel() for _, p in trainable_named_parameters(model))
    assert abs(counts["fraction"] - extra) <= 0.01, counts


def test_explicit_sizes_override_extra_params():
    model = tiny_model("llama")
    extend_model(model, MethodConfig(name="neutral_residues", hidden_size=8))
    d, L = 64, 2
    assert count_parameters(model)["trainable"] == L * (3 * d * 8 + d)
    model = tiny_model("llama")
    extend_model(model, MethodConfig(name="lora", lora_rank=3))
    assert count_parameters(model)["trainable"] == L * 3 * 3 * (64 + 128)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_and_all_trainable_weights(family, method):
    model = tiny_model(family)
    cfg = MethodConfig(name=method, alpha=1.0, l1_with_sigmoid=True)
    extend_model(model, cfg)
    trainable = dict(trainable_named_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, cfg, random_batch(4, 16), MIXED, steps=4)
    for name, p in model.named_parameters():
        if name in trainable:
            changed = (p.detach() != before[name]).float().mean().item()
            # W_o = 0 / LoRA B = 0 starts mean W_g, W_i, w_b (resp. A) get a gradient from step 2 on.
            assert changed > (0.9 if method != "finetune" else 0.0), f"{name}: {changed:.0%} of entries changed"
        else:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"
    if method != "finetune":
        assert len(trainable) < len(before)


@pytest.mark.parametrize("method", ["neutral_residues", "sigmoid_gate", "adapters", "lora"])
def test_only_added_params_require_grad(method):
    model = tiny_model("qwen2")
    added = extend_model(model, MethodConfig(name=method))
    names = [n for n, _ in trainable_named_parameters(model)]
    assert names and all((".adapter." in n) if method != "lora" else (".lora_" in n) for n in names)
    added_params = {id(p) for m in added for p in m.parameters() if p.requires_grad}
    assert added_params == {id(p) for _, p in trainable_named_parameters(model)}
    if method != "lora":
        assert all(isinstance(layer.mlp, ParallelAdapterMLP) for layer in model.model.layers)
        assert all(isinstance(b.mlp, type(tiny_model("qwen2").model.layers[0].mlp)) for b in added)


def test_adapter_uses_the_backbone_activation():
    """Gemma's FFN is tanh-GELU: the adapter must call the very same act_fn, not SiLU."""
    model = tiny_model("gemma")
    extend_model(model, MethodConfig(name="adapters"))
    calls = []
    act = model.model.layers[0].mlp.mlp.act_fn
    act.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1]))
    logits(model, random_batch(1, 4))
    h = adapter_blocks(model)[0].adapter.adapter_size
    assert sorted(calls) == sorted([model.config.intermediate_size, h])  # the FFN's call and the adapter's
    assert "gelu" in type(act).__name__.lower()


def test_training_runs_the_shipped_adapter_forward():
    """The blocks subclass trainer/method/adapter.py (the file exports ship) without overriding its math."""
    from trainer.method import adapter as shipped

    assert Path(shipped.__file__).resolve() == ROOT / "trainer" / "method" / "adapter.py"
    model = tiny_model("llama")
    extend_model(model, MethodConfig())
    for block in adapter_blocks(model):
        assert isinstance(block, shipped.ParallelAdapterMLP) and isinstance(block.adapter, shipped.GatedAdapter)
        assert type(block.adapter).forward is shipped.GatedAdapter.forward
        assert type(block).forward_parts is shipped.ParallelAdapterMLP.forward_parts


@pytest.mark.parametrize("method", ["neutral_residues", "sigmoid_gate", "adapters"])
def test_local_loss_bookkeeping_leaves_the_block_output_unchanged(method):
    """A recording training forward gives the logits of the plain (exported) forward, bit for bit."""
    model = tiny_model("qwen2")
    extend_model(model, MethodConfig(name=method))
    torch.manual_seed(1)
    with torch.no_grad():
        for block in adapter_blocks(model):
            block.adapter.w_o.normal_(0.0, 0.5)
    ids = random_batch(4, 16)
    plain = logits(model.eval(), ids)
    model.train()
    set_domain(model, MIXED)
    recorded = model(input_ids=ids).logits  # with autograd: the local-grad injection is in the graph
    assert all(b.record is not None for b in adapter_blocks(model))
    assert torch.equal(recorded.detach(), plain)


def test_helpers_see_through_an_engine_wrapper():
    """The trainer may pass the DeepSpeed engine (which holds the model as `.module`)."""
    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("llama")
    extend_model(model, MethodConfig())
    engine = Engine(model)
    assert trainable_named_parameters(engine) == trainable_named_parameters(model)
    assert count_parameters(engine) == count_parameters(model)
    model.train()
    set_domain(engine, MIXED[:2])
    model(input_ids=random_batch(2, 8))
    assert all(b.record is not None for b in adapter_blocks(engine))  # set_domain reached the blocks
    assert "l1" in local_loss(engine, MethodConfig())[1]


def test_unsupported_model_class_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        extend_model(model, MethodConfig())


def test_extending_twice_is_refused():
    model = tiny_model("llama")
    extend_model(model, MethodConfig())
    with pytest.raises(ValueError, match="already extended"):
        extend_model(model, MethodConfig())


def test_domain_mask_is_validated():
    model = tiny_model("llama")
    extend_model(model, MethodConfig())
    model.train()
    with pytest.raises(TypeError, match="bool"):
        set_domain(model, torch.ones(2, 1))
    set_domain(model, torch.ones(3, 1, dtype=torch.bool))  # batch of 2 below
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        model(input_ids=random_batch(2, 8))
    model.eval()  # eval forwards ignore the (stale) mask: the trainer's eval never calls set_domain
    logits(model, random_batch(2, 8))


# ----------------------------------------------------------------------------- activation checkpointing


def _gradients(family, method, checkpointing):
    model = tiny_model(family)
    cfg = MethodConfig(name=method, alpha=10.0, l1_with_sigmoid=True)
    extend_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # move off the W_o = 0 / B = 0 start, where most adapter gradients are 0
        for _, p in trainable_named_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    if checkpointing is not None:
        enable_activation_checkpointing(model, reentrant=checkpointing == "reentrant")
    model.train()
    ids = random_batch(4, 16)
    set_domain(model, MIXED)
    out = model(input_ids=ids, labels=ids)
    local, _ = local_loss(model, cfg)
    (out.loss + local).backward()
    return {n: p.grad.clone() for n, p in trainable_named_parameters(model)}, local.item()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", ["neutral_residues", "sigmoid_gate", "lora"])
def test_checkpointing_gives_the_same_gradients(family, mode, method):
    reference, ref_local = _gradients(family, method, None)
    grads, local = _gradients(family, method, mode)
    assert local == ref_local
    assert grads.keys() == reference.keys()
    for name in reference:
        assert reference[name].abs().max() > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- ZeRO-3 on 2 ranks

LR, ALPHA = 0.5, 10.0


def _zero3_worker(work: str, method: str, reentrant: bool) -> None:
    """One rank: backbone partitioned by from_pretrained under HfDeepSpeedConfig, extended inside zero.Init
    (as trainer/engine/model.py does), checkpointed, 3 steps where rank 0 sees original and rank 1 new data."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from trainer.export.adapters_io import save_adapters

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
          # SGD, unclipped (DeepSpeed clips at 1.0 by default): updates stay linear in the gradient,
          # so the single-process reference must match to float noise (Adam would amplify that noise).
          "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_allow_untested_optimizer": True,
          "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
    keepalive = HfDeepSpeedConfig(ds)  # noqa: F841 (makes from_pretrained partition at load)
    model = AutoModelForCausalLM.from_pretrained(f"{work}/backbone", dtype=torch.float32, attn_implementation="eager")
    cfg = MethodConfig(name=method, alpha=ALPHA)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        extend_model(model, cfg)
    counts = count_parameters(model)
    shapes = sorted({tuple(p.shape) for p in model.parameters()})
    save_adapters(model, cfg, f"{work}/adapters0", base_model="tiny-llama")
    enable_activation_checkpointing(model, reentrant=reentrant)
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=[p for _, p in trainable_named_parameters(model)])
    ids = torch.load(f"{work}/ids.pt")
    engine.eval()
    with torch.no_grad():
        logits0 = engine(input_ids=ids).logits
    engine.train()
    for _ in range(3):
        set_domain(model, torch.full((2, 1), rank == 0))  # different masks per rank, same ops: lockstep
        out = engine(input_ids=ids, labels=ids)
        local, _ = local_loss(model, cfg)
        engine.backward(out.loss + local)
        engine.step()
    save_adapters(model, cfg, f"{work}/adapters", base_model="tiny-llama")
    engine.eval()
    with torch.no_grad():
        logits1 = engine(input_ids=ids).logits
    if rank == 0:
        torch.save({"logits0": logits0, "logits1": logits1}, f"{work}/out.pt")
        (Path(work) / "out.json").write_text(json.dumps({"counts": counts, "shapes": shapes}))


def _data_parallel_reference(initial_adapters: Path, ids: torch.Tensor, with_local: bool = True,
                             steps: int = 3) -> torch.Tensor:
    """What the 2 ranks must compute: the mean of both ranks' losses, one process, same SGD,
    from the same initial adapters (random inits differ between a zero.Init and a plain build)."""
    from trainer.export.adapters_io import load_adapters

    model = tiny_model("llama")
    cfg = load_adapters(model, initial_adapters)
    opt = torch.optim.SGD([p for _, p in trainable_named_parameters(model)], lr=LR)
    model.train()
    for _ in range(steps):
        for rank in range(2):
            set_domain(model, torch.full((2, 1), rank == 0))
            out = model(input_ids=ids, labels=ids)
            local, _ = local_loss(model, cfg)
            (0.5 * (out.loss + local if with_local else out.loss)).backward()
        opt.step()
        opt.zero_grad()
    return logits(model.eval(), ids)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method,reentrant", [("neutral_residues", True), ("sigmoid_gate", False),
                                              ("lora", False)])
def test_zero3_two_ranks_extend_train_save(tmp_path, method, reentrant):
    from launch import env, free_port
    from safetensors.torch import load_file

    from trainer.export.adapters_io import load_adapters

    tiny_model("llama").save_pretrained(tmp_path / "backbone")
    ids = random_batch(2, 16)
    torch.save(ids, tmp_path / "ids.pt")
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; import test_extend; "
            f"test_extend._zero3_worker({str(tmp_path)!r}, {method!r}, {reentrant})")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)

    plain = tiny_model("llama")
    extend_model(plain, MethodConfig(name=method))
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["counts"] == count_parameters(plain)  # ds_numel counting of a partitioned model
    assert result["shapes"] == [[0]]  # every param, adapters included, was partitioned
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["logits0"], logits(tiny_model("llama"), ids))  # W_o / LoRA B zero after partitioning
    fresh = tiny_model("llama")
    load_adapters(fresh, tmp_path / "adapters")  # gathered at save: a fresh plain backbone reproduces ZeRO-3's model
    torch.testing.assert_close(logits(fresh, ids), out["logits1"], rtol=0, atol=1e-5)
    assert not torch.equal(out["logits1"], out["logits0"])
    # Checkpointed ZeRO-3 training (local-loss gradient injected per rank) == plain data-parallel math.
    zero_init = [t for k, t in load_file(str(tmp_path / "adapters0" / "adapters.safetensors")).items()
                 if k.endswith(("w_o", "lora_B.default.weight"))]
    assert zero_init and all(t.abs().max() == 0 for t in zero_init)
    reference = _data_parallel_reference(tmp_path / "adapters0", ids)
    torch.testing.assert_close(out["logits1"], reference, rtol=0, atol=1e-4)
    if method != "lora":  # and the local loss mattered: without it the result is far off
        no_local = _data_parallel_reference(tmp_path / "adapters0", ids, with_local=False)
        assert (no_local - reference).abs().max() > 1e-2
