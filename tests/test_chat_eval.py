"""Eval rows as chat conversations (system/user/assistant) rendered by the tokenizer's chat template,
CE on the assistant reply only; truncation at max_length counted for plain and chat rows and reported."""

import json

import pytest
import torch

from mergelab.errors import EvalSetError, ManifestError
from mergelab.engine.evaluate import evaluate, load_eval_set, prepare_eval, tokenize_chat
from mergelab.io.family import load_family
from tests.helpers import reference_ce, write_eval
from tests.realarch import chat_rows, chat_tokenizer, plain_rows, real_config

CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4, since 2 plus 2 is 4."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The ChatML test tokenizer, saved and loaded back as AutoTokenizer loads a checkpoint's."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    chat_tokenizer().save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def test_prompt_is_the_generation_prompt_and_the_reply_ends_with_its_end_of_turn(tokenizer):
    ids, n_prompt = tokenize_chat(tokenizer, CONVERSATION)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert ids[:n_prompt] == prompt and n_prompt == len(prompt)
    assert tokenizer.decode(ids[n_prompt:]) == "4, since 2 plus 2 is 4.<|im_end|>"
    assert full == ids + tokenizer("\n", add_special_tokens=False)["input_ids"]  # only the newline between turns is left out
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\nYou are terse.<|im_end|>")


def test_ce_on_chat_and_plain_rows_equals_transformers_loss(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(real_config("qwen2")).eval()
    path = write_eval(tmp_path / "mixed.jsonl", chat_rows("alpha", 1, n=4) + plain_rows("alpha", 2, n=3))
    data = prepare_eval({"mixed": path}, tokenizer, 10**6, batch_tokens=96)
    assert len(data.batches) > 1
    expected, count = reference_ce(model, tokenizer, path)
    assert data.n_tokens["mixed"] == count
    assert evaluate(model, data)["mixed"] == pytest.approx(expected, abs=1e-5)


def test_a_tokenizer_without_a_chat_template_is_named_with_the_eval_file(tmp_path):
    from transformers import AutoTokenizer

    from mergelab.demo.tokenizer import save_tokenizer

    save_tokenizer(tmp_path / "tok")
    path = write_eval(tmp_path / "chat.jsonl", chat_rows("alpha", 1))
    with pytest.raises(EvalSetError) as err:
        prepare_eval({"alpha": path}, AutoTokenizer.from_pretrained(str(tmp_path / "tok")), 100)
    assert str(err.value) == (f"{path}: rows with 'messages' need a chat template, but the tokenizer in {tmp_path / 'tok'} "
                              "has none (add chat_template.jinja or tokenizer_config.json's chat_template)")


@pytest.mark.parametrize("template, fragment", [
    # the reply rendered differently from what the generation prompt announces (a reasoning preamble)
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'assistant: <think>' }}{% endif %}",
     "does not render the conversation as the generation prompt followed by the assistant reply"),
    ("{{ raise_exception('System role not supported') }}", "failed: System role not supported"),
])
def test_templates_that_cannot_score_the_reply_are_refused(tokenizer, tmp_path, template, fragment):
    path = write_eval(tmp_path / "chat.jsonl", chat_rows("alpha", 1))
    tok = chat_tokenizer()
    tok.chat_template = template
    with pytest.raises(EvalSetError) as err:
        prepare_eval({"alpha": path}, tok, 100)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value)


@pytest.mark.parametrize("messages, fragment", [
    ([], "'messages' must be a non-empty list"),
    ("hi", "'messages' must be a non-empty list"),
    ([{"role": "user", "content": "a"}], "the last message must be a non-empty 'assistant' reply"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "non-empty 'assistant' reply"),
    ([{"role": "narrator", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[0] must have a 'role'"),
    ([{"role": "user"}, {"role": "assistant", "content": "b"}], "messages[0] must have a 'role' (system, user"),
])
def test_malformed_conversations_name_file_line_and_problem(tmp_path, messages, fragment):
    path = write_eval(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"messages": messages}])
    with pytest.raises(EvalSetError) as err:
        load_eval_set(path)
    assert str(err.value).startswith(f"{path}:2: ") and fragment in str(err.value)


def test_truncation_is_counted_for_plain_and_chat_rows(tokenizer, tmp_path):
    long_reply = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r" * 150}]
    long_prompt = [{"role": "user", "content": "q" * 150}, {"role": "assistant", "content": "r"}]
    rows = [{"messages": long_reply}, {"messages": long_prompt}, {"prompt": "p", "response": "s" * 150},
            {"messages": CONVERSATION}]
    path = write_eval(tmp_path / "long.jsonl", rows)
    short = write_eval(tmp_path / "short.jsonl", [{"messages": CONVERSATION}])
    data = prepare_eval({"long": path, "short": short}, tokenizer, token_budget=10**6, max_length=90)
    assert data.n_truncated == {"long": 3, "short": 0}  # the long prompt leaves nothing to score: cut, counted, dropped
    n_prompt = tokenize_chat(tokenizer, long_reply)[1]
    whole, n_conv = tokenize_chat(tokenizer, CONVERSATION)
    assert len(whole) <= 90 and data.n_tokens["long"] == (90 - n_prompt) + (90 - 2) + (len(whole) - n_conv)
    assert data.truncation_note() == "3 eval examples cut to 90 tokens (long 3)"
    assert prepare_eval({"long": path}, tokenizer, 10**6, max_length=512).truncation_note() is None


def test_sweep_reports_cut_examples_and_stores_the_counts(tiny_family, tmp_path, capsys):
    """max_length comes from the manifest; the CLI says how many examples were cut per domain."""
    from mergelab.store import ResultStore
    from tests.test_sweep import cli

    tiny_family.write_text(tiny_family.read_text().replace("token_budget =", "max_length = 17\ntoken_budget =", 1))
    family = load_family(tiny_family)
    assert family.max_length == 17
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "sweep", "--family", tiny_family, "--methods", "average", "--k", "1", "--db", db)
    assert code == 0, err
    # byte-level tokens: <bos> prompt response <eos>; every example fits the token budget of 40 here
    counts = {d: sum(2 + len(r["prompt"].encode()) + len(r["response"].encode()) > 17 for r in load_eval_set(path))
              for d, path in family.eval_sets.items()}
    assert counts == {"alpha": 2, "beta": 2, "gamma": 4}
    assert "note: size s: 8 eval examples cut to 17 tokens (alpha 2, beta 2, gamma 4)" in out
    stored = ResultStore(db).results().groupby("domain")["n_truncated"].unique().map(list).to_dict()
    assert stored == {d: [n] for d, n in counts.items()}


def test_max_length_must_be_positive(tiny_family):
    tiny_family.write_text(tiny_family.read_text().replace("token_budget =", "max_length = 0\ntoken_budget =", 1))
    with pytest.raises(ManifestError, match="field 'max_length' must be a positive integer, got 0"):
        load_family(tiny_family)
