"""Response-only CE against a plain transformers forward pass with labels; eval-set errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergelab.errors import EvalSetError
from mergelab.engine.evaluate import evaluate, load_eval_set, prepare_eval
from mergelab.io.family import load_family
from tests.helpers import reference_ce, write_eval


@pytest.fixture
def setup(tiny_family):
    family = load_family(tiny_family)
    base = family.sizes[0].base
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    return family, tokenizer, model


def test_ce_matches_transformers_forward_with_labels(setup):
    family, tokenizer, model = setup
    data = prepare_eval(family.eval_sets, tokenizer, token_budget=10**6, batch_tokens=64)
    ours = evaluate(model, data)
    assert len(data.batches) > 1  # padded, length-bucketed batches are exercised
    for domain, path in family.eval_sets.items():
        expected, count = reference_ce(model, tokenizer, path)
        assert data.n_tokens[domain] == count
        assert ours[domain] == pytest.approx(expected, abs=1e-5)


def test_token_budget_counts_response_tokens_only(setup):
    family, tokenizer, model = setup
    data = prepare_eval(family.eval_sets, tokenizer, token_budget=7)
    ours = evaluate(model, data)
    for domain, path in family.eval_sets.items():
        expected, count = reference_ce(model, tokenizer, path, budget=7)
        assert data.n_tokens[domain] == count >= 7
        assert ours[domain] == pytest.approx(expected, abs=1e-5)


def test_batching_does_not_change_results_and_hash_is_stable(setup):
    family, tokenizer, model = setup
    a = prepare_eval(family.eval_sets, tokenizer, token_budget=40, batch_tokens=32)
    b = prepare_eval(family.eval_sets, tokenizer, token_budget=40, batch_tokens=100000, max_padding=float("inf"))
    assert a.hashes == b.hashes and len(b.batches) == 1 < len(a.batches)
    ra, rb = evaluate(model, a), evaluate(model, b)
    assert all(ra[d] == pytest.approx(rb[d], abs=1e-6) for d in ra)
    assert evaluate(model, a) == ra  # deterministic
    c = prepare_eval(family.eval_sets, tokenizer, token_budget=41)
    assert c.hashes != a.hashes or c.n_tokens == a.n_tokens


def test_batches_hold_little_padding(setup, tmp_path):
    """Lengths spread from 4 to 60 tokens: one batch would be mostly padding; the default batches keep
    padded positions within 10% of the real tokens (a batch of one sequence has none)."""
    _, tokenizer, _ = setup
    rows = [{"prompt": "p" * (i % 40), "response": "r" * (1 + i % 17)} for i in range(200)]
    path = write_eval(tmp_path / "spread.jsonl", rows)
    one = prepare_eval({"spread": path}, tokenizer, 10**6, batch_tokens=10**6, max_padding=float("inf"))
    data = prepare_eval({"spread": path}, tokenizer, 10**6, batch_tokens=10**6)
    assert len(one.batches) == 1 and one.batches[0].attention_mask.float().mean() < 0.6
    assert len(data.batches) > 1 and data.hashes == one.hashes
    for batch in data.batches:
        assert batch.input_ids.numel() <= 1.1 * int(batch.attention_mask.sum())


def test_truncation_is_counted(setup, tmp_path):
    _, tokenizer, _ = setup
    path = write_eval(tmp_path / "long.jsonl", [{"prompt": "p" * 10, "response": "r" * 100}, {"prompt": "q", "response": "ok"}])
    data = prepare_eval({"long": path}, tokenizer, token_budget=1000, max_length=32)
    assert data.n_truncated == {"long": 1}
    assert data.n_tokens["long"] == (32 - 11) + 3


@pytest.mark.parametrize("content, fragment", [
    (b"", "eval set is empty"),
    (b"\n\n", "eval set is empty"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', ":2: not valid JSON"),
    (b'{"prompt": "a"}\n', ":1: field 'response' missing or not a string"),
    (b'{"prompt": 3, "response": "b"}\n', ":1: field 'prompt' missing or not a string"),
    (b'["a", "b"]\n', ":1: expected an object"),
    (b'{"prompt": "a", "response": ""}\n', ":1: empty 'response'"),
    (b'{"prompt": "\xff\xfe", "response": "b"}\n', "not UTF-8"),
])
def test_malformed_eval_sets_name_file_and_problem(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(EvalSetError) as err:
        load_eval_set(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_text_field_scores_all_tokens(tmp_path):
    path = write_eval(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert load_eval_set(path) == [{"prompt": "", "response": "hello"}]
