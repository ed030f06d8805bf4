"""The CPU quickstart, end to end, through real subprocesses (`python -m trainer demo --quick`)."""
import json
import subprocess
import sys

import pytest

from launch import ROOT, env

pytestmark = pytest.mark.slow


def test_quick_demo_shows_less_forgetting_with_neutral_residues(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "trainer", "demo", "--quick", "--jobs", "2", "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
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
