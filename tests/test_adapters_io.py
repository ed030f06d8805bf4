"""Adapters-only save/load: exact key set, exact logits on a fresh backbone, wrong backbones refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import FAMILIES, one_thread, random_batch, tiny_model, train_steps  # noqa: F401
from trainer.export.adapters_io import CONFIG_NAME, WEIGHTS_NAME, load_adapters, save_adapters
from trainer.config import METHODS, MethodConfig
from trainer.method.extend import count_parameters, extend_model, get_extension

MIXED = torch.tensor([[True], [False]])


def expected_keys(family: str, method: str, num_layers: int = 2) -> set[str]:
    if method == "finetune":
        return {n for n, _ in tiny_model(family).named_parameters()}
    if method == "lora":
        return {f"model.layers.{i}.mlp.{proj}.lora_{ab}.default.weight"
                for i in range(num_layers) for proj in ("gate_proj", "up_proj", "down_proj") for ab in "AB"}
    weights = ("w_g", "w_i", "w_o") + (("w_b",) if method != "adapters" else ())
    return {f"model.layers.{i}.mlp.adapter.{w}" for i in range(num_layers) for w in weights}


def trained(family, method, **kw):
    cfg = MethodConfig(name=method, alpha=1.0, **kw)
    model = tiny_model(family)
    extend_model(model, cfg)
    train_steps(model, cfg, random_batch(2, 16), MIXED, steps=3)
    return model.eval(), cfg


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_into_fresh_backbone_gives_identical_logits(tmp_path, family, method):
    model, cfg = trained(family, method)
    save_adapters(model, cfg, tmp_path, base_model=f"tiny-{family}")
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(tensors) == expected_keys(family, method)

    fresh = tiny_model(family)
    loaded = load_adapters(fresh, tmp_path)
    ids = random_batch(2, 16, seed=5)
    assert torch.equal(logits(fresh.eval(), ids), logits(model, ids))
    assert not torch.equal(logits(fresh, ids), logits(tiny_model(family), ids))  # it did learn something
    assert loaded.name == method and loaded.gate == cfg.gate and loaded.init == cfg.init
    assert count_parameters(fresh) == count_parameters(model)


def test_adapter_config_records_method_sizes_and_backbone(tmp_path):
    model, cfg = trained("gemma", "neutral_residues", extra_params=0.1)
    save_adapters(model, cfg, tmp_path, base_model="/models/tiny-gemma")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    ext = get_extension(model)
    assert config["method"]["name"] == "neutral_residues" and config["method"]["extra_params"] == 0.1
    assert config["adapter_hidden_size"] == ext.adapter_hidden_size and config["lora_rank"] is None
    assert (config["gate"], config["init"], config["base_model"]) == ("relu", "low_variance", "/models/tiny-gemma")
    assert config["backbone"]["model_class"] == "GemmaForCausalLM"
    assert (config["backbone"]["hidden_size"], config["backbone"]["num_layers"]) == (64, 2)
    assert len(config["backbone"]["config_sha256"]) >= 16
    assert config["trainable_params"] == count_parameters(model)["trainable"]


def test_saved_sizes_win_over_extra_params(tmp_path):
    """The loader rebuilds the saved hidden size / rank, not one re-derived from extra_params."""
    model, cfg = trained("llama", "lora", lora_rank=5)
    save_adapters(model, cfg, tmp_path, base_model="tiny")
    fresh = tiny_model("llama")
    assert load_adapters(fresh, tmp_path).lora_rank == 5
    assert get_extension(fresh).lora_rank == 5


@pytest.mark.parametrize("other,key", [
    (dict(family="llama", hidden_size=32, intermediate_size=64), "hidden_size"),
    (dict(family="llama", num_hidden_layers=3), "num_layers"),
    (dict(family="mistral"), "model_class"),
    (dict(family="llama", rope_theta=500000.0), "config_sha256"),
])
def test_a_mismatching_backbone_is_refused(tmp_path, other, key):
    model, cfg = trained("llama", "neutral_residues")
    save_adapters(model, cfg, tmp_path, base_model="tiny-llama")
    family = other.pop("family")
    wrong = tiny_model(family, **other)
    with pytest.raises(ValueError, match=key):
        load_adapters(wrong, tmp_path)
    assert get_extension(wrong) is None  # refused before touching the model


def test_a_dtype_change_is_not_a_different_backbone(tmp_path):
    model, cfg = trained("qwen2", "neutral_residues")
    save_adapters(model, cfg, tmp_path, base_model="tiny")
    fresh = tiny_model("qwen2").to(torch.bfloat16)
    fresh.config.dtype = torch.bfloat16
    load_adapters(fresh, tmp_path)
    assert fresh.model.layers[0].mlp.adapter.w_o.dtype == torch.bfloat16


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(ValueError, match=CONFIG_NAME):
        load_adapters(tiny_model("llama"), tmp_path)


def test_saving_an_unextended_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not extended"):
        save_adapters(tiny_model("llama"), MethodConfig(), tmp_path, base_model="tiny")
