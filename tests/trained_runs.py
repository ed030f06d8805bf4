"""Tiny trained runs shared by the eval/export/report/diagnose tests (each method trained once).

A 2-layer Llama backbone saved as an HF directory with a character-level
tokenizer, the two-domain MDS data of mds_fixtures, and one short real
`python -m trainer train` run per method on top of it. Training is the slow part
part, so the runs are built once per pytest session under the session's base
temp dir and reused by every test module that asks; and all methods train in ONE
subprocess calling `trainer.engine.train.train` (the function behind `python -m trainer
train`) in turn, which saves four interpreter starts and DeepSpeed imports.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from launch import run, write_config
from mds_fixtures import tiny_run_config, two_domain_data

METHODS = ("finetune", "lora", "adapters", "neutral_residues", "sigmoid_gate")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer():
    """One token per character (ids 4..99), BOS prepended: log-likelihoods are easy to reason about."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_backbone(out: Path, seed: int = 0) -> Path:
    """The tiny Llama of tiny_run_config (hidden 32, vocab 128), saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(tiny_run_config(out, {"en": {}, "code": {}})["model"]["config"])
    cfg = AutoConfig.for_model(spec.pop("model_type"), bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def run_config(root: Path, data: dict, backbone: Path, method: str, **train) -> dict:
    cfg = tiny_run_config(root, data, method, **{"max_steps": 4, "lr": 1e-2, **train})
    cfg["model"] = {"path": str(backbone)}
    cfg["checkpoint"] = {"every": 4, "keep_last": 1}
    cfg["log"]["tensorboard"] = False
    return cfg


def build(root: Path, methods=METHODS) -> dict:
    """{"data", "backbone", "runs": {method: run_dir}} under root; trains what is missing."""
    root.mkdir(parents=True, exist_ok=True)
    done = root / "done.json"
    if done.is_file():
        state = json.loads(done.read_text())
        if set(methods) <= set(state["runs"]):
            return {**state, "runs": {m: Path(p) for m, p in state["runs"].items()},
                    "backbone": Path(state["backbone"])}
    data = two_domain_data(root / "data")
    backbone = save_backbone(root / "backbone")
    runs, configs = {}, []
    for method in methods:
        cfg = run_config(root, data, backbone, method)
        configs.append(str(write_config(cfg, root / f"{method}.yaml")))
        runs[method] = Path(cfg["run_dir"])
    script = ("import sys\nfrom trainer.config import load_config\nfrom trainer.engine.train import train\n"
              "for path in sys.argv[1:]:\n    train(load_config(path))\n")
    run([sys.executable, "-c", script, *configs])
    done.write_text(json.dumps({"data": data, "backbone": str(backbone),
                                "runs": {m: str(p) for m, p in runs.items()}}))
    return {"data": data, "backbone": backbone, "runs": runs}


def shared_runs(tmp_path_factory, methods=METHODS) -> dict:
    """build() under the session's base temp dir, so several test modules share one set of runs."""
    return build(tmp_path_factory.getbasetemp() / "trained_runs", methods)
