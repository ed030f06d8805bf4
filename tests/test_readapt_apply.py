"""readapt apply: base + a*Psi + b*Delta for every kind of Psi, the scaling endpoints, the written HF dir.

Psi here is trained in-process (a few AdamW steps on a tiny Llama) and saved like an
export: adapters-only files for neutral residues and LoRA, a full HF dir for
finetune. test_readapt_runs.py repeats the key checks with Psi from real training runs.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from test_readapt_delta import perturbed, save_pair
from tiny_models import random_batch
from trainer.export.adapters_io import load_adapters, save_adapters
from trainer.config import MethodConfig
from trainer.method.extend import adapter_blocks, extend_model, trainable_named_parameters
from trainer.readapt.cli import main
from trainer.readapt.apply import apply, build, recombine
from trainer.readapt.delta import DeltaDir, compute_delta
from trainer.readapt.io import Checkpoint, ReadaptError
from trainer.readapt.lore import compress

IDS = random_batch(2, 16, seed=3)
PSI_KINDS = ("none", "neutral_residues", "lora", "finetune")


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


def train_psi(base_dir, method: MethodConfig, steps: int = 6):
    """Extend the base and take a few AdamW steps on random text: a small but real knowledge adapter."""
    model = load(base_dir)
    extend_model(model, method)
    opt = torch.optim.AdamW([p for _, p in trainable_named_parameters(model)], lr=2e-2)
    model.train()
    for step in range(steps):
        x = random_batch(4, 16, seed=100 + step)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """base/instruct dirs, their delta and tau=1 LoRE, and one Psi of each kind saved like an export."""
    root = tmp_path_factory.mktemp("apply")
    base, inst = save_pair(root, "llama")
    compute_delta(base, inst, root / "delta")
    compress(root / "delta", root / "lore", tau=1.0)
    psi = {"none": None}
    for name, method in (("neutral_residues", MethodConfig(name="neutral_residues", hidden_size=16)),
                         ("lora", MethodConfig(name="lora", lora_rank=4))):
        save_adapters(train_psi(base, method), method, root / name / "adapters", base_model=str(base))
        psi[name] = root / name  # an export dir: Psi is found in its adapters/
    perturbed(load(base), seed=5, scale=0.03).save_pretrained(root / "finetune" / "hf")
    psi["finetune"] = root / "finetune"
    return {"root": root, "base": base, "inst": inst, "delta": root / "delta", "lore": root / "lore", "psi": psi}


@pytest.mark.parametrize("kind", PSI_KINDS)
def test_a_b_zero_is_the_base_and_a_zero_b_one_the_instruct_model(setup, kind):
    base_logits, inst_logits = logits(load(setup["base"])), logits(load(setup["inst"]))
    assert not torch.allclose(base_logits, inst_logits, atol=1e-3)
    zero, _, _ = build(setup["base"], setup["delta"], setup["psi"][kind], a=0, b=0)
    assert torch.equal(logits(zero), base_logits)
    instruct, _, _ = build(setup["base"], setup["delta"], setup["psi"][kind], a=0, b=1)
    assert torch.equal(logits(instruct), inst_logits)
    if kind != "none":  # and Psi does something, so the endpoints are not trivially reached
        both, _, _ = build(setup["base"], setup["delta"], setup["psi"][kind], a=1, b=1)
        assert not torch.allclose(logits(both), inst_logits, atol=1e-4)


@pytest.mark.parametrize("family", ("gemma", "qwen2"))
def test_endpoints_on_other_families(tmp_path, family):
    """Gemma ties the LM head to the embedding (one tensor, two names); Qwen2 has attention biases."""
    base, inst = save_pair(tmp_path, family)
    compute_delta(base, inst, tmp_path / "delta")
    perturbed(load(base), seed=4).save_pretrained(tmp_path / "ft")
    for psi in (None, tmp_path / "ft"):
        assert torch.equal(logits(build(base, tmp_path / "delta", psi, a=0, b=0)[0]), logits(load(base)))
        assert torch.equal(logits(build(base, tmp_path / "delta", psi, a=0, b=1)[0]), logits(load(inst)))


def test_a_one_b_one_equals_applying_both(setup):
    """Adapters: the instruct model with Psi attached as trained. LoRA: the same, via peft's own forward."""
    for kind in ("neutral_residues", "lora"):
        reference = load(setup["inst"])
        # Trained on the base: onto the instruct weights only when allowed (what a = b = 1 amounts to).
        load_adapters(reference, setup["psi"][kind] / "adapters", allow_other_weights=True)
        model, method, _ = build(setup["base"], setup["delta"], setup["psi"][kind], a=1, b=1)
        assert torch.allclose(logits(model), logits(reference), atol=1e-5), kind
    # finetune: W = base + (trained - base) + (instruct - base) = trained + Delta.
    trained, inst, base = (Checkpoint(p) for p in (setup["psi"]["finetune"] / "hf", setup["inst"], setup["base"]))
    model, _, _ = build(setup["base"], setup["delta"], setup["psi"]["finetune"], a=1, b=1)
    params = dict(model.named_parameters())
    for name in base.names:
        expected = trained.read(name) + inst.read(name) - base.read(name)
        assert torch.allclose(params[name], expected, atol=1e-6), name


@pytest.mark.parametrize("kind", PSI_KINDS[1:])
def test_every_weight_follows_the_formula(setup, kind):
    """base + a*Psi + b*Delta tensor by tensor, with Psi computed independently of apply's code."""
    a, b = 0.5, 0.25
    base, delta = Checkpoint(setup["base"]), DeltaDir(setup["delta"])
    model, method, info = build(setup["base"], setup["delta"], setup["psi"][kind], a=a, b=b)
    assert info["a"] == a and info["b"] == b and info["method"] == kind
    params = dict(model.named_parameters())
    if kind == "finetune":
        trained = Checkpoint(setup["psi"][kind] / "hf")
        psi = {n: trained.read(n).double() - base.read(n).double() for n in base.names}
    elif kind == "lora":
        from safetensors.torch import load_file
        saved = load_file(str(setup["psi"][kind] / "adapters" / "adapters.safetensors"))
        psi = {}
        for key in saved:
            if key.endswith("lora_B.default.weight"):
                prefix = key.removesuffix(".lora_B.default.weight")
                psi[prefix + ".weight"] = saved[key].double() @ saved[prefix + ".lora_A.default.weight"].double()
        assert len(psi) == 6  # gate/up/down x 2 layers; lora_alpha = rank, so scaling 1
        assert not any("lora" in n or "base_layer" in n for n in params)  # LoRA layers are gone
    else:
        psi = {}
        saved = load(setup["base"])
        load_adapters(saved, setup["psi"][kind] / "adapters")
        for trained, block in zip(adapter_blocks(saved), adapter_blocks(model)):
            assert torch.equal(block.adapter.w_o, a * trained.adapter.w_o)  # g*A scaled by exactly a
            assert torch.equal(block.adapter.w_g, trained.adapter.w_g)
            assert torch.equal(block.adapter.w_b, trained.adapter.w_b)
        params = {n.replace(".mlp.mlp.", ".mlp."): p for n, p in params.items()}
    for name in base.names:
        expected = base.read(name).double() + b * delta.read(name).double()
        if name in psi:
            expected += a * psi[name]
        assert torch.allclose(params[name].double(), expected, atol=1e-7, rtol=0), name


def test_lore_delta_applies_like_the_full_delta_at_tau_one(setup):
    model, _, info = build(setup["base"], setup["lore"], setup["psi"]["neutral_residues"], a=0, b=1)
    assert info["delta_kind"] == "lore" and info["tau"] == 1.0
    assert torch.allclose(logits(model), logits(load(setup["inst"])), atol=1e-4)


@pytest.mark.parametrize("kind", ("none", "lora", "finetune"))
def test_written_dir_loads_like_any_export(setup, tmp_path, kind):
    out = tmp_path / "out"
    expected = logits(build(setup["base"], setup["delta"], setup["psi"][kind])[0])  # a = b = 0.5
    info = apply(setup["base"], setup["delta"], out, setup["psi"][kind])
    loaded = load(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.allclose(logits(loaded), expected, atol=1e-6)
    assert (out / "readapt_apply.json").is_file() and info["tokenizer_files"]["from"] == str(setup["inst"].resolve())
    assert (out / "generation_config.json").is_file()


def test_gated_adapters_are_written_with_remote_code(setup, tmp_path):
    """The scaled adapters go through the export's remote-code writer (loaded back in test_readapt_runs)."""
    out = tmp_path / "out"
    apply(setup["base"], setup["delta"], out, setup["psi"]["neutral_residues"], a=0.5)
    assert "auto_map" in (out / "config.json").read_text() and (out / "modeling_parallel_adapter.py").is_file()
    from safetensors import safe_open
    trained = load(setup["base"])
    load_adapters(trained, setup["psi"]["neutral_residues"] / "adapters")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for i, block in enumerate(adapter_blocks(trained)):
            assert torch.equal(f.get_tensor(f"model.layers.{i}.mlp.adapter.w_o"), 0.5 * block.adapter.w_o)


def test_psi_trained_on_another_backbone_is_refused(setup):
    """An adapter trained on the instruct model (a likely mistake) carries the wrong frozen backbone."""
    model = load(setup["inst"])
    extend_model(model, MethodConfig(name="neutral_residues", hidden_size=8))
    method = MethodConfig(name="neutral_residues", hidden_size=8)
    with pytest.raises(ReadaptError, match=r"tensor lm_head.weight: the Psi model's backbone differs"):
        recombine(model, method, Checkpoint(setup["base"]), DeltaDir(setup["delta"]), 0.5, 0.5)


def test_bad_inputs(setup, tmp_path, capsys):
    other = tmp_path / "other"
    perturbed(load(setup["base"]), seed=9, scale=1e-3).save_pretrained(other)
    with pytest.raises(ReadaptError, match="weights differ from the base the delta was computed from"):
        build(other, setup["delta"])
    save_pair(tmp_path / "qwen", "qwen2")
    with pytest.raises(ReadaptError, match="model_type is 'qwen2' in the Psi model but 'llama'"):
        build(setup["base"], setup["delta"], tmp_path / "qwen" / "base")
    with pytest.raises(ReadaptError, match="not a run directory, an adapters directory"):
        build(setup["base"], setup["delta"], tmp_path)
    with pytest.raises(ReadaptError, match="no readapt.json"):
        build(setup["base"], tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("run_dir: x\nmodel: {path: /nonexistent}\n")
    with pytest.raises(ReadaptError):
        build(setup["base"], setup["delta"], tmp_path / "run")
    argv = ["apply", "--delta", str(setup["delta"]), "--psi", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_delta_lore_apply(setup, tmp_path, capsys):
    d, lo, out = tmp_path / "d", tmp_path / "lo", tmp_path / "out"
    assert main(["delta", str(setup["base"]), str(setup["inst"]), "--out", str(d)]) == 0
    assert main(["lore", str(d), "--out", str(lo), "--tau", "0.5", "--quiet"]) == 0
    assert main(["apply", "--delta", str(lo), "--psi", str(setup["psi"]["lora"]), "--a", "1", "--b", "0.5",
                 "--out", str(out)]) == 0  # --base defaults to the delta's
    printed = capsys.readouterr().out
    assert '"delta_kind": "lore"' in printed and '"a": 1.0' in printed
    model = load(out)
    reference, _, _ = build(setup["base"], lo, setup["psi"]["lora"], a=1, b=0.5)
    assert torch.allclose(logits(model), logits(reference), atol=1e-6)
