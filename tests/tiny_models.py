"""Tiny randomly initialised causal LMs of each supported family, shared by all tests.

Two layers, width 64, vocab 128, float32: big enough to have every structural
feature of the real models (GQA, tied/untied embeddings, Gemma's tanh-GELU and
embedding scaling), small enough that a forward/backward takes milliseconds.
"""
from __future__ import annotations

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
VOCAB = 128

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_FAMILY = {
    "llama": dict(),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it single-threaded: on a busy 2-core box, torch's
    intra-op threads fight other processes and make millisecond steps take a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(family: str, **kw):
    """HF config for a tiny `family` model (llama|mistral|qwen2|gemma|gemma2); `kw` overrides fields."""
    from transformers import AutoConfig

    if family not in _FAMILY:
        raise ValueError(f"unknown tiny model family {family!r} (known: {', '.join(_FAMILY)})")
    fields = {**_COMMON, **_FAMILY[family], **kw}
    return AutoConfig.for_model(family, **fields)


def tiny_model(family: str, seed: int = 0, **kw):
    """A float32 tiny causal LM, returned in eval mode; same seed -> same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32,
                                             attn_implementation="eager")
    return model.eval()


def random_batch(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Token ids in [3, VOCAB) (no special tokens), reproducible."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def train_steps(model, method, ids: torch.Tensor, original_mask: torch.Tensor, steps: int, lr: float = 1e-2,
                with_local: bool = True) -> list[dict]:
    """`steps` AdamW steps on one batch, the way the trainer does them; per-step losses and stats.

    Each entry describes the forward BEFORE that step's update.
    """
    from trainer.method.extend import set_domain, trainable_named_parameters
    from trainer.method.losses import local_loss

    opt = torch.optim.AdamW([p for _, p in trainable_named_parameters(model)], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    model.train()
    history = []
    for _ in range(steps):
        set_domain(model, original_mask)
        out = model(input_ids=ids, labels=ids)
        local, stats = local_loss(model, method)
        (out.loss + local if with_local else out.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"lm": out.loss.item(), "local": local.item(), **{k: float(v) for k, v in stats.items()}})
    return history
