"""Activation memory of one training micro batch, measured on fake tensors.

The trainer's own forward and backward (extended model, `token_nll`, the local loss,
non-reentrant activation checkpointing if on) run under torch's FakeTensorMode, which
computes shapes and no values, while a dispatch mode adds up the bytes of every tensor
an operator creates and subtracts them when the tensor is freed. The peak is what the
eager allocator would hold for activations, the logits and the loss, whatever the
architecture, attention kernel or method, with no formula to keep in step with the code.

A full-depth trace of a 70B model would take minutes, so the model is traced at depth
1 and 2 and micro batch 1 and 2; activations are linear in both (every layer keeps the
same tensors, every tensor scales with the batch), so four small traces give the
bilinear fit `c0 + c_L*L + c_B*B + c_LB*L*B`, exact at the traced points.

Gradients of trainable parameters are dropped as soon as they are accumulated, as
DeepSpeed's hooks do (they copy them into their reduce buckets, counted separately).
FakeTensorMode and TorchDispatchMode are torch internals; tests/test_planner.py checks
the fake trace against the same trace on real tensors.
"""
from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass

import torch


class AllocationTracker:
    """Live and peak bytes of the tensors operators create while active (views and in-place ops excluded)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live = self.peak = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not any(r.alias_info is not None for r in func._schema.returns):
                    tracker._add(out)
                return out

        self.mode = _Mode()

    def _add(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                n = storage.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def train_micro_batch(model, method, batch: int, seq_len: int) -> None:
    """One micro batch as `Trainer.train_step` runs it (one original-domain sample, so the l1 runs)."""
    from ..engine.perplexity import token_nll
    from ..method.extend import set_domain
    from ..method.losses import local_loss

    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    mask = torch.zeros(batch, 1, dtype=torch.bool)
    mask[0] = True
    set_domain(model, mask, l1_tokens=float(seq_len))
    nll = token_nll(model(input_ids=ids).logits, ids)
    local, _ = local_loss(model, method)
    (nll.mean() + local).backward()


def prepare(model, checkpointing: bool) -> None:
    from ..method.extend import enable_activation_checkpointing

    if checkpointing:
        enable_activation_checkpointing(model, reentrant=False)
    model.train()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def traced_peak(config, method, batch: int, seq_len: int, checkpointing: bool, dtype: torch.dtype,
                fake: bool = True) -> int:
    """Peak bytes of one micro batch of `config`'s model, on fake tensors (`fake=False`: real ones)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from ..method.extend import extend_model

    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        extend_model(model, method)
        prepare(model, checkpointing)
        with AllocationTracker() as tracker:
            train_micro_batch(model, method, batch, seq_len)
    return tracker.peak


@dataclass(frozen=True)
class ActivationFit:
    """Bytes = c0 + cl*L + cb*B + clb*L*B for L layers and micro batch B."""
    c0: float
    cl: float
    cb: float
    clb: float

    def bytes(self, layers: int, batch: int) -> float:
        return self.c0 + self.cl * layers + self.cb * batch + self.clb * layers * batch

    def per_sample(self, layers: int) -> float:
        return self.cb + self.clb * layers


@functools.lru_cache(maxsize=64)
def _fit(config_json: str, model_type: str, method_json: str, seq_len: int, checkpointing: bool,
         dtype: torch.dtype) -> ActivationFit:
    from transformers import AutoConfig

    from ..config import MethodConfig
    from .shape import with_layers

    config = AutoConfig.for_model(model_type, **json.loads(config_json))
    method = MethodConfig(**json.loads(method_json))
    p = {(L, B): traced_peak(with_layers(config, L), method, B, seq_len, checkpointing, dtype)
         for L in (1, 2) for B in (1, 2)}
    clb = p[2, 2] - p[1, 2] - p[2, 1] + p[1, 1]
    cl = p[2, 1] - p[1, 1] - clb
    cb = p[1, 2] - p[1, 1] - clb
    return ActivationFit(p[1, 1] - cl - cb - clb, cl, cb, clb)


def activation_fit(config, method, seq_len: int, checkpointing: bool, dtype: torch.dtype) -> ActivationFit:
    import dataclasses

    spec = config.to_dict()
    model_type = spec.pop("model_type")
    for k in ("architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        spec.pop(k, None)
    return _fit(json.dumps(spec, sort_keys=True, default=str), model_type,
                json.dumps(dataclasses.asdict(method), sort_keys=True), seq_len, checkpointing, dtype)
