"""`python -m trainer demo`: the paper's core result in miniature, on a CPU, with no downloads.

It chains the real commands a user runs on a cluster, as subprocesses:
corpus -> data_prep train-tokenizer -> data_prep build (per domain) ->
trainer train (pretrain a tiny English backbone) -> trainer export ->
trainer train (each method, p = 0.1) -> trainer report.
With `--budget EPS` the four methods instead train to the same forgetting budget
(method.forgetting_budget) and the report compares their learning at that forgetting.
Every step leaves a `.done` marker, so a re-run reuses finished steps; --fresh redoes them.
Independent launches (the two data builds, the four extensions) run `--jobs` at a time with
the cores split between them: on a small machine most of a tiny run is Python start-up
(torch, transformers, DeepSpeed, streaming: ~8 s per process), which overlaps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..resources import demo_config

METHODS = ("finetune", "lora", "adapters", "neutral_residues")

# Learning rates for a ~1M-parameter backbone (the paper's 5e-5 / 2e-4 are for 1B models).
LR = {"finetune": 3e-3, "lora": 3e-3, "adapters": 3e-3, "neutral_residues": 3e-3}

SIZES = {
    # name: (files, seq_len, vocab, pretrain steps, extend steps, model overrides of demo/configs/pretrain.yaml)
    "full": (None, 96, 2048, 400, 150, []),
    "quick": (120, 64, 1024, 200, 60, ["model.config.hidden_size=64", "model.config.intermediate_size=172",
                                       "model.config.num_hidden_layers=2"]),
}


class Demo:
    def __init__(self, out: Path, quick: bool, nproc: int, corpus: Path | None,
                 pretrain_steps: int | None = None, extend_steps: int | None = None, jobs: int = 1,
                 budget: str | None = None):
        self.out, self.quick, self.nproc, self.user_corpus, self.jobs = out, quick, nproc, corpus, jobs
        self.budget = budget
        self.files, self.seq_len, self.vocab, self.pre_steps, self.ext_steps, self.model_kw = \
            SIZES["quick" if quick else "full"]
        self.pre_steps = pretrain_steps or self.pre_steps
        self.ext_steps = extend_steps or self.ext_steps
        self.env = dict(os.environ)
        if "CUDA_VISIBLE_DEVICES" not in os.environ:
            self.env.setdefault("DS_ACCELERATOR", "cpu")
        self.timings: dict[str, float] = {}
        self._print = threading.Lock()

    def settings(self, name: str) -> str:
        """What a step's output depends on (its own settings and every upstream step's)."""
        yaml_text = {n: demo_config(n).read_text() for n in ("pretrain", "extend")}
        chain = [("corpus", [self.files, str(self.user_corpus)]), ("tokenizer", [self.vocab]),
                 ("data", [self.seq_len]), ("pretrain", [self.pre_steps, self.model_kw, yaml_text["pretrain"]]),
                 ("export_backbone", []), ("extend", [self.ext_steps, LR, yaml_text["extend"]])]
        out = []
        for step, values in chain:
            out.append(values)
            if name.startswith(step):
                break
        return json.dumps(out)

    def step(self, name: str, fn) -> None:
        marker = self.out / ".done" / name
        if marker.exists() and _marker_settings(marker) == self.settings(name):
            self.say(f"[demo] {name}: cached")
            return
        self.say(f"[demo] {name} ...")
        # A step redone (new settings, or killed midway) starts from an empty output dir:
        # a leftover training checkpoint would otherwise be resumed.
        target = self.out / {"export_backbone": "backbone"}.get(name, name.removeprefix("extend_"))
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.time()
        fn()
        self.timings[name] = round(time.time() - t0, 1)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"seconds": self.timings[name], "settings": self.settings(name)}))
        self.say(f"[demo] {name}: done in {self.timings[name]:.0f}s")

    def say(self, msg: str) -> None:
        with self._print:
            print(msg, flush=True)

    def sh(self, *args: str, log: str | None = None) -> None:
        """Run `python -m ARGS`. A launch that may run concurrently names a `log`: with --jobs > 1
        its output goes to logs/LOG.log and it gets its share of the cores."""
        cmd = [sys.executable, "-m", *args]
        self.say("  $ " + " ".join(cmd[1:]))
        if log is None or self.jobs == 1:
            subprocess.run(cmd, env=self.env, check=True)
            return
        path = self.out / "logs" / f"{log}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        env = self.env
        if "OMP_NUM_THREADS" not in os.environ:
            env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // (self.jobs * self.nproc))))
        with open(path, "w") as f:
            p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if p.returncode:
            self.say(f"--- last lines of {path} ---\n" + "\n".join(path.read_text().splitlines()[-30:]))
            raise subprocess.CalledProcessError(p.returncode, cmd)
        self.say(f"  log: {path}")

    def concurrently(self, fn, items) -> None:
        """fn(item) for every item, `jobs` at a time; the first failure is raised."""
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(fn, items))

    def train(self, config: str, *overrides: str, log: str | None = None) -> None:
        """`trainer train` on the shipped demo YAML `config` ("pretrain" or "extend")."""
        path = demo_config(config)
        if self.nproc > 1:
            import yaml

            # The same global batch on any number of ranks, each rank taking its share.
            global_batch = yaml.safe_load(path.read_text())["train"]["global_batch_size"]
            overrides += (f"train.micro_batch_size={max(1, global_batch // self.nproc)}",)
            from ..engine.dist import free_port  # concurrent launches must not share torchrun's default port
            launcher = ["torch.distributed.run", "--nproc_per_node", str(self.nproc), "--master_port",
                        str(free_port()), "-m"]
        else:
            launcher = []
        self.sh(*launcher, "trainer", "train", str(path), *overrides, "log.progress=false", log=log)

    # ----------------------------------------------------------------- steps
    def corpus(self) -> None:
        from .corpus import build_corpus
        dest = self.out / "corpus"
        if self.user_corpus:
            dest.mkdir(parents=True, exist_ok=True)
            for d in ("en", "code"):
                shutil.copy(self.user_corpus / f"{d}.jsonl", dest / f"{d}.jsonl")
        else:
            build_corpus(dest, max_files=self.files)

    def tokenizer(self) -> None:
        c = self.out / "corpus"
        self.sh("data_prep", "train-tokenizer", "--input", str(c / "en.jsonl"), str(c / "code.jsonl"),
                "--out", str(self.out / "tokenizer"), "--vocab-size", str(self.vocab))

    def data(self) -> None:
        def build(d: str) -> None:
            self.sh("data_prep", "build", "--input", str(self.out / "corpus" / f"{d}.jsonl"), "--domain", d,
                    "--tokenizer", str(self.out / "tokenizer"), "--seq-len", str(self.seq_len),
                    "--out", str(self.out / "data" / d), "--val-fraction", "0.1", "--seed", "0",
                    log=f"data_{d}")

        self.concurrently(build, ("en", "code"))

    def data_overrides(self) -> list[str]:
        dd = self.out / "data"
        return [f"data.streams.0.train={dd}/en/train", f"data.streams.0.val={dd}/en/val",
                f"data.streams.1.val={dd}/code/val"]

    def pretrain(self) -> None:
        from transformers import AutoTokenizer
        vocab = len(AutoTokenizer.from_pretrained(self.out / "tokenizer"))
        self.train("pretrain", f"run_dir={self.out / 'pretrain'}", *self.data_overrides(),
                   f"model.config.vocab_size={vocab}", f"model.config.max_position_embeddings={self.seq_len}",
                   f"train.max_steps={self.pre_steps}", f"checkpoint.every={self.pre_steps}", *self.model_kw)

    def export_backbone(self) -> None:
        self.sh("trainer", "export", str(self.out / "pretrain"), "--out", str(self.out / "backbone"),
                "--tokenizer", str(self.out / "tokenizer"))

    def run_name(self, method: str) -> str:
        """`neutral_residues`, or `neutral_residues_budget0.01` / `..._budget2pct` under --budget."""
        return method if self.budget is None else f"{method}_budget{self.budget.replace('%', 'pct')}"

    def extend(self, method: str) -> None:
        name = self.run_name(method)
        # Under a budget, a few held-out evals on the way give the report's degradation curve.
        budget = [] if self.budget is None else [f"method.forgetting_budget={self.budget}",
                                                 f"eval.every={max(1, self.ext_steps // 6)}"]
        self.train("extend", f"run_dir={self.out / name}", f"method.name={method}",
                   f"model.path={self.out / 'backbone' / 'hf'}", *self.data_overrides(),
                   f"data.streams.1.train={self.out / 'data' / 'code' / 'train'}",
                   f"train.lr={LR[method]}", f"train.max_steps={self.ext_steps}", f"checkpoint.every={self.ext_steps}",
                   # Every method starts as the backbone, whose eval the report takes from the pretraining run.
                   "eval.at_start=false", *budget, log=name)

    def report(self) -> dict:
        from ..evaluation.report import write_report
        if self.budget is None:
            return write_report([self.out / m for m in METHODS], self.out, backbone=self.out / "pretrain",
                                title="Quickstart: extending an English backbone to Python code (p = 0.1)")
        name = self.run_name("report")
        return write_report([self.out / self.run_name(m) for m in METHODS], self.out / name,
                            backbone=self.out / "pretrain",
                            title=f"Quickstart at a forgetting budget of {self.budget} (English -> Python code)")

    def run(self) -> dict:
        t0 = time.time()
        self.step("corpus", self.corpus)
        self.step("tokenizer", self.tokenizer)
        self.step("data", self.data)
        self.step("pretrain", self.pretrain)
        self.step("export_backbone", self.export_backbone)
        self.concurrently(lambda m: self.step(f"extend_{self.run_name(m)}", lambda: self.extend(m)), METHODS)
        res = self.report()
        total = round(time.time() - t0, 1)
        (self.out / "timings.json").write_text(json.dumps({**self.timings, "total": total}, indent=2))
        print("\n" + res["table"])
        if res.get("budget_table"):
            print(f"\nAt equal forgetting (budget {self.budget}):\n" + res["budget_table"])
        print(f"\nreport: {res['markdown']}\nplot:   {res['png']}\ntotal:  {total:.0f}s")
        return res


def _marker_settings(marker: Path):
    try:
        return json.loads(marker.read_text()).get("settings")
    except (ValueError, AttributeError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"),
                    help="run dir (default: runs/demo, in the working directory)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke version (~2 min on 2 cores): fewer files and steps, a smaller model")
    ap.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    ap.add_argument("--nproc", type=int, default=1, help="ranks per training run (default 1)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="independent launches at a time, sharing the cores (default: 2, or 1 on one core); "
                         "with more than 1, their output goes to OUT/logs/")
    ap.add_argument("--corpus", type=Path, help="dir with your own en.jsonl and code.jsonl ({'text': ...} lines)")
    ap.add_argument("--pretrain-steps", type=int, help="override the backbone's pretraining steps")
    ap.add_argument("--extend-steps", type=int, help="override each method's extension steps")
    ap.add_argument("--budget", metavar="EPS",
                    help="train every method to this forgetting budget: bits per byte (0.01) or relative (2%%)")
    args = ap.parse_args(argv)
    if args.budget is not None:
        from ..config import ConfigError, MethodConfig
        try:
            MethodConfig(forgetting_budget=args.budget)
        except ConfigError as e:
            print(f"error: --budget: {str(e).split(': ', 1)[1]}", file=sys.stderr)
            return 2
    if args.corpus and not all((args.corpus / f"{d}.jsonl").is_file() for d in ("en", "code")):
        print(f"error: --corpus {args.corpus}: needs en.jsonl and code.jsonl", file=sys.stderr)
        return 2
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    try:
        Demo(args.out, args.quick, args.nproc, args.corpus, args.pretrain_steps, args.extend_steps,
             max(1, args.jobs), args.budget).run()
    except subprocess.CalledProcessError as e:
        print(f"error: step failed: {' '.join(map(str, e.cmd[1:]))} (exit {e.returncode})", file=sys.stderr)
        return 1
    return 0
