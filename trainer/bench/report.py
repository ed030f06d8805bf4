"""The bench's verdict: the issue's targets checked against the measured ratios, as markdown.

Targets are goals for the product, not pass/fail tests: the table says where we
stand, and a missed target is a finding to explain (see the issue note).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .plan import BUDGET_METERS, METHODS


def _get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _methods(res: dict) -> list[str]:
    return (res.get("meta") or {}).get("methods") or list(METHODS)


def _full(res: dict) -> bool:
    """Whether the bench ran the whole matrix (budget runs, peers, data path), not only throughput and ZeRO."""
    return (res.get("meta") or {}).get("full_matrix", True)


def targets(res: dict) -> list[dict]:
    """[{name, value, target, met}] for every target of the issue; `met` is None when not measured."""
    def row(name, value, target, ok):
        return {"name": name, "value": value, "target": target, "met": None if value is None else ok(value)}

    rows = []
    for ck in ("off", "on"):
        v = _get(res, f"train.neutral_residues.{ck}.ratio_vs_finetune")
        rows.append(row(f"neutral_residues / finetune tokens/s (checkpointing {ck})", v, ">= 1.15",
                        lambda x: x >= 1.15))
    if _full(res):
        rows.append(row("our lora / HF Trainer+PEFT tokens/s", _get(res, "peer.ratio"), ">= 1.0", lambda x: x >= 1.0))
    ds = _get(res, "peer.ratio_vs_hf_deepspeed")
    if ds is not None:
        rows.append(row("our lora / HF Trainer+PEFT+DeepSpeed tokens/s", ds, ">= 1.0", lambda x: x >= 1.0))
    rows.append(row("checkpoint bytes / trainable state (neutral_residues)",
                    _get(res, "checkpoint.neutral_residues.ratio_to_trainable_state"), "<= 1.05", lambda x: x <= 1.05))
    frozen = [_get(res, f"checkpoint.{m}.frozen_params_saved") for m in _methods(res) if m != "finetune"]
    rows.append(row("frozen params in adapter/LoRA checkpoints", None if None in frozen else sum(frozen), "0",
                    lambda x: x == 0))
    if _full(res):
        rows.append(row("data_prep / raw tokenizer tokens/s per worker", _get(res, "data.ratio"), ">= 0.8",
                        lambda x: x >= 0.8))
        rows.append(row("loader samples/s / training consumption", _get(res, "loader.ratio"), ">= 10",
                        lambda x: x >= 10))
        for method in BUDGET_METERS:
            # The meter's share of the step time, timed inside the run: the tokens/s it costs, without the
            # drift between two runs that the paired ratio (in the table) carries on a shared machine.
            rows.append(row(f"forgetting budget overhead, {method} ({BUDGET_METERS[method]} meter)",
                            _get(res, f"budget.{method}.meter_share"), "<= 5%", lambda x: x <= 0.05))
    rows.append(row("FLOP utilisation, neutral_residues (checkpointing off)",
                    _get(res, "train.neutral_residues.off.mfu"), "report", lambda x: True))
    return rows


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def _series(values: Optional[list]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "—"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _gb(b: Optional[float]) -> Optional[float]:
    return None if b is None else b / 2**30


def markdown(res: dict) -> str:
    """The printed report: targets first, then the figures behind them."""
    meta = res["meta"]
    out = [f"## trainer bench: size {meta['size']}, device {meta['device']}, threads {meta['threads']}, "
           f"load {meta.get('load_avg_start', '—')} -> {meta.get('load_avg_end', '—')}"]
    if meta.get("jobs", 1) > 1:
        out.append(f"**{meta['jobs']} concurrent launches: the speeds below are not measurements (smoke run).**")
    met = {True: "met", False: "**missed**", None: "not measured"}
    out += ["", "### Targets", _table(["target", "value", "goal", "status"],
                                      [[t["name"], t["value"], t["target"],
                                        "reported" if t["target"] == "report" and t["met"] else met[t["met"]]]
                                       for t in res["targets"]])]

    peak = _get(res, "peak_matmul.flops_per_s")
    rows = []
    for m in _methods(res):
        for ck in ("off", "on"):
            r = _get(res, f"train.{m}.{ck}") or {}
            rows.append([m, ck, r.get("tokens_per_s"), r.get("ratio_vs_finetune"),
                         _series(r.get("ratio_vs_finetune_per_repeat")), r.get("tokens_per_s_best"),
                         r.get("ratio_vs_finetune_best"), r.get("expected_ratio"), r.get("flops_per_token"),
                         r.get("mfu"), r.get("peak_mem_gb"), r.get("load_avg_end")])
    out += ["", f"### Training throughput (1 rank; peak matmul {_fmt(peak and peak / 1e9)} GFLOP/s)",
            "tokens/s: median over repeats of each run's median window; / finetune: median over repeats of the "
            "ratio to the finetune run of the same repeat (run next to it, so machine drift cancels); best: the "
            "fastest window (least disturbed by other load); FLOPs ratio: finetune's FLOPs/token over the "
            "method's, the speed-up if time followed FLOPs; FLOP util. counts the recompute when checkpointing.",
            "", _table(["method", "act. ckpt", "tokens/s", "/ finetune", "per repeat", "best tokens/s",
                        "best / finetune",
                        "FLOPs ratio", "FLOPs/token", "FLOP util.", "peak mem GB", "load avg"], rows)]

    if meta.get("optimizer"):
        out.append(f"Every run uses {meta['optimizer']['type']}, not the shipped AdamW (see the size's definition).")
    if _full(res):
        _peers_budget_data(res, out)
    _memory_checkpoints(res, out)
    _profiles(res, out)
    return "\n".join(out)


def _peers_budget_data(res: dict, out: list) -> None:
    peer = res.get("peer") or {}
    prow = [["ours (trainer lora)", _get(res, "train.lora.off.tokens_per_s"), 1.0, ""],
            ["HF Trainer + PEFT", _get(peer, "hf.tokens_per_s"), peer.get("ratio"),
             _series(peer.get("ratio_per_repeat"))]]
    if "hf_deepspeed" in peer:
        prow.append(["HF Trainer + PEFT + DeepSpeed", _get(peer, "hf_deepspeed.tokens_per_s"),
                     peer.get("ratio_vs_hf_deepspeed"), _series(peer.get("ratio_vs_hf_deepspeed_per_repeat"))])
    out += ["", "### Peer comparison (LoRA, same data/batch/steps; each repeat runs HF right after our lora)",
            _table(["trainer", "tokens/s", "ours / it", "per repeat"], prow)]
    if _get(peer, "hf_deepspeed.skipped"):
        out.append(f"HF Trainer + DeepSpeed: skipped ({peer['hf_deepspeed']['skipped']})")

    brows = [[m, b.get("measure"), b.get("meter_share"), _get(res, f"train.{m}.off.tokens_per_s"),
              b.get("tokens_per_s"), b.get("ratio_vs_off"), _series(b.get("ratio_vs_off_per_repeat"))]
             for m, b in ((m, _get(res, f"budget.{m}") or {}) for m in BUDGET_METERS)]
    out += ["", "### Forgetting budget cost (1 rank, checkpointing off; each repeat runs it after the plain run)",
            _table(["method", "meter", "meter's share of step time", "tokens/s without", "tokens/s with",
                    "with / without", "per repeat"], brows)]
    d, lo = res.get("data") or {}, res.get("loader") or {}
    out += ["", "### Data path",
            _table(["measure", "rate", "baseline", "ratio"], [
                ["data_prep build, 1 worker (tokens/s)", _get(d, "data_prep.tokens_per_s"),
                 _get(d, "raw_tokenizer.tokens_per_s"), d.get("ratio")],
                ["StreamingDataLoader (samples/s)", lo.get("samples_per_s"), lo.get("train_samples_per_s"),
                 lo.get("ratio")]]),
            f"rates: the best of each; data_prep ratio: median of side-by-side pairs "
            f"({_series(d.get('ratio_per_repeat'))})"]


def _memory_checkpoints(res: dict, out: list) -> None:

    zrows = []
    for stage in ("2", "3"):
        z = _get(res, f"zero.{stage}") or {}
        if z.get("skipped"):
            zrows.append([f"ZeRO-{stage}", "skipped: " + z["skipped"], None, None, None, None])
            continue
        ranks = z.get("rss_peak_gb") or {}
        zrows.append([f"ZeRO-{stage}", ", ".join(f"{v:.2f}" for v in ranks.values()) or "—",
                      z.get("peak_mem_gb_rank0"), z.get("tokens_per_s"), z.get("save_s"), _gb(z.get("bytes"))])
    out += ["", "### Memory at 2 ranks (neutral_residues)",
            _table(["stage", "peak RSS per rank GB", "rank 0 logged GB", "tokens/s", "save s", "checkpoint GB"], zrows)]

    crows = []
    for m in _methods(res):
        c = _get(res, f"checkpoint.{m}") or {}
        crows.append([m, c.get("bytes"), c.get("trainable_state_bytes"), c.get("ratio_to_trainable_state"),
                      c.get("frozen_params_saved"), c.get("save_s"), c.get("load_s")])
    json_name = Path(res["meta"].get("ds_config", "ds_configs/zero2.json")).stem
    out += ["", f"### Checkpoints (1 rank, {json_name})",
            _table(["method", "bytes", "trainable state bytes", "ratio", "frozen params saved", "save s", "load s"],
                   crows)]



def _profiles(res: dict, out: list) -> None:
    prof = res.get("profile") or {}
    for name, p in prof.items():
        if not isinstance(p, dict) or "categories" not in p:
            continue
        cats = ", ".join(f"{k} {v['share_of_wall']:.0%}" for k, v in list(p["categories"].items())[:6])
        spans = "; ".join(f"{k} (total) {v['share_of_wall']:.0%}" for k, v in (p.get("spans") or {}).items())
        cats += f"; {spans}" if spans else ""
        out += ["", f"### Profile: {name} ({p['active']} steps, {p['wall_ms'] / p['active']:.0f} ms/step): {cats}",
                _table(["op", "calls", "self ms", "share of wall"],
                       [[o["op"], o["calls"], o["self_ms"], o["share_of_wall"]] for o in p["top_ops"][:10]])]


def missing_figures(res: dict) -> list[str]:
    """Dotted paths of every figure the bench must produce that is absent or not finite."""
    paths = ["peak_matmul.flops_per_s"]
    if _full(res):
        paths += ["peer.hf.tokens_per_s", "peer.ratio", "data.ratio", "loader.ratio",
                  "data.data_prep.tokens_per_s", "data.raw_tokenizer.tokens_per_s", "loader.samples_per_s"]
        paths += [f"budget.{method}.{k}" for method in BUDGET_METERS
                  for k in ("tokens_per_s", "meter_share", "ratio_vs_off", "overhead")]
    for m in _methods(res):
        for ck in ("off", "on"):
            paths += [f"train.{m}.{ck}.{k}" for k in ("tokens_per_s", "ratio_vs_finetune", "flops_per_token",
                                                      "achieved_flops_per_s", "mfu", "peak_mem_gb")]
        paths += [f"checkpoint.{m}.{k}" for k in ("bytes", "trainable_state_bytes", "ratio_to_trainable_state",
                                                  "frozen_params_saved", "save_s", "load_s")]
    for stage in ("2", "3"):
        if not _get(res, f"zero.{stage}.skipped"):
            paths += [f"zero.{stage}.{k}" for k in ("rss_peak_gb.0", "rss_peak_gb.1", "peak_mem_gb_rank0",
                                                    "tokens_per_s", "save_s", "bytes")]
    bad = []
    for p in paths:
        v = _get(res, p)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            bad.append(p)
    return bad
