"""Training objectives per stage, as sums over a micro-batch so that gradient accumulation (and
data-parallel ranks) can divide by the size of the whole effective batch.

- alignment / sft: the summed -log p of the target tokens; divided by the number of target tokens
  of the effective batch this is its token-weighted mean CE, whatever the micro-batch split.
- dpo: the sigmoid DPO loss of each pair, -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on
  summed answer-token log-probs, summed over pairs; divided by the pairs of the effective batch.
  Metrics carry TRL's names (rewards/chosen = beta * (pi_c - ref_c), ...).
"""

import torch
import torch.nn.functional as F

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss [B] and per-pair metrics {name: [B]}."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen - rejected)
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected,
               "rewards/accuracies": (chosen > rejected).to(chosen.dtype),  # ties count 0, as TRL
               "rewards/margins": chosen - rejected, "logps/chosen": policy_chosen,
               "logps/rejected": policy_rejected}
    return losses, metrics


def micro_batch_loss(model, batch: dict, stage: str, mode: str, beta: float = 0.1, reference=None):
    """(summed loss, {metric: summed value}) for one device batch.

    DPO takes the reference log-probs from `reference` (a frozen model) or, when it is None, from
    the batch (`ref_chosen_logps` / `ref_rejected_logps`, precomputed). This is the function that
    torch.compile compiles in training.
    """
    if stage != "dpo":
        out = model(frames=batch["frames"], frame_index=batch["frame_index"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"], mode=mode,
                    target_index=batch["target_index"])
        return -out["logp_sum"].sum(), {}
    policy = dpo_logps(model, batch, mode)
    if reference is not None:
        with torch.no_grad():
            ref = dpo_logps(reference, batch, mode)
        ref_c, ref_r = ref["chosen_logps"], ref["rejected_logps"]
    else:
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    losses, metrics = dpo_terms(policy["chosen_logps"], policy["rejected_logps"], ref_c, ref_r, beta)
    return losses.sum(), {k: v.detach().sum() for k, v in metrics.items()}


def dpo_logps(model, batch: dict, mode: str) -> dict:
    return model.dpo_logps(batch["frames"], batch["chosen_input_ids"], batch["chosen_attention_mask"],
                           batch["chosen_loss_mask"], batch["rejected_input_ids"], batch["rejected_attention_mask"],
                           batch["rejected_loss_mask"], frame_index=batch["frame_index"], mode=mode,
                           chosen_target_index=batch["chosen_target_index"],
                           rejected_target_index=batch["rejected_target_index"])


def weight(batch: dict, stage: str) -> int:
    """What the summed loss is divided by, known on the host: target tokens (CE) or pairs (DPO)."""
    if stage == "dpo":
        return batch["chosen_input_ids"].shape[0]
    return batch["target_index"].numel()
