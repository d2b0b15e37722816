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


def plain_padded_ce(model, tokenizer, path, budget, max_length=512):
    """The loop a user writes: the domain's rows (as prepare_eval picks them) in one right-padded batch,
    labels −100 outside the responses, and transformers' own loss of `model(input_ids, labels=…)`."""
    from mergelab.engine.evaluate import tokenize_row

    rows, scored = [], 0
    for example in load_eval_set(path):
        ids, n_prompt = tokenize_row(tokenizer, example, path)
        ids = ids[:max_length]
        if len(ids) - max(n_prompt, 1) <= 0:
            continue
        rows.append((ids, n_prompt))
        scored += len(ids) - max(n_prompt, 1)
        if scored >= budget:
            break
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
    for r, (ids, n_prompt) in enumerate(rows):
        input_ids[r, :len(ids)], mask[r, :len(ids)] = torch.tensor(ids), 1
        labels[r, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item(), scored


def spread_eval(tmp_path, n=120):
    """Lengths spread from a few tokens to ~70: packed rows hold several sequences each."""
    rows = [{"prompt": f"{i} " + "p" * (3 * (i % 19)), "response": f"answer {i}" + "r" * (i % 11)} for i in range(n)]
    return write_eval(tmp_path / "spread.jsonl", rows)


def test_packed_fast_path_equals_a_plain_padded_forward(setup, tmp_path):
    """Sequences packed end to end without padding (each at its own positions), the decoder once per
    batch and the LM head only on scored positions: the same CE, within 1e-5 nats, as one padded
    `model(input_ids, attention_mask, labels=…)` batch per domain, and as the padded batches."""
    from mergelab.engine.evaluate import _packing_honoured

    family, tokenizer, model = setup
    sets = {**family.eval_sets, "spread": spread_eval(tmp_path)}
    data = prepare_eval(sets, tokenizer, token_budget=10**6)
    b = data.packed[0]
    segments = (b.position_ids == 0).sum(1)
    assert int(segments.max()) >= 3 and b.attention_mask is None  # several sequences share a row
    real = sum(int(x.attention_mask.sum()) for x in data.batches)
    packed_positions = sum(x.input_ids.numel() for x in data.packed)
    assert packed_positions - real <= 0.1 * real  # padding: only each row's tail
    assert packed_positions < sum(x.input_ids.numel() for x in data.batches)
    assert _packing_honoured(model, data.packed)
    ours, padded = evaluate(model, data), evaluate(model, data, packed=False)
    for domain, path in sets.items():
        expected, count = plain_padded_ce(model, tokenizer, path, 10**6)
        assert data.n_tokens[domain] == count
        assert ours[domain] == pytest.approx(expected, abs=1e-5)
        assert ours[domain] == pytest.approx(padded[domain], abs=1e-6)


def test_a_model_that_does_not_honour_packing_is_evaluated_in_padded_batches(tmp_path):
    """OPT takes its positions from the attention mask, not position_ids: packed rows would let its
    sequences see each other. The check notices, and evaluation uses the padded batches (same CE as
    transformers' loss), where forcing the packed rows would be wrong."""
    from transformers import OPTConfig

    from mergelab.demo.tokenizer import build_tokenizer
    from mergelab.engine.evaluate import _packing_honoured

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=272, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                       max_position_embeddings=256, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tokenizer = build_tokenizer()
    path = spread_eval(tmp_path)
    data = prepare_eval({"spread": path}, tokenizer, 10**6)
    assert not _packing_honoured(model, data.packed)
    expected = plain_padded_ce(model, tokenizer, path, 10**6)[0]
    assert evaluate(model, data)["spread"] == pytest.approx(expected, abs=1e-5)
    assert abs(evaluate(model, data, packed=True)["spread"] - expected) > 1e-5


def test_token_budget_reaches_llm_size_evals(setup, tmp_path):
    """Thousands of scored tokens per domain (the paper's evals): no cap below the budget asked for, in
    the manifest or the evaluator, and the CE still that of transformers' own loss."""
    import re

    family, tokenizer, model = setup
    rows = [{"prompt": f"question {i}: what follows?", "response": f"the answer to {i} is " + "x" * (10 + i % 30)}
            for i in range(400)]
    path = write_eval(tmp_path / "big.jsonl", rows)
    text = family.manifest.read_text()
    manifest = family.manifest.with_name(f"budget-{tmp_path.name}.toml")
    manifest.write_text(re.sub(r"(?m)^token_budget = .*$", "token_budget = 8000", text))
    assert load_family(manifest).token_budget == 8000
    data = prepare_eval({"big": path}, tokenizer, token_budget=8000, max_length=512)
    assert 8000 <= data.n_tokens["big"] < 8000 + 60
    expected, count = plain_padded_ce(model, tokenizer, path, 8000)
    assert count == data.n_tokens["big"]
    assert evaluate(model, data)["big"] == pytest.approx(expected, abs=1e-5)
