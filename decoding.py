"""Decoding: prompts in, replies out. Conversations -> right-padded prompt ids (`prompt_ids`); the prompt
through the model into a KV cache (FoveatedVLM.prefill); then a token a step, each fed back through
the cache (`decode`), greedy or temperature + top-p sampling (`sample`); the steps as text pieces
(`stream_text`) or token lists (`collect`). FoveatedVLM.generate and generate_ids are the public entry
points (`generate`, `generate_ids` here); StreamSession answers with `decode` and `stream_text` too.

A step is (each row's new token id, or None once the row has stopped, the logits [B, V] it was drawn
from). A row stops at one of the model's stop_ids (end of turn, end of text) or after max_new_tokens.
"""

import torch

from collate import pack_frames, pad_rows
from precision import autocast


def prompt_ids(model, conversations) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations (lists of chat messages) -> right-padded generation prompts (input_ids,
    attention_mask) [B, S] in the model's chat template."""
    rows = [model.chat_ids(c) for c in conversations]
    return pad_rows(rows, model.pad_id), pad_rows([[1] * len(r) for r in rows], 0)


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] float logits -> [B] token ids: the argmax at temperature 0, else a draw from the
    temperature-scaled distribution cut to its smallest set of tokens reaching top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1)[:, 0]


def decode(model, logits, cache, pos, max_new_tokens: int, temperature: float, top_p: float):
    """Yield the decoding steps from logits [B, V] (the first new token's distribution) at logical
    position pos [B], each new token appended to `cache` (a model.new_cache filled by prefill or
    append)."""
    b, device = logits.shape[0], logits.device
    stops = torch.tensor(model.stop_ids, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        tok = sample(logits.float(), temperature, top_p)
        done |= torch.isin(tok, stops)  # a stop token ends its row, and a row once ended stays ended
        flags = done.tolist()  # one host sync a step (the token ids need it anyway)
        yield [None if f else t for f, t in zip(flags, tok.tolist())], logits
        if all(flags):
            return
        h = model.append(cache, model.embed(tok[:, None]), pos[:, None])
        logits = model.llm.lm_head(h[:, 0])
        pos = pos + 1


@torch.no_grad()
def steps(model, input_ids, attention_mask, frames, frame_index, kv, mode: str, max_new_tokens: int,
          temperature: float, top_p: float):
    """Yield the decoding steps of prepared prompts (as generate_ids takes them), prefill included,
    under the model's precision (precision.autocast)."""
    with autocast(model.device):
        logits, cache, pos = model.prefill(input_ids, attention_mask, frames, frame_index, kv, mode)
        yield from decode(model, logits, cache, pos, max_new_tokens, temperature, top_p)


def stream_text(tokenizer, steps):
    """Decoding steps of one row -> its text, a piece per token (a multi-byte character split over
    tokens comes out whole, with its last token)."""
    ids, sent = [], ""
    for step, _ in steps:
        if step[0] is None:
            continue
        ids.append(step[0])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(sent):]
            sent = text


def collect(steps) -> dict:
    """Decoding steps -> {"tokens": per-row new ids, "first_logits": the first step's logits (float)}."""
    tokens, first = None, None
    for step, logits in steps:
        if first is None:
            first, tokens = logits.float(), [[] for _ in step]
        for i, tok in enumerate(step):
            if tok is not None:
                tokens[i].append(tok)
    return {"tokens": tokens, "first_logits": first}


def conversations(prompt) -> tuple[list, bool]:
    """A prompt as generate takes it (a string, chat messages, or a list of those) -> (list of message
    lists, batched?)."""
    as_messages = lambda p: [{"role": "user", "content": p}] if isinstance(p, str) else list(p)  # noqa: E731
    if isinstance(prompt, str):
        return [as_messages(prompt)], False
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return [as_messages(prompt)], False
    if isinstance(prompt, (list, tuple)) and prompt:
        return [as_messages(p) for p in prompt], True
    raise ValueError("prompt must be a string, a list of chat messages, or a non-empty list of those")


def frames_per_sample(frames, batch: int, batched: bool) -> list:
    """generate's frames (None, an image, a video, a [B, T, 3, H, W] batch or a list) -> one entry per prompt."""
    if frames is None:
        return [None] * batch
    if isinstance(frames, (list, tuple)):
        if len(frames) != batch:
            raise ValueError(f"{len(frames)} frame entries for {batch} prompts")
        return list(frames)
    if frames.dim() == 5:
        if frames.shape[0] != batch:
            raise ValueError(f"frames batch {frames.shape[0]} != {batch} prompts")
        return list(frames)
    if batched and batch != 1:
        raise ValueError("for a batch of prompts pass frames as a list (one entry per prompt) or [B, T, 3, H, W]")
    return [frames] * batch


def reply_steps(model, convs: list, samples: list, max_new_tokens: int, mode: str, temperature: float,
                top_p: float):
    """The decoding steps of conversations about samples (one of None / image / video each)."""
    ids, am = prompt_ids(model, convs)
    pixels, index = pack_frames(samples, model.image_frames)
    return steps(model, ids, am, pixels, index, None, mode, max_new_tokens, temperature, top_p)


def generate(model, frames, prompt, max_new_tokens: int, mode: str, temperature: float, top_p: float,
             stream: bool):
    """FoveatedVLM.generate (see there)."""
    convs, batched = conversations(prompt)
    samples = frames_per_sample(frames, len(convs), batched)
    if stream and batched:
        raise ValueError("stream=True takes a single prompt")
    replies = reply_steps(model, convs, samples, max_new_tokens, mode, temperature, top_p)
    if stream:
        return stream_text(model.tokenizer, replies)
    texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in collect(replies)["tokens"]]
    return texts if batched else texts[0]
