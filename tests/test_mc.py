"""Multiple-choice scoring: hand-computable log-likelihoods, acc vs acc_norm, k-shot prompts, batching."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_models import VOCAB, tiny_model
from trained_runs import char_tokenizer
from trainer.evaluation.mc import (TaskError, build_requests, choose, encode_pair, evaluate_task, fewshot_pool, fewshot_prompt,
                        load_items, metrics, score_requests)

TOK = char_tokenizer()


def tid(ch: str) -> int:
    return TOK.convert_tokens_to_ids(ch)


def unigram_forward(probs: dict[str, float]):
    """A 'model' whose next-token distribution ignores the input: p(ch) as given, the rest spread evenly."""
    rest = (1.0 - sum(probs.values())) / (VOCAB - len(probs))
    logp = torch.full((VOCAB,), math.log(rest))
    for ch, p in probs.items():
        logp[tid(ch)] = math.log(p)

    def forward(ids):
        return logp.expand(ids.shape[0], ids.shape[1], VOCAB).clone()

    return forward


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


P = {" ": 0.25, "a": 0.05, "b": 0.3}


def test_acc_takes_the_likeliest_answer_acc_norm_the_likeliest_per_character(tmp_path):
    # " a": log .25 + log .05 = -4.38 (per char -4.38); " bbbb": log .25 + 4 log .3 = -6.20 (per char -1.55).
    items = [{"context": "Q:", "choices": ["a", "bbbb"], "label": 0},
             {"context": "Q:", "choices": ["bbbb", "a"], "label": 1}]
    path = write_jsonl(tmp_path / "t.jsonl", items)
    loaded = load_items(path)
    reqs = build_requests(loaded, TOK)
    ll = score_requests(unigram_forward(P), reqs, batch_size=3, device="cpu", max_length=64)
    expect = {"a": math.log(.25) + math.log(.05), "bbbb": math.log(.25) + 4 * math.log(.3)}
    for r, value in zip(reqs, ll.tolist()):
        assert value == pytest.approx(expect[loaded[r.item].choices[r.choice]], abs=1e-5)
    assert choose([expect["a"], expect["bbbb"]], ["a", "bbbb"]) == (0, 1)
    assert metrics(loaded, reqs, ll) == {"acc": 1.0, "acc_norm": 0.0, "n": 2}
    # Labels on the long answers: the other way round.
    flipped = write_jsonl(tmp_path / "f.jsonl", [dict(x, label=1 - x["label"]) for x in items])
    res = evaluate_task(unigram_forward(P), TOK, flipped, "cpu", batch_size=2, max_length=64)
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)


def test_ties_go_to_the_first_choice():
    assert choose([-1.0, -1.0], ["x", "y"]) == (0, 0)
    assert choose([-2.0, -1.0], ["xx", "y"]) == (1, 0)  # norm: -1.0 vs -1.0, tie -> first


def test_continuation_is_the_answer_with_its_delimiter_and_context_spaces():
    prefix = [TOK.bos_token_id]
    ctx, cont = encode_pair(TOK, "Answer: ", " yes", prefix)
    assert ctx == prefix + [tid(c) for c in "Answer:"]
    assert cont == [tid(c) for c in "  yes"]  # the context's trailing space moves to the answer
    ctx, cont = encode_pair(TOK, "", " yes", [])
    assert ctx == [TOK.eos_token_id]  # something to condition the first answer token on


def test_fewshot_prompts_are_deterministic_and_never_contain_the_scored_item(tmp_path):
    items = load_items(write_jsonl(tmp_path / "t.jsonl", [
        {"context": f"q{i}", "choices": [f"a{i}", f"b{i}"], "label": i % 2} for i in range(6)]))
    for i in range(6):
        prompt = fewshot_prompt(items, i, 3, seed=0)
        shots = prompt.split("\n\n")
        assert len(shots) == 4 and shots[-1] == f"q{i}"
        assert all(not s.startswith(f"q{i} ") for s in shots[:-1])
        for s in shots[:-1]:
            j = int(s.split()[0][1:])
            assert s == f"q{j} {items[j].choices[items[j].label]}"  # solved with the right answer
        assert fewshot_prompt(items, i, 3, seed=0) == prompt
    assert {fewshot_prompt(items, 0, 3, seed=s) for s in range(10)} != {fewshot_prompt(items, 0, 3, seed=0)}
    pool = load_items(write_jsonl(tmp_path / "pool.jsonl", [{"context": "P", "choices": ["x", "y"], "label": 1}]))
    assert fewshot_prompt(items, 2, 1, pool=pool) == "P y\n\nq2"
    with pytest.raises(TaskError, match="only 5 examples"):
        fewshot_prompt(items, 0, 6)
    assert fewshot_pool(tmp_path / "t.jsonl", tmp_path / "." / "t.jsonl") is None  # own file: scored item excluded
    assert fewshot_pool(tmp_path / "t.jsonl", tmp_path / "pool.jsonl")[0].context == "P"


@pytest.mark.parametrize("line,message", [
    ("{not json", "invalid JSON"),
    ('{"context": "c", "choices": ["a", "b"]}', "missing key 'label'"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "label must be an integer index"),
    ('{"context": "c", "choices": ["a"], "label": 0}', "choices must be a list of at least 2"),
    ('["c", ["a", "b"], 0]', "expected a JSON object"),
])
def test_malformed_task_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "label": 0}\n\n' + line + "\n")
    with pytest.raises(TaskError, match=f"bad.jsonl:3: {message}"):
        load_items(path)


def test_batched_scoring_equals_one_request_at_a_time_and_a_direct_forward(tmp_path):
    model = tiny_model("llama")
    forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    items = load_items(write_jsonl(tmp_path / "t.jsonl", [
        {"context": "def f(x):" * (i + 1), "choices": ["return x", "pass", "x" * (3 + i)], "label": i % 3}
        for i in range(4)]))
    reqs = build_requests(items, TOK, fewshot=1)
    one = score_requests(forward, reqs, 1, "cpu", max_length=128)
    many = score_requests(forward, reqs, 5, "cpu", max_length=128)
    torch.testing.assert_close(many, one, atol=1e-4, rtol=1e-5)
    r = reqs[-1]
    ids = torch.tensor([r.context_ids + r.continuation_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    n = len(r.context_ids)
    direct = sum(logp[n - 1 + k, t].item() for k, t in enumerate(r.continuation_ids))
    assert one[-1].item() == pytest.approx(direct, abs=1e-4)
    # Too long for the context: the left of the prompt is dropped, the answer is kept whole.
    short = score_requests(forward, reqs, 4, "cpu", max_length=16)
    assert torch.isfinite(short).all() and not torch.allclose(short, one)
