"""Per-rank memory of one ZeRO choice, term by term.

Every term is a count of bytes that DeepSpeed 0.19 or autograd allocates, sized from the
model (shape.py), one traced micro batch (trace.py) and the DeepSpeed JSON's own values
(bucket sizes, live/prefetch parameters, persistence threshold; DeepSpeed's defaults where
the JSON is silent, read from its config class). The DeepSpeed allocations behind each term
(DeepSpeed 0.19: runtime/zero/stage_1_and_2.py, stage3.py):

- ZeRO-1/2 keep the trainable params flat in the model dtype on every rank plus an fp32
  clone of this rank's partition (a clone even in fp32), ZeRO-3 only the partition and its fp32
  clone. Adam adds two fp32 moments per partition element.
- Gradients: ZeRO-1 keeps them whole until the step; ZeRO-2 a partition (`grads_in_partition`);
  ZeRO-3 an fp32 partition (`grad_partitions_flat_buffer`). The step flattens ZeRO-1/2's into
  a new fp32 partition while the activations are gone: it counts in the step's peak only.
- Buckets: `reduce_bucket_size` elements, twice with `overlap_comm` (ZeRO-1/2 double buffers).
  On CPU an untouched page costs nothing, so a bucket counts only as far as gradients fill it.
- ZeRO-3 gathers each module's params for its forward and backward and prefetches up to
  `stage3_prefetch_bucket_size` elements ahead; from the second step on, what the prefetcher has
  looked past stays gathered, up to `stage3_max_live_parameters` (see memory_terms; without
  prefetching, what is reused within `stage3_max_reuse_distance` elements);
  params of at most `stage3_param_persistence_threshold` elements stay whole on every rank.

The peak is the persistent states plus the larger of the backward (activations, buckets, live
params) and the optimizer step (the flat fp32 gradient and the optimizer's scratch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .shape import ModelFacts
from .trace import ActivationFit

GIB = 2**30


@dataclass(frozen=True)
class Choice:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    checkpointing: bool = False

    @property
    def label(self) -> str:
        off = "+param+opt offload" if self.offload_param else "+opt offload" if self.offload_optimizer else ""
        return f"ZeRO-{self.stage}{off} ckpt {'on' if self.checkpointing else 'off'}"


CHOICES = [Choice(s, o, p, c) for s, o, p in ((1, False, False), (2, False, False), (3, False, False),
                                              (3, True, False), (3, True, True)) for c in (False, True)]


@dataclass(frozen=True)
class Knobs:
    """The zero_optimization values the terms use (DeepSpeed's defaults filled in)."""
    stage: int
    reduce_bucket_size: int
    allgather_bucket_size: int
    overlap_comm: bool
    contiguous_gradients: bool
    prefetch_bucket_size: int
    max_live_parameters: int
    max_reuse_distance: int
    param_persistence_threshold: int
    offload_optimizer: bool
    offload_param: bool

    @classmethod
    def from_ds(cls, ds: dict) -> "Knobs":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        z = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
        dev = lambda o: o is not None and str(getattr(o, "device", "none")).split(".")[-1].lower() not in ("none",)
        return cls(int(z.stage), int(z.reduce_bucket_size), int(z.allgather_bucket_size), bool(z.overlap_comm),
                   bool(z.contiguous_gradients), int(z.prefetch_bucket_size), int(z.max_live_parameters),
                   int(z.max_reuse_distance), int(z.param_persistence_threshold), dev(z.offload_optimizer), dev(z.offload_param))


@dataclass
class Terms:
    """Bytes per rank; `device` terms add up to the peak, `host` is what one rank puts in host RAM."""
    frozen_weights: float = 0
    trainable_weights: float = 0
    gradients: float = 0
    optimizer_states: float = 0
    activations: float = 0
    zero3_live_params: float = 0
    buckets: float = 0
    step_scratch: float = 0
    framework: float = 0
    host: float = 0
    notes: list = field(default_factory=list)

    DEVICE = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations",
              "zero3_live_params", "buckets", "framework")

    @property
    def persistent(self) -> float:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_states + self.framework

    @property
    def peak(self) -> float:
        return self.persistent + max(self.activations + self.zero3_live_params + self.buckets, self.step_scratch)

    def overflowing(self) -> str:
        """The largest term: what to cut first when the peak does not fit."""
        big = {k: getattr(self, k) for k in self.DEVICE + ("step_scratch",)}
        return max(big, key=big.get)


def _touched(size: int, fill: int, on_cpu: bool) -> int:
    """Elements of a `size`-element buffer that cost memory when `fill` elements are written into it."""
    return min(size, fill) if on_cpu else size


def memory_terms(facts: ModelFacts, knobs: Knobs, act: ActivationFit, micro_batch: int, world: int,
                 dtype_bytes: int, framework_bytes: float, on_cpu: bool, adam_scratch: Optional[int] = None) -> Terms:
    """Per-rank terms of `knobs` for `micro_batch` sequences per rank on `world` ranks.

    `adam_scratch`: elements of fp32 scratch per partition element in the optimizer step (torch's
    single-tensor AdamW on CPU: 2, `sqrt` then the division; fused GPU kernels: 0).
    """
    b, W = dtype_bytes, world
    Nf, Nt = facts.frozen, facts.trainable
    part = -(-Nt // W)  # this rank's partition of the trainable params (DeepSpeed pads to W)
    t = Terms(framework=framework_bytes)
    t.activations = act.bytes(facts.hf_config.num_hidden_layers, micro_batch)
    scratch = (2 if on_cpu else 0) if adam_scratch is None else adam_scratch
    if knobs.stage in (1, 2):
        t.frozen_weights = Nf * b
        t.trainable_weights = Nt * b
        t.optimizer_states = part * 12  # fp32 clone + m + v
        t.gradients = Nt * b if knobs.stage == 1 else part * b
        # The bucket fills with every gradient of the step (ZeRO-2: all of them pass through it).
        fill = Nt if knobs.contiguous_gradients else 0
        first = _touched(knobs.reduce_bucket_size, fill, on_cpu)
        second = _touched(knobs.reduce_bucket_size, max(0, fill - knobs.reduce_bucket_size), on_cpu) \
            if knobs.overlap_comm else 0
        t.buckets = (first + second) * b
        t.step_scratch = part * 4 * (1 + scratch)  # flat fp32 gradient + Adam's temporaries
        t.notes.append(f"reduce bucket {knobs.reduce_bucket_size:.0e} x {1 + knobs.overlap_comm}")
        return t

    threshold = knobs.param_persistence_threshold
    t.frozen_weights = ((0 if knobs.offload_param else Nf / W) + facts.persistent(threshold, False)) * b
    t.trainable_weights = ((0 if knobs.offload_param else part) + facts.persistent(threshold, True)) * b
    opt = part * 12  # fp32 master + m + v (a clone even in fp32: DeepSpeed compares devices as strings)
    grads = part * 4
    if knobs.offload_optimizer:
        t.host += opt + grads + (part * b if knobs.offload_param else 0)
        t.host += (Nf / W * b) if knobs.offload_param else 0
    else:
        t.optimizer_states = opt
        t.gradients = grads
        t.step_scratch = part * 4 * scratch
    # From the second step on (once the module trace is complete), the prefetcher walks the parameter trace
    # ahead of the execution. An upcoming use whose param is still gathered costs it nothing, so it walks on;
    # and a param with a use the walk has passed is not released (partitioned_param_coordinator
    # .__params_to_release: "Don't release params whose reuse was skipped by prefetch"). At the end of the
    # forward the walk enters the backward, whose params are all still gathered: it passes their uses too,
    # so nothing is released until `max_live_parameters` are gathered (the walk's budget is max_live minus
    # what is gathered). Measured at the turn from forward to backward: 1.13B params, max_live 1e9 ->
    # 996.6M gathered (938.5M with checkpointing), the same with stage3_max_reuse_distance 3e8 as with 1e9;
    # 127M -> all but the input embedding. The module being computed is fetched whatever max_live says.
    # Besides, what is reused within `stage3_max_reuse_distance` elements stays: about half of it at the
    # turn (each layer's forward is followed by the later layers' forward and backward); with the default
    # 1e9, a whole model below ~5e8 parameters.
    walked = knobs.max_live_parameters if knobs.prefetch_bucket_size > 0 else 0
    live = max(walked, knobs.max_reuse_distance // 2) + facts.largest_module
    t.notes.append(f"live <= max(max_live {knobs.max_live_parameters:.0e} if prefetching, reuse distance "
                   f"{knobs.max_reuse_distance:.0e} / 2) + largest module {facts.largest_module:.2e}")
    t.zero3_live_params = min(live, facts.total) * b
    t.buckets = _touched(knobs.reduce_bucket_size, Nt, on_cpu) * b * 2  # ipg bucket + reduce-scatter copy
    return t
