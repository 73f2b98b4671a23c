"""Benchmarks: MVBench, Video-MME, ScienceQA-IMG and POPE with lmms-eval's prompts and answer parsers
(greedy generation), validation loss on held-out shards, and the synthetic foveation probe — in any
of the three forward modes.

    python benchmark.py --mode all --checkpoint runs/stage3_135M --bench mvbench,videomme,scienceqa,pope \\
        --data-root /data/benchmarks --output results.json

Two scores per multiple-choice item. `generate`: the reply generated greedily from lmms-eval's
default prompt and scored by lmms-eval's parser for that benchmark, so the numbers compare with
published lmms-eval numbers. `likelihood`: the candidate answer (option letter; yes/no for POPE)
whose first token the model finds most likely right after the prompt — the first step of the same
generation, so it costs nothing extra. Both report their answer distribution, so a model that
always says "A" (or "yes") shows.

Speed: every clip is decoded once (in DataLoader workers) and DINO-encoded once per run; its K/V
serve every question about it, every prompt variant and every forward mode. Questions are batched
by clip. Results are appended item by item to OUTPUT.items.jsonl, so `--resume` continues an
interrupted run where it stopped.

This file is the command line (`main`, `read_benchmarks`, `run_bench`); the parts live in
bench_parsers.py (lmms-eval's prompts and answer parsers), bench_loaders.py (the items of each
benchmark), bench_runner.py (decoding, running and scoring; validation loss) and bench_report.py
(summaries, the resumable item log, the Markdown table).
"""

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from bench_loaders import LOADERS
from bench_parsers import LMMS_EVAL_VERSION, MAX_NEW_TOKENS
from bench_report import append_record, bench_results, identity, markdown, resume_items, run_settings
from bench_runner import Runner, batches_by_clip, run_val, score, val_source
from cli import HelpFormatter, int_at_least
from config import MODES
from frames import check_frame_size
from model import load_model
from progress import Progress

BENCHES = ("mvbench", "videomme", "scienceqa", "pope", "val", "synthetic")


EXAMPLES = """examples:
  # a run directory (its final/ export) or a save_pretrained folder, in every forward mode
  python benchmark.py --checkpoint runs/stage3_135M --data-root /data/benchmarks --output results.json

  # the published checkpoint.pt (weights only): name its backbones
  python benchmark.py --checkpoint checkpoint.pt --llm HuggingFaceTB/SmolLM2-1.7B-Instruct \\
      --dino facebook/dinov2-small --data-root /data/benchmarks --bench mvbench,videomme --mode coarse_fine

  # a Hugging Face Hub repo by id (@revision optional): its export, or its checkpoint.pt with the published
  # backbones (loading.PUBLISHED_BACKBONES; --llm / --dino override them)
  python benchmark.py --checkpoint sanps/fVLM-135M --data-root /data/benchmarks --output results.json

  # continue an interrupted run: keeps what results.json.items.jsonl already holds
  python benchmark.py --checkpoint runs/stage3_135M --data-root /data/benchmarks --output results.json --resume
"""


def read_benchmarks(benches, data_root: Path, limit: int | None, val_shards: str | None = None) -> dict:
    """Every requested benchmark's items ({bench: [Item]}; val: its shard Source), read and checked
    before the model is loaded and before anything is scored: a missing dataset, one whose media are
    all missing, or a duplicated item then fails in seconds, not after the other benchmarks ran."""
    found = {}
    for bench in benches:
        if bench == "val":
            found[bench] = val_source(data_root, val_shards)
            continue
        items = LOADERS[bench](data_root)
        twice = [uid for uid, n in Counter(it.uid for it in items).items() if n > 1]
        if twice:
            raise ValueError(f"{bench}: {len(twice)} item id(s) appear more than once under {data_root / bench} "
                             f"(e.g. {twice[0]!r}): a second copy of its data files?")
        items = items[:limit]
        if not items:
            raise ValueError(f"{bench}: no items in {data_root / bench}")
        missing = [it for it in items if it.media[0] == "missing"]
        if len(missing) == len(items):
            raise ValueError(f"{bench}: no usable item: the media of all {len(items)} items are missing "
                             f"(e.g. {missing[0].media[1]})")
        found[bench] = items
    return found


def parser() -> argparse.ArgumentParser:
    """benchmark.py's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--mode", default="all", choices=[*MODES, "all"], help="forward mode(s) to score")
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, save_pretrained folder, checkpoint file, or a Hugging Face Hub id "
                             "owner/name[@revision] (a path that exists wins)")
    parser.add_argument("--llm", help="backbone LLM (hub id or folder) for a checkpoint file: needed for the "
                                      "published checkpoint.pt, else replaces the one stored in the checkpoint")
    parser.add_argument("--dino", help="vision backbone (hub id or folder) for a checkpoint file, as --llm")
    parser.add_argument("--bench", default="mvbench,videomme,scienceqa,pope",
                        help=f"comma-separated, from {','.join(BENCHES)}")
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding the benchmarks' data")
    parser.add_argument("--output", type=Path, default=Path("results.json"),
                        help="the report (JSON); items are appended to OUTPUT.items.jsonl as they are scored")
    parser.add_argument("--max-frames", type=int_at_least(1), default=64,
                        help="frames sampled uniformly from each video")
    parser.add_argument("--frame-size", type=int_at_least(1), default=224,
                        help="frame side in pixels (a multiple of the vision backbone's patch size)")
    parser.add_argument("--limit", type=int_at_least(1), metavar="N",
                        help="score only the first N items of each benchmark (val: its first N samples) "
                             "(default: all)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, help="questions per batch")
    parser.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1),
                        help="decoding processes (0: decode in this process) (default: min(8, CPUs), here "
                             "%(default)s)")
    parser.add_argument("--val-shards", metavar="PATTERN",
                        help="`val`'s shards: a pattern, folder or URL (https://host/val-{0000..0009}.tar, "
                             "hf://datasets/..., pipe:CMD) (default: DATA_ROOT/val)")
    parser.add_argument("--val-stage", default="sft", choices=["alignment", "sft"], help="loss masks for `val`")
    parser.add_argument("--resume", action="store_true", help="keep the items already scored in OUTPUT.items.jsonl")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint file that holds pickled Python objects besides tensors; unpickling "
                             "can run code from the file, so only for files you trust")
    return parser


def main(argv=None) -> dict:
    cli = parser()
    args = cli.parse_args(argv)
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown = [b for b in benches if b not in BENCHES]
    if unknown:
        cli.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    modes = list(MODES) if args.mode == "all" else [args.mode]
    data = read_benchmarks(benches, args.data_root, args.limit, args.val_shards)
    items_path = args.output.with_name(args.output.name + ".items.jsonl")
    settings = run_settings(args, modes)
    done = resume_items(items_path, settings) if args.resume else {}  # a mismatch fails before loading
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, source = load_model(args.checkpoint, args.llm, args.dino, trust=args.trust_checkpoint)
    model.to(device).eval()
    try:
        check_frame_size(args.frame_size, model.encoder.dino.patch_size, f"--frame-size {args.frame_size}")
    except ValueError as e:
        cli.error(str(e))

    if not args.resume or not items_path.is_file() or not items_path.stat().st_size:
        items_path.write_text(json.dumps({"settings": settings}) + "\n")
    results, timings, failed = {}, {}, {}
    for bench in benches:
        if bench == "val":
            results["val"] = run_val(model, data["val"], args, modes, device)
            continue
        timings[bench] = run_bench(model, bench, data[bench], args, modes, device, done, items_path)
        results[bench], why = bench_results(bench, data[bench], modes, done)
        if why:
            failed[bench] = why
    report = {"model": identity(model, source, args), "args": {k: str(v) for k, v in vars(args).items()},
              "scoring": f"lmms-eval {LMMS_EVAL_VERSION} prompts and parsers", "modes": modes, "results": results,
              "timings": timings}
    if failed:
        report["failed"] = failed
    args.output.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    if failed:  # after the report is written: the benchmarks that worked keep their scores
        raise RuntimeError("; ".join(f"{b}: {why}" for b, why in failed.items()) + f" (the others: {args.output})")
    return report


def run_bench(model, bench: str, items: list, args, modes: list, device, done: dict, items_path: Path) -> dict:
    """Score a benchmark's items not in `done` yet in every mode, each record appended to the item log
    (and to done) as it is scored -> the benchmark's timings."""
    start = time.perf_counter()
    todo = [it for it in items if any((bench, m, it.uid) not in done for m in modes)
            and (bench, "skipped", it.uid) not in done]
    runner = Runner(model, modes, device)
    scored = 0
    with open(items_path, "a") as sink, Progress(len(todo), bench, "questions") as bar:
        for decoded, batch in batches_by_clip(todo, args.max_frames, args.frame_size, args.batch_size, args.workers):
            if decoded is None:  # the clip's media failed: its items are skipped, with the reason
                for item, reason in batch:
                    append_record(sink, done, {"bench": bench, "mode": "skipped", "uid": item.uid, "reason": reason})
                bar.update(len(batch))
                continue
            per_mode = runner.run(decoded, batch, MAX_NEW_TOKENS[bench])
            for mode, answers in per_mode.items():
                for item, (reply, picked) in zip(batch, answers):
                    if (bench, mode, item.uid) not in done:
                        append_record(sink, done, {"bench": bench, "mode": mode, **score(item, reply, picked)})
            scored += len(batch)
            bar.update(len(batch))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "questions_scored": scored, **dict(runner.timings),
            "questions_per_s": scored / wall if wall else None,
            "question_modes_per_s": scored * len(modes) / wall if wall else None}


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # bad input exits 2, as argparse's errors do (sys.exit(message) would exit 1); one line, no traceback
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
