"""Conversations -> token ids and loss masks in the LLM's chat template, per training stage.

`alignment`: every text token is a target (captions with their prompts). `sft`: only assistant
turns are targets — each reply's text and its end-of-turn token (`<|im_end|>`), not the template's
role header or the newline after the turn; every user/system turn is masked, in multi-turn
conversations too. `dpo`: two sequences (conversation + chosen reply, conversation + rejected
reply) whose targets are the final reply only; earlier turns are identical in both and would cancel.

The masks come from character spans in the rendered template mapped to tokens through the
tokenizer's offsets, so they are exact for any template that renders a conversation as the
concatenation of its turns (checked; other templates raise).
"""

from pathlib import Path

from config import STAGES

ROLES = ("system", "user", "assistant")


def hub_location(name) -> tuple[str, dict]:
    """A hub id, a folder, or a .gguf file -> (name, from_pretrained kwargs)."""
    if str(name).endswith(".gguf"):
        return str(Path(name).parent), {"gguf_file": Path(name).name}
    return str(name), {}


def load_tokenizer(name):
    """The tokenizer of a hub id, a model folder, or a .gguf file."""
    from transformers import AutoTokenizer

    folder, kwargs = hub_location(name)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def pad_id(tokenizer) -> int:
    """The id text is padded with (the model, the collate and generation agree on it): the tokenizer's
    pad token, else its end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
    return pad


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` is its skip-counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def with_system(messages, system_prompt):
    """Prepend our system prompt unless the conversation has its own. An empty system prompt leaves
    the template's default in place."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def chat_ids(tokenizer, messages, system_prompt, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the chat template (the prompt used for generation)."""
    text = tokenizer.apply_chat_template(with_system(messages, system_prompt), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_messages(messages, final_role: str):
    """Raise SampleError('missing_fields', …) unless messages is a list of {role, content: str}
    turns with known roles, at least one user turn, ending with `final_role`."""
    if not isinstance(messages, list) or not messages:
        raise SampleError("missing_fields", "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SampleError("missing_fields", f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    if not any(m["role"] == "user" for m in messages):
        raise SampleError("missing_fields", "no user turn")
    if messages[-1]["role"] != final_role:
        raise SampleError("missing_fields", f"the last turn must be {final_role!r}, got {messages[-1]['role']!r}")


def tokenize(tokenizer, messages, stage: str, max_text_tokens: int, system_prompt: str,
             target_turns: str = "all") -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) for a conversation ending with an assistant turn.

    target_turns: "all" assistant turns or only the "last" (DPO). Raises SampleError when the text is
    longer than max_text_tokens (never trained with a cut answer) or has no target token.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    check_messages(messages, "assistant")
    messages = with_system(messages, system_prompt)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) > max_text_tokens:
        raise SampleError("text_too_long", f"{len(ids)} tokens > max_text_tokens={max_text_tokens}")
    if stage == "alignment":
        mask = [1] * len(ids)
    else:
        spans = _assistant_spans(tokenizer, messages, text)
        if target_turns == "last":
            spans = spans[-1:]
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    mask[0] = 0  # nothing predicts the first text token (see model.py: what the loss is)
    if not any(mask):
        raise SampleError("no_target_tokens", "the loss mask selects no token")
    return ids, mask


def tokenize_dpo(tokenizer, messages, chosen: str, rejected: str, max_text_tokens: int, system_prompt: str):
    """((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)) for a conversation ending with the
    user turn that the two replies answer."""
    check_messages(messages, "user")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise SampleError("missing_fields", "DPO samples need 'chosen' and 'rejected' strings")
    return tuple(tokenize(tokenizer, messages + [{"role": "assistant", "content": reply}], "dpo",
                          max_text_tokens, system_prompt, target_turns="last") for reply in (chosen, rejected))


def _assistant_spans(tokenizer, messages, text):
    """Character spans [start, end) of each assistant reply in `text`: from after the role header
    to the end of the end-of-turn token."""
    end_token = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(head) and text.startswith(turn) and turn.startswith(head)):
            raise ValueError("the chat template does not render a conversation as the concatenation of its "
                             "turns; tokenization.py cannot locate the assistant replies")
        stop = turn.rfind(end_token, len(head)) if end_token else -1
        spans.append((len(head), stop + len(end_token) if stop >= 0 else len(turn)))
    return spans
