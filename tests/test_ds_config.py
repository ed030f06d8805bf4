"""DeepSpeed JSON "auto" filling and the batch arithmetic."""
import json

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.engine.ds_config import batch_arithmetic, build_ds_config
from trainer.engine.model import resolve_dtype

BASE = {
    "model": {"config": {"model_type": "llama"}},
    "data": {"streams": [{"domain": "en", "train": "/a", "role": "original"}, {"domain": "fr", "train": "/b"}]},
    "train": {"global_batch_size": 16, "micro_batch_size": 2, "grad_clip": 0.5, "lr": 1e-3, "betas": [0.9, 0.99]},
}


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_every_shipped_config_resolves(name):
    cfg = load_config(data=BASE, overrides=[f"deepspeed.config=ds_configs/{name}.json"])
    ds = build_ds_config(cfg, world_size=4, on_gpu=True, bf16_ok=True)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["betas"] == [0.9, 0.99]
    assert "auto" not in json.dumps(ds)


def test_cpu_is_fp32_with_torch_adam():
    ds = build_ds_config(load_config(data=BASE), world_size=1, on_gpu=False)
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_accumulation_steps"] == 8


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_gpu_without_bf16_trains_in_fp32(name):
    """A V100 has no native bf16: dtype auto must not turn it on there, nor switch to fp16."""
    cfg = load_config(data=BASE, overrides=[f"deepspeed.config=ds_configs/{name}.json"])
    ds = build_ds_config(cfg, world_size=4, on_gpu=True, bf16_ok=False)
    assert ds["bf16"]["enabled"] is False
    assert not ds.get("fp16", {}).get("enabled", False)
    assert "torch_adam" not in ds["optimizer"]["params"]  # still a GPU: DeepSpeed's fused Adam
    assert resolve_dtype("auto", ds) == torch.float32
    # Not knowing is not enough for bf16 either: the default is the safe fp32.
    assert build_ds_config(cfg, world_size=4, on_gpu=True)["bf16"]["enabled"] is False


def test_bf16_supported_means_native_bf16(monkeypatch):
    """torch answers True for a V100 unless asked about native support (emulated bf16 counts by default)."""
    from trainer.engine import dist

    native = {"v100": False, "a100": True}
    for gpu, has_bf16 in native.items():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=has_bf16: n or including_emulation)
        assert dist.bf16_supported() is has_bf16, gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.bf16_supported() is False  # CPU (DS_ACCELERATOR=cpu)


def test_explicit_dtype_wins_over_the_device():
    fp16 = build_ds_config(load_config(data=BASE, overrides=["model.dtype=float16"]), 1, on_gpu=True, bf16_ok=False)
    assert fp16["fp16"]["enabled"] is True and fp16["bf16"]["enabled"] is False
    bf16 = build_ds_config(load_config(data=BASE, overrides=["model.dtype=bfloat16"]), 1, on_gpu=True, bf16_ok=False)
    assert bf16["bf16"]["enabled"] is True


def test_batch_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size=2 x world size 3"):
        build_ds_config(load_config(data=BASE), world_size=3, on_gpu=False)
    assert batch_arithmetic(12, 2, 3) == 2


def test_user_json_with_conflicting_batch_is_refused(tmp_path):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    cfg = load_config(data=BASE, overrides=[f"deepspeed.config={user}"])
    with pytest.raises(ConfigError, match="batch sizes disagree"):
        build_ds_config(cfg, world_size=1, on_gpu=False)


def test_user_json_missing_or_broken(tmp_path):
    cfg = load_config(data=BASE, overrides=["deepspeed.config=/nope.json"])
    with pytest.raises(ConfigError, match="deepspeed.config: /nope.json: file not found"):
        build_ds_config(cfg, 1, False)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "zero_optimization": {,}\n}')
    cfg = load_config(data=BASE, overrides=[f"deepspeed.config={bad}"])
    with pytest.raises(ConfigError, match=rf"{bad}:2: invalid JSON"):
        build_ds_config(cfg, 1, False)


def test_an_optimizer_without_betas_gets_none(tmp_path):
    """SGD's constructor has no `betas`: filling them in would fail inside deepspeed.initialize."""
    user = tmp_path / "sgd.json"
    user.write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"lr": "auto"}},
                                "zero_optimization": {"stage": 3}}))
    cfg = load_config(data=BASE, overrides=[f"deepspeed.config={user}", "train.lr=0.01"])
    params = build_ds_config(cfg, 1, False)["optimizer"]["params"]
    assert params == {"lr": 0.01, "weight_decay": cfg.train.weight_decay}
    import torch.optim

    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **params)  # what DeepSpeed will call
    adam = build_ds_config(load_config(data=BASE), 1, False)["optimizer"]["params"]
    assert adam["betas"] == list(cfg.train.betas) and adam["torch_adam"] is True
    user.write_text(json.dumps({"optimizer": {"type": "OneBitAdam", "params": {}}, "zero_optimization": {"stage": 2}}))
    onebit = build_ds_config(load_config(data=BASE, overrides=[f"deepspeed.config={user}"]), 1, False)
    assert onebit["optimizer"]["params"]["betas"] == list(cfg.train.betas)
