"""The controlled study's report (scripts/ablate.py runs the grid, this reads it): accuracies with 95 %
intervals over questions and seeds, paired comparisons, the verdict (on the tasks the probe check
verified: those the full-grid baseline learned), the table and the figures.

Every run is scored on the same held-out probe questions, so a variant's verdicts form a [seeds,
questions] matrix (intervals.py). Questions are grouped by task family (content-findable, question-
dependent, history-dependent: make_synthetic.FAMILIES), by task, and by difficulty: "few" (at most
FEW other objects in the clip) or "many". Paired comparisons (the seeds both ran, the same questions): the
question-conditioned query against the static glance (prompt_first vs static), and every foveated
variant against the 1-token and the 16-token pooled baselines.

Writes table.md, accuracy_vs_tokens.png (a panel per family), accuracy_vs_difficulty.png (a panel per
family, accuracy against the number of other objects) and attention_TASK.png (one question-dependent
clip, and one history-dependent clip: where the static glance, the video-first dynamic query and the
question-conditioned query looked).
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import intervals  # noqa: E402
import looked  # noqa: E402
import make_synthetic  # noqa: E402
from shards import expand, read_samples  # noqa: E402

FAMILY_NAMES = {"content": "content-findable", "question": "question-dependent", "history": "history-dependent"}
FEW = 3  # other objects in a clip: at most FEW is "few", more is "many"
DIFFICULTY_VARIANTS = ("static", "coarse_fine", "prompt_first", "autoregressive", "pooled_1", "pooled_16", "pooled_64")
# the clips drawn for attention: the first of each of these tasks, as each run's looked.json stores them
DRAWN_TASKS = ("qcolour", "qshape", "mcolour")
# the probe check: what the full-grid baseline must reach on held-out clips (mean over seeds) before a
# comparison on that task means anything; a task below its bar is reported but gets no verdict
PROBE_BAR = {"colour": 0.9, "shape": 0.9, "motion": 0.8, "qcolour": 0.8, "qshape": 0.8, "mcolour": 0.8}
COMPARED_QUERIES = {"static": "static glance\n(static)", "coarse_fine": "dynamic query,\nvideo first\n(coarse_fine)",
                    "prompt_first": "question-\nconditioned\n(prompt_first)"}  # row labels: short lines


def probe_check(results: dict) -> dict:
    """The full-grid baseline (the largest pooled_N run) against PROBE_BAR, task by task: "passed" when
    every task reaches its bar, "partial" when some do (the verdict then covers those, the "verified"
    tasks, only), "failed" when none does."""
    pooled = [n for n in results if n.startswith("pooled_")]
    if not pooled:
        return {"status": "not run", "why": "no pooled_N variant in this grid", "verified": []}
    name = max(pooled, key=lambda n: results[n]["tokens_per_frame"])
    means = results[name]["mean_std"]
    tasks = {t: {"accuracy": means[t][0], "bar": bar, "ok": means[t][0] >= bar} for t, bar in PROBE_BAR.items()
             if t in means}
    verified = [t for t, v in tasks.items() if v["ok"]]
    status = "failed" if not verified else "passed" if len(verified) == len(tasks) else "partial"
    return {"status": status, "variant": name, "tasks": tasks, "verified": verified}


def check_line(check: dict) -> str:
    if check["status"] == "not run":
        return f"probe check: not run ({check['why']}): no verdict about looking"
    parts = ", ".join(f"{t} {100 * v['accuracy']:.1f} {'>=' if v['ok'] else '<'} {100 * v['bar']:.0f}"
                      for t, v in check["tasks"].items())
    line = f"probe check: {check['status']} ({check['variant']}: {parts})"
    if check["status"] == "partial":
        return line + f": verdicts on the verified tasks only ({', '.join(check['verified'])})"
    return line if check["status"] == "passed" else line + ": no verdict about looking"


def eval_meta(data: Path) -> dict:
    """uid -> {"task", "family", "others"} for every question of the probe's eval split."""
    meta = {}
    for path in expand(data / "eval"):
        for key, files in read_samples(path):
            m = json.loads(files["json"])["meta"]
            meta[key] = {"task": m["task"], "family": make_synthetic.FAMILIES[m["task"]],
                         "others": len(m["distractors"])}
    return meta


def verdicts(run_dir: Path, mode: str) -> dict:
    """uid -> correct, from a run's probe.json (benchmark.py's records)."""
    records = json.loads((run_dir / "probe.json").read_text())["results"]["synthetic"][mode]["raw"]
    return {r["uid"]: r["correct"] for r in records}


def matrices(args, grid: dict, seeds: dict) -> tuple[dict, list[str]]:
    """({variant: [its seeds, questions] bool}, the question uids): the questions every run was scored on
    (all of them, unless --limit scored a prefix)."""
    scored = {name: [verdicts(args.out / "runs" / name / f"seed{s}", mode) for s in seeds[name]]
              for name, (_, mode) in grid.items()}
    uids = sorted(set.intersection(*(set(v) for runs in scored.values() for v in runs)))
    return {name: np.array([[v[u] for u in uids] for v in runs], dtype=bool) for name, runs in scored.items()}, uids


def groups(meta: dict, uids: list[str]) -> dict:
    """Question indices per group: "all", each family, each task, and "FAMILY/few" and "FAMILY/many"."""
    out = {"all": np.arange(len(uids))}
    for key, value in (("family", lambda m: m["family"]), ("task", lambda m: m["task"]),
                       ("level", lambda m: f"{m['family']}/{'few' if m['others'] <= FEW else 'many'}")):
        for name in sorted({value(meta[u]) for u in uids}):
            out[name] = np.array([i for i, u in enumerate(uids) if value(meta[u]) == name])
    return out


def pairs(names) -> list[tuple[str, str]]:
    """The paired comparisons the grid allows: (prompt_first, static), then every foveated variant
    against pooled_1 and pooled_16."""
    out = [("prompt_first", "static")] if {"prompt_first", "static"} <= set(names) else []
    foveated = [n for n in names if not n.startswith("pooled_")]
    return out + [(f, p) for p in ("pooled_1", "pooled_16") if p in names for f in foveated]


def analyse(matrices: dict, meta: dict, uids: list[str], verified, seeds: dict | None = None) -> dict:
    """Intervals per variant and group (every question), and, on the questions of the verified tasks
    only (the probe check's), intervals per family ("checked") and the paired comparisons per family and
    overall: what the verdict reads. seeds: {variant: the seed of each matrix row} (default 0, 1, ...);
    a comparison pairs the rows of the seeds both variants have, and is left out when they share none."""
    seeds = seeds or {name: list(range(len(m))) for name, m in matrices.items()}
    index = groups(meta, uids)
    cis = {name: {g: intervals.interval(m[:, idx]) for g, idx in index.items()} for name, m in matrices.items()}
    kept = np.array([meta[u]["task"] in set(verified) for u in uids])
    checked_index = {g: idx[kept[idx]] for g, idx in index.items()
                     if (g == "all" or g in FAMILY_NAMES) and kept[idx].any()}
    checked = {name: {g: intervals.interval(m[:, idx]) for g, idx in checked_index.items()}
               for name, m in matrices.items()}
    comparisons = []
    for a, b in pairs(list(matrices)):
        common = sorted(set(seeds[a]) & set(seeds[b]))  # paired by seed: the seeds both have
        rows_a, rows_b = ([seeds[n].index(s) for s in common] for n in (a, b))
        for g, idx in checked_index.items() if common else ():
            comparisons.append({"a": a, "b": b, "group": g, "seeds": common,
                                **intervals.paired(matrices[a][np.ix_(rows_a, idx)], matrices[b][np.ix_(rows_b, idx)])})
    return {"intervals": cis, "checked": checked, "verified": list(verified), "comparisons": comparisons}


def ci_text(ci: dict) -> str:
    return f"{100 * ci['mean']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def diff_text(c: dict) -> str:
    verdict = "separates" if c["separates"] else "does not separate"
    return f"{100 * c['difference']:+.1f} points [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}], {verdict}"


def verdict(check: dict, analysis: dict) -> list[str]:
    """The answer, family by family on the verified tasks: the best variant and the paired comparisons.
    Refused (one line saying why) when the probe check verified no task."""
    if check["status"] == "not run":
        return [f"No verdict about looking: the probe check was not run ({check['why']}: add the full-grid "
                "baseline), so no difference between variants can be read."]
    if check["status"] not in ("passed", "partial"):
        return ["No verdict about looking: the probe check did not pass (the full-grid baseline did not learn "
                "the probe), so no difference between variants can be read."]
    cis, lines = analysis["checked"], []
    for family, label in FAMILY_NAMES.items():
        ranked = sorted((v for v in cis if family in cis[v]), key=lambda v: -cis[v][family]["mean"])
        if not ranked:
            if any(family in c for c in analysis["intervals"].values()):  # asked, but not verified
                lines.append(f"{label}: no verdict (none of its tasks passed the probe check)")
            continue
        tasks = [t for t in analysis["verified"] if make_synthetic.FAMILIES[t] == family]
        compared = [f"{c['a']} vs {c['b']} {diff_text(c)}" for c in analysis["comparisons"] if c["group"] == family]
        lines.append(f"{label} ({', '.join(tasks)}): best {ranked[0]} {ci_text(cis[ranked[0]][family])}"
                     + "".join(f"; {c}" for c in compared))
    return lines


def seed_text(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def table(results: dict, analysis: dict, args, tasks) -> str:
    cis = analysis["intervals"]
    families = [f for f in FAMILY_NAMES if any(f in c for c in cis.values())]
    head = ("| variant | seeds | tokens / clip | " + " | ".join(FAMILY_NAMES[f] for f in families) + " | overall | "
            + " | ".join(tasks) + " | train GFLOP / sample | train min | looked: static | looked: dynamic | chance |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        a, look = r["mean_std"], r["mean_std"].get("looked", {})
        cell = lambda k: f"{100 * look[k][0]:.1f}" if k in look else "–"  # noqa: E731
        lines.append(f"| {name} | {seed_text(r['seeds'])} | {r['tokens_per_clip']} | "
                     + " | ".join(ci_text(cis[name][f]) for f in families) + f" | **{ci_text(cis[name]['all'])}** | "
                     + " | ".join(f"{100 * a[t][0]:.1f} ± {100 * a[t][1]:.1f}" if t in a else "–" for t in tasks)
                     + f" | {a['train_flops_per_sample'][0] / 1e9:.2f} | {a['train_seconds'][0] / 60:.1f} | "
                     f"{cell('static')} | {cell('dynamic')} | {cell('chance')} |")
    chance = ", ".join(f"{t} {100 / len(make_synthetic.vocabulary(t)):.1f}" for t in tasks)
    notes = (f"\nAnswer accuracy (%) of the generated reply on the held-out probe questions. Families: mean and "
             f"95 % interval (bootstrap over questions and the variant's seeds); tasks: mean ± std over its "
             f"seeds. Chance: {chance}. {args.steps} steps each. looked: the share (%) of the query's last-block "
             f"attention on the target's patches (mean over heads and clips), and the share its area gets by chance.\n")
    head = "| comparison (paired: the seeds both ran, same questions of the verified tasks) | seeds | " + " | ".join(
        ["overall"] + [FAMILY_NAMES[f] for f in families]) + " |"
    by_pair = {}  # (a, b) -> {group: comparison}, in pairs() order; a pair sharing no seed has none
    for c in analysis["comparisons"]:
        by_pair.setdefault((c["a"], c["b"]), {})[c["group"]] = c
    comparisons = ["", head, "|---|" + "---|" * (len(families) + 2)] if by_pair else []
    for (a, b), cells in by_pair.items():
        row = [diff_text(cells[g]) if g in cells else "–" for g in ["all", *families]]
        comparisons.append(f"| {a} − {b} | {seed_text(cells['all']['seeds'])} | " + " | ".join(row) + " |")
    apart = [f"{a} − {b}" for a, b in pairs(list(results)) if (a, b) not in by_pair and analysis["verified"]]
    if apart:
        comparisons.append(f"\nNot compared (no seed in common): {', '.join(apart)}.")
    levels = ["", "| variant | " + " | ".join(f"{FAMILY_NAMES[f]}: {lv}" for f in families for lv in ("few", "many"))
              + " |", "|---|" + "---|" * (2 * len(families))]
    for name in results:
        levels.append(f"| {name} | " + " | ".join(ci_text(cis[name][f"{f}/{lv}"]) if f"{f}/{lv}" in cis[name] else "–"
                                               for f in families for lv in ("few", "many")) + " |")
    level_note = f"\nfew: at most {FEW} other objects in the clip; many: more.\n"
    return "\n".join(lines) + notes + "\n".join(comparisons) + "\n" + "\n".join(levels) + level_note


def looked_table(results: dict, tasks) -> str:
    """Where each variant with queries looked, per task: the target's share (%) of the static and the
    dynamic query's attention, against the share its area gets by chance."""
    rows = [(n, r["mean_std"]) for n, r in results.items() if "looked" in r["mean_std"]]
    if not rows:
        return ""
    lines = ["| where it looked: static / dynamic query (chance) | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for name, a in rows:
        cells = []
        for t in tasks:
            look = a.get(f"looked_{t}", {})
            share = lambda k: f"{100 * look[k][0]:.1f}" if k in look else "–"  # noqa: E731
            cells.append(f"{share('static')} / {share('dynamic')} ({share('chance')})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines) + "\n"


def plot_tokens(results: dict, analysis: dict, path: Path):
    """Accuracy against visual tokens per frame, one panel per family, 95 % intervals drawn."""
    cis = analysis["intervals"]
    families = [f for f in FAMILY_NAMES if any(f in c for c in cis.values())]
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4.0), layout="constrained",
                             squeeze=False)
    for ax, family in zip(axes[0], families):
        pooled = sorted((r["tokens_per_frame"], cis[n][family]) for n, r in results.items() if n.startswith("pooled_"))
        if pooled:
            x = [p[0] for p in pooled]
            y = np.array([[c["mean"], c["mean"] - c["low"], c["high"] - c["mean"]] for _, c in pooled]) * 100
            ax.errorbar(x, y[:, 0], y[:, 1:].T, marker="o", capsize=3, label="frames as images (pooled N)")
        foveated = [n for n in results if not n.startswith("pooled_")]
        for i, (name, marker) in enumerate(zip(foveated, "s^Dv<>p")):
            c = cis[name][family]
            ax.errorbar([1.1 ** (i - (len(foveated) - 1) / 2)], [100 * c["mean"]],
                        [[100 * (c["mean"] - c["low"])], [100 * (c["high"] - c["mean"])]], marker=marker, capsize=3,
                        ls="none", label=f"foveated: {name}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 100)  # from 0: a few points must not look like a gap
        ax.set_title(FAMILY_NAMES[family])
        ax.set_xlabel("visual tokens per frame")
    axes[0][0].set_ylabel("probe answer accuracy (%), 95 % interval")
    axes[0][-1].legend(fontsize=7, loc="best")  # where it covers the fewest points
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_difficulty(matrices: dict, meta: dict, uids: list[str], path: Path):
    """Accuracy (mean over seeds) against the number of other objects in the clip, per family."""
    others = np.array([meta[u]["others"] for u in uids])
    family = np.array([meta[u]["family"] for u in uids])
    families = [f for f in FAMILY_NAMES if f in set(family)]
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4.0), layout="constrained",
                             squeeze=False)
    for ax, fam in zip(axes[0], families):
        counts = sorted(set(others[family == fam]))
        for name in (v for v in DIFFICULTY_VARIANTS if v in matrices):
            acc = [100 * matrices[name][:, (family == fam) & (others == k)].mean() for k in counts]
            ax.plot(counts, acc, marker="o", label=name)
        ax.set_ylim(0, 100)
        ax.set_xticks(counts)
        ax.set_title(FAMILY_NAMES[fam])
        ax.set_xlabel("other objects in the clip")
    axes[0][0].set_ylabel("probe answer accuracy (%), mean over seeds")
    if axes[0][-1].get_legend_handles_labels()[0]:  # no line when none of DIFFICULTY_VARIANTS ran
        axes[0][-1].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_attention(args, data: Path, seeds: dict) -> list[Path]:
    """attention_TASK.png: the first clip of each DRAWN_TASKS task, with where the static glance, the
    video-first dynamic query and the question-conditioned query looked (the first seed they all ran;
    each one's first seed when they share none)."""
    cfg = args.base
    drawn_runs = [name for name in COMPARED_QUERIES if name in seeds]
    shared = set.intersection(*(set(seeds[n]) for n in drawn_runs)) if drawn_runs else set()
    chosen = {name: min(shared) if shared else seeds[name][0] for name in drawn_runs}
    maps = {}
    for name, seed in chosen.items():
        path = args.out / "runs" / name / f"seed{seed}" / "looked.json"
        if path.is_file():
            maps[name] = {d["key"]: d["maps"] for d in json.loads(path.read_text())["drawn"]}
    which = f"seed {min(shared)}" if shared else ", ".join(f"{n} seed {s}" for n, s in chosen.items())
    probe = looked.read_probe(data / "val_sft", cfg.data.frame_size, cfg.data.max_frames, len(make_synthetic.TASKS))
    written = []
    for sample, meta in probe:
        if meta["task"] not in DRAWN_TASKS or not maps:
            continue
        rows = {}
        for name, label in COMPARED_QUERIES.items():
            kind = "static" if name == "static" else "dynamic"
            drawn = maps.get(name, {}).get(sample["key"], {})
            rows[label] = torch.tensor(drawn[kind]) if kind in drawn else None
        boxes = [looked.scale_box(b, meta["frame_size"], cfg.data.frame_size) for b in meta["boxes"]]
        path = args.out / f"attention_{meta['task']}.png"
        looked.draw_looked(path, sample["frames"], rows, boxes, f"{which}: {sample['question']} "
                           f"({meta['answer']}; the target outlined)")
        written.append(path)
    return written


def write(args, data: Path, grid: dict, results: dict, check: dict, tasks) -> dict:
    """Analyse the grid's finished runs (results[name]["seeds"] each) and write the table and figures;
    returns the analysis (results.json)."""
    meta = eval_meta(data)
    seeds = {name: results[name]["seeds"] for name in grid}
    scored, uids = matrices(args, grid, seeds)
    analysis = analyse(scored, meta, uids, check.get("verified", []), seeds)
    analysis["verdict"] = verdict(check, analysis)
    text = table(results, analysis, args, tasks) + looked_table(results, tasks)
    (args.out / "table.md").write_text(text + "\n" + check_line(check) + "\n\n" + "\n".join(analysis["verdict"]) + "\n")
    plot_tokens(results, analysis, args.out / "accuracy_vs_tokens.png")
    plot_difficulty(scored, meta, uids, args.out / "accuracy_vs_difficulty.png")
    analysis["figures"] = [str(p) for p in draw_attention(args, data, seeds)]
    return analysis
