"""Training objectives as units. Each says what it reads from a batch and gives, for a micro-batch, its
summed loss and the normaliser that turns the sum into a mean over the whole effective batch (target
tokens, pairs, ...), its metrics, its training FLOPs, and how validation scores it. The trainer,
validation, logging and the FLOP count only iterate over what the active objectives report.
Several objectives can be active in one step, each with a weight:
    loss = sum_k weight_k * (objective k summed over the effective batch) / (its normaliser over it)
so each term is a mean over the whole effective batch, whatever the micro-batch split and the number
of ranks (train.py knows every normaliser before the first forward of a step).

- TextCE (stages alignment and sft): the summed -log p of the target tokens; normaliser: targets.
- DPO (stage dpo): the sigmoid DPO loss of each pair, -log sigmoid(beta * ((pi_c - ref_c) -
  (pi_r - ref_r))) on summed answer-token log-probs; normaliser: pairs. Metrics carry TRL's names
  (rewards/chosen = beta * (pi_c - ref_c), ...). The reference is a frozen copy of the initial
  weights or their log-probs precomputed once (`dpo.reference`).
Adding an objective: a subclass here, its config keys (config.py), an entry in `build`, and tests.
"""

import copy
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("fvlm.objectives")

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
# what validation reports of a sample's text (text_scores -> text_summary)
TEXT_METRICS = ("samples", "tokens", "loss", "token_acc", "answer_acc", "static_entropy", "dynamic_entropy")


class Objective:
    name = ""
    batch_keys: tuple = ()  # what the device batch needs from the host batch
    metrics: tuple = ()  # per-step metrics: sums over the batch, averaged over the normaliser
    brief: tuple = ()  # the metrics shown on the step line
    val_metrics: tuple = ()  # what validation reports per mode and source (val.csv columns)
    val_brief: tuple = ()  # the validation metrics shown in the log line
    val_loss = ""  # the validation metric the best checkpoint is chosen by
    val_modes: tuple = ()  # modes it is scored in besides the eval modes

    def setup(self, model, run):
        """One-time preparation before training; `run` is train.Run (nothing by default)."""

    def prepare(self, host: dict) -> dict:
        """Host-side additions to a batch before it moves to the device (nothing by default)."""
        return host

    def normaliser(self, host: dict) -> int:
        """What the summed loss is divided by (summed over the effective batch), known on the host."""
        raise NotImplementedError

    def loss(self, model, batch: dict, mode: str):
        """(summed loss, {metric: summed value}) for one device batch."""
        raise NotImplementedError

    def flops(self, count, host: dict, mode: str) -> float:
        """Training FLOPs of this objective on a host batch (flops.FlopCount): backward ~ 2x forward."""
        raise NotImplementedError

    def val_scores(self, model, batch: dict, mode: str, kv) -> dict:
        """{score: per-sample sums [B]} of one batch in one mode (kv: its frames, encoded once)."""
        raise NotImplementedError

    def val_summary(self, sums: dict, samples: int) -> dict:
        """Summed scores over `samples` samples -> the reported metrics (those present)."""
        raise NotImplementedError


class TextCE(Objective):
    name = "text"
    batch_keys = ("frames", "frame_index", "input_ids", "attention_mask", "loss_mask", "target_index")
    val_metrics = TEXT_METRICS
    val_brief = ("loss", "answer_acc")
    val_loss = "loss"

    def normaliser(self, host):
        return host["target_index"].numel()

    def loss(self, model, batch, mode):
        out = model(frames=batch["frames"], frame_index=batch["frame_index"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"], mode=mode,
                    target_index=batch["target_index"])
        return -out["logp_sum"].sum(), {}

    def flops(self, count, host, mode):
        rows = count.rows(host["attention_mask"], host["frame_index"])
        return 3 * count.forward(rows, _frames(host), host["target_index"].numel(), mode)

    def val_scores(self, model, batch, mode, kv):
        return text_scores(model, batch, mode, kv)

    def val_summary(self, sums, samples):
        return text_summary(sums, samples)


class DPO(Objective):
    name = "dpo"
    batch_keys = ("frames", "frame_index") + tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in (
        "input_ids", "attention_mask", "loss_mask", "target_index"))
    metrics = DPO_METRICS
    brief = ("rewards/accuracies", "rewards/margins")
    val_metrics = TEXT_METRICS + ("dpo_loss",) + DPO_METRICS  # text metrics: of the chosen replies
    val_brief = ("dpo_loss", "rewards/accuracies", "loss", "answer_acc")
    val_loss = "dpo_loss"

    def __init__(self, beta: float, mode: str, reference: str = "model"):
        self.beta, self.mode, self.reference = beta, mode, reference
        self.val_modes = (mode,)  # the pairs are scored in the training mode (the reference's)
        self.reference_model = None
        self.table = None  # (source, key) -> (chosen, rejected) reference log-probs

    def setup(self, model, run):
        if self.reference == "model":  # the stage's initial weights, frozen
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
            if run.amp:
                self.reference_model.to(torch.bfloat16)
        else:
            self.table = precompute_reference(model, run, self.mode)
            self.batch_keys += ("ref_chosen_logps", "ref_rejected_logps")  # added by prepare()

    def prepare(self, host):
        if self.table is None:
            return host
        try:
            pairs = [self.table[(s, k)] for s, k in zip(host["sources"], host["keys"])]
        except KeyError as e:
            raise KeyError(f"no precomputed reference log-probs for sample {e}; delete the run's "
                           f"reference_logps.pt to recompute them") from e
        ref = torch.tensor(pairs, dtype=torch.float32)
        return dict(host, ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1])

    def normaliser(self, host):
        return host["chosen_input_ids"].shape[0]

    def _terms(self, model, batch, mode):
        policy = dpo_logps(model, batch, mode)
        if self.reference_model is not None:
            with torch.no_grad():
                ref = dpo_logps(self.reference_model, batch, mode)
            ref_c, ref_r = ref["chosen_logps"], ref["rejected_logps"]
        else:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        return dpo_terms(policy["chosen_logps"], policy["rejected_logps"], ref_c, ref_r, self.beta)

    def loss(self, model, batch, mode):
        losses, metrics = self._terms(model, batch, mode)
        return losses.sum(), {k: v.detach().sum() for k, v in metrics.items()}

    def flops(self, count, host, mode):
        chosen = count.rows(host["chosen_attention_mask"], host["frame_index"])
        rejected = count.rows(host["rejected_attention_mask"], host["frame_index"])
        targets = host["chosen_target_index"].numel() + host["rejected_target_index"].numel()
        forward = count.forward(chosen + rejected, _frames(host), targets, mode, coarse_rows=chosen)
        return 3 * forward + (forward if self.reference_model is not None else 0)

    def val_scores(self, model, batch, mode, kv):
        scores = text_scores(model, batch, mode, kv, side="chosen_")
        if mode == self.mode:  # the pairs in the training mode, against that mode's reference
            losses, metrics = self._terms(model, batch, mode)
            scores.update(dpo_loss=losses, **metrics)
        return scores

    def val_summary(self, sums, samples):
        out = text_summary(sums, samples)
        if "dpo_loss" in sums:
            out.update({k: sums[k] / max(samples, 1) for k in ("dpo_loss", *DPO_METRICS)})
        return out


def build(cfg) -> list[tuple[Objective, float]]:
    """The active objectives of a training config, with their weights."""
    if cfg.stage == "dpo":
        active = [(DPO(cfg.dpo.beta, cfg.mode, cfg.dpo.reference), 1.0)]
    else:
        active = [(TextCE(), 1.0)]
    for kind in ("metrics", "val_metrics"):  # the objectives share the logs' columns
        seen = {}
        for objective, _ in active:
            for name in getattr(objective, kind):
                if name in seen:
                    raise ValueError(f"objectives {seen[name]} and {objective.name} both report {name!r}")
                seen[name] = objective.name
    return active


def micro_batch_losses(model, batch: dict, objectives, mode: str):
    """[(summed loss, {metric: sum})] of each objective on one device batch: the function train.py
    compiles (objectives is a tuple of Objective)."""
    return [objective.loss(model, batch, mode) for objective in objectives]


# ---- text scores (validation) ------------------------------------------------------------------------

def attention_entropy(attention: torch.Tensor, valid: torch.Tensor):
    """attention [B, T, blocks, heads, keys] -> (summed entropy [B], count [B]) over valid tokens,
    blocks and heads (nats; uniform attention over K keys gives ln K)."""
    p = attention.float().clamp_min(1e-12)
    h = -(p * p.log()).sum(-1).mean((-1, -2))  # [B, T]
    v = valid.to(h.dtype)
    return (h * v).sum(1), v.sum(1)


def text_scores(model, batch, mode, kv, side: str = "") -> dict:
    """Per-sample sums [B] of a sample's text (a DPO pair's `side`) in one mode: nll, target tokens,
    correct tokens (argmax under teacher forcing), answer_ok (every target token right: for a
    one-word answer, "is the word right"), and the attention entropy of the static and dynamic
    queries."""
    ids = batch[side + "input_ids"]
    b = ids.shape[0]
    out = model(frames=batch["frames"], frame_index=batch["frame_index"], input_ids=ids,
                attention_mask=batch[side + "attention_mask"], loss_mask=batch[side + "loss_mask"],
                target_index=batch[side + "target_index"], mode=mode, return_attention=True, kv=kv)
    right = (out["logits"].argmax(-1) == out["target_labels"]).float()
    correct = right.new_zeros(b).index_add(0, out["target_rows"], right)
    tokens = out["num_tokens"].float()
    scores = dict(nll=-out["logp_sum"].float(), tokens=tokens, correct_tokens=correct,
                  answer_ok=((correct == tokens) & (tokens > 0)).float())
    valid = batch["frame_index"] >= 0
    for kind in ("static", "dynamic"):
        attn = out["attention"].get(kind)
        h, n = attention_entropy(attn, valid) if attn is not None else (tokens.new_zeros(b), tokens.new_zeros(b))
        scores[f"{kind}_h"], scores[f"{kind}_n"] = h, n
    return scores


def text_summary(sums: dict, samples: int) -> dict:
    ratio = lambda a, b: sums[a] / sums[b] if sums[b] else float("nan")  # noqa: E731
    return {"samples": samples, "tokens": int(sums["tokens"]), "loss": ratio("nll", "tokens"),
            "token_acc": ratio("correct_tokens", "tokens"),
            "answer_acc": sums["answer_ok"] / samples if samples else float("nan"),
            "static_entropy": ratio("static_h", "static_n"), "dynamic_entropy": ratio("dynamic_h", "dynamic_n")}


# ---- DPO -------------------------------------------------------------------------------------------

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


def dpo_logps(model, batch: dict, mode: str) -> dict:
    return model.dpo_logps(batch["frames"], batch["chosen_input_ids"], batch["chosen_attention_mask"],
                           batch["chosen_loss_mask"], batch["rejected_input_ids"], batch["rejected_attention_mask"],
                           batch["rejected_loss_mask"], frame_index=batch["frame_index"], mode=mode,
                           chosen_target_index=batch["chosen_target_index"],
                           rejected_target_index=batch["rejected_target_index"])


def precompute_reference(model, run, mode: str) -> dict:
    """{(source, key): (chosen logp, rejected logp)} of the stage's initial weights over every train and
    val pair (one exact pass, split over ranks), saved to RUN/reference_logps.pt; read back when it
    exists for the same init_from."""
    path = run.run_dir / "reference_logps.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored["init_from"] == run.cfg.init_from:
            return stored["logps"]
    table, duplicates = {}, []
    model.eval()
    with torch.no_grad(), run.autocast():
        for host in run.exact_batches():
            out = dpo_logps(model, run.to_device(host), mode)
            for src, key, c, r in zip(host["sources"], host["keys"], out["chosen_logps"].tolist(),
                                      out["rejected_logps"].tolist()):
                if (src, key) in table:
                    duplicates.append((src, key))
                table[(src, key)] = (c, r)
    model.train()
    merged = {}
    for part, dups in run.all_gather((table, duplicates)):
        duplicates += [k for k in part if k in merged] + dups
        merged.update(part)
    if duplicates:
        raise ValueError(f"dpo.reference: precomputed needs unique (source, key) per sample; "
                         f"{len(set(duplicates))} repeat, e.g. {sorted(set(duplicates))[:3]}; use reference: model")
    if run.dist.is_main:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"logps": merged, "init_from": run.cfg.init_from}, tmp)
        tmp.replace(path)
    run.barrier()
    log.info("reference log-probs of %d pairs precomputed -> %s", len(merged), path)
    return merged


def _frames(host) -> int:
    return 0 if host["frames"] is None else host["frames"].shape[0]

