"""`python -m trainer diagnose`: is the trained adapter neutral on the original domain?

For a run of an adapter method (neutral_residues, sigmoid_gate, adapters):
  - per layer and per domain's val set: the fraction of tokens whose gate is open
    (g > 0) and the mean |g * A(n)| (the residual the adapter actually adds);
  - the singular values of each layer's W_g, normalised by the largest, and a plot
    of them (the paper's Figure 3: low-variance init keeps a spread-out spectrum);
  - one line of "neutrality": mean |g*A| on original-domain tokens / on new-domain
    tokens. Near 0: the adapter stays out of the way on the original domain; 1: it
    does not tell the domains apart.

The statistics are the ones the trainer logs (`losses.layer_statistics`), taken
from eval forwards over the val sets: only the adapter blocks are put in
recording mode, the rest of the model stays in eval mode (no dropout).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config import ADAPTER_METHODS, ConfigError, load_config


def singular_values(model) -> list[list[float]]:
    """Per layer: singular values of W_g (h, d), descending, divided by the largest."""
    from ..method.extend import adapter_blocks

    out = []
    for block in adapter_blocks(model):
        s = torch.linalg.svdvals(block.adapter.w_g.detach().float())
        out.append((s / s[0].clamp(min=1e-30)).tolist())
    return out


@torch.no_grad()
def gate_statistics(model, batches) -> dict[str, list[float]]:
    """Token-weighted per-layer means over `batches` of {input_ids, valid}, and the token count.

    gate_active: fraction of tokens with g > 0 (always 1 for a sigmoid gate or no gate);
    gate_mean: mean g; residual_abs: mean |g*A| over tokens and hidden units.
    """
    from ..method.extend import adapter_blocks, set_domain
    from ..method.losses import layer_statistics

    blocks = adapter_blocks(model)
    model.eval()
    for b in blocks:
        b.training = True  # recording mode of ParallelAdapterMLP only; children stay as they are
    keys = ("gate_active", "gate_mean", "residual_abs")
    sums = {k: torch.zeros(len(blocks), dtype=torch.float64) for k in keys}
    tokens = 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            ids = batch["input_ids"][batch.get("valid", torch.ones(len(batch["input_ids"]), dtype=torch.bool))]
            if not len(ids):
                continue
            ids = ids.to(device)
            # Every token is labelled "original": the label only picks which bucket the stats land in.
            set_domain(model, torch.ones(ids.shape[0], 1, dtype=torch.bool, device=device))
            model(input_ids=ids)
            stats = layer_statistics(model)
            n = ids.numel()
            for k in keys:
                sums[k] += stats[f"{k}_original"].double().cpu() * n
            tokens += n
    finally:
        set_domain(model, None)
        for b in blocks:
            b.training = False
    return {k: (v / max(tokens, 1)).tolist() for k, v in sums.items()} | {"tokens": tokens}


def neutrality(per_domain: dict, roles: dict[str, str]) -> Optional[dict]:
    """Mean |g*A| over layers on original-role domains vs new-role domains (token-weighted)."""
    def pooled(role):
        doms = [d for d in per_domain if roles.get(d) == role]
        n = sum(per_domain[d]["tokens"] for d in doms)
        if not n:
            return None, doms
        mean = sum(sum(per_domain[d]["residual_abs"]) / len(per_domain[d]["residual_abs"]) * per_domain[d]["tokens"]
                   for d in doms) / n
        return mean, doms

    orig, orig_doms = pooled("original")
    new, new_doms = pooled("new")
    if orig is None or new is None:
        return None
    return {"original": orig_doms, "new": new_doms, "residual_abs_original": orig, "residual_abs_new": new,
            "ratio": orig / new if new > 0 else float("inf")}


def neutrality_line(n: Optional[dict]) -> str:
    if n is None:
        return "neutrality: needs val data of both an original and a new domain"
    return (f"neutrality: mean |g*A| on {'+'.join(n['original'])} (original) / {'+'.join(n['new'])} (new) = "
            f"{n['residual_abs_original']:.3g} / {n['residual_abs_new']:.3g} = {n['ratio']:.3f} "
            "(0 = silent on the original domain, 1 = no domain selectivity)")


def plot_singular_values(sv: list[list[float]], out: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(sv):
        x = [(j + 1) / len(s) for j in range(len(s))]
        ax.plot(x, s, color=cmap(i / max(len(sv) - 1, 1)), lw=1.2, label=f"layer {i}")
    ax.set_xlabel("singular value index / adapter width")
    ax.set_ylabel("singular value / largest")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    if len(sv) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def diagnose(run_dir: Path, out_dir: Optional[Path] = None, data: Optional[dict[str, str]] = None,
             tag: Optional[str] = None, batch_size: int = 8, max_batches: Optional[int] = None) -> dict:
    """Gate statistics on each domain's val set, W_g spectra, neutrality; writes JSON + PNG to out_dir."""
    from ..engine.data import ValSet
    from ..export.export import load_trained

    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    method = load_config(cfg_path).method.name
    if method not in ADAPTER_METHODS:  # checked before the (slow) model load
        raise ConfigError(f"{run_dir}: method {method} has no adapter gates to diagnose "
                          f"(diagnose needs one of {', '.join(ADAPTER_METHODS)})")
    cfg, model = load_trained(run_dir, tag)
    roles = {s.domain: s.role for s in cfg.data.streams}
    val = data or {s.domain: s.val for s in cfg.data.streams if s.val}
    if not val:
        raise ConfigError(f"{run_dir}: the run has no val sets; give --data DOMAIN=MDS_DIR")
    per_domain = {d: gate_statistics(model, ValSet(p, 0, 1, batch_size, max_batches)) for d, p in val.items()}
    result = {"run": str(run_dir), "method": cfg.method.name, "gate": cfg.method.gate, "roles": roles,
              "layers": per_domain, "singular_values": singular_values(model),
              "neutrality": neutrality(per_domain, roles)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result["png"] = str(plot_singular_values(result["singular_values"], out_dir / "singular_values.png",
                                                 f"W_g spectra: {cfg.method.name} ({Path(run_dir).name})"))
        (out_dir / "diagnose.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    doms = list(result["layers"])
    head = "layer " + " ".join(f"{d + ' g>0':>12} {d + ' |gA|':>12}" for d in doms) + f" {'sv>0.1':>7}"
    lines = [head]
    for i, sv in enumerate(result["singular_values"]):
        stats = [result["layers"][d] for d in doms]
        cells = " ".join(f"{s['gate_active'][i]:>12.3f} {s['residual_abs'][i]:>12.3g}" for s in stats)
        lines.append(f"{i:>5} {cells} {sum(s > 0.1 for s in sv):>7d}")
    return "\n".join(lines + ["", neutrality_line(result["neutrality"])])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer diagnose", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="run directory of an adapter method")
    ap.add_argument("--data", nargs="+", default=[], metavar="DOMAIN=MDS_DIR",
                    help="val sets (default: the run's); roles come from the run's config")
    ap.add_argument("--out", type=Path, help="write diagnose.json and singular_values.png here")
    ap.add_argument("--tag", help="checkpoint tag (default: latest)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, help="cap on val batches per domain")
    args = ap.parse_args(argv)
    from .evaluate import EvalError, parse_data

    try:
        if not args.run_dir.is_dir():
            raise ConfigError(f"{args.run_dir}: no such directory")
        data = parse_data(args.data) if args.data else None
        result = diagnose(args.run_dir, args.out, data, args.tag, args.batch_size, args.max_batches)
    except (ConfigError, EvalError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        print(f"\nwrote {args.out / 'diagnose.json'} and {result['png']}")
    return 0
