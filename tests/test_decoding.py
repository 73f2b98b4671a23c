"""decoding.py's parts without a model: sampling (greedy, top-p's kept set), streamed text over
multi-byte characters, collecting steps, the prompt forms generate takes."""

import pytest
import torch

from decoding import collect, conversations, frames_per_sample, sample, stream_text


def test_sampling_is_greedy_at_zero_and_keeps_the_top_p_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample(logits, 0.0, 1.0).tolist() == [0]
    torch.manual_seed(0)
    # top_p 0.7: {0.5, 0.3} reach it (0.5 alone does not), so tokens 2 and 3 are never drawn
    drawn = {sample(logits, 1.0, 0.7).item() for _ in range(300)}
    assert drawn == {0, 1}
    torch.manual_seed(0)
    assert {sample(logits, 1.0, 1.0).item() for _ in range(2000)} == {0, 1, 2, 3}


class ByteTokenizer:
    """Each token id is one byte of UTF-8: a character may span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_waits_for_the_rest_of_a_character_and_skips_stopped_steps():
    text = "aé€b"
    data = list(text.encode())  # a: 1 byte, é: 2, €: 3, b: 1
    steps = [([t], None) for t in data] + [([None], None)]
    pieces = list(stream_text(ByteTokenizer(), steps))
    assert "".join(pieces) == text and pieces == ["a", "é", "€", "b"]


def test_collect_keeps_each_rows_tokens_until_it_stops():
    first = torch.zeros(2, 3)
    steps = [([5, 7], first), ([None, 8], torch.ones(2, 3)), ([None, None], torch.ones(2, 3))]
    out = collect(iter(steps))
    assert out["tokens"] == [[5], [7, 8]] and torch.equal(out["first_logits"], first)


def test_prompt_and_frame_forms():
    assert conversations("hi") == ([[{"role": "user", "content": "hi"}]], False)
    chat = [{"role": "user", "content": "a"}]
    assert conversations(chat) == ([chat], False)
    assert conversations(["a", chat]) == ([[{"role": "user", "content": "a"}], chat], True)
    with pytest.raises(ValueError, match="prompt must be"):
        conversations([])
    video = torch.zeros(2, 3, 4, 4)
    assert frames_per_sample(None, 2, True) == [None, None]
    assert len(frames_per_sample(video, 1, False)) == 1
    with pytest.raises(ValueError, match="3 frame entries for 2 prompts"):
        frames_per_sample([video, video, None], 2, True)
    with pytest.raises(ValueError, match="pass frames as a list"):
        frames_per_sample(video, 2, True)
