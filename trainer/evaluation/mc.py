"""Multiple-choice scoring: each answer is a continuation, ranked by log-likelihood.

A task is a JSONL file, one item per line: {"context": str, "choices": [str, ...],
"label": int}. Each choice is scored as `context + " " + choice` (the delimiter
belongs to the continuation), as lm-evaluation-harness does:

  acc       argmax_i  sum log p(choice_i tokens | prompt)
  acc_norm  argmax_i  sum log p(choice_i tokens | prompt) / len(choice_i in characters)

acc_norm is the per-character normalisation of OLMES ("acc_per_char"): it does
not depend on the tokenizer, and removes plain acc's bias towards short answers.

k-shot prompts put k solved examples before the item, separated by blank lines.
The examples are drawn with a RNG seeded by (seed, item index), so a prompt is
the same on every run and every number of ranks; drawn from the task file
itself, the scored item is never among its own examples.

Batched and rank-sharded: rank r scores requests r, r+W, ...; the per-request
log-likelihoods are all-reduced (a sum over a zero-filled vector), so every rank
ends with all of them and the metrics do not depend on the number of ranks.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..engine import dist

DELIMITER = " "
SHOT_SEPARATOR = "\n\n"


class TaskError(ValueError):
    """A malformed task file; the message names file:line."""


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    where: str
    """file:line, for messages."""


@dataclass
class Request:
    item: int
    choice: int
    context_ids: list[int]
    continuation_ids: list[int]


def load_items(path: str | Path) -> list[Item]:
    """Parse and check a task JSONL file; raises TaskError naming file:line on the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: expected a JSON object with context, choices, label")
        missing = [k for k in ("context", "choices", "label") if k not in obj]
        if missing:
            raise TaskError(f"{where}: missing key {missing[0]!r}")
        context, choices, label = obj["context"], obj["choices"], obj["label"]
        if not isinstance(context, str):
            raise TaskError(f"{where}: context must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: choices must be a list of at least 2 non-empty strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise TaskError(f"{where}: label must be an integer index into choices (0..{len(choices) - 1})")
        items.append(Item(context, choices, label, where))
    if not items:
        raise TaskError(f"{path}: no items")
    return items


def shot_text(item: Item, delimiter: str = DELIMITER) -> str:
    return item.context + delimiter + item.choices[item.label]


def fewshot_prompt(items: list[Item], index: int, k: int, pool: Optional[list[Item]] = None, seed: int = 0,
                   delimiter: str = DELIMITER) -> str:
    """The prompt for items[index]: k solved examples, then its context.

    `pool` None draws the examples from `items` without items[index]; otherwise from `pool`.
    """
    item = items[index]
    if k <= 0:
        return item.context
    candidates = [x for j, x in enumerate(items) if j != index] if pool is None else pool
    if len(candidates) < k:
        raise TaskError(f"{item.where}: --fewshot {k} but only {len(candidates)} examples to draw from")
    rng = random.Random(f"{seed}:{index}")  # str seeds hash stably (not PYTHONHASHSEED-dependent)
    shots = rng.sample(candidates, k)
    return SHOT_SEPARATOR.join([shot_text(x, delimiter) for x in shots] + [item.context])


def _prefix_ids(tokenizer) -> list[int]:
    """BOS if the tokenizer adds one by itself (Llama, Gemma), else nothing."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and with_special and with_special[0] == bos else []


def encode_pair(tokenizer, context: str, continuation: str, prefix: list[int]) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) such that context + continuation tokenizes the joined text.

    Trailing spaces of the context move to the continuation, and the continuation is
    what the joined text adds after the context's tokens (lm-evaluation-harness's rule),
    so a BPE merge across the boundary is scored as part of the answer.
    """
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ctx = prefix + ctx
    if not ctx:  # nothing to condition the first answer token on: use EOS as a document boundary
        eos = tokenizer.eos_token_id
        if eos is None:
            raise TaskError("empty context and the tokenizer has neither BOS nor EOS to condition on")
        ctx = [eos]
    if not cont:
        raise TaskError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def build_requests(items: list[Item], tokenizer, fewshot: int = 0, pool: Optional[list[Item]] = None,
                   seed: int = 0, delimiter: str = DELIMITER) -> list[Request]:
    prefix = _prefix_ids(tokenizer)
    requests = []
    for i, item in enumerate(items):
        prompt = fewshot_prompt(items, i, fewshot, pool, seed, delimiter)
        for c, choice in enumerate(item.choices):
            ctx, cont = encode_pair(tokenizer, prompt, delimiter + choice, prefix)
            requests.append(Request(i, c, ctx, cont))
    return requests


@torch.no_grad()
def score_requests(forward: Callable[[torch.Tensor], torch.Tensor], requests: list[Request], batch_size: int,
                   device, max_length: int, pad_id: int = 0) -> torch.Tensor:
    """Sum of continuation log-probs per request, (N,) float64, identical on every rank.

    `forward(input_ids (B, T)) -> logits (B, T, V)`. Inputs longer than max_length lose
    tokens on the left (the continuation always fits, or the request is an error).
    Rows are right-padded: with causal attention, padding after a row's last token
    cannot change that row's earlier logits, so no attention mask is needed.
    """
    initialized = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if initialized else 0
    size = torch.distributed.get_world_size() if initialized else 1
    mine = list(range(rank, len(requests), size))
    # Longest first: batches of similar length waste little padding.
    mine.sort(key=lambda j: -(len(requests[j].context_ids) + len(requests[j].continuation_ids)))
    out = torch.zeros(len(requests), dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        rows = []
        for j in chunk:
            r = requests[j]
            if len(r.continuation_ids) >= max_length:
                raise TaskError(f"an answer of {len(r.continuation_ids)} tokens does not fit the "
                                f"model's {max_length}-token context")
            full = (r.context_ids + r.continuation_ids)[-(max_length + 1):]
            rows.append(full[:-1])  # the last token is only predicted, never fed
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for b, x in enumerate(rows):
            ids[b, :len(x)] = torch.tensor(x)
        logits = forward(ids.to(device))
        for b, j in enumerate(chunk):
            cont = torch.tensor(requests[j].continuation_ids, device=logits.device)
            n_in = len(rows[b])
            # Input position t predicts token t+1: the answer's tokens are the last len(cont) targets.
            # Only those positions go through log_softmax (a full (B, T, V) copy is large for big vocabs).
            logp = torch.log_softmax(logits[b, n_in - len(cont):n_in].float(), dim=-1)
            out[j] = logp.gather(1, cont[:, None]).double().sum().item()
    return dist.all_reduce_sum(out.to(device)).cpu()


def choose(loglik: list[float], choices: list[str]) -> tuple[int, int]:
    """(index by acc, index by acc_norm); ties go to the first choice."""
    by_acc = max(range(len(loglik)), key=lambda i: (loglik[i], -i))
    norm = [ll / len(c) for ll, c in zip(loglik, choices)]
    by_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return by_acc, by_norm


def metrics(items: list[Item], requests: list[Request], loglik: torch.Tensor) -> dict:
    per_item: list[list[float]] = [[math.nan] * len(x.choices) for x in items]
    for r, ll in zip(requests, loglik.tolist()):
        per_item[r.item][r.choice] = ll
    hits = hits_norm = 0
    for item, ll in zip(items, per_item):
        a, n = choose(ll, item.choices)
        hits += a == item.label
        hits_norm += n == item.label
    return {"acc": hits / len(items), "acc_norm": hits_norm / len(items), "n": len(items)}


def fewshot_pool(path: str | Path, fewshot_file: Optional[str | Path]) -> Optional[list[Item]]:
    """Items to draw examples from, or None for "the task file itself, minus the scored item".

    The task file given again as its own --fewshot-file is the second case: otherwise
    an item could be shown solved right before it is asked.
    """
    if fewshot_file is None or Path(fewshot_file).resolve() == Path(path).resolve():
        return None
    return load_items(fewshot_file)


def evaluate_task(forward, tokenizer, path: str | Path, device, fewshot: int = 0,
                  fewshot_file: Optional[str | Path] = None, seed: int = 0, batch_size: int = 8,
                  max_length: int = 2048) -> dict:
    """acc, acc_norm and n for one task file (call on every rank)."""
    items = load_items(path)
    pool = fewshot_pool(path, fewshot_file)
    requests = build_requests(items, tokenizer, fewshot, pool, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loglik = score_requests(forward, requests, batch_size, device, max_length, pad)
    return {**metrics(items, requests, loglik), "fewshot": fewshot}
