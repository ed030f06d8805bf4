"""`python -m trainer plan CONFIG.yaml [key=value ...] --gpus-per-node G --nodes N --gpu-mem 80GiB`.

Prints, for every ZeRO stage / offload / activation-checkpointing choice, the predicted peak
memory per rank term by term, the host memory per node, the largest micro batch that fits and
a step time, then recommends one; `--write-ds-config PATH` writes its DeepSpeed JSON and prints
the YAML overrides that go with it. `--measure` trains the configuration for a few steps on this
machine's CPU and prints predicted vs measured peak memory; `plan validate --sizes 10m,100m,1b`
does it over shapes, stages and checkpointing (one table); `plan calibrate` measures the CPU
framework term. Nothing is loaded: the backbone is read from its config.json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

from ..config import ConfigError, RunConfig, load_config
from .choices import Cluster, Row, cannot_fit, choice_ds, evaluate, recommend
from .memory import CHOICES, GIB, Choice
from .timing import Hardware

UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}


def parse_bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 80GiB, 512GB or 4096MiB")
    return float(m.group(1)) * UNITS[m.group(2).lower()]


def gpu_cluster(args) -> Cluster:
    from .measure import load_baseline

    base = load_baseline()
    host_proc = float(base["bytes"]["zero2"]) if base else 2 * GIB
    hw = Hardware(args.gpu_tflops * 1e12, args.mfu, args.intra_node_gbs * 1e9, args.inter_node_gbs * 1e9,
                  args.pcie_gbs * 1e9, args.host_adam)
    return Cluster(args.gpus_per_node, args.nodes, args.gpu_mem, args.cpu_mem, False, hw,
                   {s: args.reserve for s in (1, 2, 3)}, host_proc)


def cpu_cluster(nproc: int, framework: Optional[float] = None, mem: Optional[float] = None) -> Cluster:
    """This machine, `nproc` CPU ranks: device memory = RAM / ranks, the framework term calibrated."""
    import os

    from .measure import framework_bytes

    ram = mem or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    hw = Hardware(1e11, 0.5, 5e9, 5e9, 1e12, 1e9)  # time is not the point on CPU
    fw = {s: framework_bytes(s) if framework is None else framework for s in (1, 2, 3)}
    return Cluster(nproc, 1, ram / nproc, None, True, hw, fw, 0.0)


def predict(cfg: RunConfig, hf_config_file: Optional[str], cluster: Cluster, seq_len: int, choice: Choice,
            micro_batch: int) -> Row:
    from .shape import model_facts

    facts = model_facts(cfg, hf_config_file)
    return evaluate(cfg, facts, cluster, seq_len, [choice], micro_batch)[0]


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


COLUMNS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations",
           "zero3_live_params", "buckets", "framework", "step_scratch")
HEADS = ("frozen", "trainable", "grads", "optim", "activ.", "ZeRO-3 live", "buckets", "framework", "step")


def table(rows: list[Row], cluster: Cluster, best: Optional[Row]) -> str:
    lines = ["| choice | micro batch | peak GiB/rank | " + " | ".join(HEADS) + " | host GiB/node | step s | comm GB/rank | fits |",
             "|---" * (len(HEADS) + 8) + "|"]
    for r in rows:
        mark = " **(recommended)**" if r is best else ""
        cells = [gib(getattr(r.terms, c)) for c in COLUMNS]
        lines.append(f"| {r.choice.label}{mark} | {r.micro_batch} | {gib(r.terms.peak)} | " + " | ".join(cells) +
                     f" | {gib(r.host_per_node)} | {r.time.step_s:.2f} | {r.time.comm_bytes / 1e9:.1f} | "
                     f"{'yes' if r.fits else 'no'} |")
    return "\n".join(lines)


def overrides_for(row: Row, ds_path: str) -> list[str]:
    return [f"deepspeed.config={ds_path}", f"train.micro_batch_size={row.micro_batch}",
            f"train.activation_checkpointing={'true' if row.choice.checkpointing else 'false'}"]


def write_ds_config(cfg: RunConfig, row: Row, path: Path, world: int, on_cpu: bool) -> None:
    """The recommended JSON, resolved by build_ds_config for this world size (so it is checked)."""
    import copy

    from ..engine.ds_config import build_ds_config

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row.ds, indent=2) + "\n")
    check = copy.deepcopy(cfg)
    check.deepspeed.config = str(path)
    check.train.micro_batch_size = row.micro_batch
    build_ds_config(check, world, on_gpu=not on_cpu, bf16_ok=True)  # raises on a bad combination
    # The file keeps its "auto" values: the YAML fills them, so it stays valid on other node counts.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer plan", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", type=parse_bytes, default=parse_bytes("80GiB"), help="memory per GPU (80GiB)")
    p.add_argument("--cpu-mem", type=parse_bytes, default=None, help="host RAM per node (not checked if omitted)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample of the MDS data (2048)")
    p.add_argument("--hf-config", help="the backbone's config.json, when model.path is not on this machine")
    p.add_argument("--reserve", type=parse_bytes, default=parse_bytes("2GiB"),
                   help="per-GPU memory outside torch's allocator: CUDA context, NCCL, fragmentation (2GiB)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (989: H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (0.4)")
    p.add_argument("--intra-node-gbs", type=float, default=200.0, help="GB/s per GPU within a node (200: NVLink)")
    p.add_argument("--inter-node-gbs", type=float, default=40.0, help="GB/s per GPU across nodes (40: 400Gb/s IB)")
    p.add_argument("--pcie-gbs", type=float, default=25.0, help="GB/s host<->GPU (25: PCIe 4 x16)")
    p.add_argument("--host-adam", type=float, default=1e9, help="params/s of the host's Adam per rank (1e9)")
    p.add_argument("--write-ds-config", metavar="PATH", help="write the recommended DeepSpeed JSON here")
    p.add_argument("--measure", action="store_true",
                   help="also train this config a few steps on this machine's CPU and compare (its own stage, "
                        "checkpointing and micro batch)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks for --measure (2)")
    p.add_argument("--work", default="runs/plan", help="where --measure writes data and runs (runs/plan)")
    return p


def plan(args) -> int:
    from .shape import model_facts

    cfg = load_config(args.config, args.overrides)
    facts = model_facts(cfg, args.hf_config)
    cluster = gpu_cluster(args)
    rows = evaluate(cfg, facts, cluster, args.seq_len)
    best = recommend(rows)
    c = facts.hf_config
    print(f"{args.config}: {type(c).__name__.replace('Config', '')} {c.num_hidden_layers} layers x {c.hidden_size}, "
          f"{facts.frozen / 1e9:.2f}B frozen + {facts.trainable / 1e9:.3f}B trainable ({cfg.method.name}); "
          f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs of {args.gpu_mem / GIB:.0f} GiB; "
          f"seq {args.seq_len}, global batch {cfg.train.global_batch_size}")
    print(table(rows, cluster, best))
    print("GiB per rank. peak = frozen + trainable + grads + optim + framework + max(activ. + ZeRO-3 live + buckets, "
          "step); micro batch = the largest that fits (global batch / world / accumulation); step s at "
          f"{args.mfu:.0%} MFU of {args.gpu_tflops:.0f} TFLOP/s, communication overlapped when overlap_comm.")
    if best is None:
        print(cannot_fit(rows, cluster))
        return 1
    why = (f"fastest fitting choice ({best.time.step_s:.2f} s/step: compute {best.time.compute_s:.2f} s, "
           f"communication {best.time.comm_s:.2f} s, offload {best.time.offload_s:.2f} s) with "
           f"{(cluster.device_mem - best.terms.peak) / GIB:.1f} GiB to spare per rank")
    print(f"recommended: {best.choice.label}, micro batch {best.micro_batch}: {why}")
    ds_path = args.write_ds_config or f"ds_configs/<this choice>.json"
    if args.write_ds_config:
        write_ds_config(cfg, best, Path(args.write_ds_config), cluster.world, on_cpu=False)
        print(f"wrote {args.write_ds_config}")
    print("overrides: " + " ".join(overrides_for(best, ds_path)))
    if args.measure:
        return measure_config(cfg, args)
    return 0


def measure_config(cfg: RunConfig, args) -> int:
    """Train the config's own choice on `args.nproc` CPU ranks and print predicted vs measured."""
    from ..engine.ds_config import load_ds_json, zero_stage
    from .measure import measure_run

    ds = load_ds_json(cfg.deepspeed.config)
    zero = ds.get("zero_optimization", {})
    choice = Choice(zero_stage(ds), "offload_optimizer" in zero, "offload_param" in zero,
                    cfg.train.activation_checkpointing)
    row = predict(cfg, args.hf_config, cpu_cluster(args.nproc), args.seq_len, choice, cfg.train.micro_batch_size)
    measured = measure_run(cfg, choice, choice_ds(cfg, choice), args.seq_len, cfg.train.micro_batch_size, args.nproc,
                           Path(args.work))
    print(validation_table([(cfg.run_dir, choice, cfg.train.micro_batch_size, row, measured)]))
    return 0


def validation_table(results) -> str:
    lines = ["| shape | choice | micro batch | params (frozen + trainable) | predicted GiB/rank | measured GiB "
             "(rank 0 peak_mem_gb) | RSS GiB per rank | error | activ. | model states | buckets+live | framework |",
             "|---" * 12 + "|"]
    for name, choice, mb, row, m in results:
        t = row.terms
        err = (t.peak / GIB - m["peak_gib"]) / m["peak_gib"]
        states = t.frozen_weights + t.trainable_weights + t.gradients + t.optimizer_states
        rss = " / ".join(f"{v:.2f}" for v in m["rss_gib"].values()) or "-"
        p = m.get("params") or {}
        lines.append(f"| {name} | {choice.label} | {mb} | {p.get('backbone', 0) / 1e6:.1f}M + "
                     f"{p.get('trainable', 0) / 1e6:.1f}M | {gib(t.peak)} | {m['peak_gib']:.2f} | {rss} | "
                     f"{err:+.1%} | {gib(t.activations)} | {gib(states)} | {gib(t.buckets + t.zero3_live_params)} "
                     f"| {gib(t.framework)} |")
    return "\n".join(lines)


def validate(argv) -> int:
    """One table: predicted vs measured over --sizes x --stages x checkpointing on 2 CPU ranks."""
    from .measure import SIZES, measure_run, size_config

    p = argparse.ArgumentParser(prog="python -m trainer plan validate")
    p.add_argument("--sizes", default="10m,100m", help=f"comma-separated, of {', '.join(s for s in SIZES if s != 'calib')}")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--work", default="runs/plan_validate")
    p.add_argument("--out", help="also write the table (markdown) here")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the measurements of identical runs already in --work (re-predict only)")
    args = p.parse_args(argv)
    results = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise ConfigError(f"--sizes: {size!r} is not one of {', '.join(SIZES)}")
        spec, seq, mb = SIZES[size]
        cfg = size_config(size)
        for stage in (int(s) for s in args.stages.split(",")):
            for ck in args.checkpointing.split(","):
                choice = Choice(stage, checkpointing=ck == "on")
                row = predict(cfg, None, cpu_cluster(args.nproc), seq, choice, mb)
                print(f"[plan] {size} {choice.label}: predicted {gib(row.terms.peak)} GiB/rank, measuring...",
                      file=sys.stderr, flush=True)
                m = measure_run(cfg, choice, row.ds, seq, mb, args.nproc, Path(args.work), reuse=args.reuse)
                print(f"[plan]   measured {m['peak_gib']:.2f} GiB (rank 0), {m['s_per_step']:.1f} s/step",
                      file=sys.stderr, flush=True)
                results.append((size, choice, mb, row, m))
    text = validation_table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "validate":
            return validate(argv[1:])
        if argv and argv[0] == "calibrate":
            from .measure import calibrate
            p = argparse.ArgumentParser(prog="python -m trainer plan calibrate")
            p.add_argument("--nproc", type=int, default=2)
            p.add_argument("--work", default="runs/plan_calibrate")
            a = p.parse_args(argv[1:])
            calibrate(Path(a.work), a.nproc)
            return 0
        return plan(parser().parse_args(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
