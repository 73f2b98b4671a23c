"""layout.py alone (no model): logical positions against a hand-written sequence, assembly fills every
slot once, the cached-chunk mask against a naive loop, the next-token grid round trip, bad frame inputs."""

import pytest
import torch

from layout import ChatMarks, assemble, chunk_mask, frame_inputs, grid, make_layout, regrid, take, visual_start

# a toy ChatML: 1 = <|im_start|>, 2 = "user", 3 = <|im_end|>; 9 = padding
MARKS = ChatMarks(im_start=1, user=2, im_end=3)
IDS = torch.tensor([[1, 2, 5, 6, 3, 7, 8, 9],    # <s> user 5 6 </s> 7 8 + 1 pad
                    [1, 2, 5, 3, 7, 9, 9, 9]])   # <s> user 5 </s> 7 + 3 pads
MASK = (IDS != 9).long()
VISUAL = torch.tensor([[True, True, False], [True, True, True]])  # row 0: 2 real visual tokens, row 1: 3


def naive_sequence(order):
    """Each row's real tokens in reading order, as ("t", j) / ("v", t), built by list insertion."""
    rows = []
    for b in range(IDS.shape[0]):
        text = [("t", j) for j in range(IDS.shape[1]) if MASK[b, j]]
        vis = [("v", t) for t in range(VISUAL.shape[1]) if VISUAL[b, t]]
        at = 0 if order == "video_first" else [j for _, j in text].index(IDS[b].tolist().index(3))
        rows.append(text[:at] + vis + text[at:])
    return rows


@pytest.mark.parametrize("order", ["video_first", "prompt_first"])
def test_positions_match_a_naive_insertion(order):
    lay = make_layout(IDS, MASK, VISUAL, order, MARKS)
    for b, seq in enumerate(naive_sequence(order)):
        where = {tok: i for i, tok in enumerate(seq)}
        assert lay.length[b] == len(seq)
        for j in range(IDS.shape[1]):
            if MASK[b, j]:
                assert lay.text_pos[b, j] == where[("t", j)]
                # the token after j is predicted from the position just before it
                following = seq[where[("t", j)] + 1:]
                nxt = next((tok for tok in following if tok[0] == "t"), None)
                if nxt is not None:
                    assert lay.pred_pos[b, j] == where[nxt] - 1
        for t in range(VISUAL.shape[1]):
            if VISUAL[b, t]:
                assert lay.visual_pos[b, t] == where[("v", t)]


def test_visual_start_finds_the_end_of_the_first_user_message():
    assert visual_start(IDS, MASK, MARKS).tolist() == [4, 3]
    with pytest.raises(ValueError, match="ChatML"):
        visual_start(IDS, MASK, ChatMarks(1, None, 3))


@pytest.mark.parametrize("order", ["video_first", "prompt_first"])
def test_assemble_fills_every_slot_once_with_real_tokens_first(order):
    lay = make_layout(IDS, MASK, VISUAL, order, MARKS)
    b, s, t = IDS.shape[0], IDS.shape[1], VISUAL.shape[1]
    # a token's embedding is its own identity: (kind, index) -> a distinct number
    text = torch.arange(s, dtype=torch.float).expand(b, -1)[..., None]
    vis = (100 + torch.arange(t, dtype=torch.float)).expand(b, -1)[..., None]
    seq, pos = assemble(text, vis, lay)
    assert seq.shape[1] == s + t and torch.equal(pos[0], torch.arange(s + t))
    for row, naive in enumerate(naive_sequence(order)):
        want = [float(j) if kind == "t" else 100.0 + j for kind, j in naive]
        assert seq[row, :len(naive), 0].tolist() == want
        assert sorted(seq[row, :, 0].tolist()) == sorted(list(range(s)) + [100.0 + i for i in range(t)])


def test_chunk_mask_equals_a_naive_loop():
    cache_valid = torch.tensor([[True, False, True], [True, True, True]])
    valid = torch.tensor([[True, False], [False, True]])
    mask, after = chunk_mask(cache_valid, valid)
    assert torch.equal(after, torch.cat([cache_valid, valid], 1)) and mask.shape == (2, 1, 2, 5)
    for b in range(2):
        for i in range(2):
            for slot in range(5):
                me = 3 + i
                want = slot == me or (slot < me and bool(after[b, slot]))
                assert bool(mask[b, 0, i, slot]) == want, (b, i, slot)


def test_grid_and_regrid():
    index = torch.tensor([0, 5, 9])  # into a [2, 5] grid (length 6)
    rows, cols = grid(index, 6)
    assert rows.tolist() == [0, 1, 1] and cols.tolist() == [0, 0, 4]
    moved = regrid(index, 6, 9, 3)  # into [3 + 2, 8]
    assert (moved // 8).tolist() == [3, 4, 4] and (moved % 8).tolist() == [0, 0, 4]
    x = torch.arange(12.0).view(1, 4, 3)
    assert take(x, torch.tensor([[2, 0]])).tolist() == [[[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]]


def test_frame_inputs_name_what_is_wrong():
    frames = torch.zeros(2, 3, 3, 4, 4)
    vis = frame_inputs(frames, torch.tensor([[1, 1, 0], [1, 0, 0]]), None, 2)
    assert vis.pixels.shape[0] == 3 and vis.token_frame.tolist() == [[0, 1, 1], [2, 2, 2]] and vis.unique
    with pytest.raises(ValueError, match="real frames first"):
        frame_inputs(frames, torch.tensor([[0, 1, 0], [1, 0, 0]]), None, 2)
    with pytest.raises(ValueError, match="batch size 2 but input_ids have 3"):
        frame_inputs(frames, None, None, 3)
    with pytest.raises(ValueError, match="either frame_mask"):
        frame_inputs(frames.flatten(0, 1), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), 2)
    packed = frame_inputs(frames.flatten(0, 1), None, torch.tensor([[0, 1, -1], [2, -1, -1]]), 2)
    assert packed.valid.tolist() == [[True, True, False], [True, False, False]] and not packed.unique
