"""Config loading: defaults, overrides, and errors that name the key (and file:line)."""
import pytest
import yaml

from trainer.config import ConfigError, load_config, save_config

BASE = {
    "run_dir": "/tmp/x",
    "model": {"config": {"model_type": "llama"}},
    "data": {"streams": [{"domain": "en", "train": "/a", "role": "original"}, {"domain": "fr", "train": "/b"}]},
}


def write(tmp_path, data) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(p)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.max_steps=7", "method.alpha=1", "data.streams.1.val=/c",
                                              "method.name=adapters"])
    assert cfg.train.max_steps == 7 and cfg.method.alpha == 1.0 and isinstance(cfg.method.alpha, float)
    assert cfg.data.streams[1].val == "/c" and cfg.data.streams[1].role == "new"
    assert cfg.method.gate == "none" and cfg.method.init == "he"  # derived from the method
    assert cfg.lr == 5e-5
    assert load_config(data=BASE, overrides=["method.name=finetune"]).lr == 2e-4
    assert load_config(data=BASE, overrides=["train.lr=1e-3"]).lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_unknown_key_names_file_line_and_key(tmp_path):
    bad = {**BASE, "method": {"name": "neutral_residues", "alpah": 3}}
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    line = next(i for i, l in enumerate(open(path), 1) if "alpah" in l)
    assert f"{path}:{line}: method.alpah: unknown key" in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("train.max_steps=abc", "override train.max_steps: expected int"),
    ("method.name=lora2", "method.name: 'lora2' is not one of"),
    ("train.activation_checkpointing=3", "train.activation_checkpointing: expected true/false"),
    ("data.p=1.5", "data.p: 1.5 must be in [0, 1]"),
    ("nosuch.key=1", "nosuch: unknown key"),
    ("data.streams.5.val=x", "override data.streams.5.val: no such entry"),
    ("train.max_steps", "expected key.sub=value"),
    ("train.lr=-1", "override train.lr: -1.0 must be > 0"),
    ("train.lr=0", "override train.lr: 0.0 must be > 0"),
    ("train.lr=.nan", "override train.lr: nan must be > 0"),
    ("train.betas=[0.9, 1.0]", "override train.betas: [0.9, 1.0] must be in [0, 1)"),
    ("train.weight_decay=-0.1", "override train.weight_decay: -0.1 must be >= 0"),
    ("train.warmup_steps=-1", "override train.warmup_steps: -1 must be >= 0"),
    ("train.min_lr_ratio=1.5", "override train.min_lr_ratio: 1.5 must be in [0, 1]"),
    ("train.grad_clip=-1", "override train.grad_clip: -1.0 must be >= 0"),
    ("train.seed=-1", "override train.seed: -1 must be in [0, 2**32)"),
    ("train.micro_batch_size=0", "override train.micro_batch_size: must be >= 1"),
    ("log.every=0", "override log.every: 0 must be >= 1"),
    ("eval.batch_size=0", "override eval.batch_size: 0 must be >= 1"),
    ("eval.max_batches=0", "override eval.max_batches: 0 must be >= 1"),
    ("data.num_canonical_nodes=0", "override data.num_canonical_nodes: 0 must be >= 1"),
    ("data.streams.1.weight=-1", "data.streams[fr].weight: -1.0 must be >= 0"),
])
def test_bad_values_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(write(tmp_path, BASE), [override])
    assert needle in str(e.value)


def test_two_streams_of_one_domain_name_file_and_line(tmp_path):
    streams = [*BASE["data"]["streams"], {"domain": "en", "val": "/c"}]
    path = write(tmp_path, {**BASE, "data": {"streams": streams}})
    line = [i for i, l in enumerate(open(path), 1) if "domain: en" in l][1]
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}:{line}: data.streams.2.domain: 'en' is already the domain of data.streams.0 "
                            "(one stream per domain)")


def test_missing_sections_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model: required section"):
        load_config(data={"data": BASE["data"]})
    p = tmp_path / "broken.yaml"
    p.write_text("model:\n  path: [a\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+: invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_p_needs_an_original_stream():
    data = {**BASE, "data": {"p": 0.1, "streams": [{"domain": "fr", "train": "/b"}]}}
    with pytest.raises(ConfigError, match="no stream has role: original"):
        load_config(data=data)
    data["data"]["p"] = 0.0
    assert load_config(data=data).data.p == 0.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["method.alpha=2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
