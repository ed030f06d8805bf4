"""The learn/forget comparison over runs: a Table-2-style markdown table and a trade-off plot.

Each run dir holds its resolved config.yaml and metrics.jsonl; the last `eval`
record gives the final per-domain bits per byte. The original domain (whose
bits per byte measure forgetting) and the new domain (learning) come from the
stream roles in the config. The backbone is a run or eval JSON given with
--backbone (the demo uses its pretraining run, which also evaluated the new domain).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import yaml


def final_eval(run_dir: Path) -> dict:
    """Last eval record of a run dir, or the `domains` of an eval JSON file."""
    if run_dir.is_file():
        data = json.loads(run_dir.read_text())
        return data.get("domains", data)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory)")
    last = None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            last = record["eval"]
    if last is None:
        raise ValueError(f"{metrics}: no eval record; the run has not finished")
    return last


def run_row(run_dir: Path) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    roles = {s["domain"]: s["role"] for s in cfg["data"]["streams"]}
    method = cfg["method"]
    lr = cfg["train"]["lr"] or (2e-4 if method["name"] == "finetune" else 5e-5)
    return {"run": run_dir.name, "method": method["name"], "lr": lr, "p": cfg["data"]["p"],
            "alpha": method["alpha"] if method["name"] in ("neutral_residues", "sigmoid_gate") else None,
            "extra_params": method["extra_params"] if method["name"] != "finetune" else None,
            "roles": roles, "eval": final_eval(run_dir)}


def collect(runs: list[Path], backbone: Optional[Path]) -> dict:
    rows = [run_row(r) for r in runs]
    roles = rows[0]["roles"]
    original = next(d for d, r in roles.items() if r == "original")
    new = [d for d, r in roles.items() if r == "new"]
    base = final_eval(backbone) if backbone else None
    return {"original": original, "new": new, "rows": rows, "backbone": base}


def markdown_table(rep: dict) -> str:
    doms = [rep["original"]] + rep["new"]
    head = "| method | lr | p | alpha | " + " | ".join(f"{d} bpb" for d in doms) + " |"
    lines = [head, "|" + "---|" * (4 + len(doms))]

    def fmt(x, spec=".4f"):
        return "" if x is None else format(x, spec)

    for r in rep["rows"]:
        cells = [fmt(r["eval"].get(d, {}).get("bpb")) for d in doms]
        lines.append(f"| {r['method']} | {r['lr']:.0e} | {r['p']} | {fmt(r['alpha'], 'g')} | " + " | ".join(cells) + " |")
    if rep["backbone"]:
        cells = [fmt(rep["backbone"].get(d, {}).get("bpb")) for d in doms]
        lines.append("| backbone | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rep: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig, new = rep["original"], rep["new"][0]
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for r in rep["rows"]:
        x, y = r["eval"][new]["bpb"], r["eval"][orig]["bpb"]
        ax.scatter(x, y, s=40)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if rep["backbone"]:
        x, y = rep["backbone"][new]["bpb"], rep["backbone"][orig]["bpb"]
        ax.scatter(x, y, marker="*", s=160, color="black")
        ax.annotate("backbone", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{new} bits per byte (learning, lower is better)")
    ax.set_ylabel(f"{orig} bits per byte (forgetting, lower is better)")
    ax.set_title("Learning vs forgetting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(runs: list[Path], out_dir: Path, backbone: Optional[Path] = None, title: str = "Learn/forget report") -> dict:
    rep = collect(runs, backbone)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rep)
    png = plot(rep, out_dir / "tradeoff.png")
    text = (f"# {title}\n\nBits per byte on held-out data: `{rep['original']}` is the original domain "
            f"(lower = less forgetting), {', '.join(f'`{d}`' for d in rep['new'])} the new one (lower = more learning).\n\n"
            f"{table}\n\n![trade-off]({png.name})\n")
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    return {"table": table, "markdown": out_dir / "report.md", "png": png, "data": rep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--backbone", type=Path, help="run dir or eval JSON of the unextended backbone")
    ap.add_argument("--out", type=Path, default=Path("report"), help="output dir for report.md and tradeoff.png")
    args = ap.parse_args(argv)
    try:
        res = write_report(args.runs, args.out, args.backbone)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    print(f"\nwrote {res['markdown']} and {res['png']}")
    return 0
