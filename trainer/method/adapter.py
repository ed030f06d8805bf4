"""The parallel gated adapter's forward: the one definition, used by training and shipped in exports.

Each decoder layer's MLP becomes

    out = mlp(n) + g(n) * A(n),   A(n) = W_o(act(W_g n) * W_i n),   g(n) = relu(w_b . n) | sigmoid(w_b . n) | 1

where n is the MLP's (normalised) input and act the backbone MLP's own activation
(SiLU for Llama, tanh-GELU for Gemma), so the adapter is a small gated FFN of the
backbone's kind, running next to the frozen one.

This file is copied byte for byte next to `modeling_parallel_adapter.py` in every
gated model directory the trainer exports, so it imports only torch: it must run
wherever that directory is loaded. The training code subclasses these modules for
initialisation and its local loss; it never re-implements the forward, so an exported
model computes exactly what was trained. Parameter names and shapes are the checkpoint
keys (model.layers.i.mlp.adapter.w_g, ..., and model.layers.i.mlp.mlp.* for the
backbone MLP): renaming one breaks every saved adapter and export.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedAdapter(nn.Module):
    """A(n) = W_o(act(W_g n) * W_i n), scaled per token by g(n) = gate(w_b . n).

    Raw parameters rather than nn.Linear children: a subclass can then initialise
    them in its own __init__, before ZeRO-3's zero.Init partitions the module.
    Zeros here mean a model built from a config alone (no weights loaded) adds nothing.
    """

    def __init__(self, hidden_size: int, adapter_size: int, gate: str, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        if gate not in ("relu", "sigmoid", "none"):
            raise ValueError(f"gate must be 'relu', 'sigmoid' or 'none', got {gate!r}")
        kw = dict(dtype=dtype, device=device)
        self.hidden_size, self.adapter_size, self.gate = hidden_size, adapter_size, gate
        d, h = hidden_size, adapter_size
        self.w_g = nn.Parameter(torch.zeros(h, d, **kw))  # (h, d)
        self.w_i = nn.Parameter(torch.zeros(h, d, **kw))  # (h, d)
        self.w_o = nn.Parameter(torch.zeros(d, h, **kw))  # (d, h)
        self.w_b = nn.Parameter(torch.zeros(d, **kw)) if gate != "none" else None  # (d,), no bias

    def forward(self, n: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """n: (B, T, d) -> (y = g*A(n) (B, T, d), gate logit z (B, T), gate g (B, T)); z, g None if ungated.

        z and g are returned because training's local loss is defined on them.
        """
        a = F.linear(act(F.linear(n, self.w_g)) * F.linear(n, self.w_i), self.w_o)  # (B, T, h) -> (B, T, d)
        if self.w_b is None:
            return a, None, None
        z = torch.matmul(n, self.w_b)  # (B, T): one gate value per token
        g = torch.relu(z) if self.gate == "relu" else torch.sigmoid(z)
        return g.unsqueeze(-1) * a, z, g

    def extra_repr(self) -> str:
        return f"d={self.hidden_size}, h={self.adapter_size}, gate={self.gate}"


class ParallelAdapterMLP(nn.Module):
    """Takes the place of `layer.mlp`: out = mlp(n) + g(n)*A(n), with the backbone MLP kept as `.mlp`.

    The backbone MLP stays a child (not copied, not re-implemented), so its weights keep
    their own code and only their key gains one `.mlp`.
    """

    def __init__(self, mlp: nn.Module, adapter: GatedAdapter):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(n)[0]

    def forward_parts(self, n: torch.Tensor):
        """n: (B, T, d) -> (out (B, T, d), y = g*A(n) (B, T, d), z (B, T) | None, g (B, T) | None).

        The block's output together with the adapter's own terms, so training can
        record its loss on the very tensors this forward produced.
        """
        y, z, g = self.adapter(n, self.mlp.act_fn)
        return self.mlp(n) + y, y, z, g
