"""lmms_fvlm.py, the lmms-eval model plugin: `python -m lmms_eval --model fvlm` run for real (a subprocess,
offline) on a local task written here (mp4s, PNGs, a json dataset, a yaml + utils.py in lmms-eval's task
format) with a tiny random checkpoint; its logged replies equal, item for item, what benchmark.py's Runner
generates for the same prompts and media. The entry point is found through a dist-info folder on
PYTHONPATH, as `pip install -e .` would register it. Also: model_args checks, gen_kwargs (greedy only,
`until` cutting), the visuals lmms-eval hands over, and generate_until called in-process.

Needs lmms-eval 0.7.3 and the modules its command line imports (docs/evaluation.md "lmms-eval plugin"; CI installs them).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3 plus the modules docs/evaluation.md "
                        "'lmms-eval plugin' lists (CI does)")
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2  # noqa: E402

import bench_loaders  # noqa: E402
import bench_runner  # noqa: E402
import lmms_fvlm  # noqa: E402
from model import load_model  # noqa: E402
from lmms_fvlm import FVLM, cut_at_stops, generation_settings, media_of  # noqa: E402
from media import decode_image  # noqa: E402
from test_media import write_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "fvlm_plugin_check"
MAX_FRAMES, FRAME_SIZE, MAX_NEW_TOKENS = 4, 28, 6
# MVBench-like documents: visuals are file names under the task folder (mp4: a video; png: an image;
# several png: the frames of one clip); docs 0 and 1 share a video (decoded and encoded once)
DOCS = [
    {"visuals": ["v1.mp4"], "question": "Where does the block move?", "candidates": ["up", "down", "left"], "answer": "C"},
    {"visuals": ["v1.mp4"], "question": "How many blocks?", "candidates": ["one", "two"], "answer": "A"},
    {"visuals": ["v2.mp4"], "question": "What changes?", "candidates": ["colour", "size", "shape", "nothing"],
     "answer": "B"},
    {"visuals": ["red.png"], "question": "Which colour?", "candidates": ["red", "green"], "answer": "A"},
    {"visuals": [f"f{i}.png" for i in range(6)], "question": "What is shown?", "candidates": ["a", "b", "c"],
     "answer": "B"},
]
TASK_UTILS = '''
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [str(HERE / name) if name.endswith(".mp4") else Image.open(HERE / name).convert("RGB")
            for name in doc["visuals"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):  # MVBench's prompt
    options = "".join(f"({chr(65 + i)}) {c}\\n" for i, c in enumerate(doc["candidates"]))
    return "Question:" + doc["question"] + "\\nOption:\\n" + options + lmms_eval_specific_kwargs["post_prompt"]


def process_results(doc, results):
    reply = results[0].strip()
    return {"accuracy": float(reply[:1].upper() == doc["answer"])}
'''


def task_yaml(docs_path: Path, until: list[str]) -> str:
    return f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(docs_path))}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
lmms_eval_specific_kwargs:
  default:
    post_prompt: "Only give the best option.\\n"
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
  until: {json.dumps(until)}
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def checkpoint(tiny_backbones, tmp_path_factory):
    from conftest import lively_llm, make_model

    model = lively_llm(make_model(tiny_backbones))  # replies that vary with the prompt, frames and mode
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The local task's media, documents and utils.py (the yaml is written by the test: its `until`)."""
    folder = tmp_path_factory.mktemp("tasks") / TASK
    folder.mkdir()
    write_video(folder / "v1.mp4", 12)
    write_video(folder / "v2.mp4", 5)
    Image.new("RGB", (40, 30), (200, 30, 20)).save(folder / "red.png")
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 90)).save(folder / f"f{i}.png")
    (folder / "docs.json").write_text(json.dumps(DOCS))
    (folder / "utils.py").write_text(TASK_UTILS)
    return folder


def load_task_utils(folder: Path):
    spec = importlib.util.spec_from_file_location("fvlm_plugin_task_utils", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def harness_replies(checkpoint, task_dir, mode) -> list[str]:
    """benchmark.py's own path for the same items: Item -> batches_by_clip (one question per batch) ->
    Runner.run, greedy, uncut."""
    utils = load_task_utils(task_dir)
    model, _ = load_model(checkpoint)
    model.eval()
    items = []
    for i, doc in enumerate(DOCS):
        files = [task_dir / name for name in doc["visuals"]]
        if files[0].suffix == ".mp4":
            media = ("video", str(files[0]))
        elif len(files) == 1:
            media = ("image", files[0].read_bytes())
        else:
            media = ("frames", [f.read_bytes() for f in files])
        prompt = utils.doc_to_text(doc, {"post_prompt": "Only give the best option.\n"})
        items.append(bench_loaders.Item("local", str(i), prompt, doc["answer"], media,
                                    candidates=tuple("ABCD"[:len(doc["candidates"])])))
    runner = bench_runner.Runner(model, [mode], torch.device("cpu"))
    replies = {}
    for decoded, batch in bench_runner.batches_by_clip(items, MAX_FRAMES, FRAME_SIZE, 1, 0):
        assert decoded is not None, batch
        for item, (reply, _) in zip(batch, runner.run(decoded, batch, MAX_NEW_TOKENS)[mode]):
            replies[int(item.uid)] = reply
    return [replies[i] for i in range(len(DOCS))]


@pytest.mark.slow  # ~17 s: lmms-eval's command line imports for ~10 s
def test_lmms_eval_command_line_gives_the_harness_replies(checkpoint, task_dir, tmp_path):
    mode = "autoregressive"
    expected_raw = harness_replies(checkpoint, task_dir, mode)
    assert len(set(expected_raw)) == len(DOCS), expected_raw  # replies that tell the items apart
    # a stop string taken from inside a reply (two ASCII letters or digits: plain in the yaml), so that
    # `until` cuts at least one reply end to end
    stop = next((r[k:k + 2] for r in expected_raw for k in range(1, len(r) - 1)
                 if r[k:k + 2].isascii() and r[k:k + 2].isalnum()), None)
    assert stop is not None, expected_raw
    until = [stop, "\n\n"]
    expected = [cut_at_stops(r, until) for r in expected_raw]
    assert expected != expected_raw
    (task_dir / f"{TASK}.yaml").write_text(task_yaml(task_dir / "docs.json", until))

    # the entry point, registered as `pip install -e .` would (pyproject.toml), found on PYTHONPATH
    site = tmp_path / "site"
    dist = site / "fvlm_plugin-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fvlm-plugin\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nfvlm = lmms_fvlm:manifest\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    out = tmp_path / "out"
    model_args = (f"checkpoint={checkpoint},mode={mode},max_frames={MAX_FRAMES},frame_size={FRAME_SIZE},"
                  f"device=cpu,workers=1")
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "fvlm", "--model_args", model_args,
                           "--tasks", TASK, "--include_path", str(task_dir.parent), "--batch_size", "2",
                           "--output_path", str(out), "--log_samples"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log

    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    assert len(results) == 1, log  # lmms-eval exits 0 after some errors: the results file says it finished
    assert results[0]["config"]["model"] == "fvlm" and "checkpoint=" in results[0]["config"]["model_args"]
    assert TASK in results[0]["results"]
    samples = [json.loads(line) for p in out.rglob(f"*_samples_{TASK}.jsonl") for line in p.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(DOCS))), log
    utils = load_task_utils(task_dir)
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        i = s["doc_id"]
        # "resps": the reply as generate_until returned it; "filtered_resps": what the task scored (reasoning
        # tags cut, stripped). lmms-eval's logger leaves "resps" out where the two are equal.
        reply = s.get("resps", s["filtered_resps"])
        while isinstance(reply, list):
            reply = reply[0]
        assert reply == expected[i], (i, reply, expected[i], expected_raw[i])
        assert s["input"] == utils.doc_to_text(DOCS[i], {"post_prompt": "Only give the best option.\n"})


# ---- registration ---------------------------------------------------------------------------------------

def test_manifest_and_packaging():
    m = lmms_fvlm.manifest()
    assert m == ModelManifest(model_id="fvlm", simple_class_path="lmms_fvlm.FVLM")
    registry = ModelRegistryV2()
    registry.register_manifest(m)
    assert registry.get_model_class("fvlm") is FVLM and FVLM.is_simple
    assert registry.resolve("fvlm").model_type == "simple"
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lmms_eval.models"] == {"fvlm": "lmms_fvlm:manifest"}
    assert project["tool"]["setuptools"]["py-modules"] == ["lmms_fvlm"]  # not config.py, data.py, model.py, ...
    assert not project["project"].get("dependencies")  # requirements*.txt stay the source of truth


# ---- model_args ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({}, "checkpoint=PATH is required"),
    ({"checkpoint": "/no/such/run"}, "checkpoint: /no/such/run does not exist"),
    ({"mode": "fast"}, "mode must be one of coarse_only, coarse_fine, autoregressive, got 'fast'"),
    ({"max_frames": 0}, "max_frames must be an integer >= 1, got 0"),
    ({"max_frames": 8.5}, "max_frames must be an integer >= 1, got 8.5"),
    ({"frame_size": "big"}, "frame_size must be an integer >= 1, got 'big'"),
    ({"batch_size": "auto"}, "--batch_size auto is not supported"),
    ({"batch_size": "0"}, "batch_size must be an integer >= 1, got '0'"),
    ({"workers": -1}, "workers must be an integer >= 0, got -1"),
    ({"trust_checkpoint": "maybe"}, "trust_checkpoint must be true or false, got 'maybe'"),
    ({"device": "gpu0"}, "device must be a torch device such as cuda, cuda:1 or cpu, got 'gpu0'"),
    ({"max_frame": 8}, "unknown model_args ['max_frame']"),
])
def test_bad_model_args_are_refused_before_loading(kwargs, message, checkpoint):
    if kwargs and "checkpoint" not in kwargs:  # a good checkpoint and one bad argument
        kwargs = {"checkpoint": str(checkpoint), **kwargs}
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        FVLM(**kwargs)
    assert message in str(e.value)


def test_model_args_as_lmms_eval_passes_them(checkpoint):
    lm = FVLM.create_from_arg_string(f"checkpoint={checkpoint},max_frames=8,frame_size=28,workers=0",
                                     {"batch_size": "3", "max_batch_size": None, "device": "cpu"})
    assert (lm.mode, lm.max_frames, lm.frame_size, lm.batch_size, lm.device.type) == ("autoregressive", 8, 28, 3, "cpu")
    with pytest.raises(ValueError, match="frame_size=30 is not a multiple of the vision backbone's 14-px patches"):
        FVLM(checkpoint=str(checkpoint), frame_size=30)


# ---- gen_kwargs and visuals -----------------------------------------------------------------------------

def test_until_cuts_at_the_first_stop_string():
    assert cut_at_stops("A. up\n\nB", ["\n\n"]) == "A. up"
    assert cut_at_stops("xx STOP yy END", ["END", "STOP"]) == "xx "  # the earliest, whatever the list order
    assert cut_at_stops("abc", []) == "abc" and cut_at_stops("abc", ["z"]) == "abc"
    assert cut_at_stops("abc", ["a"]) == ""
    assert generation_settings({"until": "\n"}) == (16, ["\n"])  # a string, and the default length
    assert generation_settings({"until": ["", "Q:"], "max_new_tokens": 4}) == (4, ["Q:"])
    assert generation_settings(None) == (16, [])


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"do_sample": True, "temperature": 0.2}, "generates greedily only"),
    ({"temperature": 0.7}, "--gen_kwargs do_sample=false,temperature=0"),
    ({"num_beams": 4}, "num_beams=4"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"until": [3]}, "until must be a string or a list of strings"),
])
def test_sampling_and_bad_gen_kwargs_are_refused(gen_kwargs, message):
    with pytest.raises(ValueError) as e:
        generation_settings(gen_kwargs)
    assert message in str(e.value)


def test_greedy_settings_are_accepted():
    # HF semantics: do_sample=False is greedy whatever the temperature says
    assert generation_settings({"do_sample": False, "temperature": 0.2, "top_p": 0.9})[0] == 16
    assert generation_settings({"temperature": 0, "num_beams": 1, "do_sample": "false"})[0] == 16


def test_visuals_become_benchmark_media(tmp_path):
    img = Image.new("RGB", (20, 10), (1, 2, 3))
    assert media_of(None) is None and media_of([]) is None and media_of([None]) is None
    assert media_of(["/x/a.mp4"]) == ("video", "/x/a.mp4") and media_of("/x/a.MKV") == ("video", "/x/a.MKV")
    kind, data = media_of([img])
    assert kind == "image" and torch.equal(decode_image(data), torch.tensor([1, 2, 3])[:, None, None].expand(3, 10, 20))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert media_of([rgba])[0] == "image"  # transparency reaches media.decode_image (onto white)
    kind, frames = media_of([img, img, img])
    assert kind == "frames" and len(frames) == 3
    (tmp_path / "p.png").write_bytes(frames[0])
    assert media_of([str(tmp_path / "p.png")]) == ("image", frames[0])
    assert media_of(["/x/a.mp4", "/x/b.mp4"]) == ("missing", "2 videos in one request")
    assert media_of(["/x/a.mp4", img])[0] == "missing"
    assert media_of([{"array": [0.0], "sampling_rate": 16000}])[1].startswith("unsupported visual of type dict")


def test_generate_until_in_process(checkpoint, task_dir):
    """Requests as lmms-eval builds them: text-only, a missing video (an empty reply), stop strings;
    replies come back in request order and do not depend on the batch size."""
    docs = [{"v": None}, {"v": str(task_dir / "v1.mp4")}, {"v": "/no/such.mp4"}, {"v": str(task_dir / "v2.mp4")},
            {"v": None}]

    def requests(gen_kwargs):
        return [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                         arguments=(f"Question {i}?", dict(gen_kwargs), lambda d: [d["v"]] if d["v"] else [], i,
                                    "t", "test"))
                for i in range(len(docs))]

    replies = {}
    for bs in (1, 3):
        lm = FVLM(checkpoint=str(checkpoint), max_frames=MAX_FRAMES, frame_size=FRAME_SIZE, batch_size=bs, workers=0,
                  device="cpu")
        lm.task_dict = {"t": {"test": docs}}
        replies[bs] = lm.generate_until(requests({"max_new_tokens": 5}))
    assert replies[1] == replies[3] and replies[1][2] == ""
    model = lm.model
    for i in (0, 4):  # text only: the model's own generate, no frames
        assert replies[1][i] == model.generate(None, f"Question {i}?", max_new_tokens=5)
    assert all(replies[1][i] for i in (1, 3))
    stop = replies[1][1].strip()[:2]
    cut = lm.generate_until(requests({"max_new_tokens": 5, "until": [stop]}))
    assert cut == [cut_at_stops(r, [stop]) for r in replies[1]] and cut[1] != replies[1][1]
    with pytest.raises(ValueError, match="generates greedily only"):
        lm.generate_until(requests({"do_sample": True}))
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        lm.loglikelihood([])
