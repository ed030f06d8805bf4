"""DeepSpeed JSON "auto" filling and the batch arithmetic."""
import json

import pytest

from trainer.config import ConfigError, load_config
from trainer.engine.ds_config import batch_arithmetic, build_ds_config

BASE = {
    "model": {"config": {"model_type": "llama"}},
    "data": {"streams": [{"domain": "en", "train": "/a", "role": "original"}, {"domain": "fr", "train": "/b"}]},
    "train": {"global_batch_size": 16, "micro_batch_size": 2, "grad_clip": 0.5, "lr": 1e-3, "betas": [0.9, 0.99]},
}


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_every_shipped_config_resolves(name):
    cfg = load_config(data=BASE, overrides=[f"deepspeed.config=ds_configs/{name}.json"])
    ds = build_ds_config(cfg, world_size=4, on_gpu=True)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["betas"] == [0.9, 0.99]
    assert "auto" not in json.dumps(ds)


def test_cpu_is_fp32_with_torch_adam():
    ds = build_ds_config(load_config(data=BASE), world_size=1, on_gpu=False)
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_accumulation_steps"] == 8


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
