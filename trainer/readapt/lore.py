"""LoRE-Adapt: compress a delta to low rank, block matrix by block matrix.

For each 2-D weight inside the transformer blocks (`...layers.<i>....`), the SVD
Delta = U S V^T (in float32) is truncated at the smallest rank k whose cumulative
explained variance sum(s_i^2, i <= k) / sum(s^2) reaches tau, and stored as the
factors U_k S_k (m x k) and V_k^T (k x n), in float32. Embeddings, the LM head and
1-D weights (norms) stay dense: the paper's truncation is per block matrix, and
those tensors are not where the parameters are.

The parameter fraction is sum k(m+n) / sum mn over the factored matrices (the
paper's k(m+n)/(mn), summed); `total_fraction` also counts the dense tensors,
i.e. stored elements / delta elements.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .delta import FORMAT, US, VT, DeltaDir, write_meta
from .io import ReadaptError, ShardWriter, dtype_name, parse_size


def in_block(name: str) -> bool:
    """True for tensors of a transformer block: a `layers.<int>` segment in the name."""
    parts = name.split(".")
    return any(p == "layers" and nxt.isdigit() for p, nxt in zip(parts, parts[1:]))


def choose_rank(s: torch.Tensor, tau: float) -> int:
    """Smallest k with sum(s[:k]^2) / sum(s^2) >= tau; 0 for an all-zero matrix.

    The cumulative sum is in float64 and normalised by its own last entry, so the
    full rank reaches exactly 1.0 and tau = 1 never asks for more than min(m, n).
    """
    energy = torch.cumsum(s.double() ** 2, 0)
    if energy.numel() == 0 or energy[-1] == 0:
        return 0
    explained = energy / energy[-1]
    return int(torch.searchsorted(explained, torch.tensor([tau], dtype=torch.float64), side="left")) + 1


def numerical_spectrum(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """s with values below float32 SVD round-off (s_max * max(m, n) * eps, as numpy's matrix_rank) set to 0.

    Without this a rank-r matrix has min(m, n) - r tiny nonzero singular values of pure
    round-off, and tau = 1 would keep all of them instead of stopping at r.
    """
    if s.numel() == 0:
        return s
    return torch.where(s > s[0] * max(m, n) * torch.finfo(torch.float32).eps, s, torch.zeros_like(s))


def explained_variance(s: torch.Tensor, k: int) -> float:
    energy = (s.double() ** 2)
    total = float(energy.sum())
    return 1.0 if total == 0 else float(energy[:k].sum()) / total


def compress(delta_dir: str | Path, out_dir: str | Path, tau: float = 0.5, max_shard_size: str = "2GB") -> dict:
    """Write the LoRE version of `delta_dir` to `out_dir`; returns its readapt.json contents."""
    if not 0 < tau <= 1:
        raise ReadaptError(f"tau = {tau}: must be in (0, 1]")
    src = DeltaDir(delta_dir)
    if src.kind != "delta":
        raise ReadaptError(f"{src.path}: is a {src.kind} directory; lore needs a full delta (`readapt delta`)")
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, "lore", parse_size(max_shard_size), {"format": FORMAT, "kind": "lore"})
    tensors = {}
    factored = dense = full = stored_factored = stored_dense = 0
    for name in src.names:
        t = src.read(name)
        entry = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        if t.dim() == 2 and in_block(name):
            m, n = t.shape
            u, s, vt = torch.linalg.svd(t.float(), full_matrices=False)  # u (m, r), s (r,), vt (r, n)
            s = numerical_spectrum(s, m, n)
            k = choose_rank(s, tau)
            writer.add(name + US, (u[:, :k] * s[:k]).contiguous())
            writer.add(name + VT, vt[:k].contiguous())
            entry.update(dtype="float32", rank=k, explained=explained_variance(s, k),
                         fraction=k * (m + n) / (m * n))
            factored += m * n
            stored_factored += k * (m + n)
            del u, s, vt
        else:
            writer.add(name, t)
            dense += t.numel()
            stored_dense += t.numel()
        full += t.numel()
        tensors[name] = entry
        del t
    weight_map = writer.close()
    meta = {
        **{k: v for k, v in src.meta.items() if k not in ("tensors", "weight_map", "inexact_elements")},
        "kind": "lore",
        "tau": tau,
        "source_delta": str(src.path.resolve()),
        "factored_elements": factored,
        "stored_factor_elements": stored_factored,
        "fraction": stored_factored / factored if factored else 0.0,
        "total_fraction": (stored_factored + stored_dense) / full if full else 0.0,
        "tensors": tensors,
        "weight_map": weight_map,
    }
    write_meta(out_dir, meta)
    return meta


def rank_table(meta: dict) -> str:
    """Per-matrix ranks and the overall fractions, for the CLI."""
    lines = [f"{'tensor':<56} {'shape':>14} {'rank':>6} {'explained':>9} {'fraction':>8}"]
    for name, t in sorted(meta["tensors"].items()):
        if t.get("rank") is not None:
            shape = "x".join(map(str, t["shape"]))
            lines.append(f"{name:<56} {shape:>14} {t['rank']:>6} {t['explained']:>9.3f} {t['fraction']:>8.3f}")
    lines.append(f"tau = {meta['tau']}: factored matrices keep {meta['fraction']:.4f} of their parameters "
                 f"(sum k(m+n) / sum mn); the whole delta keeps {meta['total_fraction']:.4f}")
    return "\n".join(lines)
