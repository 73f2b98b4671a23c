"""The next-token loss: log p of each target token (`token_logps`, the one cross-entropy of the project:
training, validation, DPO and the published dense path use it) and the loss of a batch from the hidden
states that predict its text (`next_token_loss`, the cells of layout.py's next-token grid)."""

import torch
import torch.nn.functional as F

from collate import IGNORE_INDEX
from layout import grid


def token_logps(logits, labels):
    """log p(label) of each row of logits [K, V] (computed in fp32); 0 where label == -100."""
    return -F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def next_token_loss(lm_head, h_pred, input_ids, attention_mask, loss_mask, target_index=None) -> dict:
    """Next-token log-probs of the loss targets, from the hidden states h_pred [B, S, D] that predict
    them (through lm_head).

    With target_index (flat indices into the [B, S - 1] grid of next-token cells, cell
    (b, j - 1) = text token j of row b; see collate.target_index), logits are computed at those
    cells only ([K, V], the training path). Without it, logits are computed everywhere ([B, S, V],
    the published contract) and the cells outside the masks are ignored."""
    b, s = input_ids.shape
    labels = input_ids[:, 1:]  # the label of cell (b, j - 1) is text token j
    if target_index is None:
        logits = lm_head(h_pred)
        mask = attention_mask.bool() if loss_mask is None else loss_mask.bool() & attention_mask.bool()
        cell_logits = logits[:, :-1].flatten(0, 1)
        cell_labels = labels.masked_fill(~mask[:, 1:], IGNORE_INDEX).flatten()
        rows = torch.arange(b, device=input_ids.device).repeat_interleave(s - 1)
    else:
        rows, cols = grid(target_index, s)
        cell_logits = logits = lm_head(h_pred[rows, cols])
        cell_labels = labels[rows, cols]
    logp = token_logps(cell_logits, cell_labels)
    counted = (cell_labels != IGNORE_INDEX).long()
    logp_sum = logp.new_zeros(b).index_add(0, rows, logp)
    num_tokens = counted.new_zeros(b).index_add(0, rows, counted)
    return dict(logits=logits, loss=-logp_sum.sum() / num_tokens.sum().clamp(min=1), logp_sum=logp_sum,
                num_tokens=num_tokens, target_labels=cell_labels, target_rows=rows)
