"""`python -m trainer bench`: what extension training costs, as ratios measured in one run.

Absolute speeds change from machine to machine (and minute to minute on a
shared one); ratios measured side by side in the same run mostly do not. So
every figure here is paired with its reference from the same run:

- tokens/s of neutral_residues, adapters, lora vs finetune, each with
  activation checkpointing off and on, through `python -m trainer train`
  (DeepSpeed engine, streaming loader, losses: the real path);
- model FLOPs/token (bench_flops.py) x tokens/s vs a matmul peak measured here;
- our lora vs `transformers.Trainer` + `peft` (+ DeepSpeed) on the same work;
- per-rank peak memory of ZeRO-2 vs ZeRO-3 at 2 ranks, checkpoint bytes vs the
  trainable state, save and load times;
- data_prep vs the raw tokenizer, the streaming loader vs what training eats.

The pieces: bench_plan (sizes, run configs), bench_runs (launch, metrics),
bench_flops, bench_peer, bench_profile, bench_data, bench_report (targets,
markdown). This file orders the measurements and derives the ratios.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .. import package_version
from .plan import BUDGET_METERS, METHODS, SIZES, BenchSize, PlanError, TrainJob, budget_jobs, check_device, profile_jobs, \
    run_inputs, throughput_jobs, zero_jobs
from .runs import BenchRunError, checkpoint_contents, latest_checkpoint, launch, paired_ratio, \
    read_metrics, run_job, segments, subprocess_env, summarize_segment, train_command, window_rates, write_config


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Bench:
    """One bench run: its size, device, work dir, and the result dict it fills stage by stage."""

    def __init__(self, size: BenchSize, device: str, work: Path, threads: int, repeats: int = 1,
                 peer_deepspeed: bool = True, profile: bool = False, jobs: int = 1):
        self.size, self.device, self.work, self.threads = size, device, work, threads
        self.repeats, self.peer_deepspeed, self.profile, self.jobs = repeats, peer_deepspeed, profile, jobs
        self.runs: dict[tuple[int, str], dict] = {}
        """(repeat, method) -> its off/on/checkpoint summaries."""
        self.budget_runs: dict[tuple[int, str], dict] = {}
        """(repeat, method) -> its run with a forgetting budget (compared with the same repeat's `off`)."""
        self.peer_runs: dict[tuple[int, str], dict] = {}
        """(repeat, "hf" | "hf_deepspeed") -> that peer launch's result."""
        self.env = subprocess_env(device, threads)
        self.res: dict = {"meta": self._meta(), "errors": {}}
        self.data: dict = {}

    def _meta(self) -> dict:
        import torch

        versions = {}
        for mod in ("torch", "deepspeed", "transformers", "peft", "streaming"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # a missing optional package is a fact to record, not a failure
                versions[mod] = None
        # The commit, when the package runs from a git checkout; an installed copy has only its version.
        source = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True, text=True)
        s = self.size
        return {"size": s.name, "device": self.device, "version": package_version(), "threads": self.threads,
                "cpu_count": os.cpu_count(),
                "cuda_devices": torch.cuda.device_count(), "versions": versions,
                "commit": commit.stdout.strip() or None, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "load_avg_start": round(os.getloadavg()[0], 2), "model": s.model, "seq_len": s.seq_len,
                "micro_batch": s.micro_batch, "global_batch": s.global_batch, "warmup_steps": s.warmup,
                "timed_steps": s.timed, "window": s.window, "repeats": self.repeats, "jobs": self.jobs,
                "methods": list(s.methods or METHODS), "full_matrix": s.full_matrix, "optimizer": s.optimizer,
                "ds_config": s.ds_config,
                "backbone": "model.path (built under ZeRO-3, sharded)" if s.backbone_on_disk else "model.config"}

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        """Run one measurement; a failure is recorded and the others still run."""
        t0 = time.time()
        log(f"{name} ...")
        try:
            fn()
            log(f"{name}: {time.time() - t0:.0f}s")
        except Exception as e:  # noqa: BLE001 - every stage failure is reported, none hides the rest
            msg = str(e).strip().splitlines()
            self.res["errors"][name] = "\n".join(msg[:1] + msg[-15:]) if msg else type(e).__name__
            log(f"{name}: FAILED: {msg[0] if msg else type(e).__name__}")
            if not isinstance(e, BenchRunError):
                traceback.print_exc()

    # ------------------------------------------------------------------ measurements

    def peak(self, when: str) -> None:
        import torch

        from .flops import peak_matmul_flops

        torch.set_num_threads(self.threads)
        r = peak_matmul_flops(self.device, self.size.matmul_n)
        pm = self.res.setdefault("peak_matmul", {"dtype": r["dtype"], "n": r["n"], "threads": r["threads"]})
        pm[f"flops_per_s_{when}"] = r["flops_per_s"]
        # The hardware limit is the best that was observed; load only ever lowers it.
        pm["flops_per_s"] = max(pm.get("flops_per_s", 0.0), r["flops_per_s"])

    def write_data(self) -> None:
        """MDS shards; for a size that loads its backbone from disk, that backbone (built on 2 ranks under
        ZeRO-3, as no process could hold it whole at 70B); the JSONs with the size's optimizer."""
        from .data import training_data
        from .plan import run_inputs

        data = {**training_data(self.work / "data", self.size), **run_inputs(self.size, self.work)}
        if self.size.backbone_on_disk:
            self.build_backbone(Path(data["model"]["path"]))
        self.data = data

    def build_backbone(self, out: Path) -> None:
        spec = self.work / "backbone.json"
        spec.write_text(json.dumps(self.size.model, indent=2))
        ranks = 2 if self.device == "cpu" else max(1, min(2, self.res["meta"]["cuda_devices"]))
        cmd = train_command(spec, ranks, overrides=[str(out)], module="trainer.bench.backbone")
        log(f"  backbone: {self.size.name}, built on {ranks} rank(s) under ZeRO-3 -> {out}")
        run = launch(cmd, subprocess_env(self.device, max(1, self.threads // ranks)), self.work / "logs" / "backbone.log",
                     self.size.timeout_s)
        self.res["backbone"] = {"build_s": run["seconds"], "bytes": sum(f.stat().st_size for f in out.iterdir())}

    def method_pair(self, repeat: int, off: TrainJob, on: TrainJob) -> None:
        """One method: checkpointing off (fresh), then on (resuming it: load time + second figure)."""
        method = off.config["method"]["name"]
        shutil.rmtree(off.run_dir, ignore_errors=True)
        load_off = self.run_train(off)["load_avg_end"]
        s_off = summarize_segment(segments(read_metrics(off.run_dir))[0], self.size.warmup, self.size.window)
        s_off["load_avg_end"] = load_off
        ckpt = {**checkpoint_contents(latest_checkpoint(off.run_dir), s_off["params"]["trainable"],
                                      self.size.optimizer_moments),
                "save_s": s_off.pop("checkpoint")["save_s"]}  # read now: the `on` run's save prunes it
        load_on = self.run_train(on)["load_avg_end"]
        s_on = summarize_segment(segments(read_metrics(on.run_dir))[-1], self.size.warmup, self.size.window)
        s_on["load_avg_end"] = load_on
        ckpt["load_s"] = s_on.pop("load_s")
        s_on.pop("checkpoint", None)
        s_on["params"] = s_off["params"]
        self.runs[(repeat, method)] = {"off": s_off, "on": s_on, "checkpoint": ckpt}

    def budget_run(self, repeat: int, job: TrainJob) -> None:
        """A method's `off` run with a forgetting budget: what measuring forgetting costs per step."""
        shutil.rmtree(job.run_dir, ignore_errors=True)
        self.run_train(job)
        self.budget_runs[(repeat, job.config["method"]["name"])] = summarize_segment(
            segments(read_metrics(job.run_dir))[0], self.size.warmup, self.size.window)

    def collect_budget(self) -> None:
        """tokens/s with a budget over the same repeat's tokens/s without, per method."""
        for method in sorted({m for _, m in self.budget_runs}):
            with_budget = {r: run["tokens_per_s"] for (r, m), run in self.budget_runs.items() if m == method}
            without = {r: self.runs[(r, method)]["off"]["tokens_per_s"] for r in with_budget if (r, method) in self.runs}
            entry = {"measure": BUDGET_METERS[method], "tokens_per_s": statistics.median(with_budget.values())}
            # Timed inside the run: unlike the ratio of two runs, other load on the machine hardly moves it.
            shares = [run["meter_share"] for (_, m), run in self.budget_runs.items() if m == method and "meter_share" in run]
            if shares:
                entry["meter_share"] = statistics.median(shares)
            if without:
                entry["ratio_vs_off"], entry["ratio_vs_off_per_repeat"] = paired_ratio(with_budget, without)
                entry["overhead"] = 1 - entry["ratio_vs_off"]
            self.res.setdefault("budget", {})[method] = entry

    def collect_throughput(self) -> None:
        """Medians over repeats per (method, checkpointing); every ratio pairs the runs of one repeat."""
        train, ckpts = self.res.setdefault("train", {}), self.res.setdefault("checkpoint", {})
        rates: dict[tuple[str, str], dict[int, float]] = {}
        for (repeat, method), by in sorted(self.runs.items()):
            ckpts.setdefault(method, by["checkpoint"])  # the first repeat's: sizes do not drift
            for ck in ("off", "on"):
                rates.setdefault((method, ck), {})[repeat] = by[ck]["tokens_per_s"]
        for (method, ck), per_repeat in rates.items():
            runs = [self.runs[(r, method)][ck] for r in sorted(per_repeat)]
            agg = dict(runs[0])
            agg["tokens_per_s"] = statistics.median(per_repeat.values())
            agg["tokens_per_s_best"] = max(x["tokens_per_s_best"] for x in runs)
            agg["tokens_per_s_per_repeat"] = [per_repeat[r] for r in sorted(per_repeat)]
            agg["peak_mem_gb"] = max(x["peak_mem_gb"] for x in runs)
            ref = rates.get(("finetune", ck))
            if ref:
                agg["ratio_vs_finetune"], agg["ratio_vs_finetune_per_repeat"] = paired_ratio(per_repeat, ref)
            train.setdefault(method, {})[ck] = agg

        peer, ours = self.res.setdefault("peer", {}), rates.get(("lora", "off"))
        for name, key in (("hf", "ratio"), ("hf_deepspeed", "ratio_vs_hf_deepspeed")):
            per_repeat = {r: run for (r, n), run in sorted(self.peer_runs.items()) if n == name}
            if not per_repeat:
                continue
            tps = {r: run["tokens_per_s"] for r, run in per_repeat.items()}
            first = per_repeat[min(per_repeat)]
            peer[name] = {**first, "tokens_per_s": statistics.median(tps.values()),
                          "tokens_per_s_per_repeat": [tps[r] for r in sorted(tps)]}
            if ours:
                peer[key], peer[f"{key}_per_repeat"] = paired_ratio(ours, tps)

    def run_train(self, job: TrainJob) -> dict:
        log(f"  train {job.name} ({job.nproc} rank{'s' if job.nproc > 1 else ''})")
        run = run_job(job, self.work, self.env, self.size.timeout_s)
        log(f"  train {job.name}: {run['seconds']:.0f}s, load average {run['load_avg_end']:.1f}")
        return run

    def peer(self, repeat: int, name: str) -> None:
        """HF Trainer + PEFT on our lora config (`hf`), or with DeepSpeed and our resolved JSON (`hf_deepspeed`)."""
        from .plan import base_config
        from ..config import load_config
        from ..engine.dist import bf16_supported
        from ..engine.ds_config import build_ds_config

        root = self.work / f"repeat{repeat}"
        cfg = base_config(self.size, self.data, root / "runs" / f"peer_{name}", "lora", self.size.steps)
        cfg_path = write_config(cfg, root / "configs" / f"peer_{name}.yaml")
        out = root / f"peer_{name}.json"
        cmd = [sys.executable, "-m", "trainer.bench.peer", str(cfg_path), "--out", str(out), "--device", self.device]
        if name == "hf_deepspeed":
            ds = build_ds_config(load_config(cfg_path), 1, self.device == "cuda", bf16_supported())
            ds_path = root / "configs" / "peer_ds.json"
            ds_path.write_text(json.dumps(ds, indent=2))
            cmd += ["--deepspeed", str(ds_path)]
        log(f"  peer {name} (repeat {repeat})")
        launch(cmd, self.env, root / "logs" / f"peer_{name}.log", self.size.timeout_s)
        r = json.loads(out.read_text())
        tokens = self.size.global_batch * self.size.seq_len
        rates = [tokens / sec for sec in r.pop("step_seconds")][self.size.warmup:]
        windows = window_rates(rates, self.size.window)
        self.peer_runs[(repeat, name)] = {**r, "tokens_per_s": statistics.median(windows),
                                          "windows": [round(w, 2) for w in windows]}

    def zero(self, job: TrainJob) -> None:
        """One 2-rank run: per-rank peak RSS sampled from outside, the rest from its metrics."""
        stage = job.name[-1]
        if self.device == "cuda" and self.res["meta"]["cuda_devices"] < 2:
            self.res.setdefault("zero", {})[stage] = {
                "skipped": f"needs 2 GPUs, {self.res['meta']['cuda_devices']} visible"}
            return
        shutil.rmtree(job.run_dir, ignore_errors=True)
        per_rank = max(1, self.threads // 2)
        log(f"  train {job.name} (2 ranks)")
        run = run_job(job, self.work, subprocess_env(self.device, per_rank), self.size.timeout_s, sample_rss=True)
        s = summarize_segment(segments(read_metrics(job.run_dir))[0], self.size.warmup, 1)
        self.res.setdefault("zero", {})[stage] = {
            "rss_peak_gb": {str(k): v / 2**30 for k, v in run["rss_peak_bytes"].items()},
            "peak_mem_gb_rank0": s["peak_mem_gb"], "tokens_per_s": s["tokens_per_s"],
            "save_s": s["checkpoint"]["save_s"], "bytes": s["checkpoint"]["bytes"], "threads_per_rank": per_rank}

    def profile_run(self, job: TrainJob) -> None:
        name = job.name.split("/")[1]
        shutil.rmtree(job.run_dir, ignore_errors=True)
        cfg_path = write_config(job.config, self.work / "configs" / f"profile_{name}.yaml")
        out = self.work / f"profile_{name}.json"
        log(f"  profile {name}")
        launch([sys.executable, "-m", "trainer.bench.profile", str(cfg_path), "--skip", str(self.size.warmup),
                "--active", str(self.size.timed), "--out", str(out)], self.env,
               self.work / "logs" / f"profile_{name}.log", self.size.timeout_s)
        self.res.setdefault("profile", {})[name] = json.loads(out.read_text())

    def data_path(self) -> None:
        from .data import data_path

        self.res["data"] = data_path(self.work / "data_path", self.size)

    def loader(self) -> None:
        from .data import loader_rate
        from .plan import base_config

        cfg = base_config(self.size, self.data, self.work / "runs" / "loader", "neutral_residues", self.size.steps)
        self.res["loader"] = loader_rate(cfg)

    # ------------------------------------------------------------------ derived figures

    def derive(self) -> None:
        from .flops import ModelShape, expected_speedup, flops_per_token

        res, s = self.res, self.size
        shape = ModelShape.from_hf(s.model)
        res["model_flops"] = {"matmul_params": shape.matmul_params, "layer_matmul_params": shape.layer_matmul_params,
                              "head_params": shape.head_params, "attention_flops_per_token": shape.attention_flops(s.seq_len)}
        peak = (res.get("peak_matmul") or {}).get("flops_per_s")
        train = res.get("train") or {}
        for method, by_ck in train.items():
            for ck, r in by_ck.items():
                adapter = 0 if method == "finetune" else r["params"]["trainable"]
                r["flops_per_token"] = flops_per_token(shape, s.seq_len, method, adapter, ck == "on")
                r["achieved_flops_per_s"] = r["flops_per_token"] * r["tokens_per_s"]
                if peak:
                    r["mfu"] = r["achieved_flops_per_s"] / peak
        for method, by_ck in train.items():
            for ck, r in by_ck.items():
                ref = train.get("finetune", {}).get(ck)
                if ref:
                    r["ratio_vs_finetune_best"] = r["tokens_per_s_best"] / ref["tokens_per_s_best"]
                    r["expected_ratio"] = ref["flops_per_token"] / r["flops_per_token"] if method != "finetune" else 1.0
        nr = train.get("neutral_residues", {}).get("off")
        if nr:
            res["model_flops"]["expected_speedup_no_ckpt"] = expected_speedup(shape, s.seq_len,
                                                                              nr["params"]["trainable"], False)
        lo = res.get("loader")
        if lo and train:
            fastest = max(r["tokens_per_s"] for by_ck in train.values() for r in by_ck.values())
            lo["train_samples_per_s"] = fastest / s.seq_len
            lo["ratio"] = lo["samples_per_s"] / lo["train_samples_per_s"]
        from .report import targets

        res["targets"] = targets(res)
        res["meta"]["load_avg_end"] = round(os.getloadavg()[0], 2)

    def launches(self) -> list[tuple[str, Callable[[], None]]]:
        """Every subprocess measurement, as independent tasks. Each repeat runs every method (in
        METHODS order) then the HF peers, so the pairs whose ratio is a target run side by side;
        odd repeats run in reverse, so a steady drift of machine speed favours each side of a pair
        equally often."""
        tasks = []
        for r in range(self.repeats):
            repeat = [(f"train {off.config['method']['name']} (repeat {r})",
                       functools.partial(self.method_pair, r, off, on))
                      for off, on in throughput_jobs(self.size, self.data, self.work / f"repeat{r}")]
            if self.size.full_matrix:
                repeat += [(f"train {job.name} (repeat {r})", functools.partial(self.budget_run, r, job))
                           for job in budget_jobs(self.size, self.data, self.work / f"repeat{r}")]
                repeat.append((f"peer: HF Trainer + PEFT (repeat {r})", functools.partial(self.peer, r, "hf")))
            if self.peer_deepspeed and self.size.full_matrix:
                repeat.append((f"peer: HF Trainer + PEFT + DeepSpeed (repeat {r})",
                               functools.partial(self.peer, r, "hf_deepspeed")))
            tasks += repeat[::-1] if r % 2 else repeat
        for job in zero_jobs(self.size, self.data, self.work):
            tasks.append((f"ZeRO-{job.name[-1]} at 2 ranks", functools.partial(self.zero, job)))
        if self.profile:
            for job in profile_jobs(self.size, self.data, self.work):
                tasks.append((job.name, functools.partial(self.profile_run, job)))
        return tasks

    def run(self) -> dict:
        self.stage("peak matmul (start)", lambda: self.peak("start"))
        self.stage("training data", self.write_data)
        if not self.data:
            return self.res
        tasks = self.launches()
        if self.jobs == 1:
            for name, fn in tasks:
                self.stage(name, fn)
        else:
            # Smoke runs only: concurrent launches share the CPU, so their speeds mean nothing.
            with ThreadPoolExecutor(self.jobs) as pool:
                list(pool.map(lambda t: self.stage(*t), tasks))
        self.collect_throughput()
        self.collect_budget()
        if self.size.full_matrix:
            self.stage("data path", self.data_path)
            self.stage("loader", self.loader)
        self.stage("peak matmul (end)", lambda: self.peak("end"))
        self.derive()
        return self.res


def plan_commands(size: BenchSize, work: Path) -> list[str]:
    """The training launches a bench of this size makes, with their configs written under `work`
    and checked against the RunConfig schema (a bad preset fails here, before any device check)."""
    from ..config import load_config

    data = {d: {"train": str(work / "data" / d / "train"), "val": str(work / "data" / d / "val")}
            for d in ("en", "code")}
    data.update(run_inputs(size, work))
    jobs = [j for pair in throughput_jobs(size, data, work / "repeat0") for j in pair]
    jobs += (budget_jobs(size, data, work / "repeat0") if size.full_matrix else []) + zero_jobs(size, data, work)
    lines = []
    for job in jobs:
        path = write_config(job.config, work / "configs" / f"{job.name.replace('/', '_')}.yaml")
        load_config(path)
        launcher = f"torchrun --nproc_per_node {job.nproc} -m" if job.nproc > 1 else "python -m"
        lines.append(f"{launcher} trainer train {path}")
    return lines


def save_cost(args) -> int:
    from .save_cost import measure, report

    units = {"K": 1e3, "M": 1e6, "B": 1e9}
    text = args.save_cost.upper()
    params = int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    work = args.work or Path(tempfile.mkdtemp(prefix="trainer-bench-save-"))
    res = measure(params, max(args.repeats, 3), work)
    out = args.out or Path("runs") / "bench" / "save-cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(report(res))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    ap.add_argument("--size", choices=tuple(SIZES), default="small",
                    help="tiny: CI smoke (figures only); small: a CPU measurement (~8 min per repeat on 2 idle cores, "
                         "~25 on a loaded machine); 1b: 1.1B parameters, loaded from disk (on CPU: "
                         "neutral_residues vs finetune only, ~1 h, ~20 GB of RAM)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result file (default: runs/bench/SIZE-DEVICE.json)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads per training process (default: torch's, i.e. the physical cores); "
                         "2-rank runs use half each")
    ap.add_argument("--repeats", type=int, default=1, help="run the throughput matrix N times, report medians")
    ap.add_argument("--jobs", type=int, default=1,
                    help="concurrent launches (default 1). >1 only for smoke runs: the figures come out, "
                         "but concurrent runs share the CPU and their speeds are meaningless")
    ap.add_argument("--profile", action="store_true", help="also profile neutral_residues and finetune steps")
    ap.add_argument("--peer-deepspeed", action=argparse.BooleanOptionalAction, default=None,
                    help="also time HF Trainer + PEFT + DeepSpeed (default: on, except --size tiny)")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir, removed on success)")
    ap.add_argument("--plan", action="store_true", help="write the run configs, print the launches, run nothing")
    ap.add_argument("--save-cost", metavar="PARAMS", default=None,
                    help="only measure what checkpoint digests add to a save of PARAMS trainable parameters "
                         "(e.g. 190M, a 1B backbone's neutral residues), then exit")
    args = ap.parse_args(argv)
    if args.save_cost:
        return save_cost(args)
    if min(args.repeats, args.jobs, args.threads or 1) < 1:
        print("error: --repeats, --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    size = SIZES[args.size].for_device(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"trainer-bench-{size.name}-"))
    commands = plan_commands(size, work)
    if args.plan:
        print("\n".join(commands))
        return 0
    import torch

    try:
        check_device(size, args.device, torch.cuda.is_available(), torch.cuda.device_count())
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        return 2
    threads = args.threads or torch.get_num_threads()
    peer_ds = size.peer_deepspeed if args.peer_deepspeed is None else args.peer_deepspeed
    bench = Bench(size, args.device, work, threads, args.repeats, peer_ds, args.profile, args.jobs)
    res = bench.run()
    from .report import markdown, missing_figures

    res["missing"] = missing_figures(res)
    out = args.out or Path("runs") / "bench" / f"{size.name}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(markdown(res) if "targets" in res else json.dumps(res["errors"], indent=2))
    failed = bool(res["errors"])
    if failed:
        log(f"failed stages: {', '.join(res['errors'])}; logs kept in {work}")
    elif args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    log(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
