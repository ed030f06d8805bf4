"""readapt delta: exact round trip, the JSON describing both models, named mismatches, streaming memory.

The helpers here (`perturbed`, `save_pair`) are shared with the other test_readapt_* modules.
"""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tiny_models import tiny_config, tiny_model
from trainer.engine.model import backbone_hash
from trainer.readapt.cli import main
from trainer.readapt.delta import META_NAME, DeltaDir, compute_delta
from trainer.readapt.io import Checkpoint, ReadaptError, ShardWriter

ROOT = Path(__file__).resolve().parents[1]


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of `model` with every weight moved, like an instruct release of the same base."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def save_pair(root: Path, family: str = "llama", seed: int = 0, **shard) -> tuple[Path, Path]:
    """base (sharded when `shard` says so) and a perturbed 'instruct' copy, as HF dirs."""
    base = tiny_model(family, seed)
    base.save_pretrained(root / "base", safe_serialization=True, **shard)
    perturbed(base, seed + 100).save_pretrained(root / "instruct", safe_serialization=True)
    return root / "base", root / "instruct"


def shard_keys(directory: Path) -> dict[str, str]:
    keys = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys.update({k: f.name for k in h.keys()})
    return keys


@pytest.mark.parametrize("family,chunk", [("llama", 1 << 22), ("gemma", 1000), ("qwen2", 1 << 22)])
def test_base_plus_delta_is_instruct_exactly(tmp_path, family, chunk):
    base, inst = save_pair(tmp_path, family, max_shard_size="100KB")  # sharded base, single-file instruct
    assert (base / "model.safetensors.index.json").is_file() and (inst / "model.safetensors").is_file()
    meta = compute_delta(base, inst, tmp_path / "delta", max_shard_size="150KB", chunk_elements=chunk)
    assert meta["inexact_elements"] == 0
    delta, b, i = DeltaDir(tmp_path / "delta"), Checkpoint(base), Checkpoint(inst)
    assert delta.names == b.names == i.names
    for name in delta.names:
        d = delta.read(name)
        assert d.dtype == torch.float64 and d.abs().max() > 0, name  # float32 weights -> float64 delta
        assert torch.equal((b.read(name).double() + d).float(), i.read(name)), name
    # Several delta shards, and every tensor is in exactly the shard the JSON says.
    assert len(set(meta["weight_map"].values())) > 1
    assert shard_keys(tmp_path / "delta") == meta["weight_map"]


def test_json_describes_both_models(tmp_path):
    base, inst = save_pair(tmp_path)
    compute_delta(base, inst, tmp_path / "delta")
    meta = json.loads((tmp_path / "delta" / META_NAME).read_text())
    names = sorted(load_file(str(base / "model.safetensors")))
    assert meta["kind"] == "delta" and meta["dtype"] == "auto"
    assert meta["tensor_count"] == len(names) == len(shard_keys(tmp_path / "delta"))
    assert sorted(meta["tensors"]) == names
    assert meta["num_elements"] == sum(t.numel() for t in load_file(str(base / "model.safetensors")).values())
    for role, path in (("base", base), ("instruct", inst)):
        d = meta[role]
        assert d["path"] == str(path.resolve()) and d["model_type"] == "llama" and d["dtypes"] == ["float32"]
        assert d["config_sha256"] == backbone_hash(tiny_config("llama"))
        assert d["tensor_count"] == len(names)
    assert {t["dtype"] for t in meta["tensors"].values()} == {"float64"}
    # The base fingerprint depends on the base weights (apply relies on it to refuse another base).
    other = tmp_path / "other"
    perturbed(tiny_model("llama", 0), 7, 1e-3).save_pretrained(other / "base")
    assert compute_delta(other / "base", inst, other / "delta")["base"]["weights_sha256"] != \
        meta["base"]["weights_sha256"]


def _checkpoint(path: Path, tensors: dict) -> Path:
    tiny_config("llama").save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_inexact_elements_are_counted_and_the_default_dtype_avoids_them(tmp_path):
    # 1 - 2**25 needs 26 bits: in float32 it rounds to -2**25 and base + delta gives 0, not 1.
    base = _checkpoint(tmp_path / "b", {"model.layers.0.w": torch.tensor([2.0**25, 0.5])})
    inst = _checkpoint(tmp_path / "i", {"model.layers.0.w": torch.tensor([1.0, 0.75])})
    narrow = compute_delta(base, inst, tmp_path / "d32", dtype="float32")
    assert narrow["inexact_elements"] == 1 and narrow["tensors"]["model.layers.0.w"]["inexact"] == 1
    wide = compute_delta(base, inst, tmp_path / "d64")
    assert wide["inexact_elements"] == 0
    assert DeltaDir(tmp_path / "d64").read("model.layers.0.w").tolist() == [1.0 - 2.0**25, 0.25]


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_mismatches_give_an_error_naming_the_tensor_or_field(tmp_path, capsys):
    base, inst = save_pair(tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    bad_shape = _edited_copy(inst, tmp_path / "shape", lambda t: t.__setitem__(name, torch.zeros(129, 64)))
    missing = _edited_copy(inst, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ReadaptError, match=rf"tensor {name}: shape \[128, 64\] .* but \[129, 64\]"):
        compute_delta(base, bad_shape, tmp_path / "out")
    with pytest.raises(ReadaptError, match=rf"tensor {name} is in .*base but not in .*missing"):
        compute_delta(base, missing, tmp_path / "out")
    tiny_model("llama", 0, num_hidden_layers=3).save_pretrained(tmp_path / "deeper")
    with pytest.raises(ReadaptError, match="num_hidden_layers is 2 .* but 3"):
        compute_delta(base, tmp_path / "deeper", tmp_path / "out")
    tiny_model("qwen2", 0).save_pretrained(tmp_path / "qwen")
    with pytest.raises(ReadaptError, match="model_type is 'llama'"):
        compute_delta(base, tmp_path / "qwen", tmp_path / "out")
    (tmp_path / "bin").mkdir()
    with pytest.raises(ReadaptError, match="no model.safetensors"):
        compute_delta(base, tmp_path / "bin", tmp_path / "out")
    assert not (tmp_path / "out" / META_NAME).exists()

    # The CLI: one line, exit 2.
    capsys.readouterr()
    assert main(["delta", str(base), str(bad_shape), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and name in err and err.count("\n") == 1
    assert main(["delta", str(base), str(inst), "--out", str(tmp_path / "out"), "--max-shard-size", "lots"]) == 2
    assert "shard size 'lots'" in capsys.readouterr().err


def test_cli_writes_a_delta(tmp_path, capsys):
    base, inst = save_pair(tmp_path)
    assert main(["delta", str(base), str(inst), "--out", str(tmp_path / "d"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "round trip:" in out and DeltaDir(tmp_path / "d").meta["dtype"] == "float32"


def test_shard_writer_round_trips_through_safetensors(tmp_path):
    tensors = {"a": torch.randn(5, 7), "b": torch.randn(3).bfloat16(), "empty": torch.zeros(4, 0),
               "c": torch.randn(20, 5, dtype=torch.float64), "h": torch.randn(2, 2).half()}
    w = ShardWriter(tmp_path, "x", max_bytes=300, metadata={"kind": "test"})
    for name, t in tensors.items():
        if name == "c":  # written in row chunks, as compute_delta does
            w.begin(name, tuple(t.shape), t.dtype)
            w.write(t[:7])
            w.write(t[7:])
            w.end()
        else:
            w.add(name, t)
    weight_map = w.close()
    assert len(set(weight_map.values())) == 3 and not list(tmp_path.glob(".*"))  # no temp files left
    for name, t in tensors.items():
        with safe_open(str(tmp_path / weight_map[name]), "pt") as f:
            assert f.metadata() == {"kind": "test"}
            got = f.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    w = ShardWriter(tmp_path / "short", "x", max_bytes=1000)
    w.begin("t", (4, 4), torch.float32)
    w.write(torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="missing 32 bytes"):
        w.end()


# ----------------------------------------------------------------------------- streaming memory

N_TENSORS, ROWS, COLS = 64, 512, 512  # 64 tensors of 1 MiB (float32): 64 MiB per model

MEASURE = r"""
import json, sys
import torch
from safetensors.torch import load_file
from trainer.readapt.delta import compute_delta

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def peak_growth(fn):
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = status("VmRSS")
    result = fn()
    growth = status("VmHWM") - before
    del result
    return growth

root = sys.argv[1]
compute_delta(root + "/warm_b", root + "/warm_i", root + "/warm_d")  # lazy imports happen here, not below
delta = peak_growth(lambda: compute_delta(root + "/base", root + "/inst", root + "/delta", max_shard_size="16MB"))
rows = peak_growth(lambda: compute_delta(root + "/base", root + "/inst", root + "/rows", chunk_elements=%d))
def naive():  # what a non-streaming delta does: whole models in, whole delta out
    b, i = load_file(root + "/base/model.safetensors"), load_file(root + "/inst/model.safetensors")
    return {k: i[k].double() - b[k].double() for k in b}
naive = peak_growth(naive)
print(json.dumps({"delta": delta, "rows": rows, "naive": naive}))
"""


def test_delta_peak_memory_is_about_a_tensor_not_the_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w": torch.randn(ROWS, COLS, generator=g) for i in range(N_TENSORS)}
    _checkpoint(tmp_path / "base", base)
    _checkpoint(tmp_path / "inst", {k: v + 0.01 for k, v in base.items()})
    _checkpoint(tmp_path / "warm_b", {"model.layers.0.w": torch.zeros(8, 8)})
    _checkpoint(tmp_path / "warm_i", {"model.layers.0.w": torch.ones(8, 8)})
    del base
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so RSS tracks live memory.
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    script = MEASURE % (ROWS * COLS // 8)  # row chunks of 1/8 tensor
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    growth = json.loads(p.stdout.strip().splitlines()[-1])
    tensor = ROWS * COLS * 4
    model = N_TENSORS * tensor
    # The probe sees whole models when a delta is computed the naive way (so it can fail)...
    assert growth["naive"] > 2 * model, growth
    # ...while delta, which reads 2 x 64 MiB and writes 128 MiB of float64, holds a few float64 copies of
    # one tensor (about 7 float32 tensors' worth)...
    assert growth["delta"] < 10 * tensor, {k: v / tensor for k, v in growth.items()}
    # ...and less again when tensors are bigger than a row chunk (a 7-8B model's embedding is ~1 GB).
    assert growth["rows"] < 0.6 * growth["delta"], {k: v / tensor for k, v in growth.items()}
    assert DeltaDir(tmp_path / "delta").meta["tensor_count"] == N_TENSORS
    assert math.isclose(sum(f.stat().st_size for f in (tmp_path / "delta").glob("*.safetensors")),
                        2 * model, rel_tol=0.01)
