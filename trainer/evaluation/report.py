"""The learn/forget comparison over runs: a Table-2-style markdown table and a trade-off plot.

Each run dir holds its resolved config.yaml and metrics.jsonl; the last `eval`
record gives the final per-domain bits per byte. The original domain (whose
bits per byte measure forgetting) and the new domain (learning) come from the
stream roles in the config, and must agree across runs.

Runs trained under a forgetting budget (method.forgetting_budget) also get the comparison a
user asks for: each method's new-domain learning at the same allowed forgetting, with the
held-out figures (`budget_table`), and a plot of the multiplier and of the held-out
degradation over steps (`budget.png`; evals every `eval.every` steps give its points).

The backbone row is, in order of preference:
  - `--backbone PATH`: a run dir (its last eval; the demo uses its pretraining run)
    or the JSON that `python -m trainer eval BACKBONE --out` wrote;
  - otherwise the step-0 eval of the first run that has one: every method starts
    as exactly the backbone's function (W_o = 0, LoRA B = 0, finetune unchanged),
    so that eval IS the backbone's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import yaml

GATED = ("neutral_residues", "sigmoid_gate")


class ReportError(ValueError):
    """Bad input to report; printed as `error: <message>`."""


def _records(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (not a run directory)")
    out = []
    for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{metrics}:{lineno}: invalid JSON: {e.msg}") from None
    return out


def final_eval(run_dir: Path) -> dict:
    """Last eval record of a run dir, or the `domains` of an eval JSON file."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        try:
            data = json.loads(run_dir.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{run_dir}:{e.lineno}: invalid JSON: {e.msg}") from None
        domains = data.get("domains", data) if isinstance(data, dict) else None
        if not isinstance(domains, dict) or not all(isinstance(m, dict) and "bpb" in m for m in domains.values()):
            raise ReportError(f"{run_dir}: expected an eval JSON with domains -> {{bpb, ...}} "
                              "(python -m trainer eval ... --out FILE)")
        return domains
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such run directory or eval JSON")
    evals = [r["eval"] for r in _records(run_dir) if "eval" in r]
    if not evals:
        raise ReportError(f"{run_dir / 'metrics.jsonl'}: no eval record; the run has not finished")
    return evals[-1]


def start_eval(run_dir: Path) -> Optional[dict]:
    """The step-0 eval of a run (the backbone's numbers), if it logged one."""
    for r in _records(run_dir):
        if "eval" in r and r.get("step") == 0:
            return r["eval"]
    return None


def run_row(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ReportError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
        roles = {s["domain"]: s["role"] for s in cfg["data"]["streams"]}
        method, lr, p = cfg["method"], cfg["train"]["lr"], cfg["data"]["p"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ReportError(f"{cfg_path}: not a resolved run config ({type(e).__name__}: {e})") from None
    name = method["name"]
    lr = lr or (2e-4 if name == "finetune" else 5e-5)  # RunConfig.lr's defaults
    records = _records(run_dir)
    step = max((r.get("step", 0) for r in records if "eval" in r), default=None)
    alpha = None
    budget = method.get("forgetting_budget")
    if budget is None and (name == "neutral_residues" or (name == "sigmoid_gate" and method.get("l1_with_sigmoid"))):
        alpha = method["alpha"]  # under a budget, the multiplier is alpha
    trace = [{"step": r["step"], **r["budget"]} for r in records if "budget" in r]
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    return {"run": run_dir.name, "path": str(run_dir), "method": name, "lr": lr, "p": p,
            "alpha": alpha, "extra_params": method["extra_params"] if name != "finetune" else None,
            "step": step, "roles": roles, "eval": final_eval(run_dir), "budget": budget,
            "budget_trace": trace, "evals": [evals[k] | {"step": k} for k in sorted(evals)]}


def collect(runs: list[Path], backbone: Optional[Path]) -> dict:
    if not runs:
        raise ReportError("no run directories given")
    rows = [run_row(Path(r)) for r in runs]
    roles = rows[0]["roles"]
    for r in rows[1:]:
        if r["roles"] != roles:
            raise ReportError(f"{r['path']}: domain roles {r['roles']} differ from {rows[0]['path']}'s {roles}; "
                              "runs in one report must share their original and new domains")
    original = [d for d, role in roles.items() if role == "original"]
    new = [d for d, role in roles.items() if role == "new"]
    if not original or not new:
        raise ReportError(f"{rows[0]['path']}: needs a stream with role original and one with role new")
    for r in rows:
        for d in original + new:
            if d not in r["eval"]:
                raise ReportError(f"{r['path']}: its last eval has no `{d}` domain (no val set for it?)")
    base, base_source = None, None
    if backbone:
        base, base_source = final_eval(Path(backbone)), str(backbone)
    else:
        for r in rows:
            base = start_eval(Path(r["path"]))
            if base:
                base_source = f"step-0 eval of {r['run']}"
                break
    return {"original": original[0], "new": new, "rows": rows, "backbone": base, "backbone_source": base_source}


def _fmt(x, spec=".4f") -> str:
    return "" if x is None else format(x, spec)


def markdown_table(rep: dict) -> str:
    """One row per run (+ backbone): bits per byte per domain, and the change vs the backbone."""
    doms = [rep["original"]] + rep["new"]
    base = rep["backbone"] or {}
    show_delta = all(d in base for d in doms)
    head = ["run", "method", "lr", "p", "alpha", "extra", "steps"] + [f"{d} bpb" for d in doms]
    if show_delta:
        head += [f"forgetting (Δ{rep['original']})"] + [f"learning (-Δ{d})" for d in rep["new"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rep["rows"]:
        bpb = [r["eval"][d]["bpb"] for d in doms]
        cells = [r["run"], r["method"], f"{r['lr']:.0e}", f"{r['p']:g}", _fmt(r["alpha"], "g"),
                 _fmt(r["extra_params"], "g"), _fmt(r["step"], "d")] + [_fmt(x) for x in bpb]
        if show_delta:
            cells += [f"{bpb[0] - base[doms[0]]['bpb']:+.4f}"]
            cells += [f"{base[d]['bpb'] - x:+.4f}" for d, x in zip(doms[1:], bpb[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    if rep["backbone"]:
        cells = ["backbone", "", "", "", "", "", ""] + [_fmt(base.get(d, {}).get("bpb")) for d in doms]
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _labels(rows: list[dict]) -> list[str]:
    """Method names, disambiguated by lr / p / alpha only where several runs share a method."""
    labels = []
    for r in rows:
        same = [o for o in rows if o["method"] == r["method"]]
        extra = []
        for key, fmt in (("lr", ".0e"), ("p", "g"), ("alpha", "g"), ("budget", "")):
            if len({o.get(key) for o in same}) > 1 and r.get(key) is not None:
                extra.append(f"{key}={format(r[key], fmt)}")
        labels.append(r["method"] + (f" ({', '.join(extra)})" if extra else ""))
    return labels


def plot(rep: dict, out: Path) -> Path:
    """Original-domain bpb (forgetting) vs new-domain bpb (learning): lower-left is better."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig, new = rep["original"], rep["new"][0]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    cmap = plt.get_cmap("tab10")
    methods = sorted({r["method"] for r in rep["rows"]})
    for r, label in zip(rep["rows"], _labels(rep["rows"])):
        x, y = r["eval"][new]["bpb"], r["eval"][orig]["bpb"]
        ax.scatter(x, y, s=45, color=cmap(methods.index(r["method"]) % 10), zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    base = rep["backbone"]
    if base and orig in base and new in base:
        x, y = base[new]["bpb"], base[orig]["bpb"]
        ax.scatter(x, y, marker="*", s=220, color="black", zorder=4)
        ax.annotate("backbone", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=9, weight="bold")
        ax.axhline(y, color="black", lw=0.6, ls=":", zorder=1)  # no forgetting at all
    ax.set_xlabel(f"{new} bits per byte (learning: lower is better)")
    ax.set_ylabel(f"{orig} bits per byte (forgetting: lower is better)")
    several = f" ({len(rep['new'])} new domains, first shown)" if len(rep["new"]) > 1 else ""
    ax.set_title("Learning vs forgetting" + several)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- forgetting budgets


def budget_eps(row: dict) -> Optional[float]:
    """The run's budget in bits per byte (a relative one as the run resolved it)."""
    if row["budget"] is None:
        return None
    resolved = [t["eps_bpb"] for t in row["budget_trace"] if "eps_bpb" in t]
    if resolved:
        return resolved[-1]
    text = str(row["budget"]).strip()
    return None if text.endswith("%") else float(text)


def budget_table(rep: dict) -> Optional[str]:
    """New-domain learning at equal original-domain forgetting: the budgeted runs, grouped by budget,
    most learning first. The figures are the final held-out ones against the backbone."""
    base = rep["backbone"] or {}
    orig, new = rep["original"], rep["new"][0]
    rows = [r for r in rep["rows"] if r["budget"] is not None]
    if not rows or orig not in base or new not in base:
        return None
    head = ["budget", "method", "final λ", f"held-out Δ{orig} (forgetting)", "within budget",
            f"learning (-Δ{new})", f"{new} bpb", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def learning(r):
        return base[new]["bpb"] - r["eval"][new]["bpb"]

    for r in sorted(rows, key=lambda r: (budget_eps(r) or 0.0, str(r["budget"]), -learning(r))):
        forget = r["eval"][orig]["bpb"] - base[orig]["bpb"]
        eps = budget_eps(r)
        lam = r["budget_trace"][-1]["lambda"] if r["budget_trace"] else None
        within = "" if eps is None else f"{forget / eps:.2f} EPS" + (" ✓" if forget <= eps else " ✗")
        budget = str(r["budget"])
        if budget.strip().endswith("%") and eps is not None:
            budget += f" ({eps:.4f} bpb)"
        lines.append("| " + " | ".join([budget, r["method"], _fmt(lam, ".3g"), f"{forget:+.4f}", within,
                                         f"{learning(r):+.4f}",
                                         _fmt(r["eval"][new]["bpb"]), r["run"]]) + " |")
    return "\n".join(lines)


def budget_plot(rep: dict, out: Path) -> Optional[Path]:
    """The multiplier (top) and the degradation (bottom) over steps, one colour per run: held-out
    evals as points, the training estimate the multiplier follows as a thin line, EPS dashed."""
    rows = [r for r in rep["rows"] if r["budget"] is not None]
    base = (rep["backbone"] or {}).get(rep["original"])
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=120, sharex=True)
    cmap = plt.get_cmap("tab10")
    for i, (r, label) in enumerate(zip(rows, _labels(rows))):
        color = cmap(i % 10)
        trace = r["budget_trace"]
        top.plot([t["step"] for t in trace], [t["lambda"] for t in trace], color=color, label=label)
        est = [t for t in trace if "degradation" in t]
        bottom.plot([t["step"] for t in est], [t["degradation"] for t in est], color=color, lw=0.7, alpha=0.6)
        if base is not None:
            pts = [(e["step"], e[rep["original"]]["bpb"] - base["bpb"]) for e in r["evals"] if rep["original"] in e]
            bottom.plot([s for s, _ in pts], [d for _, d in pts], "o-", color=color, ms=4, label=label)
        eps = budget_eps(r)
        if eps is not None:
            bottom.axhline(eps, color=color, ls="--", lw=0.8)
    top.set_ylabel("multiplier λ")
    top.set_title("Forgetting budget: multiplier and degradation over training")
    top.legend(fontsize=7)
    bottom.axhline(0.0, color="black", lw=0.6, ls=":")
    bottom.set_ylabel(f"Δ{rep['original']} bits per byte vs backbone")
    bottom.set_xlabel("step (points: held-out evals; thin: the budget's running estimate; dashed: budget)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(runs: list[Path], out_dir: Path, backbone: Optional[Path] = None,
                 title: str = "Learn/forget report") -> dict:
    """report.md, report.json and tradeoff.png (+ budget.png) in out_dir;
    returns {table, budget_table, markdown, png, budget_png, data}."""
    rep = collect([Path(r) for r in runs], Path(backbone) if backbone else None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rep)
    png = plot(rep, out_dir / "tradeoff.png")
    btable = budget_table(rep)
    bpng = budget_plot(rep, out_dir / "budget.png")
    base_note = f" Backbone: {rep['backbone_source']}." if rep["backbone"] else " No backbone numbers were found."
    text = (f"# {title}\n\nBits per byte on held-out data: `{rep['original']}` is the original domain "
            f"(lower = less forgetting), {', '.join(f'`{d}`' for d in rep['new'])} the new one "
            f"(lower = more learning).{base_note}\n\n{table}\n\n![trade-off]({png.name})\n")
    if btable:
        text += ("\n## At equal forgetting\n\nEach method trained to the same forgetting budget EPS (the allowed "
                 f"rise of `{rep['original']}` bits per byte over the backbone's); held-out figures at the end, "
                 f"most learning first.\n\n{btable}\n")
    if bpng:
        text += f"\n![multiplier and degradation]({bpng.name})\n"
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    return {"table": table, "budget_table": btable, "markdown": out_dir / "report.md", "png": png,
            "budget_png": bpng, "data": rep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--backbone", type=Path,
                    help="run dir or eval JSON of the unextended backbone (default: a run's step-0 eval)")
    ap.add_argument("--out", type=Path, default=Path("report"), help="output dir for report.md and tradeoff.png")
    ap.add_argument("--title", default="Learn/forget report")
    args = ap.parse_args(argv)
    try:
        res = write_report(args.runs, args.out, args.backbone, args.title)
    except ReportError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(res["table"])
    if res["budget_table"]:
        print("\nAt equal forgetting:\n" + res["budget_table"])
    pngs = " and ".join(str(x) for x in (res["png"], res["budget_png"]) if x)
    print(f"\nwrote {res['markdown']} and {pngs}")
    return 0
