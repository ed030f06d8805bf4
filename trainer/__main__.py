"""`python -m trainer <command> ...`: a thin dispatcher over importable modules.

Each command lives in its own module with a `main(argv) -> int` function, so tests
call the same entry points as users. Imports are lazy: `--help` must not pay for
importing DeepSpeed.
"""
import hashlib
import importlib
import os
import sys
from pathlib import Path

COMMANDS = {
    "train": ("trainer.engine.train", "train an extended model (DeepSpeed, any number of ranks)"),
    "eval": ("trainer.evaluation.evaluate", "per-domain bits per byte and multiple-choice tasks"),
    "export": ("trainer.export.export", "adapters-only files and a full Hugging Face model directory"),
    "report": ("trainer.evaluation.report", "learn/forget table and trade-off plot over runs"),
    "diagnose": ("trainer.evaluation.diagnose", "gate statistics and W_g singular values"),
    "demo": ("trainer.demo.cli", "the CPU quickstart, end to end"),
    "bench": ("trainer.bench.cli", "throughput, memory and checkpoint cost vs finetune"),
    "faults": ("trainer.bench.faults", "kill and damage a training run again and again; count what survives"),
    "readapt": ("trainer.readapt.cli", "RE-Adapt / LoRE-Adapt: instruction deltas and recombination"),
    "plan": ("trainer.planner.cli", "predicted memory and step time per ZeRO choice; --measure checks them"),
}


def prog() -> str:
    """How the user called us: `python -m trainer` or the installed `neutral-residues` script."""
    name = Path(sys.argv[0]).name
    return "python -m trainer" if name in ("__main__.py", "-m", "-c", "") else name


def usage() -> str:
    lines = [f"usage: {prog()} <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _own_extensions_dir() -> None:
    """DeepSpeed JIT-builds ops (the CPU shm allreduce, fused Adam...) into ~/.cache/torch_extensions/pyXY_*.
    Two environments sharing that dir rebuild the op in turn (~1 min each time: the build command names
    each environment's include paths), which is common on clusters with one venv per project. One dir per
    interpreter prefix avoids it; an explicit TORCH_EXTENSIONS_DIR is respected."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"env-{tag}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK carries it too.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    _own_extensions_dir()
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
