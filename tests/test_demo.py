"""The CPU quickstart, end to end, through real subprocesses (`python -m trainer demo --quick`)."""
import json
import shutil
import subprocess
import sys

import pytest

from launch import ROOT, env

pytestmark = pytest.mark.slow


def run_demo(out, *args) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "trainer", "demo", "--quick", "--jobs", "2", "--out", str(out), *args],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out)


def bpb_table(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    table = {r["method"]: {d: r["eval"][d]["bpb"] for d in ("en", "code")} for r in report["rows"]}
    return {**table, "backbone": {d: report["backbone"][d]["bpb"] for d in ("en", "code")}}


def test_quick_demo_shows_less_forgetting_with_neutral_residues(quick_demo):
    out, p = quick_demo
    assert (out / "report.md").is_file() and (out / "tradeoff.png").stat().st_size > 10_000
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    backbone = json.loads((out / "report.json").read_text())["backbone"]
    assert set(rows) == {"finetune", "lora", "adapters", "neutral_residues"}
    forget = {m: r["eval"]["en"]["bpb"] - backbone["en"]["bpb"] for m, r in rows.items()}
    learn = {m: backbone["code"]["bpb"] - r["eval"]["code"]["bpb"] for m, r in rows.items()}
    # The paper's core result in miniature: full fine-tuning forgets English more than neutral residues,
    # and every method learns code.
    assert forget["finetune"] > forget["neutral_residues"], forget
    assert all(v > 0 for v in learn.values()), learn
    assert "| neutral_residues |" in p.stdout  # the table is printed
    # The four extensions ran two at a time, each logging to its own file.
    for m in rows:
        assert "checkpoint step_00000060 saved" in (out / "logs" / f"{m}.log").read_text()

    # A re-run reuses every finished step.
    again = subprocess.run([sys.executable, "-m", "trainer", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                           env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": cached") == 9, again.stdout[-2000:]


def test_quick_demo_at_a_forgetting_budget(quick_demo):
    """`--budget EPS` reuses the corpus and backbone, trains the four methods to the budget and prints the
    equal-forgetting table; a bad EPS is a one-line error before anything runs."""
    out, _ = quick_demo
    bad = subprocess.run([sys.executable, "-m", "trainer", "demo", "--quick", "--out", str(out), "--budget", "-1"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --budget: -1 must be > 0 (a zero budget has no finite multiplier)"]
    p = run_demo(out, "--budget", "0.03")
    assert p.stdout.count(": cached") == 5  # corpus .. export_backbone
    table = p.stdout.split("At equal forgetting (budget 0.03):")[1]
    methods = ("finetune", "lora", "adapters", "neutral_residues")
    assert sorted(line.split(" | ")[1] for line in table.splitlines() if line.startswith("| 0.03 |")) == sorted(methods)
    rep = json.loads((out / "report_budget0.03" / "report.json").read_text())
    assert (out / "report_budget0.03" / "budget.png").stat().st_size > 10_000
    for r in rep["rows"]:
        assert r["budget"] == 0.03 and [t["step"] for t in r["budget_trace"]] == list(range(10, 61, 10))
        assert all(t["eps_bpb"] == 0.03 and "lambda" in t for t in r["budget_trace"])
        assert len(r["evals"]) >= 5  # evals on the way give the held-out degradation curve


@pytest.mark.distributed
def test_quick_demo_on_two_ranks_per_job_gives_the_one_rank_table(quick_demo, tmp_path):
    """Two jobs of 2 ranks side by side: the ranks of each job and the two jobs share the node's
    shared memory (streaming registration, DeepSpeed's CPU all-reduce), and the sample order does
    not depend on the number of ranks, so the table is the 1-rank one up to float reduction order.
    The extensions start from the 1-rank demo's corpus, data and backbone (its finished steps)."""
    base, out = quick_demo[0], tmp_path / "demo2"
    for d in ("corpus", "tokenizer", "data", "pretrain", "backbone"):
        shutil.copytree(base / d, out / d)
    (out / ".done").mkdir()
    for step in ("corpus", "tokenizer", "data", "pretrain", "export_backbone"):
        shutil.copy(base / ".done" / step, out / ".done" / step)
    p = run_demo(out, "--nproc", "2")
    assert p.stdout.count(": cached") == 5 and p.stdout.count(": done") == 4, p.stdout[-2000:]
    assert "world size 2" in (out / "logs" / "neutral_residues.log").read_text()
    one, two = bpb_table(quick_demo[0]), bpb_table(out)
    assert one.keys() == two.keys()
    for run in one:
        for d in ("en", "code"):
            assert two[run][d] == pytest.approx(one[run][d], abs=1e-3), (run, d, one[run], two[run])
