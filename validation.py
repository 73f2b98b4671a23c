"""Validation on held-out batches, per forward mode: each active objective scores every batch
(objectives.py: per-sample sums, e.g. the text CE, token and answer accuracy and attention entropy;
DPO's pair metrics against the reference), the sums are merged across ranks and summarised overall
and per source. Every batch is encoded once for all modes.

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
    scores = {m: {} for m in modes}  # mode -> (objective, score) -> per-sample values
    sources = []
    with autocast:
        for host in batches:
            if len(sources) >= limit:
                break
            batch = to_device(host)
            kv = model.encoder.encode(batch["frames"]) if batch["frames"] is not None else None
            for m in modes:
                for i, (objective, _) in enumerate(objectives):
                    for name, values in objective.val_scores(model, batch, m, kv).items():
                        scores[m].setdefault((i, name), []).append(values.float())
            sources += list(host["sources"])
    model.train(was_training)
    local = {m: {k: torch.cat(v).cpu().tolist() for k, v in s.items()} for m, s in scores.items()}
    parts = all_gather_object(dist, (local, sources)) if dist else [(local, sources)]
    all_sources = [s or "(no source)" for _, src in parts for s in src]
    merged = {m: {} for m in modes}
    for part, _ in parts:
        for m in modes:
            for key, values in part[m].items():
                merged[m].setdefault(key, []).extend(values)
    result = {"samples": len(all_sources), "modes": {}}
    groups = {"all": range(len(all_sources))}
    for src in sorted(set(all_sources)):
        groups[src] = [j for j, s in enumerate(all_sources) if s == src]
    for m in modes:
        result["modes"][m] = {"by_source": {}}
        for group, rows in groups.items():
            summary = {}
            for i, (objective, _) in enumerate(objectives):
                sums = {name: sum(values[j] for j in rows) for (k, name), values in merged[m].items() if k == i}
                if sums:
                    summary.update(objective.val_summary(sums, len(rows)))
            if group == "all":
                result["modes"][m]["all"] = summary
            else:
                result["modes"][m]["by_source"][group] = summary
    result["loss"] = sum(weight * next((result["modes"][m]["all"][o.val_loss] for m in modes
                                        if o.val_loss in result["modes"][m]["all"]), float("nan"))
                         for o, weight in objectives)
    return result
