"""scripts/pretrain_llm.py: the scene text carries each probe answer (answered here from the text
alone), the folder it writes loads as model.llm through the public API, and runs are cached and
deterministic."""

import random
import re
from collections import Counter

import torch
from transformers import AutoModelForCausalLM

from conftest import load_script
from model import FoveatedVLM

pretrain = load_script("pretrain_llm")
TINY = dict(steps=3, batch=4)


def answer_from_text(text: str) -> str:
    """Answer the question after the scene lines from the lines alone."""
    *lines, question = text.split("\n")
    frames = [re.findall(r"(\w+) (\w+) at row (\d+) column (\d+)", line) for line in lines]
    first = {(c, s, int(r), int(k)) for c, s, r, k in frames[0]}
    last = {(c, s, int(r), int(k)) for c, s, r, k in frames[-1]}
    moved = sorted(first - last, key=lambda o: o[:2])
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        named = [o for o in first if o[1] == m[1]]
        assert len(named) == 1, text
        return named[0][0]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        named = [o for o in first if o[0] == m[1]]
        assert len(named) == 1, text
        return named[0][1]
    assert len(lines) > 1 and len(moved) == 1, text  # a video: exactly one object changes its cell
    (colour, shape, r0, c0), = moved
    (_, _, r1, c1), = [o for o in last if o[:2] == (colour, shape) and o not in first]
    if question == "What colour is the object that moves?":
        return colour
    return "right" if c1 > c0 else "left" if c1 < c0 else "down" if r1 > r0 else "up"


def test_the_text_carries_the_answer():
    s = pretrain.Settings(**TINY)
    rng = random.Random(0)
    tasks = Counter()
    for i in range(120):
        messages, task = pretrain.sample(s, rng, s.tasks[i % len(s.tasks)])
        answer = answer_from_text(messages[0]["content"])
        assert answer in messages[1]["content"].split(" ")[-1] or \
            messages[1]["content"].endswith(f"to the {answer}."), (messages, answer)
        tasks[task] += 1
    assert set(tasks) == set(s.tasks)


def test_the_folder_loads_as_the_llm_and_is_cached(tmp_path):
    s = pretrain.Settings(**TINY)
    folder = pretrain.ensure(s, tmp_path, log=lambda *_: None)
    model = FoveatedVLM(llm_name=str(folder), dino_name="random:tiny", query_dim=16).eval()
    trained = dict(model.llm.named_parameters())
    saved = AutoModelForCausalLM.from_pretrained(folder)
    for name, p in saved.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert isinstance(model.generate(None, "Say hi.", max_new_tokens=3), str)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrain.ensure(s, tmp_path, log=lambda *_: None) == folder  # cached: nothing trained again
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    again = AutoModelForCausalLM.from_pretrained(pretrain.ensure(s, tmp_path / "b", log=lambda *_: None))
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), again.state_dict().values()))
