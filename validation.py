"""Validation on held-out batches, per forward mode: each active objective scores every batch
(objectives.py: per-sample sums, e.g. the text CE, token and answer accuracy and attention entropy;
DPO's pair metrics against the reference), the sums are merged across ranks and summarised overall
and per source. Every batch is encoded once for all modes. An objective is scored in the eval modes
and in the modes it needs itself (`val_modes`: DPO's pairs in its training mode, where its
reference log-probs live).

The validation loss (the number the best checkpoint is chosen by) is the objectives' weighted sum of
their `val_loss`, each from the first mode it was scored in (so the first eval mode for the text CE;
the training mode for DPO).
"""

import math

import torch

from distributed import all_gather_object


@torch.no_grad()
def validate(model, batches, *, objectives, modes, to_device, autocast, max_samples: int, dist=None) -> dict:
    """Score up to max_samples samples (split over ranks) of `batches` (host batches; to_device
    prepares and moves one). Returns {"samples": n, "loss": the validation loss, "modes": {mode:
    {"all": metrics, "by_source": {source: metrics}}}}."""
    was_training = model.training
    model.eval()
    limit = math.ceil(max_samples / (dist.world_size if dist else 1))
    scored = {m: [i for i, (o, _) in enumerate(objectives) if m in modes or m in o.val_modes]
              for m in dict.fromkeys([*modes, *(m for o, _ in objectives for m in o.val_modes)])}
    scores = {m: {} for m in scored}  # mode -> (objective index, score) -> per-sample values
    sources = []
    with autocast:
        for host in batches:
            if len(sources) >= limit:
                break
            batch = to_device(host)
            kv = model.encode_frames(batch["frames"]) if batch["frames"] is not None else None
            for m, indices in scored.items():
                for i in indices:
                    for name, values in objectives[i][0].val_scores(model, batch, m, kv).items():
                        scores[m].setdefault((i, name), []).append(values.float())
            sources += list(host["sources"])
    model.train(was_training)
    local = {m: {k: torch.cat(v).cpu().tolist() for k, v in s.items()} for m, s in scores.items()}
    parts = all_gather_object(dist, (local, sources)) if dist else [(local, sources)]
    all_sources = [s or "(no source)" for _, src in parts for s in src]
    merged = {m: {} for m in scored}
    for part, _ in parts:
        for m in scored:
            for key, values in part[m].items():
                merged[m].setdefault(key, []).extend(values)
    by_source = {}
    for j, src in enumerate(all_sources):
        by_source.setdefault(src, []).append(j)

    def summary(m, rows) -> dict:
        out = {}
        for i in scored[m]:
            sums = {name: sum(values[j] for j in rows) for (k, name), values in merged[m].items() if k == i}
            if sums:
                out.update(objectives[i][0].val_summary(sums, len(rows)))
        return out

    result = {"samples": len(all_sources), "modes": {
        m: {"all": summary(m, range(len(all_sources))),
            "by_source": {src: summary(m, rows) for src, rows in sorted(by_source.items())}} for m in scored}}
    result["loss"] = sum(weight * next((result["modes"][m]["all"][o.val_loss] for m in scored
                                        if o.val_loss in result["modes"][m]["all"]), float("nan"))
                         for o, weight in objectives)
    return result
