"""FoveatedVLM: modes, padding invariance, teacher forcing, caching, checkpoints, bad input."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from collate import pack_frames, target_index
from layout import visual_start
from model import MODES

SIZE = 28  # tiny frames: 2x2 patches + CLS with the test DINO


def sample_ids(model, question, answer):
    """Chat ids and an answer-only loss mask (assistant reply + <|im_end|>)."""
    user = [{"role": "user", "content": question}]
    prompt = model.chat_ids(user, add_generation_prompt=True)
    full = model.chat_ids(user + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    assert full[: len(prompt)] == prompt
    return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))


def make_batch(model, samples):
    """samples: (frames [T,3,H,W] or None, question, answer) -> dense padded batch."""
    rows = [sample_ids(model, q, a) for _, q, a in samples]
    b, s = len(rows), max(len(r[0]) for r in rows)
    t = max((f.shape[0] for f, _, _ in samples if f is not None), default=0)
    ids = torch.full((b, s), model.tokenizer.pad_token_id, dtype=torch.long)
    am, lm = torch.zeros(b, s, dtype=torch.long), torch.zeros(b, s)
    frames, fmask = torch.zeros(b, t, 3, SIZE, SIZE), torch.zeros(b, t, dtype=torch.bool)
    for i, ((f, _, _), (r, m)) in enumerate(zip(samples, rows)):
        ids[i, : len(r)], am[i, : len(r)], lm[i, : len(r)] = torch.tensor(r), 1, torch.tensor(m, dtype=torch.float)
        if f is not None:
            frames[i, : f.shape[0]], fmask[i, : f.shape[0]] = f, True
    return dict(frames=frames, frame_mask=fmask, input_ids=ids, attention_mask=am, loss_mask=lm)


def video(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, 3, SIZE, SIZE, generator=g)


SAMPLES = [(video(3, 1), "What moves?", "A red ball."),
           (video(5, 2), "Which way does the small square go, and what colour is it?", "Left, and it is blue."),
           (None, "Say hi.", "Hi!")]


def per_sample_loss(out):
    return -out["logp_sum"] / out["num_tokens"]


# ---- the published model's semantics, written out naively (video first, one sample, no padding) ----

def reference_losses(model, frames, ids, lm):
    """Losses as the predecessor computed them: [visual tokens; text], plain causal LLM calls."""
    enc, llm, T = model.encoder, model.llm, frames.shape[0]
    proj = lambda z: model.dino_to_llm(z) * model.visual_scale  # noqa: E731
    kv = enc.encode(frames)
    text = llm.get_input_embeddings()(ids)

    def shifted_ce(logits, labels, mask):
        per = F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none")
        return per[mask[0, 1:].bool()].mean()

    pad = torch.zeros(1, T, dtype=torch.long)
    z = proj(enc.query(model.q_static.expand(T, -1), kv)[0])[None]
    h = llm.model(inputs_embeds=torch.cat([z, text], 1)).last_hidden_state
    coarse_only = shifted_ce(llm.lm_head(h), torch.cat([pad, ids], 1), torch.cat([pad.float(), lm], 1))

    queries = model.llm_to_query(llm.model(inputs_embeds=z).last_hidden_state)
    queries = torch.cat([model.q_init[None], queries[:, :-1]], 1)
    z_fine = proj(enc.query(queries[0], kv)[0])[None]
    h = llm.model(inputs_embeds=torch.cat([z_fine, text], 1)).last_hidden_state
    coarse_fine = shifted_ce(llm.lm_head(h[:, T:]), ids, lm)

    cache, q = None, model.q_init
    for t in range(T):
        z_t = proj(enc.query(q, [(k[t:t + 1], v[t:t + 1]) for k, v in kv])[0])[None]
        out = llm.model(inputs_embeds=z_t, cache=cache, use_cache=True)
        cache, q = out.cache, model.llm_to_query(out.last_hidden_state[:, -1])
    h_text = llm.model(inputs_embeds=text, cache=cache).last_hidden_state
    logits = llm.lm_head(torch.cat([out.last_hidden_state[:, -1:], h_text], 1))
    autoregressive = shifted_ce(logits, torch.cat([pad[:, :1], ids], 1), torch.cat([pad[:, :1].float(), lm], 1))
    return dict(coarse_only=coarse_only, coarse_fine=coarse_fine, autoregressive=autoregressive)


@torch.no_grad()
def test_losses_match_the_published_model_semantics(tiny_model):
    ids, lm = sample_ids(tiny_model, "What is in the video?", "Two cats playing.")
    ids, lm = torch.tensor([ids]), torch.tensor([lm], dtype=torch.float)
    frames = video(4, 3)
    ref = reference_losses(tiny_model, frames, ids, lm)
    for mode in MODES:
        out = tiny_model(frames=frames[None], input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=lm, mode=mode)
        torch.testing.assert_close(out["loss"], ref[mode], atol=1e-5, rtol=1e-5, msg=mode)
    assert len({round(v.item(), 6) for v in ref.values()}) == 3  # the three modes really differ


@torch.no_grad()
def test_prompt_first_matches_a_naive_concatenation(tiny_backbones):
    """[question; visual tokens; rest of the text] as one plain sequence; every text token scored
    from the position just before it."""
    model = make_model(tiny_backbones, layout="prompt_first")
    frames, (ids, _) = video(3, 8), sample_ids(model, "Is the dot red?", "Yes.")
    ids_t = torch.tensor([ids])
    p = ids.index(model.marks.im_end)  # the first <|im_end|> closes the system turn...
    p = ids.index(model.marks.im_end, p + 1)  # ...the second one the user turn: the video goes before it
    enc, llm = model.encoder, model.llm
    z = model.dino_to_llm(enc.query(model.q_static.expand(3, -1), enc.encode(frames))[0]) * model.visual_scale
    text = llm.get_input_embeddings()(ids_t)[0]
    h = llm.model(inputs_embeds=torch.cat([text[:p], z, text[p:]])[None]).last_hidden_state[0]
    logits = llm.lm_head(h)
    before_text = [j if j < p - 1 else j + 3 for j in range(len(ids))]  # position predicting text j + 1
    out = model(frames=frames[None], input_ids=ids_t, mode="coarse_only")
    torch.testing.assert_close(out["logits"][0], logits[before_text], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["video_first", "prompt_first"])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_one_sample_alone_equals_its_place_in_a_padded_batch(tiny_backbones, layout, mode):
    model = make_model(tiny_backbones, layout=layout)
    batch = model(**make_batch(model, SAMPLES), mode=mode)
    for i, sample in enumerate(SAMPLES):
        alone = model(**make_batch(model, [sample]), mode=mode)
        torch.testing.assert_close(per_sample_loss(batch)[i], alone["loss"], atol=1e-5, rtol=1e-5)
        s = alone["logits"].shape[1]
        torch.testing.assert_close(batch["logits"][i, :s], alone["logits"][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_packed_frames_and_encode_once_images(tiny_model, mode):
    image = video(1, 7)[0]
    samples = [(image, "What colour is the dot?", "Green."), SAMPLES[0], SAMPLES[2]]
    pixels, index = pack_frames([s[0] for s in samples], image_frames=tiny_model.image_frames)
    assert pixels.shape[0] == 1 + 3  # the image is encoded once
    assert index[0].tolist() == [0] * 8
    dense = make_batch(tiny_model, [(image.expand(8, -1, -1, -1), q, a) for _, q, a in samples[:1]] + samples[1:])
    packed = dict(dense, frames=pixels, frame_index=index, frame_mask=None)
    a, b = tiny_model(**dense, mode=mode), tiny_model(**packed, mode=mode)
    torch.testing.assert_close(a["logp_sum"], b["logp_sum"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["video_first", "prompt_first"])
@torch.no_grad()
def test_teacher_forced_autoregressive_equals_parallel_fine_pass(tiny_backbones, layout):
    model = make_model(tiny_backbones, layout=layout)
    batch = make_batch(model, SAMPLES)
    fine = model(**batch, mode="coarse_fine")
    forced = model(**batch, mode="autoregressive", queries=fine["queries"])
    torch.testing.assert_close(forced["logp_sum"], fine["logp_sum"], atol=1e-5, rtol=1e-5)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(forced["logits"][real], fine["logits"][real], atol=1e-4, rtol=1e-4)
    # and the other way: the autoregressive queries, fed to the parallel pass, give the same output
    ar = model(**batch, mode="autoregressive")
    assert not torch.allclose(ar["queries"], fine["queries"])
    parallel = model(**batch, mode="coarse_fine", queries=ar["queries"])
    torch.testing.assert_close(parallel["logp_sum"], ar["logp_sum"], atol=1e-5, rtol=1e-5)


def test_all_modes_run_and_coarse_fine_backward_reaches_everything(tiny_model):
    batch = make_batch(tiny_model, SAMPLES)
    for mode in MODES:
        out = tiny_model(**batch, mode=mode)
        assert torch.isfinite(out["loss"]) and out["logits"].shape == (*batch["input_ids"].shape, len(tiny_model.tokenizer))
    tiny_model.train()
    tiny_model(**batch, mode="coarse_fine")["loss"].backward()
    names = ["q_static", "q_init", "dino_to_llm.weight", "llm_to_query.weight", "encoder.query_input_proj.weight",
             "encoder.output_proj.weight", "encoder.dino.patch_embed.weight", "encoder.dino.blocks.0.qkv.weight",
             "encoder.dino.blocks.2.fc1.weight", "encoder.dino.norm.weight", "llm.model.embed_tokens.weight",
             "llm.model.layers.0.self_attn.q_proj.weight", "llm.model.layers.1.mlp.down_proj.weight"]
    params = dict(tiny_model.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # weights nothing reads: the mask token is not even a parameter
    assert not any("mask_token" in n for n in params)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_text_only(tiny_model, mode):
    batch = make_batch(tiny_model, [SAMPLES[2]])
    a = tiny_model(**dict(batch, frames=None, frame_mask=None), mode=mode)
    b = tiny_model(**batch, mode=mode)  # frames [1, 0, 3, H, W]
    assert batch["frames"].shape[1] == 0
    torch.testing.assert_close(a["loss"], b["loss"])
    assert a["queries"] is None


@torch.no_grad()
def test_prompt_first_puts_the_video_after_the_question(tiny_backbones):
    model = make_model(tiny_backbones, layout="prompt_first")
    tok = model.tokenizer
    batch = make_batch(model, SAMPLES[:2])
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    p = visual_start(ids, am, model.marks)
    for i, (_, question, _) in enumerate(SAMPLES[:2]):
        assert tok.decode(ids[i, : p[i]]).endswith("user\n" + question)
        assert tok.decode(ids[i, p[i]:]).startswith("<|im_end|>\n<|im_start|>assistant\n")
    # the queries now depend on the question; with the video first they cannot
    frames = video(3, 4)
    two = [(frames, "Where is the red dot?", "Top."), (frames, "Where is the blue dot?", "Top.")]
    q = model(**make_batch(model, two), mode="coarse_fine")["queries"]
    assert not torch.allclose(q[0, 1:], q[1, 1:])
    vf = make_model(tiny_backbones, layout="video_first")
    q = vf(**make_batch(vf, two), mode="coarse_fine")["queries"]
    torch.testing.assert_close(q[0], q[1])


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
@torch.no_grad()
def test_dpo_logps_equal_separate_forwards(tiny_model, mode):
    chosen = make_batch(tiny_model, SAMPLES[:2])
    rejected = make_batch(tiny_model, [(f, q, "No idea at all, sorry.") for f, q, _ in SAMPLES[:2]])
    out = tiny_model.dpo_logps(chosen["frames"], chosen["input_ids"], chosen["attention_mask"], chosen["loss_mask"],
                               rejected["input_ids"], rejected["attention_mask"], rejected["loss_mask"],
                               frame_mask=chosen["frame_mask"], mode=mode)
    c, r = tiny_model(**chosen, mode=mode), tiny_model(**rejected, mode=mode)
    torch.testing.assert_close(out["chosen_logps"], c["logp_sum"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["rejected_logps"], r["logp_sum"], atol=1e-4, rtol=1e-5)
    assert torch.equal(out["chosen_tokens"], c["num_tokens"])


@pytest.mark.parametrize("mode", MODES)
def test_logits_at_target_index_only_give_the_same_loss_and_gradients(tiny_model, mode):
    """The training path (logits only where collate.target_index says the loss needs them) equals the
    full-logits path: loss, per-sample sums, token counts, the logits there, and every gradient."""
    batch = make_batch(tiny_model, SAMPLES)
    batch["loss_mask"][0, 1] = 1  # a target right after the first token: the index edge
    index = target_index(batch["loss_mask"], batch["attention_mask"])
    outs, grads = [], []
    for ti in (None, index):
        tiny_model.zero_grad()
        out = tiny_model(**batch, mode=mode, target_index=ti)
        out["loss"].backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
    full, sparse = outs
    torch.testing.assert_close(sparse["loss"], full["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse["logp_sum"], full["logp_sum"], atol=1e-5, rtol=1e-6)
    assert torch.equal(sparse["num_tokens"], full["num_tokens"]) and sparse["logits"].shape[0] == index.numel()
    b, s = batch["input_ids"].shape
    torch.testing.assert_close(sparse["logits"], full["logits"][:, :-1].reshape(b * (s - 1), -1)[index])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
@torch.no_grad()
def test_dpo_logps_at_target_index_only(tiny_model, mode):
    chosen = make_batch(tiny_model, SAMPLES[:2])
    rejected = make_batch(tiny_model, [(f, q, "No idea at all, sorry, none.") for f, q, _ in SAMPLES[:2]])
    args = (chosen["frames"], chosen["input_ids"], chosen["attention_mask"], chosen["loss_mask"],
            rejected["input_ids"], rejected["attention_mask"], rejected["loss_mask"])
    full = tiny_model.dpo_logps(*args, frame_mask=chosen["frame_mask"], mode=mode)
    sparse = tiny_model.dpo_logps(*args, frame_mask=chosen["frame_mask"], mode=mode,
                                  chosen_target_index=target_index(chosen["loss_mask"]),
                                  rejected_target_index=target_index(rejected["loss_mask"]))
    assert chosen["input_ids"].shape[1] != rejected["input_ids"].shape[1]  # the two grids differ
    for key in full:
        torch.testing.assert_close(sparse[key], full[key], atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="pass both"):
        tiny_model.dpo_logps(*args, frame_mask=chosen["frame_mask"], chosen_target_index=target_index(chosen["loss_mask"]))


@torch.no_grad()
def test_attention_maps(tiny_model):
    batch = make_batch(tiny_model, SAMPLES[:2])
    out = tiny_model(**batch, mode="coarse_fine", return_attention=True)
    static, dynamic = out["attention"]["static"], out["attention"]["dynamic"]
    assert static.shape == dynamic.shape == (2, 5, 3, 4, 5)  # [B, T, blocks, heads, 1 + patches]
    torch.testing.assert_close(dynamic.sum(-1), torch.ones(2, 5, 3, 4))
    ar = tiny_model(**batch, mode="autoregressive", return_attention=True)["attention"]["dynamic"]
    assert ar.shape == dynamic.shape


# ---- generation ----------------------------------------------------------------------------------

def greedy_without_cache(model, frames, prompt, mode, steps):
    """Re-run the whole forward for every new token (no KV cache anywhere)."""
    ids = model.chat_ids([{"role": "user", "content": prompt}])
    out = []
    for _ in range(steps):
        x = torch.tensor([ids + out])
        f = None if frames is None else (frames.expand(model.image_frames, -1, -1, -1) if frames.dim() == 3 else frames)[None]
        tok = model(frames=f, input_ids=x, attention_mask=torch.ones_like(x), mode=mode)["logits"][0, -1].argmax().item()
        if tok in model.stop_ids:
            break
        out.append(tok)
    return model.tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("layout", ["video_first", "prompt_first"])
@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_uncached(tiny_backbones, layout, mode):
    model = make_model(tiny_backbones, layout=layout)
    cases = [(video(4, 5), "Describe the video."), (video(1, 6)[0], "What is shown?"), (None, "Tell me a joke.")]
    expected = [greedy_without_cache(model, f, p, mode, steps=6) for f, p in cases]
    assert all(expected)
    for (f, p), want in zip(cases, expected):
        assert model.generate(f, p, max_new_tokens=6, mode=mode) == want
    # a batch of different prompts and media gives each sample's own reply
    assert model.generate([f for f, _ in cases], [p for _, p in cases], max_new_tokens=6, mode=mode) == expected


@torch.no_grad()
def test_generate_ids_reuses_one_encode_across_modes(tiny_model):
    """The evaluation path: frames encoded once, K/V passed to every mode; the replies equal
    generate()'s and the first logits are the prompt's next-token distribution from forward()."""
    from collate import pad_rows

    cases = [(video(4, 5), "Describe the video."), (video(1, 6)[0], "What is shown?"), (None, "Tell me a joke.")]
    rows = [tiny_model.chat_ids([{"role": "user", "content": p}]) for _, p in cases]
    ids, am = pad_rows(rows, tiny_model.pad_id), pad_rows([[1] * len(r) for r in rows], 0)
    pixels, index = pack_frames([f for f, _ in cases], tiny_model.image_frames)
    kv = tiny_model.encoder.encode(pixels)
    for mode in MODES:
        out = tiny_model.generate_ids(ids, am, pixels, index, kv=kv, mode=mode, max_new_tokens=5)
        replies = [tiny_model.tokenizer.decode(t, skip_special_tokens=True) for t in out["tokens"]]
        assert replies == tiny_model.generate([f for f, _ in cases], [p for _, p in cases], max_new_tokens=5, mode=mode)
        full = tiny_model(frames=pixels, frame_index=index, input_ids=ids, attention_mask=am, mode=mode, kv=kv)
        last = full["logits"][torch.arange(len(rows)), am.sum(1) - 1]
        torch.testing.assert_close(out["first_logits"], last.float(), atol=1e-4, rtol=1e-4)
        plain = tiny_model(frames=pixels, frame_index=index, input_ids=ids, attention_mask=am, mode=mode)
        assert torch.equal(plain["logits"], full["logits"])
    with pytest.raises(ValueError, match="kv holds 2 encoded frames"):
        tiny_model.generate_ids(ids, am, pixels, index, kv=[(k[:2], v[:2]) for k, v in kv])


def test_generate_stream_and_sampling(tiny_model):
    reply = tiny_model.generate(video(3, 1), "Hi", max_new_tokens=8)
    pieces = list(tiny_model.generate(video(3, 1), "Hi", max_new_tokens=8, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == reply
    torch.manual_seed(0)
    a = tiny_model.generate(None, "Hi", max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    assert tiny_model.generate(None, "Hi", max_new_tokens=8, temperature=1.0, top_p=0.9) == a
    messages = [{"role": "user", "content": "Hi"}]
    assert tiny_model.generate(video(3, 1), messages, max_new_tokens=8) == reply
    with pytest.raises(ValueError, match="single prompt"):
        tiny_model.generate(None, ["a", "b"], stream=True)


# ---- checkpoints ---------------------------------------------------------------------------------

def to_published_layout(state):
    """Our state dict -> the published checkpoint layout (transformers-4 DINO names, tied head absent,
    torch.compile prefixes here and there)."""
    out = {}
    for key, value in state.items():
        if not key.startswith("encoder.dino."):
            out[key] = value
            continue
        k = key[len("encoder.dino."):]
        parts = k.split(".")
        if k == "cls_token":
            out["embeddings.cls_token"] = value
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif parts[0] == "patch_embed":
            out["embeddings.patch_embeddings.projection." + parts[1]] = value
        elif parts[0] == "norm":
            out["layernorm." + parts[1]] = value
        else:
            i, name, rest = parts[1], parts[2], parts[3:]
            layer = f"encoder.layer.{i}."
            if name == "qkv":
                for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                    out[layer + f"attention.attention.{part}." + rest[0]] = chunk
            else:
                new = {"norm1": "norm1", "norm2": "norm2", "proj": "attention.output.dense", "fc1": "mlp.fc1",
                       "fc2": "mlp.fc2", "ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1"}[name]
                out[layer + new + ("." + rest[0] if rest else "")] = value
    out = {("encoder.dino." + k if not k.startswith(("q_", "dino_to", "llm", "encoder.q", "encoder.o")) else k): v
           for k, v in out.items()}
    out["encoder.dino.embeddings.mask_token"] = torch.zeros(1, state["encoder.dino.cls_token"].shape[-1])
    del out["llm.lm_head.weight"]
    compiled = {}
    for key, value in out.items():
        if key.startswith("llm."):
            key = "llm._orig_mod." + key[4:]
        elif key.startswith("q_"):
            key = "_orig_mod." + key
        compiled[key] = value
    return compiled


@torch.no_grad()
def test_published_layout_loads_and_runs(tiny_backbones):
    source, target = make_model(tiny_backbones, seed=0), make_model(tiny_backbones, seed=1)
    published = to_published_layout(source.state_dict())
    assert "encoder.dino.encoder.layer.0.attention.attention.query.weight" in published
    assert "encoder.query_input_proj.weight" in published and "encoder.query_input_proj.bias" not in published
    assert any(k.startswith("_orig_mod.") for k in published) and any("._orig_mod." in k for k in published)
    batch = make_batch(source, SAMPLES)
    before = target(**batch)["loss"]
    target.load_state_dict({"model": published}["model"])
    for mode in MODES:
        torch.testing.assert_close(target(**batch, mode=mode)["logp_sum"], source(**batch, mode=mode)["logp_sum"])
    assert not torch.allclose(before, target(**batch)["loss"])


@torch.no_grad()
def test_save_pretrained_round_trip_is_exact(tiny_backbones, tmp_path):
    model = make_model(tiny_backbones, layout="prompt_first", image_frames=4)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = type(model).from_pretrained(tmp_path / "ckpt")
    assert loaded.layout == "prompt_first" and loaded.image_frames == 4
    assert dataclasses.replace(loaded.config, pretrained=True) == model.config  # the one config, sources included
    # an export written before ModelConfig (no llm / dino keys, deep_query) loads; its sources are its folders
    config = tmp_path / "ckpt" / "config.json"
    old = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("llm", "dino")}
    config.write_text(json.dumps(dict(old, deep_query=True)))
    legacy = type(model).from_pretrained(tmp_path / "ckpt")
    assert legacy.config.llm == str(tmp_path / "ckpt" / "llm") and legacy.layout == "prompt_first"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in legacy.state_dict().items())
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = make_batch(model, SAMPLES)
    for mode in MODES:
        assert torch.equal(model(**batch, mode=mode)["logits"], loaded(**batch, mode=mode)["logits"])


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_a_clear_value_error(tiny_model):
    batch = make_batch(tiny_model, SAMPLES[:2])
    bad = [
        (dict(frames=batch["frames"][0]), "frames must be"),                         # wrong rank
        (dict(frames=batch["frames"][:, :, :1]), "frames must be"),                  # 1 channel
        (dict(frames=batch["frames"][:1], frame_mask=batch["frame_mask"][:1]), "batch size"),
        (dict(frame_mask=batch["frame_mask"][:, :2]), "frame_mask must have shape"),
        (dict(mode="fine_only"), "unknown mode"),
        (dict(loss_mask=batch["loss_mask"][:, :3]), "loss_mask must have the shape"),
        (dict(frame_index=torch.zeros(2, 3, dtype=torch.long)), "frame_index"),
        (dict(frame_mask=batch["frame_mask"].flip(1)), "real frames first"),
        (dict(mode="coarse_only", queries=torch.zeros(2, 5, 24)), "coarse_only has none"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            tiny_model(**dict(batch, **change))
    with pytest.raises(ValueError, match="unknown mode"):
        tiny_model.generate(None, "hi", mode="fast")


def test_bad_settings_are_clear_errors_before_anything_loads():
    from model import FoveatedVLM

    with pytest.raises(ValueError, match="FoveatedVLM: unknown key 'query_dm' \\(did you mean 'query_dim'"):
        FoveatedVLM(query_dm=24)
    with pytest.raises(ValueError, match="key 'layout' must be one of"):
        FoveatedVLM(layout="video_last")
    with pytest.raises(ValueError, match="key 'image_frames' must be an integer"):
        FoveatedVLM(image_frames="8")
    with pytest.raises(ValueError, match="deep_query=False"):
        FoveatedVLM(deep_query=False)
    with pytest.raises(ValueError, match="model.dino: unknown random preset 'huge'"):
        FoveatedVLM(llm_name="random:tiny", dino_name="random:huge")
    with pytest.raises(TypeError, match="takes a config.ModelConfig or keywords"):
        FoveatedVLM("HuggingFaceTB/SmolLM2-135M-Instruct")


@torch.no_grad()
def test_bfloat16_weights_and_cpu_autocast(tiny_backbones):
    """The model card casts the whole model to bf16; training uses autocast over fp32 weights."""
    model = make_model(tiny_backbones)
    batch = make_batch(model, SAMPLES)
    ref = model(**batch)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for mode in MODES:
            out = model(**batch, mode=mode)
            assert torch.isfinite(out["loss"]) and abs(out["loss"].item() - ref.item()) < 0.1 * ref.item(), mode
    model.to(torch.bfloat16)
    half = dict(batch, frames=batch["frames"].to(torch.bfloat16))
    for mode in MODES:
        out = model(**half, mode=mode)
        assert torch.isfinite(out["loss"]) and abs(out["loss"].item() - ref.item()) < 0.1 * ref.item(), mode
    assert isinstance(model.generate(video(2, 1).to(torch.bfloat16), "Hi", max_new_tokens=3), str)


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
def test_packed_training_forward_is_one_graph_without_host_syncs(tiny_model, mode):
    """torch.compile sees the whole training forward (packed frames) as one graph: no host syncs,
    no data-dependent Python branching."""
    batch = make_batch(tiny_model, SAMPLES[:2])
    index = torch.tensor([[0, 1, 2, -1, -1], [3, 4, 5, 6, 7]])
    packed = dict(batch, frames=torch.cat([SAMPLES[0][0], SAMPLES[1][0]]), frame_index=index, frame_mask=None)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(tiny_model.train())(**packed, mode=mode)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("part", ["llm", "dino"])
def test_a_hub_id_that_cannot_be_fetched_names_the_offline_alternatives(monkeypatch, part):
    """No network: one error naming the setting and what works offline, not transformers' traceback."""
    import backbones
    from model import FoveatedVLM

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(backbones, "load_tokenizer", offline)
    monkeypatch.setattr(backbones.AutoConfig, "from_pretrained", offline)
    names = {"llm_name": "random:tiny", "dino_name": "random:tiny", f"{part}_name": "someone/some-model"}
    with pytest.raises(OSError) as err:
        FoveatedVLM(**names, query_dim=16)
    message = str(err.value)
    assert message.startswith(f"model.{part} 'someone/some-model' could not be loaded") and "couldn't connect" in message
    assert "a local folder" in message and "random:<preset>" in message and ("a .gguf file" in message) == (part == "llm")
    assert err.value.__suppress_context__  # transformers' traceback is not chained in
