"""Validation on held-out shards, per forward mode: the token-weighted CE of the stage's target tokens,
token accuracy, and answer accuracy (a sample counts when every one of its target tokens is the
argmax under teacher forcing: for a one-word answer, "is the word right"), overall and per source;
the attention entropy of the static and the dynamic queries (nats, mean over visual tokens, DINO
blocks and heads; uniform attention over 1 + P keys gives ln(1 + P)); and for DPO the pair metrics
against the reference. Every rank scores its share; the results are merged across ranks.
"""

import math

import torch

from losses import DPO_METRICS, dpo_logps, dpo_terms
from distributed import all_gather_object

RECORD = ("nll", "tokens", "correct_tokens", "answer_ok", "static_h", "static_n", "dynamic_h", "dynamic_n")


def attention_entropy(attention: torch.Tensor, valid: torch.Tensor):
    """attention [B, T, blocks, heads, keys] -> (summed entropy [B], count [B]) over valid tokens,
    blocks and heads."""
    p = attention.float().clamp_min(1e-12)
    h = -(p * p.log()).sum(-1).mean((-1, -2))  # [B, T]
    v = valid.to(h.dtype)
    return (h * v).sum(1), v.sum(1)


def _text_inputs(batch, stage):
    """The CE inputs: the sample's text, or the chosen reply of a DPO pair."""
    prefix = "chosen_" if stage == "dpo" else ""
    return {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "loss_mask", "target_index")}


@torch.no_grad()
def _score_batch(model, batch, stage, mode, kv):
    """Per-sample records [len(RECORD), B] for one mode (kv: the batch's frames, encoded once)."""
    text = _text_inputs(batch, stage)
    ids, ti = text["input_ids"], text["target_index"]
    b, s = ids.shape
    out = model(frames=batch["frames"], frame_index=batch["frame_index"], mode=mode, return_attention=True, kv=kv,
                **text)
    labels = ids[:, 1:].reshape(-1).index_select(0, ti)  # the target tokens, in target_index order
    right = (out["logits"].argmax(-1) == labels).float()
    rows = ti // max(s - 1, 1)
    correct = torch.zeros(b, device=ids.device).index_add(0, rows, right)
    tokens = out["num_tokens"].float()
    zeros = torch.zeros(b, device=ids.device)
    entropy = {"static": (zeros, zeros), "dynamic": (zeros, zeros)}
    valid = batch["frame_index"] >= 0
    for kind, attn in out.get("attention", {}).items():
        if attn is not None:
            entropy[kind] = attention_entropy(attn, valid)
    return torch.stack([-out["logp_sum"].float(), tokens, correct, ((correct == tokens) & (tokens > 0)).float(),
                        *entropy["static"], *entropy["dynamic"]])


def validate(model, batches, *, stage: str, modes, to_device, autocast, max_samples: int, dist,
             dpo_mode: str = "coarse_fine", beta: float = 0.1, reference=None) -> dict:
    """Score up to max_samples samples (split over ranks) of `batches` (host batches; to_device moves
    one to the model's device and adds precomputed reference log-probs where used)."""
    was_training = model.training
    model.eval()
    limit = math.ceil(max_samples / dist.world_size)
    records = {m: [] for m in modes}
    pairs, sources, seen = [], [], 0
    with torch.no_grad(), autocast:
        for host in batches:
            if seen >= limit:
                break
            batch = to_device(host)
            kv = model.encoder.encode(batch["frames"]) if batch["frames"] is not None else None
            for m in modes:
                records[m].append(_score_batch(model, batch, stage, m, kv))
            if stage == "dpo":
                pol = dpo_logps(model, batch, dpo_mode)
                if reference is not None:
                    ref = dpo_logps(reference, batch, dpo_mode)
                    rc, rr = ref["chosen_logps"], ref["rejected_logps"]
                else:
                    rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
                losses, metrics = dpo_terms(pol["chosen_logps"], pol["rejected_logps"], rc, rr, beta)
                pairs.append(torch.stack([losses.float()] + [metrics[k].float() for k in DPO_METRICS]))
            sources += list(host["sources"])
            seen += len(host["sources"])
    model.train(was_training)
    local = {m: torch.cat(r, 1).cpu().tolist() if r else [[] for _ in RECORD] for m, r in records.items()}
    local_pairs = torch.cat(pairs, 1).cpu().tolist() if pairs else None
    merged = all_gather_object(dist, (local, local_pairs, sources))
    all_sources = [s for _, _, src in merged for s in src]
    result = {"samples": len(all_sources), "modes": {}}
    for m in modes:
        columns = [sum((part[0][m][i] for part in merged), []) for i in range(len(RECORD))]
        rows = list(zip(*columns))
        result["modes"][m] = {"all": _summarise(rows)}
        by_source = {}
        for src, row in zip(all_sources, rows):
            by_source.setdefault(src or "(no source)", []).append(row)
        result["modes"][m]["by_source"] = {k: _summarise(v) for k, v in sorted(by_source.items())}
    if stage == "dpo":
        cols = [sum((part[1][i] for part in merged if part[1] is not None), []) for i in range(1 + len(DPO_METRICS))]
        n = max(len(cols[0]), 1)
        result["dpo"] = {"loss": sum(cols[0]) / n, **{k: sum(c) / n for k, c in zip(DPO_METRICS, cols[1:])}}
    return result


def _summarise(rows) -> dict:
    total = [sum(col) for col in zip(*rows)] if rows else [0.0] * len(RECORD)
    r = dict(zip(RECORD, total))
    return {"samples": len(rows), "tokens": int(r["tokens"]),
            "loss": r["nll"] / r["tokens"] if r["tokens"] else float("nan"),
            "token_acc": r["correct_tokens"] / r["tokens"] if r["tokens"] else float("nan"),
            "answer_acc": r["answer_ok"] / len(rows) if rows else float("nan"),
            "static_entropy": r["static_h"] / r["static_n"] if r["static_n"] else float("nan"),
            "dynamic_entropy": r["dynamic_h"] / r["dynamic_n"] if r["dynamic_n"] else float("nan")}


def best_metric(result: dict, stage: str, modes) -> float:
    """The number a run keeps its best checkpoint by: DPO loss, or the CE of the first mode."""
    return result["dpo"]["loss"] if stage == "dpo" else result["modes"][modes[0]]["all"]["loss"]
