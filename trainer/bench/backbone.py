"""A random backbone of any size, built partitioned under ZeRO-3 and saved as a sharded HF directory.

Scale runs (the bench's 1b size, the `scale` tests) need a billion-parameter backbone on disk,
loaded through `model.path` the way a user's is; none can be downloaded here. Built whole, a
1.1B Llama takes 4.4 GB in fp32 in every process. Built inside `deepspeed.zero.Init` (what
`from_config` does while an `HfDeepSpeedConfig` is alive), each rank holds 1/N of it; saving
gathers one tensor at a time, and rank 0 streams it into safetensors shards, so no process ever
holds more than its partition plus the largest tensor.

    torchrun --nproc_per_node 2 -m trainer.bench.backbone HF_CONFIG.json OUT_DIR [--dtype bfloat16]

The directory is what `save_pretrained` writes for a sharded model (config.json,
generation_config.json, model-0000i-of-0000N.safetensors, model.safetensors.index.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..engine import dist
from ..readapt.io import DTYPE_NAMES, INDEX_NAME, ShardWriter, parse_size


def build_and_save(hf_config: dict, out: Path, dtype: torch.dtype = torch.bfloat16,
                   max_shard_bytes: int = 10**9, seed: int = 0) -> dict:
    """Build `hf_config`'s causal LM partitioned over the ranks and write it to `out` (rank 0).

    Returns {"params": number of tensors' elements saved, "files": shard names} on every rank.
    """
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    world = dist.init_distributed()
    spec = dict(hf_config)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    # Only `zero_optimization.stage` matters here: it makes from_config build inside zero.Init.
    keepalive = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    torch.manual_seed(seed)  # rank 0's draws below decide every value: the same seed, the same files
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Under zero.Init transformers leaves torch's default init (an N(0, 1) embedding, for one); redo the
    # model's own `_init_weights` module by module, on rank 0, whose values the gather then scatters.
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0, enabled=bool(own) and hasattr(own[0], "ds_id")):
            if world.is_main:
                model._init_weights(module)
    writer = ShardWriter(out, "model", max_shard_bytes) if world.is_main else None
    total, nbytes = 0, 0
    # remove_duplicate: a tied LM head is stored once, under the embedding's name, as save_pretrained does.
    for name, p in model.named_parameters(remove_duplicate=True):
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if writer is not None:
                writer.add(name, p.detach().to("cpu", dtype))
            total += p.numel()
            nbytes += p.numel() * p.element_size()
    for name, b in model.named_buffers():
        module, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(module)._non_persistent_buffers_set and writer is not None:
            writer.add(name, b.detach().cpu())
            nbytes += b.numel() * b.element_size()
    files = []
    if writer is not None:
        weight_map = writer.close()
        # total_size: the tensors' bytes, as save_pretrained writes it (the shards add their headers).
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
        model.config.save_pretrained(out)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        files = sorted(set(weight_map.values()))
    dist.barrier()
    del keepalive
    return {"params": total, "files": files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench.backbone", description=__doc__.splitlines()[0])
    ap.add_argument("hf_config", type=Path, help="JSON of the HF config (with model_type)")
    ap.add_argument("out", type=Path, help="output model directory")
    ap.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="bfloat16", help="stored dtype (default bfloat16)")
    ap.add_argument("--max-shard-size", default="1GB", help="e.g. 1GB, 500MB (default 1GB)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        spec = json.loads(args.hf_config.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {args.hf_config}: {e}", file=sys.stderr)
        return 2
    if "model_type" not in spec:
        print(f"error: {args.hf_config}: no model_type", file=sys.stderr)
        return 2
    result = build_and_save(spec, args.out, DTYPE_NAMES[args.dtype], parse_size(args.max_shard_size), args.seed)
    if result["files"]:
        print(f"[backbone] {args.out}: {result['params'] / 1e6:.1f}M parameters in {len(result['files'])} shards",
              flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
