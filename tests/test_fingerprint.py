"""The weights fingerprint: what it sees and misses, and that resumes and adapter loads use it."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from launch import run, train_cmd, write_config
from mds_fixtures import tiny_run_config, two_domain_data
from tiny_models import one_thread, random_batch, tiny_model, train_steps  # noqa: F401
from trainer.config import ConfigError, MethodConfig
from trainer.engine import checkpoint
from trainer.engine.fingerprint import (CHUNK_BYTES, chunk_starts, dir_fingerprint, module_fingerprint,
                                        weights_fingerprint)
from trainer.export.adapters_io import load_adapters, save_adapters
from trainer.method.extend import extend_model


def header(fp):
    return fp.split("-")[0]


def sample(fp):
    return fp.split("-")[1]


def saved(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def test_same_weights_same_fingerprint_from_files_and_from_memory(tmp_path):
    model = tiny_model("llama", seed=0)
    fp = dir_fingerprint(saved(model, tmp_path / "one"))
    assert fp == dir_fingerprint(tmp_path / "one")
    assert fp == dir_fingerprint(saved(tiny_model("llama", seed=0), tmp_path / "again"))
    # Sharded: the index's files, tensor names in one order whatever the file they are in.
    assert len(list(saved(model, tmp_path / "shards", max_shard_size="20KB").glob("*.safetensors"))) > 1
    assert dir_fingerprint(tmp_path / "shards") == fp
    # From memory: the same tensors, also behind the adapters, LoRA layers and a finetune.
    assert module_fingerprint(model) == fp
    for method in ("neutral_residues", "lora", "finetune"):
        extended = tiny_model("llama", seed=0)
        extend_model(extended, MethodConfig(name=method))
        assert module_fingerprint(extended) == fp, method
    # A .bin checkpoint has no safetensors: the loaded model is fingerprinted instead.
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert dir_fingerprint(tmp_path / "bin") is None
    assert weights_fingerprint(tmp_path / "bin", model) == fp


def test_another_seed_differs_in_the_sample_not_the_header(tmp_path):
    a = dir_fingerprint(saved(tiny_model("llama", seed=0), tmp_path / "a"))
    b = dir_fingerprint(saved(tiny_model("llama", seed=1), tmp_path / "b"))
    assert header(a) == header(b) and sample(a) != sample(b)
    assert module_fingerprint(tiny_model("llama", seed=1)) == b


def test_header_catches_shape_and_dtype_with_the_same_bytes(tmp_path):
    def fp(name, tensor):
        (tmp_path / name).mkdir()
        save_file({"w": tensor}, str(tmp_path / name / "model.safetensors"))
        return dir_fingerprint(tmp_path / name)

    base = fp("base", torch.zeros(4, 8))
    for name, other in (("shape", torch.zeros(8, 4)), ("dtype", torch.zeros(4, 8, dtype=torch.int32)),
                        ("name", None)):
        if other is None:
            (tmp_path / name).mkdir()
            save_file({"v": torch.zeros(4, 8)}, str(tmp_path / name / "model.safetensors"))
            got = dir_fingerprint(tmp_path / name)
        else:
            got = fp(name, other)
        assert sample(got) == sample(base) and header(got) != header(base), name
    # A bf16 copy of the same model: other dtype, other bytes.
    model = tiny_model("llama")
    a, b = dir_fingerprint(saved(model, tmp_path / "f32")), dir_fingerprint(saved(model.to(torch.bfloat16),
                                                                                  tmp_path / "bf16"))
    assert header(a) != header(b) and sample(a) != sample(b)


def _edit_byte(file: Path, offset: int) -> None:
    """Flip one byte of the first tensor's data (offset from the start of the data section)."""
    raw = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + offset] ^= 0xFF
    file.write_bytes(bytes(raw))


def test_a_changed_value_shows_only_if_it_lies_in_a_sampled_chunk(tmp_path):
    model = tiny_model("llama")
    fp = dir_fingerprint(saved(model, tmp_path / "m"))
    file = tmp_path / "m" / "model.safetensors"
    info = json.loads(file.read_bytes()[8:8 + int.from_bytes(file.read_bytes()[:8], "little")])
    name = min((n for n in info if n != "__metadata__"), key=lambda n: info[n]["data_offsets"][0])
    begin, end = info[name]["data_offsets"]
    starts = chunk_starts(end - begin)
    assert len(starts) == 16 and end - begin > 16 * CHUNK_BYTES  # a tensor that is sampled, not read whole
    inside, gap = starts[1][0] + 3, starts[0][0] + CHUNK_BYTES + 5
    assert gap < starts[1][0]
    _edit_byte(file, begin + gap)
    assert dir_fingerprint(tmp_path / "m") == fp  # not sampled: not seen (a cost we accept for speed)
    _edit_byte(file, begin + inside)
    changed = dir_fingerprint(tmp_path / "m")
    assert header(changed) == header(fp) and sample(changed) != sample(fp)
    # The same in memory: one element inside a chunk of the embedding, one between chunks.
    emb = model.model.embed_tokens.weight
    memory = module_fingerprint(model)
    chunks = chunk_starts(emb.numel() * emb.element_size())
    with torch.no_grad():
        emb.view(-1)[(chunks[0][0] + CHUNK_BYTES) // 4 + 1] += 1.0
        assert module_fingerprint(model) == memory
        emb.view(-1)[chunks[2][0] // 4] += 1.0
    assert sample(module_fingerprint(model)) != sample(memory)


def test_checkpoints_without_a_fingerprint_are_accepted_with_a_warning(caplog):
    meta = {"method": "adapters", "model_hash": "h", "trainable_params": 3}
    ours = {**meta, "weights_fingerprint": "a-b"}
    with caplog.at_level("WARNING", logger="trainer"):
        checkpoint.check_compatible(meta, ours, Path("ckpt/step_1"))
    assert "no weights fingerprint" in caplog.text
    with pytest.raises(ConfigError, match=r"fingerprint c-d, but .* fingerprint a-b.*checkpoint.allow_other_weights"):
        checkpoint.check_compatible({**meta, "weights_fingerprint": "c-d"}, ours, Path("ckpt/step_1"))
    checkpoint.check_compatible({**meta, "weights_fingerprint": "c-d"}, ours, Path("x"), allow_other_weights=True)


# ----------------------------------------------------------------------------- adapters-only


def trained_adapters(tmp_path, seed=0):
    cfg = MethodConfig(name="neutral_residues", alpha=1.0)
    model = tiny_model("llama", seed=seed)
    extend_model(model, cfg)
    train_steps(model, cfg, random_batch(2, 16), torch.tensor([[True], [False]]), steps=2)
    return save_adapters(model, cfg, tmp_path / "adapters", base_model="tiny")


def test_adapters_load_only_onto_the_weights_they_were_trained_on(tmp_path):
    path = trained_adapters(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["weights_fingerprints"]["float32"] == module_fingerprint(tiny_model("llama", seed=0))
    load_adapters(tiny_model("llama", seed=0), path)
    load_adapters(tiny_model("llama", seed=0).to(torch.bfloat16), path)  # the same weights in bf16
    other = tiny_model("llama", seed=1)
    with pytest.raises(ConfigError) as e:
        load_adapters(other, path)
    msg = str(e.value)
    assert "\n" not in msg and "allow_other_weights=True" in msg
    assert config["weights_fingerprints"]["float32"] in msg and module_fingerprint(other) in msg
    load_adapters(other, path, allow_other_weights=True)
    assert other.model.layers[0].mlp.adapter.w_o.abs().sum() > 0


def test_readapt_refuses_adapters_of_another_base_unless_allowed(tmp_path):
    from trainer.readapt.apply import load_psi
    from trainer.readapt.io import ReadaptError

    path = trained_adapters(tmp_path)
    base = saved(tiny_model("llama", seed=0), tmp_path / "base")
    other = saved(tiny_model("llama", seed=1), tmp_path / "other")
    assert load_psi(path, base, torch.float32)[1].name == "neutral_residues"
    assert load_psi(path, base, torch.bfloat16)[1].name == "neutral_residues"
    with pytest.raises(ReadaptError, match="--allow-other-weights"):
        load_psi(path, other, torch.float32)
    assert load_psi(path, other, torch.float32, allow_other_weights=True)[1].name == "neutral_residues"


# ----------------------------------------------------------------------------- the real CLI


@pytest.mark.slow
def test_resume_onto_other_weights_is_refused_unless_allowed(tmp_path, capsys):
    from trainer.export.export import main as export_main

    data = two_domain_data(tmp_path / "data")
    a = saved(tiny_model("llama", seed=0), tmp_path / "a")
    b = saved(tiny_model("llama", seed=1), tmp_path / "b")
    cfg = tiny_run_config(tmp_path, data, max_steps=2)
    cfg["model"] = {"path": str(a)}
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["eval"]["at_start"] = False
    path = write_config(cfg, tmp_path / "run.yaml")
    run(train_cmd(path))
    ckpt = tmp_path / "run" / "checkpoints"
    meta = json.loads((ckpt / "step_00000002" / "meta.json").read_text())
    assert meta["weights_fingerprint"] == dir_fingerprint(a)

    refused = run(train_cmd(path, overrides=[f"model.path={b}", "train.max_steps=4"]), check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and dir_fingerprint(a) in last and dir_fingerprint(b) in last, last
    assert "checkpoint.allow_other_weights=true" in last

    allowed = run(train_cmd(path, overrides=[f"model.path={b}", "train.max_steps=4",
                                            "checkpoint.allow_other_weights=true"]))
    assert "resumed from step_00000002" in allowed.stderr and "using them anyway" in allowed.stderr
    assert json.loads((ckpt / "step_00000004" / "meta.json").read_text())["weights_fingerprint"] == \
        dir_fingerprint(b)

    # Export reads the same record: the run's model.path (b) now holds other weights.
    (b / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 2
    assert "--allow-other-weights" in capsys.readouterr().err
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--only", "adapters",
                        "--allow-other-weights"]) == 0
