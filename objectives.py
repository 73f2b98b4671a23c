"""Training objectives as units. Each says what it reads from a batch and gives, for a micro-batch, its
summed loss and the normaliser that turns the sum into a mean over the whole effective batch (target
tokens, pairs, ...), its metrics, its training FLOPs, and how validation scores it. The trainer,
validation, logging and the FLOP count only iterate over what the active objectives report.
Several objectives can be active in one step, each with a weight:
    loss = sum_k weight_k * (objective k summed over the effective batch) / (its normaliser over it)
so each term is a mean over the whole effective batch, whatever the micro-batch split and the number
of ranks (train.py knows every normaliser before the first forward of a step).

- TextCE (stages alignment and sft): the summed -log p of the target tokens; normaliser: targets.
  With coarse_weight > 0 (coarse_fine / autoregressive), + coarse_weight x the same CE of the
  coarse-only pass (one backbone encode for both), so the static path is trained as a baseline.
- NextFrame (stage next_frame, the proof of concept): from the LLM state at each frame (no text), the
  head predicts the next frame's target (VAE latent or downsampled pixels); the squared error per
  element, of the fine pass + coarse_weight x of the coarse pass; normaliser: (frame, next frame) pairs.
  With `residual` the head predicts the change from frame t (prediction = target_t + head(state)).
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
    derived: tuple = ()  # per-step columns computed from the metrics' means (derive)

    def derive(self, means: dict) -> dict:
        """The `derived` columns from the step window's metric means."""
        return {}

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

    def __init__(self, coarse_weight: float = 0.0, mode: str = "coarse_fine"):
        # the coarse pass is a second loss only where the training mode has a fine one
        self.coarse_weight = coarse_weight if mode != "coarse_only" else 0.0
        if self.coarse_weight:
            self.metrics, self.brief, self.derived = ("loss_fine", "loss_coarse"), ("loss_coarse",), COARSE_FINE
            self.derive = coarse_fine_gain

    def normaliser(self, host):
        return host["target_index"].numel()

    def loss(self, model, batch, mode):
        frames = batch["frames"]
        kv = model.encode_frames(frames) if self.coarse_weight and frames is not None else None
        fine = -self._logps(model, batch, mode, kv)
        if not self.coarse_weight:
            return fine, {}
        # a text-only batch has no coarse pass of its own: both passes are the same one
        coarse = -self._logps(model, batch, "coarse_only", kv) if kv is not None else fine
        return fine + self.coarse_weight * coarse, {"loss_fine": fine.detach(), "loss_coarse": coarse.detach()}

    @staticmethod
    def _logps(model, batch, mode, kv):
        return model(frames=batch["frames"], frame_index=batch["frame_index"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"], mode=mode,
                     target_index=batch["target_index"], kv=kv)["logp_sum"].sum()

    def flops(self, count, host, mode):
        rows = count.rows(host["attention_mask"], host["frame_index"])
        total = count.forward(rows, _frames(host), host["target_index"].numel(), mode)
        if self.coarse_weight:  # the coarse-only forward beside it (the backbone encode shared)
            total += count.forward(rows, 0, host["target_index"].numel(), "coarse_only") + _frames(host) * count.query
        return 3 * total

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


COARSE_FINE = ("ratio", "improvement")


def coarse_fine_gain(means: dict) -> dict:
    """ratio = loss_coarse / loss_fine (> 1: looking helps) and improvement = (coarse - fine) / coarse
    (the guide's success measure: 5-15 % solid, > 15 % strong)."""
    fine, coarse = means.get("loss_fine"), means.get("loss_coarse")
    if fine is None or coarse is None:
        return {}
    return {"ratio": coarse / fine if fine else float("nan"),
            "improvement": (coarse - fine) / coarse if coarse else float("nan")}


class NextFrame(Objective):
    """See the module docstring. Besides the two losses it reports, per (frame, next frame) pair, two
    reference losses that make them interpretable: `copy_loss` (predict frame t + 1 as frame t) and
    `mean_loss` (predict the batch's mean target), and the attention entropy of the static and the
    dynamic queries of the frames that are predicted from. entropy_weight > 0 adds that many times the
    dynamic queries' entropy to the loss (sharper attention; guide section 12)."""
    name = "next_frame"
    val_metrics = ("samples", "pairs", "loss", "loss_fine", "loss_coarse", "ratio", "improvement", "copy_loss",
                   "mean_loss", "static_entropy", "dynamic_entropy")
    val_brief = ("loss_fine", "loss_coarse", "improvement", "copy_loss")
    val_loss = "loss"

    def __init__(self, target: str, pixels_size: int, coarse_weight: float, entropy_weight: float, mode: str,
                 residual: bool = False):
        self.target, self.pixels_size, self.residual = target, pixels_size, residual
        self.coarse_weight, self.entropy_weight = coarse_weight, entropy_weight
        self.fine = mode != "coarse_only"
        self.batch_keys = ("frames", "frame_index") + (("latents",) if target != "pixels" else ())
        self.metrics = tuple(m for m in ("loss_fine", "loss_coarse", "copy_loss", "mean_loss", "static_entropy",
                                         "dynamic_entropy") if self.fine or m not in ("loss_fine", "dynamic_entropy"))
        self.brief = ("loss_fine", "loss_coarse") if self.fine else ("loss_coarse", "copy_loss")
        self.derived = COARSE_FINE if self.fine else ()
        self.shape = None

    derive = staticmethod(coarse_fine_gain)

    def setup(self, model, run):
        if model.next_frame is None:
            raise ValueError("stage next_frame needs the model's prediction head (model.next_frame)")
        self.shape = tuple(model.next_frame.shape)
        if not model.visual.queries:  # the pooled baseline (the positive control): one pass, no attention
            if self.fine:
                raise ValueError("stage next_frame with the pooled baseline (model.tokens_per_frame) trains in "
                                 "mode coarse_only: it has one pass and no queries")
            self.metrics = tuple(m for m in self.metrics if not m.endswith("_entropy"))

    def prepare(self, host):
        """Before the first forward: precomputed latents must fit the head."""
        if self.target != "pixels" and self.shape is not None and host.get("latents") is not None:
            got = tuple(host["latents"].shape[1:])
            if got != self.shape:
                raise ValueError(f"next_frame: the data's latents are {list(got)} per frame but the head "
                                 f"(model.next_frame) predicts {list(self.shape)}")
        return host

    def normaliser(self, host):
        return int(((host["frame_index"] >= 0).sum(1) - 1).clamp(min=0).sum())

    def _targets(self, batch) -> torch.Tensor:
        """[B, T, C, H, W]: each visual token's target (padding: frame 0's, never scored)."""
        if self.target == "pixels":
            from latents import pixel_target

            per_frame = pixel_target(batch["frames"], self.pixels_size)
        else:
            per_frame = batch["latents"].float()
        return per_frame[batch["frame_index"].clamp(min=0)]

    def predict(self, model, states: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The prediction of the next frame's target from the states at frames whose targets are
        `current` (residual: the head gives the change from them)."""
        out = model.next_frame(states).float()
        return current.float() + out if self.residual else out

    def _errors(self, model, batch, mode, kv=None, attention=False) -> dict:
        """Per pair [B, T - 1] (0 where frame t or t + 1 is padding): the mean squared error of the fine
        and coarse predictions and of the references; `pair`: the mask; entropies per predicting token."""
        st = model.frame_states(batch["frames"], batch["frame_index"], mode=mode, return_attention=attention, kv=kv)
        target = self._targets(batch)
        valid = st["valid"]
        pair = (valid[:, :-1] & valid[:, 1:]).float()
        nxt = target[:, 1:]
        error = lambda pred: ((pred.float() - nxt) ** 2).mean((-3, -2, -1)) * pair  # noqa: E731
        w = valid.float()[..., None, None, None]
        mean = (target * w).sum((0, 1)) / w.sum().clamp(min=1)  # the batch's mean target
        out = {"pair": pair, "coarse": error(self.predict(model, st["coarse"][:, :-1], target[:, :-1])),
               "copy": error(target[:, :-1]), "mean": error(mean.expand_as(nxt))}
        if st["fine"] is not None:
            out["fine"] = error(self.predict(model, st["fine"][:, :-1], target[:, :-1]))
        for kind, attn in st["attention"].items():
            if attn is not None:  # the tokens whose state predicts a next frame
                out[f"{kind}_entropy"] = attention_entropy(attn[:, :-1], pair.bool())[0]
        return out

    def _loss(self, e):
        return e["fine"] + self.coarse_weight * e["coarse"] if "fine" in e else e["coarse"]

    def loss(self, model, batch, mode):
        e = self._errors(model, batch, mode, attention=True)
        loss = self._loss(e).sum()
        if self.entropy_weight and "dynamic_entropy" in e:
            loss = loss + self.entropy_weight * e["dynamic_entropy"].sum()
        metrics = {"loss_fine": e.get("fine"), "loss_coarse": e["coarse"], "copy_loss": e["copy"],
                   "mean_loss": e["mean"], "static_entropy": e.get("static_entropy"),
                   "dynamic_entropy": e.get("dynamic_entropy")}
        return loss, {k: metrics[k].detach().sum() for k in self.metrics}

    def flops(self, count, host, mode):
        from flops import Row

        visual = (host["frame_index"] >= 0).sum(1).tolist()
        rows, frames = [Row(0, v * count.per_frame) for v in visual], _frames(host)
        total = count.forward(rows, frames, 0, mode)
        if mode == "autoregressive":  # the coarse pass beside it, for loss_coarse
            total += frames * count.query + sum(visual) * count.project + count.llm(sum(visual),
                                                                                     sum(v * v for v in visual))
        return 3 * (total + self.normaliser(host) * (2 if self.fine else 1) * count.next_frame)

    def val_scores(self, model, batch, mode, kv):
        e = self._errors(model, batch, mode, kv=kv, attention=True)
        scores = {"pairs": e["pair"].sum(1), "loss": self._loss(e).sum(1), "coarse": e["coarse"].sum(1),
                  "copy": e["copy"].sum(1), "mean": e["mean"].sum(1)}
        for key in ("fine", "static_entropy", "dynamic_entropy"):
            if key in e:
                scores[key] = e[key].sum(1) if key == "fine" else e[key]
        return scores

    def val_summary(self, sums, samples):
        pairs = sums["pairs"]
        mean = lambda k: sums[k] / pairs if pairs else float("nan")  # noqa: E731
        out = {"samples": samples, "pairs": int(pairs), "loss": mean("loss"), "loss_coarse": mean("coarse"),
               "copy_loss": mean("copy"), "mean_loss": mean("mean")}
        if "static_entropy" in sums:  # the pooled baseline has no queries
            out["static_entropy"] = mean("static_entropy")
        if "fine" in sums:
            out.update(loss_fine=mean("fine"), dynamic_entropy=mean("dynamic_entropy"))
            out.update(coarse_fine_gain(out))
        return out


def build(cfg) -> list[tuple[Objective, float]]:
    """The active objectives of a training config, with their weights."""
    if cfg.stage == "dpo":
        active = [(DPO(cfg.dpo.beta, cfg.mode, cfg.dpo.reference), 1.0)]
    elif cfg.stage == "next_frame":
        n = cfg.next_frame
        active = [(NextFrame(n.target, n.pixels_size, cfg.coarse_weight, n.entropy_weight, cfg.mode,
                              n.residual), 1.0)]
    else:
        active = [(TextCE(cfg.coarse_weight, cfg.mode), 1.0)]
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

