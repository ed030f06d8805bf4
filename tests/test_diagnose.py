"""`python -m trainer diagnose`: gate statistics against a direct computation, W_g spectra, neutrality."""
from __future__ import annotations

import json

import pytest
import torch

from mds_fixtures import write_mds
from tiny_models import tiny_model
from trained_runs import shared_runs
from trainer.evaluation import diagnose
from trainer.config import MethodConfig
from trainer.engine.data import ValSet
from trainer.method.extend import adapter_blocks, extend_model


def extended(method="neutral_residues"):
    model = tiny_model("llama")
    extend_model(model, MethodConfig(name=method))
    torch.manual_seed(3)
    for b in adapter_blocks(model):
        torch.nn.init.normal_(b.adapter.w_o, std=0.3)  # a silent adapter (W_o = 0) would make |g*A| = 0
    return model.eval()


def test_gate_statistics_equal_a_direct_computation(tmp_path):
    model = extended()
    val = write_mds(tmp_path / "val", "en", 1, n=6, seq_len=16, vocab=128, seed=4)
    inputs = {}
    hooks = [b.register_forward_hook(lambda m, args, out, i=i: inputs.setdefault(i, []).append(args[0].detach()))
             for i, b in enumerate(adapter_blocks(model))]
    stats = diagnose.gate_statistics(model, ValSet(str(val), 0, 1, batch_size=4))
    for h in hooks:
        h.remove()
    assert stats["tokens"] == 6 * 16
    for i, block in enumerate(adapter_blocks(model)):
        n = torch.cat([x.flatten(0, 1) for x in inputs[i]])  # (tokens, d): the block's normalised input
        a = block.adapter
        g = torch.relu(n @ a.w_b)
        y = g[:, None] * torch.nn.functional.linear(
            block.mlp.act_fn(n @ a.w_g.T) * (n @ a.w_i.T), a.w_o)
        assert stats["gate_active"][i] == pytest.approx((g > 0).float().mean().item(), abs=1e-6)
        assert stats["gate_mean"][i] == pytest.approx(g.mean().item(), rel=1e-5)
        assert stats["residual_abs"][i] == pytest.approx(y.abs().mean().item(), rel=1e-5)
    assert 0 < min(stats["gate_active"]) and max(stats["gate_active"]) < 1  # a ReLU gate: some open, some shut
    assert not any(b.training for b in adapter_blocks(model)) and not model.training


def test_singular_values_are_normalised_by_the_largest():
    model = extended()
    for b in adapter_blocks(model):
        with torch.no_grad():
            b.adapter.w_g.zero_()
            for j, s in enumerate([0.5, 4.0, 2.0, 1.0]):
                b.adapter.w_g[j, j] = s
    sv = diagnose.singular_values(model)
    assert len(sv) == 2
    assert sv[0][:4] == pytest.approx([1.0, 0.5, 0.25, 0.125]) and max(sv[0][4:]) < 1e-6


def test_neutrality_is_the_token_weighted_ratio_original_over_new():
    per_domain = {"en": {"residual_abs": [0.1, 0.3], "tokens": 10},
                  "wiki": {"residual_abs": [0.4, 0.4], "tokens": 30},
                  "code": {"residual_abs": [1.0, 2.0], "tokens": 5}}
    n = diagnose.neutrality(per_domain, {"en": "original", "wiki": "original", "code": "new"})
    assert n["residual_abs_original"] == pytest.approx((0.2 * 10 + 0.4 * 30) / 40)
    assert n["ratio"] == pytest.approx(0.35 / 1.5)
    assert "= 0.233" in diagnose.neutrality_line(n)
    assert diagnose.neutrality({"en": per_domain["en"]}, {"en": "original"}) is None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.mark.slow
def test_diagnose_cli_on_a_trained_run(runs, tmp_path, capsys):
    out = tmp_path / "diag"
    assert diagnose.main([str(runs["runs"]["neutral_residues"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "diagnose.json").read_text())
    assert set(res["layers"]) == {"en", "code"} and len(res["singular_values"]) == 2
    for d, s in res["layers"].items():
        assert s["tokens"] == 16 * 32 and len(s["gate_active"]) == 2
        assert all(0 <= x <= 1 for x in s["gate_active"]) and all(x > 0 for x in s["residual_abs"])
    mean = {d: sum(s["residual_abs"]) / 2 for d, s in res["layers"].items()}
    assert res["neutrality"]["ratio"] == pytest.approx(mean["en"] / mean["code"])
    assert f"= {res['neutrality']['ratio']:.3f}" in printed.splitlines()[-3]
    assert all(s[0] == pytest.approx(1.0) and s == sorted(s, reverse=True) for s in res["singular_values"])
    assert (out / "singular_values.png").stat().st_size > 5000


@pytest.mark.slow
def test_diagnose_refuses_methods_without_gates(runs, capsys):
    assert diagnose.main([str(runs["runs"]["lora"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no adapter gates" in err and err.count("\n") == 1
