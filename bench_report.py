"""A benchmark run's results: per-benchmark summaries (`summarise`), the settings a stored item depends
on and the resumable item log (`run_settings`, `resume_items`), the Markdown table (`markdown`)."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

from bench_parsers import LMMS_EVAL_VERSION, MAX_NEW_TOKENS
from loading import hub_commit


def summarise(bench: str, records: list[dict]) -> dict:
    def accuracy(recs):
        """Over the counted records (MVBench leaves out replies empty once stripped); 0 when every one was
        left out, as lmms-eval's MVBench aggregation scores a task with no answered item."""
        scored = [r["correct"] for r in recs if r["counted"]]
        return _mean(scored) if scored or not recs else 0.0

    counted = [r for r in records if r["counted"]]
    out = {"items": len(records), "counted": len(counted),
           "accuracy": accuracy(records),
           "likelihood_accuracy": _mean(r["likelihood_correct"] for r in records),
           "answer_distribution": {"generate": dict(Counter(r["parsed"] or "(none)" for r in records).most_common()),
                                   "likelihood": dict(Counter(r["likelihood"] for r in records).most_common())}}
    per = defaultdict(lambda: defaultdict(list))
    for r in records:  # every category shows, even one whose replies were all left out (n: the counted ones)
        for key, value in r["category"].items():
            per[key][value].append(r)
    out["per_category"] = {k: {v: {"n": sum(r["counted"] for r in rs), "accuracy": accuracy(rs),
                                   "likelihood_accuracy": _mean(r["likelihood_correct"] for r in rs)}
                               for v, rs in sorted(vals.items())} for k, vals in per.items()}
    if bench == "mvbench" and "task" in per:
        out["mean_over_tasks"] = _mean(v["accuracy"] for v in out["per_category"]["task"].values())
    if bench == "pope":
        tp = sum(r["gold"] == "yes" and r["parsed"] == "yes" for r in records)
        fp = sum(r["gold"] == "no" and r["parsed"] == "yes" for r in records)
        fn = sum(r["gold"] == "yes" and r["parsed"] == "no" for r in records)  # as lmms-eval: only explicit "no"
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.update(precision=precision, recall=recall,
                   f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                   gold_yes_ratio=_mean(r["gold"] == "yes" for r in records),  # what lmms-eval calls yes_ratio
                   predicted_yes_ratio=_mean(r["parsed"] == "yes" for r in records),
                   likelihood_yes_ratio=_mean(r["likelihood"] == "yes" for r in records))
    return out


def _mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def append_record(sink, done, record):
    sink.write(json.dumps(record) + "\n")
    sink.flush()
    done[(record["bench"], record["mode"], record["uid"])] = record


def run_settings(args, modes) -> dict:
    """What a stored item's record depends on: the weights (the checkpoint's path and its files' sizes
    and modification times - a retrained or replaced checkpoint differs), backbones, modes, frame
    sampling, generation length and the lmms-eval release whose parsers scored it. A Hub id: the id and
    the commit it resolves to now (which stands for its files)."""
    commit = hub_commit(args.checkpoint)
    path = Path(args.checkpoint) if commit else Path(args.checkpoint).resolve()
    if commit:
        files = []
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    stat = [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]
    return {"checkpoint": str(path), "checkpoint_files": commit or hashlib.sha1(json.dumps(stat).encode()).hexdigest(),
            "llm": args.llm, "dino": args.dino, "modes": list(modes), "max_frames": args.max_frames,
            "frame_size": args.frame_size, "max_new_tokens": MAX_NEW_TOKENS, "lmms_eval": LMMS_EVAL_VERSION}


def resume_items(path: Path, settings: dict) -> dict:
    """The records of an interrupted run's OUTPUT.items.jsonl, {(bench, mode, uid): record}, after
    checking that they were made with these settings (else a ValueError naming what differs). A last
    line cut by the interruption is cut off the file too, so that the next record starts on its own line."""
    if not path.is_file() or not path.stat().st_size:
        return {}
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"resume: dropped a torn last line of {path} ({len(data) - keep} bytes); that item is scored again",
              file=sys.stderr)
        data = data[:keep]
    lines = data.decode().splitlines()
    try:
        stored = json.loads(lines[0])["settings"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        stored = None
    if stored is None:
        raise ValueError(f"--resume: {path} does not start with the settings line this version writes; "
                         f"score again without --resume")
    differ = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
    if differ:
        what = "; ".join(f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in differ)
        raise ValueError(f"--resume: {path} was scored with other settings ({what}); use another --output, "
                         f"or drop --resume to score again")
    done = {}
    for line in lines[1:]:
        r = json.loads(line)
        done[(r["bench"], r["mode"], r["uid"])] = r
    return done


def identity(model, source, args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"checkpoint": source, "parameters": sum(p.numel() for p in model.parameters()),
            "llm": model.llm.config.name_or_path, "settings": dataclasses.asdict(model.config), "max_frames": args.max_frames,
            "frame_size": args.frame_size, "git_commit": commit, "torch": str(torch.__version__),
            "device": str(next(model.parameters()).device)}


def markdown(report) -> str:
    """The printed table: per benchmark and mode, the generate / likelihood accuracy; items scored of
    the benchmark's total; skipped items (media missing or undecodable)."""
    modes = report["modes"]
    lines = ["| benchmark | " + " | ".join(f"{m} (generate / likelihood)" for m in modes)
             + " | items scored / total | skipped |",
             "|---|" + "---|" * len(modes) + "---|---|"]
    for bench, res in report["results"].items():
        if bench == "val":
            cells = [f"loss {res[m]['loss']:.4f} / answer acc {res[m]['answer_acc']:.3f}" for m in modes]
            lines.append("| val | " + " | ".join(cells) + f" | {res[modes[0]]['samples']} | 0 |")
            continue
        cells = [f"{100 * res[m]['accuracy']:.1f} / {100 * res[m]['likelihood_accuracy']:.1f}" if m in res
                 else "no usable item" for m in modes]
        scored = res[modes[0]]["items"] if modes[0] in res else 0
        lines.append(f"| {bench} | " + " | ".join(cells) + f" | {scored} / {res['total']} | {res['skipped']['count']} |")
    for bench, t in report["timings"].items():
        lines.append(f"\n{bench}: {t['questions_scored']} questions x {len(modes)} mode(s) in {t['wall_s']:.1f}s "
                     f"({t['question_modes_per_s']:.2f} question-modes/s)")
    found = {b: r["found_by_name"] for b, r in report["results"].items() if r.get("found_by_name")}
    for bench, n in found.items():
        lines.append(f"{bench}: {n} clip(s) found by file name inside their task's folder, not at lmms-eval's path")
    return "\n".join(lines)


def bench_results(bench: str, items: list, modes: list, done: dict) -> tuple[dict, str | None]:
    """A benchmark's results from its scored records (done: {(bench, mode, uid): record}): item counts,
    each mode's summary with its raw records, the skipped items by reason -> (results, why it failed:
    None unless no item could be scored)."""
    uids = {it.uid for it in items}
    skipped = [r for (b, m, u), r in done.items() if b == bench and m == "skipped" and u in uids]
    results = {"total": len(items), "found_by_name": sum(it.found_by_name for it in items)}
    for mode in modes:
        records = [r for (b, m, u), r in done.items() if b == bench and m == mode and u in uids]
        if records:
            results[mode] = summarise(bench, records)
            results[mode]["raw"] = records
    results["skipped"] = {"count": len(skipped), "by_reason": dict(Counter(r["reason"].split(":")[0] for r in skipped)),
                          "items": [{"uid": r["uid"], "reason": r["reason"]} for r in skipped]}
    if not all(mode in results for mode in modes):  # every item's media failed to decode
        return results, f"no usable item ({len(skipped)} skipped: {results['skipped']['by_reason']})"
    return results, None
