"""benchmark.py against lmms-eval itself, the release named by bench_parsers.LMMS_EVAL_VERSION: for MVBench,
Video-MME, ScienceQA-IMG and POPE, (a) our prompts equal its doc_to_text with the task yaml's default
kwargs, character for character; (b) over a generated corpus of several hundred replies, every per-item
verdict (right or wrong, counted or left out) equals what its process_results and aggregation functions
give; (c) so do the aggregate scores.

lmms-eval is installed without its dependencies (`pip install --no-deps lmms-eval==0.7.3`, in .ci/run).
Importing lmms_eval.tasks.<task>.utils the usual way would run lmms_eval/tasks/__init__.py, which imports
the whole evaluator (datasets, evaluate, sacrebleu, transformers, ...). So the four tasks' utils.py and
_task_utils/mcq_extract.py are loaded here by file path from the installed package: the release's own
code, run unchanged, needing only loguru (requirements-dev.txt) besides what the project already has.
"""

import ast
import copy
import importlib.metadata
import importlib.util
import json
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import bench_loaders
import bench_parsers
import bench_report
import bench_runner

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3 (CI does)")
from lmms_eval.api.reasoning import parse_reasoning_tags_config, strip_reasoning_tags  # noqa: E402

PKG = Path(lmms_eval.__file__).resolve().parent
TASKS = PKG / "tasks"
BENCHES = ("mvbench", "videomme", "scienceqa", "pope")
TASK_YAML = {"videomme": "videomme/videomme.yaml", "scienceqa": "scienceqa/scienceqa_img.yaml",
             "pope": "pope/pope.yaml"}  # MVBench: one yaml per sub-task, mvbench/mvbench_<task>.yaml


# ---- lmms-eval's own code and configuration ---------------------------------------------------------

class _YamlLoader(yaml.SafeLoader):
    pass


_YamlLoader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


def task_config(path: Path) -> dict:
    """A task yaml as lmms-eval reads it: an `include`d file first, the task's own keys over it."""
    cfg = yaml.load(path.read_text(), Loader=_YamlLoader)
    if "include" in cfg:
        cfg = {**task_config(path.parent / cfg.pop("include")), **cfg}
    return cfg


def default_kwargs(cfg: dict) -> dict:
    """lmms_eval_specific_kwargs as ConfigurableTask sets them for a model without its own entry (ours):
    the whole mapping, with its "default" entry merged in at the top level."""
    kwargs = copy.deepcopy(cfg["lmms_eval_specific_kwargs"])
    kwargs.update(kwargs["default"])
    return kwargs


def _function(cfg_value, module):
    tag, name = cfg_value
    assert tag == "!function" and name.startswith("utils."), cfg_value
    return getattr(module, name.split(".", 1)[1])


def _registered_aggregation(name: str):
    """A built-in aggregation ("mean"): its source from lmms_eval/api/metrics.py, run without the module
    (importing it needs sacrebleu and evaluate)."""
    tree = ast.parse((PKG / "api" / "metrics.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "id", "") == "register_aggregation"
                and d.args and getattr(d.args[0], "value", None) == name for d in node.decorator_list):
            node.decorator_list = []
            namespace = {}
            exec(compile(ast.Module([node], type_ignores=[]), str(PKG / "api" / "metrics.py"), "exec"), namespace)
            return namespace[node.name]
    raise AssertionError(f"no aggregation {name!r} registered in lmms_eval/api/metrics.py")


def _cli_reasoning_tags(cfg: dict):
    """The reasoning tags lmms-eval's evaluator strips from replies: the task's own, else the command
    line's default (read from lmms_eval/__main__.py, whose import pulls in everything)."""
    for node in ast.walk(ast.parse((PKG / "__main__.py").read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
                and getattr(node.args[0], "value", None) == "--reasoning_tags"):
            default = next(k.value for k in node.keywords if k.arg == "default")
            return parse_reasoning_tags_config(cli_value=ast.literal_eval(default), task_value=cfg.get("reasoning_tags"))
    raise AssertionError("no --reasoning_tags option in lmms_eval/__main__.py")


def _task_strips_replies() -> bool:
    """Whether ConfigurableTask.process_results strips each generated reply before the task's scorer sees it."""
    for node in ast.walk(ast.parse((PKG / "api" / "task.py").read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "ConfigurableTask":
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "process_results":
                    return "res.strip() if res is not None else ''" in ast.unparse(fn)
    raise AssertionError("no ConfigurableTask.process_results in lmms_eval/api/task.py")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # their regex literals have invalid escapes ("\d"): a compile-time warning
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


def _quiet(fn, *args):
    with warnings.catch_warnings():  # mcq_acc passes re.sub's count positionally (deprecated from Python 3.13)
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args)


# Imported by videomme/utils.py at module level but used only where our checks never go: cv2 by its
# subtitle reader (videomme_w_subtitle's prompt), datasets.Dataset as the type annotation of its "long"
# subset filter. Stand-ins are used only when the real package is not installed.
_STUBS = {"cv2": types.ModuleType("cv2"), "datasets": types.ModuleType("datasets")}
_STUBS["datasets"].Dataset = type("Dataset", (), {})


@pytest.fixture(scope="module")
def lmms(tmp_path_factory):
    installed = importlib.metadata.version("lmms-eval")
    assert installed == bench_parsers.LMMS_EVAL_VERSION, (
        f"lmms-eval {installed} is installed; benchmark.py follows {bench_parsers.LMMS_EVAL_VERSION}")
    from loguru import logger

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))  # the utils derive (unused) media paths from it
        for name, stub in _STUBS.items():
            if importlib.util.find_spec(name) is None:
                mp.setitem(sys.modules, name, stub)
        # videomme's scorer imports the shared extractor by its package name when it runs
        mcq = _load(TASKS / "_task_utils" / "mcq_extract.py", "lmms_eval.tasks._task_utils.mcq_extract")
        mp.setitem(sys.modules, "lmms_eval.tasks._task_utils.mcq_extract", mcq)
        utils = {b: _load(TASKS / b / "utils.py", f"lmms_eval_parity.{b}") for b in BENCHES}
        logger.disable("lmms_eval_parity")  # Video-MME's aggregation logs ~60 lines a call
        try:
            yield types.SimpleNamespace(utils=utils, strips=_task_strips_replies())
        finally:
            logger.enable("lmms_eval_parity")


def lmms_reply(reply: str, tags) -> str:
    """What lmms-eval's evaluator hands a task's process_results: reasoning blocks cut, then (in
    ConfigurableTask.process_results) stripped."""
    if tags is not None:
        reply = strip_reasoning_tags(reply, tags)
    return reply.strip()


# ---- docs in the public layouts, and our items made from them by benchmark.py's loaders --------------

MVBENCH_DOCS = {
    "action_antonym": [
        {"video": "a1.mp4", "question": "What is the person doing?",
         "candidates": ["Pushing something from left to right", "Pulling something from left to right",
                        "Not sure"], "answer": "Pulling something from left to right"},
        {"video": "a2.mp4", "question": "What action is shown?", "candidates": ["a dog running", "Eating", "I do not know",
                                                                             "the cat sits"], "answer": "a dog running"}],
    "fine_grained_action": [
        {"video": "f1.mp4", "question": "Is the door open?", "candidates": ["yes", "no"], "answer": "no"},
        {"video": "f2.mp4", "question": "Which fruit is cut first?",
         "candidates": ["Apple", "Banana", "Cherry", "Date", "Elderberry"], "answer": "Elderberry"},
        {"video": "f3.mp4", "question": "What colour is the ball? (B) is not an option.",
         "candidates": ["red", "blue", "green"], "answer": "green"}],
}
VIDEOMME_DOCS = [
    dict(video_id="001", duration="short", domain="Knowledge", sub_category="Humanity & History", url="https://x/1",
         videoID="fFjv93ACGo8", question_id="001-1", task_type="Counting Problem",
         question="When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles "
                  "and berries, which kind of the decoration has the largest number?",
         options=["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
         answer="C"),
    dict(video_id="002", duration="medium", domain="Sports Competition", sub_category="Football", url="https://x/2",
         videoID="vid2", question_id="002-2", task_type="OCR Problems", question="What is the final score?",
         options=["A. 1-0.", "B. 2-1.", "C. 0-0.", "D. 3-2."], answer="A"),
    dict(video_id="003", duration="long", domain="Life Record", sub_category="Pet & Animal", url="https://x/3",
         videoID="vid3", question_id="003-3", task_type="Action Reasoning", question="Why does the dog bark?",
         options=["A. It is hungry.", "B. A stranger is at the door.", "C. It wants to play.", "D. It hears a cat."],
         answer="B"),
    dict(video_id="004", duration="short", domain="Multilingual", sub_category="Multilingual", url="https://x/4",
         videoID="vid4", question_id="004-1", task_type="Temporal Reasoning", question="What happens last?",
         options=["A. She sings.", "B. He dances.", "C. They leave.", "D. Nothing."], answer="D"),
]
_SQA_EXTRA = dict(task="closed choice", grade="grade5", topic="x", category="y", skill="z", lecture="", solution="")
SCIENCEQA_DOCS = [
    dict(image=None, question="Which of these states is farthest north?",
         choices=["West Virginia", "Louisiana", "Arizona", "Oklahoma"], answer=0, hint="", subject="social science",
         **_SQA_EXTRA),
    dict(image=None, question="Identify the question that Tom and Justin's experiment can best answer.",
         choices=["Do ping pong balls stop rolling along the ground sooner after being launched from a real "
                  "catapult?", "Do ping pong balls travel farther when launched from a catapult?"], answer=1,
         hint="The passage below describes an experiment.\n\nTom placed a ping pong ball in a catapult.",
         subject="natural science", **_SQA_EXTRA),
    dict(image=None, question="Which animal's feet are also adapted for sticking to smooth surfaces?",
         choices=["a", "I", "Madagascar day gecko"], answer=2, hint="Context with (B) and A.", subject="natural science",
         **_SQA_EXTRA),
    dict(image=None, question="Pick one.", choices=["one", "two", "three", "four", "five"], answer=4, hint="",
         subject="language science", **_SQA_EXTRA),
]
POPE_DOCS = [
    dict(id="0", question_id="1", question="Is there a snowboard in the image?", answer="yes",
         image_source="COCO_val2014_000000310196", image=None, category="adversarial"),
    dict(id="1", question_id="2", question="Is there a dog in the image? ", answer="no",
         image_source="COCO_val2014_000000310196", image=None, category="adversarial"),
    dict(id="2", question_id="3", question=" Is there a person in the image?", answer="yes",
         image_source="COCO_val2014_000000210789", image=None, category="popular"),
    dict(id="3", question_id="4", question="Is there a car in the image?", answer="no",
         image_source="COCO_val2014_000000429109", image=None, category="random"),
]


DOCS = {"mvbench": [doc for docs in MVBENCH_DOCS.values() for doc in docs], "videomme": VIDEOMME_DOCS,
        "scienceqa": SCIENCEQA_DOCS, "pope": POPE_DOCS}


def _parquet(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{bench: [(item, doc, task)]}: the docs written in the public layouts benchmark.py reads, and the
    items its loaders make of them, paired in order."""
    root = tmp_path_factory.mktemp("lmms_parity")
    (root / "mvbench" / "json").mkdir(parents=True)
    for task, docs in MVBENCH_DOCS.items():
        (root / "mvbench" / "json" / f"{task}.json").write_text(json.dumps(docs))
    _parquet(root / "videomme" / "videomme" / "test-00000-of-00001.parquet", VIDEOMME_DOCS)
    _parquet(root / "scienceqa" / "ScienceQA-IMG" / "test-00000-of-00001.parquet", SCIENCEQA_DOCS)
    _parquet(root / "pope" / "data" / "test-00000-of-00001.parquet", POPE_DOCS)

    out = {}
    items = {item.uid: item for item in bench_loaders.mvbench_items(root)}
    out["mvbench"] = [(items[f"{task}/{i}"], doc, task) for task in sorted(MVBENCH_DOCS)
                      for i, doc in enumerate(MVBENCH_DOCS[task])]
    for bench, docs in (("videomme", VIDEOMME_DOCS), ("scienceqa", SCIENCEQA_DOCS), ("pope", POPE_DOCS)):
        items = getattr(bench_loaders, f"{bench}_items")(root)
        assert len(items) == len(docs)
        out[bench] = [(item, doc, None) for item, doc in zip(items, docs)]
    return out


def _config(bench, task=None):
    return task_config(TASKS / (f"mvbench/mvbench_{task}.yaml" if bench == "mvbench" else TASK_YAML[bench]))


# ---- the generated corpus of replies -----------------------------------------------------------------

def corpus(bench: str) -> list[str]:
    letters = "ABCDE" + "abcde"
    wraps = ["{}", "({})", "{}.", "{})", "{}:", "[{}]", "**{}**", " {}", "{}\n", "\t{} ", "{}. ", "({}).", "'{}'",
             '"{}"', "{},", "{}!", "<{}>", "{}.\n\nBecause it is."]
    phrases = ["Answer: {}", "answer: {}", "The answer is {}", "The answer is ({}).", "The best answer is {}.",
               "the correct answer is {}", "The correct option is {}", "I choose {}", "My answer is {}.",
               "Best option: ({})", "Option {}", "Choice {}", "Clearly {}", "{}. option text", "{}) option text",
               "Based on the video, {}", "{} is correct.", "I think it's {}, since the video shows it.",
               "<think>Maybe it is A.</think>{}", "答案是{}"]
    replies = [w.format(x) for x in letters for w in wraps] + [p.format(x) for x in letters for p in phrases]
    replies += [
        # negations and several letters
        "It is B, not A", "not A but C", "Not A. The answer is D", "B is wrong, A is right", "A, not B",
        "Definitely not C", "Not (A), it's (B)", "A is incorrect; D is correct.",
        "AB", "A or B", "A, B", "A and C", "A/B", "(A) or (B)", "A B C D", "ABCD", "BA", "C.D.", "A. B. C.",
        "E or A", "(C) (A)",
        # whitespace only, empty
        "", " ", "\n", "\t \n", "\u00a0", "\u3000", "\r\n",
        # look-alikes: fullwidth, Cyrillic, Greek, Turkish dotted I (lowercases to two characters)
        "Ｂ", "（Ｂ）", "Ｂ.", "А", "В.", "(С)", "Α", "Β)", "Ε", "İ think the answer is B", "İİİ (C)",
        "The answer is İ B", "ß C",
        # rambles with letters and words like "a", "I"
        "I think a dog is in the video, so the answer is B because the dog runs.",
        "A man is walking. I would say C.", "In the video, I see a cat.", "None of the above", "I don't know",
        "The video shows a person (probably) eating. Final answer: (D)", "a", "I", "e.g. B", "Option E", "F",
        "(F)", "G.", "The answer is F.", "Clearly,D", "D)A", "answer:(c)", "B-", "-B", "B?", "B;", "\"B\".", "B...",
        "1. B", "B. 3.5", "The answer is 3.5", "A.\nfoo", "b.\ncat", "Answer:\nB", "B\nC", "**Answer:** B",
        "The correct answer is B. Apples. Not C.", "Let me think. The choice is C? No. I pick A.",
        "ANSWER IS D", "my choice is (a)", "Best answer: c", "best answer is b", "选B", "答えはC", "정답은 D",
        "Yes", "No", "yes", "no",
        # reasoning blocks
        "<think>A</think>B", "<think>A</think>", "<think>unfinished A", "A</think>C", "</think> D",
        "<analysis>x A</analysis> D", "<think>a</think><think>b</think>C", "<THINK>A</THINK>B",
        "</think>A<think>B", "<think>A</think><analysis>B</analysis>", "C <think>A</think>",
    ]
    # the option texts themselves ("Pulling something...", "A. Apples.", "a", "I")
    for doc in DOCS[bench]:
        replies += doc.get("candidates") or doc.get("options") or doc.get("choices") or []
    if bench == "pope":
        yes_no = ["Yes", "yes", "yes.", "Yes.", " YES ", "YES\n", "No", "no", "No.", "NO", "No, there is not",
                  "No, there is no dog in the image.", "Yes, there is a dog", "nope", "yep", "Y", "N", "True",
                  "false", "There is a dog.", "<think>no</think>yes", "<think>yes</think> No", "yes</think>no",
                  "Ｙｅｓ", "Y\u0435s", "noo", "yes yes", "(yes)", "**No**", "Yes!", "\tno\t", "Maybe", "yes\n\nno",
                  "no.", "Yes, it is.", "<analysis>no</analysis>\nyes\n", "Nö", "ｎｏ"]
        replies += yes_no + [w.format(x) for x in ("yes", "No") for w in wraps]
    return list(dict.fromkeys(replies))


# ---- lmms-eval's verdicts -------------------------------------------------------------------------------

class Aggregation:
    """An lmms-eval aggregation function, memoised (Video-MME's walks ~6,500 categories a call)."""

    def __init__(self, fn):
        self.fn, self.memo = fn, {}

    def __call__(self, results):
        key = json.dumps(results, sort_keys=True, default=str)
        if key not in self.memo:
            self.memo[key] = _quiet(self.fn, results)
        return self.memo[key]


def verdict(agg, result, reference):
    """(counted, correct) for one reply, from the aggregation alone: `reference` is a right answer to
    the same doc. Alone, a right reply scores the maximum and a wrong or left-out one 0; beside the
    reference, a left-out reply leaves the maximum, a counted wrong one lowers it."""
    top, alone, pair = agg([reference]), agg([result]), agg([result, reference])
    assert top > 0
    counted = not (alone == 0 and pair == top)
    return counted, alone == top


METRIC = {"mvbench": "mvbench_accuracy", "videomme": "videomme_perception_score", "scienceqa": "exact_match",
          "pope": "pope_accuracy"}
SCALE = {"mvbench": 100, "videomme": 100, "scienceqa": 1, "pope": 1}  # lmms-eval reports these two in percent


def _aggregations(cfg, module):
    return {m["metric"]: Aggregation(_registered_aggregation(m["aggregation"]) if isinstance(m["aggregation"], str)
                                     else _function(m["aggregation"], module)) for m in cfg["metric_list"]}


# ---- the tests ---------------------------------------------------------------------------------------------

def test_the_installed_lmms_eval_is_the_release_we_follow(lmms):
    assert importlib.metadata.version("lmms-eval") == bench_parsers.LMMS_EVAL_VERSION
    assert lmms.strips, "lmms-eval's ConfigurableTask.process_results no longer strips replies: recheck score()"
    for bench in ("videomme", "scienceqa", "pope"):  # (and no task sets its own reasoning tags)
        assert tuple(map(tuple, _cli_reasoning_tags(_config(bench)))) == bench_parsers.LMMS_EVAL_REASONING_TAGS
    for task in MVBENCH_DOCS:
        assert tuple(map(tuple, _cli_reasoning_tags(_config("mvbench", task)))) == bench_parsers.LMMS_EVAL_REASONING_TAGS


@pytest.mark.parametrize("bench", BENCHES)
def test_prompts_and_settings_are_lmms_evals(lmms, cases, bench):
    module = lmms.utils[bench]
    for item, doc, task in cases[bench]:
        cfg = _config(bench, task)
        theirs = _function(cfg["doc_to_text"], module)(doc, default_kwargs(cfg))
        assert item.prompt == theirs, f"{bench} {item.uid}:\nours:   {item.prompt!r}\ntheirs: {theirs!r}"
        assert bench_parsers.MAX_NEW_TOKENS[bench] == cfg["generation_kwargs"]["max_new_tokens"]
    if bench == "mvbench":
        assert bench_loaders.MVBENCH_FOLDERS == module.DATA_LIST


@pytest.mark.parametrize("bench", BENCHES)
def test_every_reply_is_scored_as_lmms_eval_scores_it(lmms, cases, bench):
    module = lmms.utils[bench]
    replies = corpus(bench)
    assert len(replies) >= 300
    disagreements, records, results = [], defaultdict(list), defaultdict(lambda: defaultdict(list))
    for item, doc, task in cases[bench]:
        cfg = _config(bench, task)
        process = _function(cfg["process_results"], module)
        aggs = _aggregations(cfg, module)
        agg = aggs[METRIC[bench]]
        tags = _cli_reasoning_tags(cfg)
        reference = _quiet(process, doc, [lmms_reply(item.gold, tags)])
        for reply in replies:
            theirs = _quiet(process, doc, [lmms_reply(reply, tags)])
            counted, correct = verdict(agg, theirs[METRIC[bench]], reference[METRIC[bench]])
            ours = bench_runner.score(item, reply, picked=item.candidates[0])
            records[task].append(ours)
            for metric, value in theirs.items():
                results[task][metric].append(value)
            bad = ours["counted"] != counted or (counted and ours["correct"] != correct)
            if bench == "videomme":  # its reading is recorded too: compare it
                bad |= ours["parsed"] != theirs[METRIC[bench]]["pred_answer"]
            if bench == "pope":
                bad |= ours["parsed"] != theirs[METRIC[bench]]["prediction"]
            if bad:
                disagreements.append(f"{item.uid} gold {item.gold}: {reply!r}: ours parsed {ours['parsed']!r} "
                                     f"counted={ours['counted']} correct={ours['correct']}; lmms-eval counted={counted} "
                                     f"correct={correct} ({theirs[METRIC[bench]]})")
    assert not disagreements, (f"{len(disagreements)} disagreements with lmms-eval {bench_parsers.LMMS_EVAL_VERSION}:\n"
                               + "\n".join(disagreements[:60]))

    # the aggregate scores: per MVBench sub-task (each is its own lmms-eval task), else over the benchmark
    for task, recs in records.items():
        ours = bench_report.summarise(bench, recs)
        aggs = _aggregations(_config(bench, task), module)
        theirs = {m: aggs[m](results[task][m]) for m in aggs}
        assert SCALE[bench] * ours["accuracy"] == pytest.approx(theirs[METRIC[bench]], abs=1e-9), (bench, task)
        if bench == "pope":
            for key, metric in (("precision", "pope_precision"), ("recall", "pope_recall"), ("f1", "pope_f1_score"),
                                ("gold_yes_ratio", "pope_yes_ratio")):
                assert ours[key] == pytest.approx(theirs[metric], abs=1e-12), key
    if bench == "mvbench":  # and through summarise's per-task breakdown of the whole benchmark
        whole = bench_report.summarise(bench, [r for recs in records.values() for r in recs])
        for task in records:
            agg = _aggregations(_config(bench, task), module)[METRIC[bench]]
            assert 100 * whole["per_category"]["task"][task]["accuracy"] == pytest.approx(
                agg(results[task][METRIC[bench]]), abs=1e-9)


def test_the_corpus_exercises_the_rules(lmms, cases):
    """The corpus is not all-right or all-wrong: each benchmark sees right, wrong and (MVBench) left-out replies."""
    for bench in BENCHES:
        item = cases[bench][0][0]
        recs = [bench_runner.score(item, r, "A") for r in corpus(bench)]
        assert any(r["correct"] for r in recs) and not all(r["correct"] for r in recs)
        assert (bench == "mvbench") == any(not r["counted"] for r in recs)


def test_a_task_whose_replies_are_all_left_out_scores_as_lmms_eval_scores_it(lmms, cases):
    """MVBench: when every reply is empty once stripped, lmms-eval's aggregation gives 0 (not an error or NaN)."""
    module = lmms.utils["mvbench"]
    item, doc, task = cases["mvbench"][0]
    cfg = _config("mvbench", task)
    process, agg = _function(cfg["process_results"], module), _aggregations(cfg, module)[METRIC["mvbench"]]
    replies = ["", " ", "\n\n\n", "<think>B</think>\n"]
    theirs = agg([_quiet(process, doc, [lmms_reply(r, _cli_reasoning_tags(cfg))])[METRIC["mvbench"]] for r in replies])
    ours = bench_report.summarise("mvbench", [bench_runner.score(item, r, "A") for r in replies])
    assert ours["counted"] == 0 and 100 * ours["accuracy"] == theirs == 0
    assert ours["per_category"]["task"][task] == {"n": 0, "accuracy": 0.0, "likelihood_accuracy": 0.0}
