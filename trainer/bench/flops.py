"""Model FLOPs per trained token, counted analytically, and the device's measured matmul peak.

Counting convention (PaLM's model FLOPs, so figures compare with published MFU):
a matmul with a weight of P elements costs 2P FLOPs per token forward, 2P for
the input gradient and 2P for the weight gradient. Attention scores and their
weighted sum cost 4*L*T*d_attn per token forward (T = sequence length, no
discount for the causal mask) and twice that backward. Elementwise ops,
norms, the loss and the optimizer are not counted: they are the overhead that
the utilisation figure exposes.

Per method, with N = matmul weights of the backbone (layers + LM head) and
N_a = trainable adapter/LoRA weights:

    finetune                 6N + 3A                    (all weight gradients)
    frozen backbone + adapter 4N + 3A + 6*N_a           (backbone: forward + input grads only)
    activation checkpointing + 2*N_layers + A + 2*N_a   (the layers' forward again; not the LM head)

Without checkpointing and with N_a = 0.2N that is 6N / (4N + 1.2N) = 1.15x:
the speed-up a frozen backbone can give at best, if time follows FLOPs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_hf(cls, spec: dict) -> "ModelShape":
        """From the bench's HF config dict (model_type + llama-style keys)."""
        from transformers import AutoConfig

        spec = dict(spec)
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.vocab_size)

    @property
    def layer_matmul_params(self) -> int:
        """q, k, v, o and the gated FFN of all layers."""
        d, a, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (d * a + 2 * d * kv + a * d + 3 * d * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def matmul_params(self) -> int:
        return self.layer_matmul_params + self.head_params

    def attention_flops(self, seq_len: int) -> int:
        """Forward QK^T and AV per token: 2 matmuls x 2 FLOPs x T x (heads*head_dim), per layer."""
        return 4 * self.layers * seq_len * self.heads * self.head_dim


def flops_per_token(shape: ModelShape, seq_len: int, method: str, adapter_params: int, checkpointing: bool) -> int:
    """Model FLOPs per trained token (see the module docstring)."""
    n, a = shape.matmul_params, shape.attention_flops(seq_len)
    if method == "finetune":
        total = 6 * n + 3 * a
        adapter_params = 0
    else:
        total = 4 * n + 3 * a + 6 * adapter_params
    if checkpointing:
        total += 2 * shape.layer_matmul_params + a + 2 * adapter_params
    return total


def expected_speedup(shape: ModelShape, seq_len: int, adapter_params: int, checkpointing: bool) -> float:
    """FLOPs ratio finetune / frozen backbone + adapters: the issue's '6N / (4N + 1.2N)'."""
    return (flops_per_token(shape, seq_len, "finetune", 0, checkpointing)
            / flops_per_token(shape, seq_len, "neutral_residues", adapter_params, checkpointing))


def peak_matmul_flops(device: str, n: int, reps: int = 5) -> dict:
    """Best FLOP/s of an n x n matmul in the training dtype (fp32 on CPU, bf16 on CUDA).

    The best of several repetitions, not the median: the peak is what the device
    can do, and on a shared machine every slower repetition is someone else's load.
    """
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # warm-up: thread pool, kernel selection
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "threads": torch.get_num_threads(),
            "flops_per_s": 2 * n ** 3 / best}
