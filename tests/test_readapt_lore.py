"""readapt lore: minimal ranks on known spectra, tau = 1 reconstruction, the reported fraction vs the files."""
import json

import pytest
import torch
from safetensors import safe_open

from test_readapt_delta import _checkpoint, save_pair
from trainer.readapt.cli import main
from trainer.readapt.delta import META_NAME, US, VT, DeltaDir, compute_delta
from trainer.readapt.io import ReadaptError
from trainer.readapt.lore import choose_rank, compress, in_block

SPECTRA = {"model.layers.0.mlp.down_proj.weight": [4.0, 3.0, 2.0, 1.0],  # s^2 = 16, 9, 4, 1 (sum 30)
           "model.layers.1.self_attn.q_proj.weight": [1.0, 1.0, 1.0, 1.0, 1.0]}  # flat


def with_spectrum(s: list[float], m: int, n: int, seed: int) -> torch.Tensor:
    """An m x n float32 matrix whose singular values are exactly `s` (then zeros)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


@pytest.fixture(scope="module")
def spectrum_delta(tmp_path_factory):
    """A delta (instruct - zero base) holding the SPECTRA matrices, an all-zero block matrix and dense tensors."""
    root = tmp_path_factory.mktemp("spectrum")
    inst = {name: with_spectrum(s, 24, 16, i).float() for i, (name, s) in enumerate(SPECTRA.items())}
    inst["model.layers.1.mlp.up_proj.weight"] = torch.zeros(24, 16)
    inst["model.embed_tokens.weight"] = torch.randn(10, 16)
    inst["model.layers.0.input_layernorm.weight"] = torch.randn(16)
    _checkpoint(root / "base", {k: torch.zeros_like(v) for k, v in inst.items()})
    _checkpoint(root / "inst", inst)
    compute_delta(root / "base", root / "inst", root / "delta")
    return root / "delta"


@pytest.mark.parametrize("tau,ranks", [
    (0.5, [1, 3]), (0.53, [1, 3]), (0.54, [2, 3]), (0.6, [2, 3]), (0.83, [2, 5]), (0.84, [3, 5]),
    (0.96, [3, 5]), (0.97, [4, 5]), (1.0, [4, 5])])
def test_ranks_are_the_minimal_ones_reaching_tau(tmp_path, spectrum_delta, tau, ranks):
    meta = compress(spectrum_delta, tmp_path / "lore", tau)
    lore = DeltaDir(tmp_path / "lore")
    for (name, s), k in zip(SPECTRA.items(), ranks):
        assert meta["tensors"][name]["rank"] == k, (name, tau)
        energy = torch.tensor(s) ** 2
        assert energy[:k].sum() / energy.sum() >= tau - 1e-6 > energy[:k - 1].sum() / energy.sum()
        # The stored factors are the best rank-k approximation: the error is the dropped spectrum.
        err = (lore.read(name).double() - DeltaDir(spectrum_delta).read(name)).pow(2).sum()
        assert err == pytest.approx(float(energy[k:].sum()), abs=1e-4)
    zero = meta["tensors"]["model.layers.1.mlp.up_proj.weight"]
    assert zero["rank"] == 0 and torch.equal(lore.read("model.layers.1.mlp.up_proj.weight"), torch.zeros(24, 16))


def test_choose_rank_edges():
    s = torch.tensor([3.0, 0.0, 0.0])
    assert choose_rank(s, 1.0) == 1 and choose_rank(s, 1e-9) == 1
    assert choose_rank(torch.zeros(4), 0.5) == 0
    assert choose_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.75) == 3  # 3/4 is exact in float64
    assert in_block("model.layers.3.mlp.up_proj.weight") and not in_block("model.embed_tokens.weight")
    assert not in_block("model.layers.norm.weight")  # "layers" must be followed by a layer index


@pytest.fixture(scope="module")
def tiny_delta(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base, inst = save_pair(root, "llama")
    compute_delta(base, inst, root / "delta")
    return root / "delta"


def test_tau_one_reconstructs_delta_and_keeps_other_tensors_dense(tmp_path, tiny_delta):
    meta = compress(tiny_delta, tmp_path / "lore", tau=1.0)
    delta, lore = DeltaDir(tiny_delta), DeltaDir(tmp_path / "lore")
    factored = [n for n in delta.names if meta["tensors"][n].get("rank") is not None]
    assert len(factored) == 14  # 7 matrices (q k v o gate up down) x 2 layers
    for name in delta.names:
        d = delta.read(name)
        if name in factored:
            assert torch.allclose(lore.read(name).double(), d, atol=1e-5 * d.abs().max()), name
        else:  # embeddings, LM head, norms: the identical tensor
            assert lore.rank(name) is None and torch.equal(lore.read(name), d), name


def test_reported_fraction_matches_the_stored_tensors(tmp_path, tiny_delta):
    meta = compress(tiny_delta, tmp_path / "lore", tau=0.5, max_shard_size="40KB")
    stored = {}
    for f in sorted((tmp_path / "lore").glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            stored.update({k: h.get_tensor(k) for k in h.keys()})
    assert len({f for f in meta["weight_map"].values()}) > 1
    factors = {k: t for k, t in stored.items() if k.endswith((US, VT))}
    replaced = [n for n, t in meta["tensors"].items() if t.get("rank") is not None]
    dense_numel = sum(t.numel() for k, t in stored.items() if k not in factors)
    full = sum(DeltaDir(tiny_delta).read(n).numel() for n in meta["tensors"])
    mn = sum(meta["tensors"][n]["shape"][0] * meta["tensors"][n]["shape"][1] for n in replaced)
    assert meta["fraction"] == sum(t.numel() for t in factors.values()) / mn
    assert meta["total_fraction"] == (sum(t.numel() for t in factors.values()) + dense_numel) / full
    assert 0 < meta["fraction"] < 1
    for name in replaced:
        k, (m, n) = meta["tensors"][name]["rank"], meta["tensors"][name]["shape"]
        assert stored[name + US].shape == (m, k) and stored[name + VT].shape == (k, n)
        assert meta["tensors"][name]["fraction"] == k * (m + n) / (m * n)
    assert json.loads((tmp_path / "lore" / META_NAME).read_text())["fraction"] == meta["fraction"]


def test_bad_inputs_and_cli(tmp_path, tiny_delta, capsys):
    for tau in (0.0, 1.5):
        with pytest.raises(ReadaptError, match=f"tau = {tau}"):
            compress(tiny_delta, tmp_path / "x", tau)
    compress(tiny_delta, tmp_path / "lore", 0.9)
    with pytest.raises(ReadaptError, match="is a lore directory"):
        compress(tmp_path / "lore", tmp_path / "again")
    with pytest.raises(ReadaptError, match="no readapt.json"):
        compress(tmp_path, tmp_path / "again")
    assert main(["lore", str(tiny_delta), "--out", str(tmp_path / "cli"), "--tau", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in out and "factored matrices keep" in out
    assert main(["lore", str(tiny_delta), "--out", str(tmp_path / "cli2"), "--tau", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tau = 2.0") and err.count("\n") == 1
