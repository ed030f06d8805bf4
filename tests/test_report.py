"""`python -m trainer report`: the learn/forget table and trade-off plot over runs."""
from __future__ import annotations

import json

import pytest
import yaml

from trained_runs import shared_runs
from trainer.evaluation import report


def fake_run(root, name, method="neutral_residues", lr=1e-3, p=0.1, alpha=1.0, evals=None, roles=None):
    """A run dir as train leaves it (config.yaml + metrics.jsonl), with chosen eval records."""
    d = root / name
    d.mkdir(parents=True)
    roles = roles or {"en": "original", "code": "new"}
    cfg = {"method": {"name": method, "alpha": alpha, "extra_params": 0.2, "l1_with_sigmoid": False},
           "train": {"lr": lr}, "data": {"p": p, "streams": [{"domain": k, "role": v} for k, v in roles.items()]}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [{"step": 0, "params": {"trainable": 1}}]
    lines += [{"step": s, "eval": {dom: {"bpb": b, "loss": b} for dom, b in ev.items()}} for s, ev in evals or []]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


BACKBONE = {"en": 1.0, "code": 2.0}


def test_table_rows_deltas_and_the_step0_backbone(tmp_path):
    runs = [fake_run(tmp_path, "ft", "finetune", 2e-4, evals=[(0, BACKBONE), (10, {"en": 1.3, "code": 1.2})]),
            fake_run(tmp_path, "nr_a", lr=1e-3, evals=[(0, BACKBONE), (10, {"en": 1.05, "code": 1.5})]),
            fake_run(tmp_path, "nr_b", lr=3e-3, evals=[(0, BACKBONE), (10, {"en": 1.1, "code": 1.4})])]
    res = report.write_report(runs, tmp_path / "out")
    lines = res["table"].splitlines()
    assert len(lines) == 2 + 3 + 1
    assert lines[2].split(" | ")[1:4] == ["finetune", "2e-04", "0.1"]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "nr_a" and cells[4] == "1" and cells[7:] == ["1.0500", "1.5000", "+0.0500", "+0.5000"]
    assert lines[-1].startswith("| backbone |") and "1.0000 | 2.0000" in lines[-1]
    assert res["data"]["backbone_source"] == "step-0 eval of ft"
    assert report._labels(res["data"]["rows"]) == ["finetune", "neutral_residues (lr=1e-03)",
                                                  "neutral_residues (lr=3e-03)"]
    assert res["png"].stat().st_size > 5000 and res["markdown"].read_text().count("| nr_") == 2


def test_backbone_from_an_eval_json_overrides_the_step0_eval(tmp_path):
    run = fake_run(tmp_path, "a", evals=[(0, BACKBONE), (5, {"en": 1.1, "code": 1.9})])
    js = tmp_path / "backbone.json"
    js.write_text(json.dumps({"domains": {"en": {"bpb": 0.9}, "code": {"bpb": 2.5}}, "tasks": {}}))
    rep = report.collect([run], js)
    assert rep["backbone"]["en"]["bpb"] == 0.9
    assert "| +0.2000 | +0.6000 |" in report.markdown_table(rep)


@pytest.mark.parametrize("setup,message", [
    (lambda r: fake_run(r, "x", evals=[]), "no eval record"),
    (lambda r: r / "missing", "not a run directory"),
    (lambda r: fake_run(r, "x", evals=[(3, {"en": 1.0})]), "no `code` domain"),
    (lambda r: (fake_run(r, "x") / "config.yaml").write_text("method: {}\n") and r / "x", "not a resolved run config"),
])
def test_bad_runs_are_one_line_errors(tmp_path, capsys, setup, message):
    ok = fake_run(tmp_path, "ok", evals=[(5, {"en": 1.0, "code": 1.0})])
    assert report.main([str(ok), str(setup(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_runs_must_share_domain_roles_and_metrics_lines_are_named(tmp_path, capsys):
    a = fake_run(tmp_path, "a", evals=[(5, {"en": 1.0, "code": 1.0})])
    b = fake_run(tmp_path, "b", evals=[(5, {"en": 1.0, "code": 1.0})], roles={"en": "new", "code": "original"})
    assert report.main([str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert "domain roles" in capsys.readouterr().err
    with open(a / "metrics.jsonl", "a") as f:
        f.write("{truncated\n")
    assert report.main([str(a), "--out", str(tmp_path / "o")]) == 2
    assert f"{a / 'metrics.jsonl'}:3: invalid JSON" in capsys.readouterr().err


def budget_run(root, name, method, budget, evals, lambdas):
    """A fake run trained under a forgetting budget: its config names it, its steps log the multiplier."""
    d = fake_run(root, name, method, evals=evals)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["method"]["forgetting_budget"] = budget
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    eps = 0.02 if budget == "2%" else budget  # 2% of the backbone's 1.0 bits per byte
    with open(d / "metrics.jsonl", "a") as f:
        for step, lam in lambdas:
            f.write(json.dumps({"step": step, "loss": 1.0, "budget": {"lambda": lam, "eps_bpb": eps,
                                                                         "degradation": eps, "slack": 0.0}}) + "\n")
    return d


def test_budgeted_runs_are_compared_at_equal_forgetting(tmp_path, capsys):
    import matplotlib.image

    runs = [fake_run(tmp_path, "free", "adapters", evals=[(0, BACKBONE), (10, {"en": 1.3, "code": 1.2})]),
            budget_run(tmp_path, "ad", "adapters", 0.05, [(0, BACKBONE), (5, {"en": 1.02, "code": 1.8}),
                                                          (10, {"en": 1.04, "code": 1.6})], [(5, 2.0), (10, 3.5)]),
            budget_run(tmp_path, "nr", "neutral_residues", 0.05, [(0, BACKBONE), (10, {"en": 1.06, "code": 1.5})],
                       [(5, 10.0), (10, 20.0)]),
            budget_run(tmp_path, "rel", "lora", "2%", [(0, BACKBONE), (10, {"en": 1.01, "code": 1.9})], [(10, 1.0)])]
    assert report.main([*map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    table = out.split("At equal forgetting:")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    assert rows[0][:3] == ["budget", "method", "final λ"]
    # The 2% budget (0.02 bpb) first; at 0.05, neutral residues learned more (code 1.5 < 1.6) but overshot.
    assert [r[1] for r in rows[1:]] == ["lora", "neutral_residues", "adapters"]
    assert rows[1][0] == "2% (0.0200 bpb)" and rows[1][3:5] == ["+0.0100", "0.50 EPS ✓"]
    assert rows[2][2:6] == ["20", "+0.0600", "1.20 EPS ✗", "+0.5000"]
    assert rows[3][2:6] == ["3.5", "+0.0400", "0.80 EPS ✓", "+0.4000"]
    assert "free" not in table  # an unbudgeted run has no budget to compare at
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## At equal forgetting" in md and "![multiplier and degradation](budget.png)" in md
    img = matplotlib.image.imread(tmp_path / "rep" / "budget.png")
    assert img.shape[0] > 400 and img[..., :3].std() > 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.mark.slow
def test_report_on_three_real_runs_with_the_backbone_evaluated_by_eval(runs, tmp_path, capsys):
    import matplotlib.image

    from trainer.evaluation import evaluate

    backbone_json = tmp_path / "backbone.json"
    assert evaluate.main([str(runs["backbone"]), "--data", *(f"{d}={p['val']}" for d, p in runs["data"].items()),
                          "--out", str(backbone_json)]) == 0
    three = [runs["runs"][m] for m in ("finetune", "adapters", "neutral_residues")]
    assert report.main([*map(str, three), "--backbone", str(backbone_json), "--out", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| run_") or line.startswith("| backbone")]
    assert len(rows) == 4
    for run_dir, row in zip(three, rows):
        final = report.final_eval(run_dir)
        assert f"{final['en']['bpb']:.4f} | {final['code']['bpb']:.4f}" in row
    # Every method starts as the backbone's function, so eval on the backbone dir = each run's step-0 eval.
    for run_dir in three:
        start = report.start_eval(run_dir)
        for d in ("en", "code"):
            assert start[d]["bpb"] == pytest.approx(report.final_eval(backbone_json)[d]["bpb"], rel=1e-5)
    png = tmp_path / "rep" / "tradeoff.png"
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 400 and img[..., :3].std() > 0.05  # not blank
    assert "![trade-off](tradeoff.png)" in (tmp_path / "rep" / "report.md").read_text()
