"""benchmark.py: lmms-eval's answer parsers on tricky replies; every benchmark read from its public
layout (made here: mp4 via PyAV, parquet with embedded images, our shards) and run end to end on a
tiny model in all modes; scores independent of the batch size; a model that always answers "A";
resume; the command line's checks, made before the model is loaded; and a trained tiny model far
above chance on the synthetic probe."""

import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import benchmark
import bench_loaders
from bench_parsers import mentioned_values, mvbench_normalize, pope_answer, scienceqa_letter, videomme_extract
from test_media import write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("reply, letter", [
    ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("b. cat", "B"), ("A.\nfoo", "A"), ("Option D", "D"),
    ("Answer: C", "C"), ("I think (B) is right", "B"), ("The best option is (C).", "C"),
    ("It is B, not A", "B"), ("The answer is a dog", "A"), ("none", "none"), ("F", "f"), ("", ""),
])
def test_mvbench_normaliser(reply, letter):
    assert mvbench_normalize(reply) == letter


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("I choose B", "B"), ("Answer: C", "C"),
    ("Based on the video, A", "A"), ("the answer is c", ""), ("E", ""), ("The best answer is B", "B"), ("", ""),
    ("It is B, not A", "A"), ("Clearly D", "D"), ("Choice B", "B"), ("AB", "B"), (" \n", ""),
])
def test_videomme_extractor(reply, letter):
    assert videomme_extract(reply) == letter


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("B.", "B"), ("B. foo", "B"), ("b", "B"), ("(B)", ""), (" B", "B"), ("B)", ""),
    ("The answer is B", ""), ("B\n", "B"), ("b.", ""), ("", ""),
])
def test_scienceqa_rule(reply, letter):
    assert scienceqa_letter(reply) == letter


def test_pope_and_synthetic_readings():
    assert pope_answer(" Yes \n") == "yes" and pope_answer("Yes.") == "yes." and pope_answer("No") == "no"
    assert mentioned_values("The red object moves to the left.", ("left", "right", "up", "down")) == {"left"}
    assert mentioned_values("Reddish, maybe blue", ("red", "blue")) == {"blue"}


# ---- fixtures in each benchmark's public layout -------------------------------------------------------

def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    # MVBench: json/<task>.json; videos in lmms-eval's per-task folder, or found by name inside that
    # folder's tree - never in another task's folder (missing.mp4 sits in moving_direction's, not in
    # action_antonym's, so it stays missing for action_antonym)
    (root / "mvbench" / "json").mkdir(parents=True)
    folder = root / "mvbench" / "video" / "clevrer" / "video_validation"
    (folder / "nested").mkdir(parents=True)
    write_video(folder / "v1.mp4", 12)
    write_video(folder / "nested" / "v2.mp4", 5)
    write_video(folder / "missing.mp4", 6)
    (root / "mvbench" / "video" / "ssv2_video_mp4" / "deeper").mkdir(parents=True)
    write_video(root / "mvbench" / "video" / "ssv2_video_mp4" / "deeper" / "v2.mp4", 7)
    (root / "mvbench" / "video" / "ssv2_video_mp4" / "broken.mp4").write_bytes(b"not a video")
    tasks = {"moving_direction": [("v1.mp4", ["up", "down", "left"], "left"), ("v2.mp4", ["yes", "no"], "yes"),
                                  ("v1.mp4", ["one", "two", "three", "four"], "one")],
             "action_antonym": [("missing.mp4", ["a", "b"], "b"), ("broken.mp4", ["a", "b"], "a"),
                                ("v2.mp4", ["x", "y", "z"], "z")]}
    for task, docs in tasks.items():
        (root / "mvbench" / "json" / f"{task}.json").write_text(json.dumps(
            [{"video": v, "question": f"What about {v}?", "candidates": c, "answer": a} for v, c, a in docs]))
    # Video-MME: the parquet (anywhere under videomme/) and videomme/data/<videoID>.mp4
    (root / "videomme" / "data").mkdir(parents=True)
    write_video(root / "videomme" / "data" / "vid1.mp4", 20)
    rows = [dict(video_id="001", videoID="vid1", duration=d, domain="Knowledge", sub_category="Humanity & History",
                 task_type=t, question_id=f"001-{i}", question=f"Q{i}?", url="",
                 options=["A. one", "B. two", "C. three", "D. four"], answer="ABCD"[i])
            for i, (d, t) in enumerate([("short", "Counting Problem"), ("short", "OCR Problems"),
                                        ("short", "Counting Problem")])]
    rows.append(dict(rows[0], videoID="gone", question_id="002-0", answer="B"))
    write_parquet(root / "videomme" / "videomme" / "test-00000-of-00001.parquet", rows)
    # ScienceQA-IMG: ScienceQA-IMG/test-*.parquet with embedded images
    write_parquet(root / "scienceqa" / "ScienceQA-IMG" / "test-00000-of-00001.parquet", [
        dict(image={"bytes": png((200, 0, 0)), "path": None}, question="Which colour?", choices=["red", "blue"],
             answer=0, hint="Look closely.", subject="natural science"),
        dict(image={"bytes": png((0, 0, 200)), "path": None}, question="Which one?", choices=["x", "y", "z"],
             answer=2, hint="", subject="language science"),
        dict(image=None, question="No picture?", choices=["p", "q"], answer=1, hint="", subject="social science")])
    write_parquet(root / "scienceqa" / "ScienceQA-IMG" / "validation-00000-of-00001.parquet", [
        dict(image={"bytes": png((0, 0, 0)), "path": None}, question="ignored", choices=["a", "b"], answer=0, hint="",
             subject="x")])
    # POPE: data/test-*.parquet, several questions per image
    image = {"bytes": png((0, 150, 0)), "path": None}
    write_parquet(root / "pope" / "data" / "test-00000-of-00001.parquet", [
        dict(question_id=str(i), question=f"Is there a {o} in the image?", answer=a, image=image, category=c,
             image_source="x")
        for i, (o, a, c) in enumerate([("dog", "yes", "random"), ("cat", "no", "popular"), ("car", "no", "adversarial"),
                                       ("tree", "yes", "random")])])
    # synthetic: scripts/make_synthetic.py's output
    synth = importlib.util.spec_from_file_location("make_synthetic", ROOT / "scripts" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(synth)
    synth.loader.exec_module(mod)
    mod.main(["--out", str(root / "synthetic"), "--size", "10", "--frames", "3", "--frame-size", "96",
              "--object-scale", "0.2", "--distractors", "0", "1"])
    # val: held-out shards in our format
    shutil.copytree(root / "synthetic" / "val_sft", root / "val")
    return root


@pytest.fixture(scope="module")
def checkpoint(tiny_backbones, tmp_path_factory):
    from conftest import make_model

    folder = tmp_path_factory.mktemp("ckpt") / "model"
    make_model(tiny_backbones).save_pretrained(folder)
    return folder


def run(checkpoint, data_root, out, *args):
    return benchmark.main(["--checkpoint", str(checkpoint), "--data-root", str(data_root), "--output", str(out),
                           "--frame-size", "28", "--max-frames", "4", "--workers", "0", *args])


def test_all_benchmarks_end_to_end(checkpoint, data_root, tmp_path, capsys):
    report = run(checkpoint, data_root, tmp_path / "r.json", "--bench", "mvbench,videomme,scienceqa,pope,val,synthetic",
                 "--batch-size", "3")
    assert json.loads((tmp_path / "r.json").read_text())["modes"] == list(benchmark.MODES)
    res = report["results"]
    mv = res["mvbench"]
    assert mv["skipped"]["count"] == 2 and set(mv["skipped"]["by_reason"]) == {"missing_media", "undecodable_media"}
    assert mv["total"] == 6 and mv["found_by_name"] == 2  # both v2.mp4, each in its own task's tree
    for mode in benchmark.MODES:
        m = mv[mode]
        assert m["items"] == 4 and set(m["per_category"]["task"]) == {"moving_direction", "action_antonym"}
        assert {r["uid"] for r in m["raw"]} == {"moving_direction/0", "moving_direction/1", "moving_direction/2",
                                               "action_antonym/2"}
        assert 0 <= m["accuracy"] <= 1 and sum(m["answer_distribution"]["likelihood"].values()) == 4
        assert all(r["likelihood"] in "ABCD" for r in m["raw"])
    vm = res["videomme"]["coarse_fine"]
    assert vm["items"] == 3 and res["videomme"]["skipped"]["items"] == [{"uid": "002-0", "reason": "missing_media: video gone not found"}]
    assert set(vm["per_category"]) == {"duration", "domain", "sub_category", "task_type"}
    assert set(vm["per_category"]["task_type"]) == {"Counting Problem", "OCR Problems"}
    sq = res["scienceqa"]["autoregressive"]
    assert sq["items"] == 2 and res["scienceqa"]["skipped"]["by_reason"] == {"missing_media": 1}
    assert set(sq["per_category"]["subject"]) == {"natural science", "language science"}
    pope = res["pope"]["coarse_only"]
    assert {"precision", "recall", "f1", "predicted_yes_ratio", "gold_yes_ratio"} <= set(pope)
    assert pope["gold_yes_ratio"] == 0.5 and all(r["likelihood"] in ("yes", "no") for r in pope["raw"])
    assert res["synthetic"]["coarse_fine"]["items"] == 100
    assert set(res["synthetic"]["coarse_fine"]["per_category"]["task"]) == {"colour", "shape", "motion"}
    assert res["val"]["coarse_fine"]["samples"] == 100 and res["val"]["coarse_fine"]["loss"] > 0
    assert report["model"]["parameters"] > 0 and report["timings"]["pope"]["questions_scored"] == 4
    printed = capsys.readouterr().out
    assert "| mvbench |" in printed and "| val |" in printed


def test_scores_do_not_depend_on_the_batch_size(checkpoint, data_root, tmp_path):
    results = []
    for bs in ("1", "4"):
        report = run(checkpoint, data_root, tmp_path / f"r{bs}.json", "--bench", "mvbench,pope", "--batch-size", bs)
        results.append({(b, m, r["uid"]): (r["reply"], r["likelihood"]) for b in ("mvbench", "pope")
                        for m in benchmark.MODES for r in report["results"][b][m]["raw"]})
    assert results[0] == results[1]


def test_a_model_that_always_answers_A_scores_as_the_parsers_dictate(checkpoint, data_root, tmp_path, monkeypatch):
    from model import FoveatedVLM

    real = FoveatedVLM.generate_ids

    def always_a(self, input_ids, *args, **kwargs):
        out = real(self, input_ids, *args, **dict(kwargs, max_new_tokens=1))
        a = self.tokenizer.encode("A", add_special_tokens=False)
        logits = torch.full_like(out["first_logits"], -10.0)
        logits[:, a[0]] = 10.0  # also the first-token likelihood says A
        return {"tokens": [list(a) for _ in range(input_ids.shape[0])], "first_logits": logits}

    monkeypatch.setattr(FoveatedVLM, "generate_ids", always_a)
    report = run(checkpoint, data_root, tmp_path / "a.json", "--bench", "mvbench,videomme,scienceqa,pope",
                 "--mode", "coarse_only")
    res = {b: report["results"][b]["coarse_only"] for b in ("mvbench", "videomme", "scienceqa", "pope")}
    # MVBench golds (counted items): C, A, A, C; Video-MME: A, B, C; ScienceQA: A, C; POPE: "a" is neither
    assert res["mvbench"]["accuracy"] == 0.5 and res["mvbench"]["answer_distribution"]["generate"] == {"A": 4}
    assert res["videomme"]["accuracy"] == pytest.approx(1 / 3)
    assert res["scienceqa"]["accuracy"] == 0.5
    assert res["pope"]["accuracy"] == 0.0 and res["pope"]["predicted_yes_ratio"] == 0.0
    assert res["pope"]["recall"] == 0.0 and res["pope"]["answer_distribution"]["generate"] == {"a": 4}
    assert res["mvbench"]["likelihood_accuracy"] == 0.5 and res["scienceqa"]["likelihood_accuracy"] == 0.5


def test_resume_scores_only_what_is_missing(checkpoint, data_root, tmp_path, monkeypatch):
    from model import FoveatedVLM

    out = tmp_path / "r.json"
    first = run(checkpoint, data_root, out, "--bench", "synthetic", "--limit", "6", "--mode", "coarse_fine")
    lines = (tmp_path / "r.json.items.jsonl").read_text().splitlines()
    # the settings line, 4 records, a fifth cut mid-line
    (tmp_path / "r.json.items.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])
    calls = []
    real = FoveatedVLM.generate_ids
    monkeypatch.setattr(FoveatedVLM, "generate_ids", lambda self, ids, *a, **k: calls.append(ids.shape[0])
                        or real(self, ids, *a, **k))
    second = run(checkpoint, data_root, out, "--bench", "synthetic", "--limit", "6", "--mode", "coarse_fine",
                 "--resume")
    assert sum(calls) == 2 * 2  # the two missing items: a generation and a likelihood prefill each
    key = lambda rep: sorted((r["uid"], r["reply"]) for r in rep["results"]["synthetic"]["coarse_fine"]["raw"])  # noqa: E731
    assert key(first) == key(second) and len(key(second)) == 6


def test_no_usable_item_is_an_error(checkpoint, data_root, tmp_path):
    root = tmp_path / "root"
    (root / "mvbench" / "json").mkdir(parents=True)
    (root / "mvbench" / "json" / "x.json").write_text(json.dumps(
        [{"video": "nope.mp4", "question": "?", "candidates": ["a", "b"], "answer": "a"}]))
    with pytest.raises(ValueError, match="mvbench: no usable item: the media of all 1 items are missing"):
        run(checkpoint, root, tmp_path / "r.json", "--bench", "mvbench")
    with pytest.raises(FileNotFoundError, match="Video-MME: no parquet"):
        run(checkpoint, root, tmp_path / "r.json", "--bench", "videomme")


# ---- the command line: checks that come before the model is loaded ------------------------------------

def refuse_to_load(*args, **kwargs):
    raise AssertionError("load_model was called before the command line and the data were checked")


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-1"), ("--limit", "two"), ("--max-frames", "0"),
                                         ("--batch-size", "0"), ("--frame-size", "0"), ("--workers", "-1")])
def test_numeric_flags_are_refused_at_parse_time_naming_the_flag(flag, value, tmp_path, monkeypatch, capsys):
    """--limit 0 used to mean everything for `val` and an error elsewhere, --limit -1 scored all but
    the last item, --max-frames 0 ended in torch.stack: now each is an argparse error (exit 2)."""
    monkeypatch.setattr(benchmark, "load_model", refuse_to_load)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "checkpoint", tmp_path, tmp_path / "r.json", "--bench", "pope,val", flag, value)
    assert e.value.code == 2
    low = 0 if flag == "--workers" else 1
    assert f"argument {flag}: must be an integer >= {low}, got '{value}'" in capsys.readouterr().err


def test_limit_scores_the_first_n_val_samples_like_the_first_n_items(checkpoint, data_root, tmp_path):
    """`val` stops at the limit even inside a batch (5 samples in batches of 2), as the other
    benchmarks score exactly their first N items."""
    report = run(checkpoint, data_root, tmp_path / "r.json", "--bench", "val,pope", "--limit", "5", "--batch-size", "2",
                 "--mode", "coarse_only")
    assert report["results"]["val"]["coarse_only"]["samples"] == 5
    assert report["results"]["pope"]["coarse_only"]["items"] == 4  # POPE has only 4


@pytest.mark.parametrize("missing, name, expected", [
    ("mvbench", "MVBench", "mvbench/json"), ("videomme", "Video-MME", "videomme"),
    ("scienceqa", "ScienceQA", "scienceqa"), ("pope", "POPE", "pope"),
    ("synthetic", "synthetic", "synthetic/README.json"), ("val", "val", "val")])
def test_missing_benchmark_data_fails_before_the_model_is_loaded(missing, name, expected, data_root, tmp_path,
                                                                 monkeypatch):
    """Loading a 1.7B model takes minutes: every requested benchmark's data is read first, and a
    missing one is an error naming the benchmark and the path it looked for."""
    root = tmp_path / "root"
    present = "scienceqa" if missing == "pope" else "pope"  # listed first: it is not run before the check
    shutil.copytree(data_root / present, root / present)
    monkeypatch.setattr(benchmark, "load_model", refuse_to_load)
    with pytest.raises(FileNotFoundError) as e:
        run(tmp_path / "checkpoint", root, tmp_path / "r.json", "--bench", f"{present},{missing}")
    assert str(e.value).startswith(f"{name}: ") and str(root / expected) in str(e.value)


def test_a_benchmark_without_items_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "load_model", refuse_to_load)
    (tmp_path / "mvbench" / "json").mkdir(parents=True)
    (tmp_path / "mvbench" / "json" / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"mvbench: no items in {tmp_path / 'mvbench'}")):
        run(tmp_path / "checkpoint", tmp_path, tmp_path / "r.json", "--bench", "mvbench")
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "README.json").write_text(json.dumps({"palette": [], "shapes": [], "directions": []}))
    with pytest.raises(FileNotFoundError) as e:
        run(tmp_path / "checkpoint", tmp_path, tmp_path / "r.json", "--bench", "synthetic")
    assert str(e.value).startswith("synthetic: ") and str(tmp_path / "synthetic" / "eval") in str(e.value)


def test_help_shows_the_defaults_and_example_commands(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal; keep each help on one line
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for shown in ("(default: all)", "(default: mvbench,videomme,scienceqa,pope)", "(default: results.json)",
                  "(default: 64)", "(default: 224)", "(default: 16)", "(default: sft)", "--trust-checkpoint"):
        assert shown in out, shown
    assert "(default: None)" not in out and "(default: False)" not in out
    examples = [line.strip() for line in out.splitlines() if line.strip().startswith("python benchmark.py")]
    assert any("--checkpoint runs/" in line for line in examples)
    assert any("--checkpoint checkpoint.pt --llm" in line for line in examples)
    assert any(line.endswith("--resume") for line in examples)


@pytest.mark.parametrize("flags, trusted", [((), False), (("--trust-checkpoint",), True)])
def test_trust_checkpoint_reaches_load_model(flags, trusted, data_root, tmp_path, monkeypatch):
    class Loaded(Exception):
        pass

    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise Loaded

    monkeypatch.setattr(benchmark, "load_model", record)
    with pytest.raises(Loaded):
        run(tmp_path / "checkpoint.pt", data_root, tmp_path / "r.json", "--bench", "pope", *flags)
    assert calls == [((str(tmp_path / "checkpoint.pt"), None, None), {"trust": trusted})]


def test_bad_input_exits_2_with_a_one_line_error(tmp_path):
    """As argparse's own errors: exit status 2 (sys.exit(message) gave 1) and one line on stderr."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--checkpoint", str(tmp_path / "none"),
                           "--data-root", str(tmp_path), "--bench", "pope"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: POPE: no parquet files of the test split (test-*.parquet) under {tmp_path / 'pope'}"]


@pytest.mark.slow
def test_synthetic_probe_a_trained_tiny_model_is_far_above_chance(tmp_path):
    """Train a tiny model on the synthetic SFT questions for a few hundred steps (CPU, ~1 minute); on
    held-out clips its replies name the right colour / shape / direction far more often than a
    model that knows the sentence but guesses the value (chance 0.21)."""
    import train

    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "scripts" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = tmp_path / "synthetic"
    mod.main(["--out", str(data), "--size", "1500", "--frames", "2", "--frame-size", "112", "--object-scale", "0.25",
              "--distractors", "0", "0"])
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({
        "stage": "sft", "run_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"llm": "random:tiny", "dino": "random:tiny", "query_dim": 32},
        "data": {"train": [{"name": "qa", "shards": str(data / "sft")}], "frame_size": 112, "max_frames": 2,
                 "max_text_tokens": 256, "batch_size": 16, "num_workers": 0},
        "optim": {"steps": 450, "lr": {"connector": 2e-3, "dino": 2e-3, "llm": 2e-3}, "warmup_ratio": 0.05},
        "checkpoint": {"every_steps": 1000}, "log": {"every_steps": 50}}))
    train.main(["--config", str(config)])
    report = run(tmp_path / "run", tmp_path, tmp_path / "r.json", "--bench", "synthetic", "--mode", "coarse_fine",
                 "--frame-size", "112")
    res = report["results"]["synthetic"]["coarse_fine"]
    assert res["items"] == 150 and res["accuracy"] > 0.35, res["per_category"]  # 0.44 measured
    assert res["per_category"]["task"]["colour"]["accuracy"] > 0.6, res["per_category"]  # chance 0.125


def test_a_checkpoint_file_with_its_backbones(checkpoint, data_root, tmp_path, tiny_backbones):
    """A published-style checkpoint.pt ({"model": state}) evaluates with --llm / --dino and gives the
    replies of the same weights loaded from their save_pretrained folder."""
    from model import FoveatedVLM

    torch.save({"model": FoveatedVLM.from_pretrained(checkpoint).state_dict(), "step": 7}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="needs --llm and --dino"):
        run(tmp_path / "checkpoint.pt", data_root, tmp_path / "x.json", "--bench", "pope")
    with pytest.raises(ValueError, match="only apply to checkpoint files"):
        run(checkpoint, data_root, tmp_path / "x.json", "--bench", "pope", "--llm", tiny_backbones[0])
    a = run(tmp_path / "checkpoint.pt", data_root, tmp_path / "a.json", "--bench", "pope", "--mode", "coarse_only",
            "--llm", tiny_backbones[0], "--dino", tiny_backbones[1])
    b = run(checkpoint, data_root, tmp_path / "b.json", "--bench", "pope", "--mode", "coarse_only")
    replies = lambda r: [(x["uid"], x["reply"]) for x in r["results"]["pope"]["coarse_only"]["raw"]]  # noqa: E731
    assert replies(a) == replies(b)


def test_a_training_checkpoint_file_is_evaluated_with_its_own_settings(data_root, tmp_path):
    """A step checkpoint of a prompt_first model that shows images as 4 tokens scores exactly like its
    export folder: the checkpoint's stored model config is used, not the published defaults."""
    import train

    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({
        "stage": "sft", "run_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"llm": "random:tiny", "dino": "random:tiny", "query_dim": 16, "layout": "prompt_first",
                  "image_frames": 4, "visual_scale": 0.5},
        "data": {"train": [{"name": "qa", "shards": str(data_root / "synthetic" / "sft")}], "frame_size": 28,
                 "max_frames": 3, "max_text_tokens": 256, "batch_size": 4, "num_workers": 0},
        "optim": {"steps": 2, "lr": {"connector": 1e-3, "dino": 1e-3, "llm": 1e-3}},
        "checkpoint": {"every_steps": 2}, "log": {"every_steps": 1}}))
    train.main(["--config", str(config)])
    step_file = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    reports = [run(source, data_root, tmp_path / f"{i}.json", "--bench", "pope,synthetic", "--limit", "4")
               for i, source in enumerate((step_file, tmp_path / "run" / "final"))]
    for report in reports:
        assert report["model"]["settings"]["layout"] == "prompt_first"
        assert report["model"]["settings"]["image_frames"] == 4 and report["model"]["settings"]["visual_scale"] == 0.5
    for bench in ("pope", "synthetic"):
        for mode in benchmark.MODES:
            a, b = ([(r["uid"], r["reply"], r["likelihood"]) for r in rep["results"][bench][mode]["raw"]] for rep in reports)
            assert a == b and len(a) == 4, (bench, mode)


def test_stored_frames_are_thinned_uniformly_as_training_reads_them():
    """A clip of 12 stored frames at --max-frames 5 shows frames 1, 3, 6, 8, 10 (media.sample_frame_indices,
    as data.py), not the first five."""
    from bench_runner import Clips
    from media import encode_jpeg, sample_frame_indices

    stored = [encode_jpeg(torch.full((3, 28, 28), 20 * t, dtype=torch.uint8)) for t in range(12)]
    _, frames = Clips([("clip", ("frames", stored))], max_frames=5, frame_size=28)[0]
    keep = sample_frame_indices(12, 5)
    assert keep != list(range(5))
    assert [round(float(f.float().mean()) / 20) for f in frames] == keep


# ---- robustness on the public layouts: splits, duplicates, resume, partial failure ----------------------

def test_pope_reads_only_the_test_split_and_keeps_every_question(tmp_path):
    """A plain POPE download holds the default config's test split (data/test-*.parquet) and the Full
    config (one file per category), and question_id repeats across categories: every question of the
    test split is kept, and nothing from Full is read."""
    image = {"bytes": png((0, 150, 0)), "path": None}
    rows = [dict(question_id=str(i), question=f"Is there a {c} thing?", answer="yes" if i else "no", image=image,
                 category=c) for c in ("adversarial", "popular", "random") for i in range(3)]
    write_parquet(tmp_path / "pope" / "data" / "test-00000-of-00002.parquet", rows[:5])
    write_parquet(tmp_path / "pope" / "data" / "test-00001-of-00002.parquet", rows[5:])
    write_parquet(tmp_path / "pope" / "Full" / "adversarial-00000-of-00001.parquet", rows[:3])
    items = bench_loaders.pope_items(tmp_path)
    assert len(items) == 9 and len({it.uid for it in items}) == 9
    assert {it.uid for it in items} == {f"{c}/{i}" for c in ("adversarial", "popular", "random") for i in range(3)}
    # a second copy of the test split in another folder is refused, naming both folders
    write_parquet(tmp_path / "pope" / "copy" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(ValueError, match="POPE: test split files in 2 folders"):
        bench_loaders.pope_items(tmp_path)


def test_a_duplicated_item_is_an_error_before_the_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "load_model", refuse_to_load)
    image = {"bytes": png((0, 150, 0)), "path": None}
    row = dict(question_id="7", question="Is there a dog?", answer="yes", image=image, category="random")
    write_parquet(tmp_path / "pope" / "data" / "test-00000-of-00001.parquet", [row, dict(row, answer="no")])
    with pytest.raises(ValueError, match=r"pope: 1 item id\(s\) appear more than once .* 'random/7'"):
        run(tmp_path / "checkpoint", tmp_path, tmp_path / "r.json", "--bench", "pope")


def test_mvbench_never_takes_a_clip_from_another_tasks_folder(data_root):
    """missing.mp4 lies in moving_direction's folder; action_antonym asks for a clip of that name and
    must not get it."""
    items = {it.uid: it for it in bench_loaders.mvbench_items(data_root)}
    assert items["action_antonym/0"].media[0] == "missing"
    assert "ssv2_video_mp4" in items["action_antonym/0"].media[1]
    assert items["moving_direction/1"].found_by_name and "clevrer" in items["moving_direction/1"].media[1]
    assert items["action_antonym/2"].found_by_name and "ssv2_video_mp4" in items["action_antonym/2"].media[1]
    assert not items["moving_direction/0"].found_by_name


@pytest.mark.parametrize("change, differs", [
    (["--max-frames", "3"], "max_frames"), (["--mode", "coarse_only"], "modes"), ("touch", "checkpoint_files")])
def test_resume_refuses_other_settings_before_loading(change, differs, checkpoint, data_root, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    run(checkpoint, data_root, out, "--bench", "pope", "--mode", "coarse_fine")
    args = ["--bench", "pope", "--mode", "coarse_fine", "--resume"]
    if change == "touch":  # the same path, new weights: a retrained checkpoint
        copy = tmp_path / "ckpt"
        shutil.copytree(checkpoint, copy)
        run(copy, data_root, out, "--bench", "pope", "--mode", "coarse_fine")
        (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
        checkpoint = copy
    else:
        args += change
        args.remove("--mode") if "--mode" in change else None
        if "--mode" in change:
            args.remove("coarse_fine")
    monkeypatch.setattr(benchmark, "load_model", refuse_to_load)
    with pytest.raises(ValueError, match=rf"--resume: .* was scored with other settings \({differs}: stored"):
        run(checkpoint, data_root, out, *args)


def test_resume_repairs_a_torn_last_line(checkpoint, data_root, tmp_path):
    out = tmp_path / "r.json"
    run(checkpoint, data_root, out, "--bench", "pope", "--mode", "coarse_only")
    items = tmp_path / "r.json.items.jsonl"
    lines = items.read_text().splitlines()
    items.write_text("\n".join(lines[:3]) + "\n" + lines[3][:15])  # the header, 2 records, a torn third
    report = run(checkpoint, data_root, out, "--bench", "pope", "--mode", "coarse_only", "--resume")
    records = [json.loads(line) for line in items.read_text().splitlines()]  # every line parses again
    assert "settings" in records[0] and len(records) == 1 + 4
    assert sorted(r["uid"] for r in records[1:]) == sorted(r["uid"] for r in report["results"]["pope"]["coarse_only"]["raw"])


def test_a_benchmark_that_fails_keeps_the_others_scores(checkpoint, data_root, tmp_path, capsys):
    """Every clip of one benchmark is undecodable: the others are scored and written, the table shows
    scored / total, and then the run fails naming the benchmark."""
    root = tmp_path / "root"
    shutil.copytree(data_root / "pope", root / "pope")
    (root / "mvbench" / "json").mkdir(parents=True)
    (root / "mvbench" / "video" / "x").mkdir(parents=True)
    (root / "mvbench" / "video" / "x" / "bad.mp4").write_bytes(b"not a video")
    (root / "mvbench" / "json" / "x.json").write_text(json.dumps(
        [{"video": "bad.mp4", "question": "?", "candidates": ["a", "b"], "answer": "a"}]))
    with pytest.raises(RuntimeError, match=r"mvbench: no usable item \(1 skipped"):
        run(checkpoint, root, tmp_path / "r.json", "--bench", "pope,mvbench", "--mode", "coarse_only")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"]["pope"]["coarse_only"]["items"] == 4 and "mvbench" in report["failed"]
    captured = capsys.readouterr()
    assert "| pope | " in captured.out and "| 4 / 4 | 0 |" in captured.out and "| 0 / 1 | 1 |" in captured.out
    assert "pope: 4/4 (100%)" in captured.err and "questions/s" in captured.err  # the progress line


def test_val_reads_shards_by_url(checkpoint, data_root, tmp_path):
    """--val-shards takes what training takes, URLs included (here a pipe:, as a bucket would be read):
    the same samples score the same as from DATA_ROOT/val."""
    from shards import expand

    local = run(checkpoint, data_root, tmp_path / "a.json", "--bench", "val", "--mode", "coarse_only")
    shards = expand(data_root / "val")
    url = f"pipe:cat {shards[0]}" if len(shards) == 1 else None
    assert url, "the fixture's val split is one shard"
    remote = run(checkpoint, data_root, tmp_path / "b.json", "--bench", "val", "--mode", "coarse_only",
                 "--val-shards", url)
    a, b = local["results"]["val"]["coarse_only"], remote["results"]["val"]["coarse_only"]
    assert a["samples"] == b["samples"] > 0 and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
