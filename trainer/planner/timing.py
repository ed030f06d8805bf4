"""Step time of one choice: model FLOPs at an assumed utilisation, plus what communication adds.

Compute: `trainer.bench.flops` counts the method's model FLOPs per token (the frozen backbone
skips its weight gradients, checkpointing adds a forward); a rank's share of a step is
global batch x sequence / world size tokens, run at `mfu` of the accelerator's peak.

Communication, bytes each rank sends per optimizer step (ring collectives move (W-1)/W of the
buffer per rank): ZeRO-1 reduce-scatters the gradients once per step and all-gathers the
updated params; ZeRO-2 reduce-scatters at every micro step (so a larger micro batch saves
communication); ZeRO-3 all-gathers every param for the forward, the backward and, with
checkpointing, the recompute, at every micro step, and reduce-scatters the gradients. Offload
adds host<->device copies (PCIe) and the host's Adam. With `overlap_comm` the collectives hide
behind compute (step = max), without it they add up. Bandwidths are per GPU: NVLink-class
within a node, the network between nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..bench.flops import ModelShape, flops_per_token
from .memory import Choice, Knobs
from .shape import ModelFacts


@dataclass(frozen=True)
class Hardware:
    peak_flops: float
    """Dense matmul FLOP/s of one accelerator in the training dtype."""
    mfu: float
    """Assumed model FLOPs utilisation."""
    intra_bw: float
    """Bytes/s per GPU for collectives within a node."""
    inter_bw: float
    """Bytes/s per GPU for collectives across nodes."""
    pcie_bw: float
    """Bytes/s host<->device (offload)."""
    host_adam: float
    """Parameters/s the host's Adam updates per rank (offloaded optimizer)."""


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float
    offload_s: float
    comm_bytes: float
    step_s: float


def shape_of(config) -> ModelShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                      getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)


def step_time(facts: ModelFacts, method: str, choice: Choice, knobs: Knobs, seq_len: int, global_batch: int,
              micro_batch: int, world: int, nodes: int, dtype_bytes: int, hw: Hardware) -> StepTime:
    W, b = world, dtype_bytes
    accum = max(1, global_batch // (micro_batch * W))
    flops = flops_per_token(shape_of(facts.hf_config), seq_len, method, facts.trainable, choice.checkpointing)
    compute = flops * global_batch * seq_len / W / (hw.peak_flops * hw.mfu)
    ring = (W - 1) / W
    Nt, N = facts.trainable, facts.total
    if choice.stage == 1:
        volume = 2 * Nt * b * ring
    elif choice.stage == 2:
        volume = (accum + 1) * Nt * b * ring
    else:
        gathered = N - facts.persistent(knobs.param_persistence_threshold)
        volume = accum * (gathered * b * (3 if choice.checkpointing else 2) + Nt * b) * ring
    comm = volume / (hw.inter_bw if nodes > 1 else hw.intra_bw) if W > 1 else 0.0
    part = Nt / W
    offload = 0.0
    if choice.offload_optimizer:
        offload += 2 * part * b / hw.pcie_bw + part / hw.host_adam
    if choice.offload_param:
        offload += accum * (3 if choice.checkpointing else 2) * (N / W) * b / hw.pcie_bw
    step = (max(compute, comm) if knobs.overlap_comm else compute + comm) + offload
    return StepTime(compute, comm, offload, volume, step)
