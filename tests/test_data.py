"""The shard stream: exactly-once coverage over ranks x workers, mixing ratios, resume without
replay, bad samples skipped and counted (never crashing, never losing valid ones), and `data.py stats`."""

import io
import json
import tarfile
from collections import Counter

import av
import numpy as np
import pytest
import torch

import data
from data import Loader, SampleSpec, ShardStream, Source
from media import encode_jpeg
from shards import ShardWriter
from test_media import write_video

SPEC = SampleSpec(stage="sft", frame_size=28, max_frames=4, max_text_tokens=200, image_frames=2)
JPEG = encode_jpeg(torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))


def conversation(key, source="toy"):
    return {"messages": [{"role": "user", "content": f"Question {key}?"},
                         {"role": "assistant", "content": f"Answer {key}."}], "source": source}


def write_shards(directory, count, per_shard, prefix="s", source="toy"):
    """Samples cycling through text-only, image, 1..6 frames; returns the keys."""
    keys = []
    with ShardWriter(directory, prefix=prefix, max_samples=per_shard) as w:
        for i in range(count):
            key = f"{prefix}{i:04d}"
            files = {"json": conversation(key, source)}
            if i % 3 == 1:
                files["jpg"] = JPEG
            elif i % 3 == 2:
                files.update({f"{j:03d}.jpg": JPEG for j in range(1 + i % 6)})
            w.write(key, files)
            keys.append(key)
    return keys


def keys_of(stream, worker, workers):
    return [s["key"] for s, _ in stream.samples(worker, workers) if s is not None]


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy")
    return directory, write_shards(directory, 7 * 5 - 2, 5)  # 7 shards, the last one short


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_exact_mode_reads_every_sample_exactly_once(toy_shards, smollm2_tokenizer, world_size, workers):
    directory, keys = toy_shards
    source = Source.from_patterns("toy", directory)
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            stream = ShardStream([source], SPEC, smollm2_tokenizer, batch_size=4, resampled=False, epoch=epoch,
                                 rank=rank, world_size=world_size)
            for w in range(workers):
                seen += keys_of(stream, w, workers)
        assert sorted(seen) == keys  # text-only samples included


def test_epochs_reshuffle_shards(toy_shards, smollm2_tokenizer):
    source = Source.from_patterns("toy", toy_shards[0])
    orders = [keys_of(ShardStream([source], SPEC, smollm2_tokenizer, 4, resampled=False, epoch=e, rank=0,
                                  world_size=1), 0, 1) for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


def test_dataloader_workers_cover_the_data_once(toy_shards, smollm2_tokenizer):
    directory, keys = toy_shards
    stream = ShardStream([Source.from_patterns("toy", directory)], SPEC, smollm2_tokenizer, batch_size=3,
                         resampled=False, rank=0, world_size=1)
    loader = Loader(stream, num_workers=2)
    batches = list(loader)
    got = [k for b in batches for k in b["keys"]]
    assert sorted(got) == keys
    text_rows = [b["frame_index"][i] for b in batches for i, k in enumerate(b["keys"]) if int(k[1:]) % 3 == 0]
    assert text_rows and all((r == -1).all() for r in text_rows)  # text-only samples reach the batches
    assert loader.counts()["seen"] == {"toy": len(keys)}
    assert sorted(k for b in loader for k in b["keys"]) == keys  # the next pass is a new epoch


def test_mixture_ratios_and_text_share(tmp_path, smollm2_tokenizer):
    for name in "abt":
        write_shards(tmp_path / name, 30, 10, prefix=name)
    a = Source.from_patterns("a", tmp_path / "a", weight=3)
    b = Source.from_patterns("b", tmp_path / "b", weight=1)
    t = Source.from_patterns("t", tmp_path / "t", text=True)
    spec = SampleSpec(frame_size=28, max_frames=2, image_frames=2)
    stream = ShardStream([a, b, t], spec, smollm2_tokenizer, batch_size=8, rank=0, world_size=2, seed=3)
    assert stream.probabilities == pytest.approx({"a": 0.645, "b": 0.215, "t": 0.14})
    n = 2500
    draws = [s["key"][0] for s, _ in zip((s for s, _ in stream.samples(0, 1)), range(n))]
    share = {k: v / n for k, v in Counter(draws).items()}
    # binomial standard deviations are <= 0.01 at n = 2500
    assert share["t"] == pytest.approx(0.14, abs=0.03) and share["a"] == pytest.approx(0.645, abs=0.03)
    other_rank = ShardStream([a, b, t], spec, smollm2_tokenizer, batch_size=8, rank=1, world_size=2, seed=3)
    assert keys_of_first(other_rank, 50) != keys_of_first(stream, 50)


def keys_of_first(stream, n):
    out = []
    for s, _ in stream.samples(0, 1):
        if s is not None:
            out.append(s["key"])
        if len(out) == n:
            return out


@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_without_replay(toy_shards, smollm2_tokenizer, resampled, workers):
    source = Source.from_patterns("toy", toy_shards[0])

    def loader():
        stream = ShardStream([source], SPEC, smollm2_tokenizer, batch_size=3, max_batch_frames=8,
                             resampled=resampled, seed=5, rank=0, world_size=1)
        return Loader(stream, num_workers=workers)

    reference = []
    for batch in loader():
        reference.append(batch["keys"])
        if len(reference) == 9:
            break
    first = loader()
    for i, batch in enumerate(first):
        assert batch["keys"] == reference[i]
        if i == 4:
            break
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = loader()
    resumed.load_state_dict(state)
    after = [b["keys"] for b, _ in zip(resumed, range(4))]
    assert after == reference[5:9]


def test_resume_refuses_a_different_setup(toy_shards, smollm2_tokenizer):
    source = Source.from_patterns("toy", toy_shards[0])
    a = Loader(ShardStream([source], SPEC, smollm2_tokenizer, 3, rank=0, world_size=1), num_workers=0)
    next(iter(a))
    b = Loader(ShardStream([source], SPEC, smollm2_tokenizer, 3, rank=0, world_size=1), num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        b.load_state_dict(a.state_dict())


def empty_video(tmp_path):
    buf = io.BytesIO()
    with av.open(io.BytesIO(write_video(tmp_path / "v.mp4", 3))) as src, av.open(buf, "w", format="matroska") as out:
        out.add_stream_from_template(src.streams.video[0])
        out.start_encoding()
    return buf.getvalue()


@pytest.fixture
def broken_shards(tmp_path):
    """Two shards: every kind of bad sample between good ones, and a tar cut off in its third sample."""
    good, bad = [], Counter()
    long_answer = " ".join(["word"] * 300)
    cases = [
        ("bad_json", {"json": b"{not json"}),
        ("missing_fields", {"json": {"source": "toy"}}),
        ("missing_fields", {"json": {"messages": [{"role": "user", "content": "no answer"}]}}),
        ("missing_json", {"jpg": JPEG}),
        ("bad_image", {"json": conversation("x"), "jpg": b"\xff\xd8\xffnot a jpeg"}),
        ("bad_image", {"json": conversation("x"), "000.jpg": JPEG, "001.jpg": b"garbage"}),
        ("bad_video", {"json": conversation("x"), "mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(64)}),
        ("empty_video", {"json": conversation("x"), "mkv": empty_video(tmp_path)}),
        ("mixed_media", {"json": conversation("x"), "jpg": JPEG, "000.jpg": JPEG}),
        ("text_too_long", {"json": {"messages": [{"role": "user", "content": "?"},
                                                 {"role": "assistant", "content": long_answer}]}}),
    ]
    with ShardWriter(tmp_path / "shards", max_samples=100) as w:
        for i, (reason, files) in enumerate(cases):
            w.write(f"good{i}", {"json": conversation(f"good{i}"), "000.jpg": JPEG, "001.jpg": JPEG})
            good.append(f"good{i}")
            w.write(f"bad{i}", files)
            bad[reason] += 1
        w.write("video", {"json": conversation("video"), "mp4": write_video(tmp_path / "ok.mp4", 12, fps=4)})
        good.append("video")
    with ShardWriter(tmp_path / "cut", prefix="cut") as w:
        for i in range(4):
            w.write(f"cut{i}", {"json": conversation(f"cut{i}"), "jpg": JPEG})
    path = tmp_path / "cut" / "cut-00000.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmember("cut2.jpg").offset_data + 10  # inside the third sample's image
    (tmp_path / "shards" / "shard-00001.tar").write_bytes(path.read_bytes()[:cut])
    good += ["cut0", "cut1"]
    bad["corrupt_shard"] += 1
    return tmp_path / "shards", sorted(good), dict(bad)


def test_bad_samples_are_skipped_counted_and_good_ones_kept(broken_shards, smollm2_tokenizer, caplog):
    directory, good, bad = broken_shards
    stream = ShardStream([Source.from_patterns("mixed", directory)], SPEC, smollm2_tokenizer, batch_size=4,
                         resampled=False, rank=0, world_size=1)
    loader = Loader(stream)
    with caplog.at_level("WARNING", logger="fvlm.data"):
        got = sorted(k for b in loader for k in b["keys"])
    assert got == good
    assert loader.counts()["skipped"] == {"mixed": bad}, (loader.counts(), bad)
    assert len(caplog.records) == len(bad)  # logged once per reason


def test_a_mostly_broken_source_is_an_error(tmp_path, smollm2_tokenizer):
    with ShardWriter(tmp_path) as w:
        for i in range(80):
            w.write(f"k{i}", {"json": conversation(f"k{i}") if i % 4 == 0 else b"{"})
    stream = ShardStream([Source.from_patterns("junk", tmp_path)], SPEC, smollm2_tokenizer, batch_size=2,
                         resampled=False, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="'junk'"):
        list(Loader(stream))


def test_dpo_samples_stream_as_pairs(tmp_path, smollm2_tokenizer):
    with ShardWriter(tmp_path) as w:
        for i in range(3):
            w.write(f"p{i}", {"json": {"messages": [{"role": "user", "content": "Which way?"}], "chosen": "Left.",
                                       "rejected": "Up and away.", "source": "pairs"}, "jpg": JPEG})
    spec = SampleSpec(stage="dpo", frame_size=28, image_frames=2)
    batch = next(iter(Loader(ShardStream([Source.from_patterns("p", tmp_path)], spec, smollm2_tokenizer, 3,
                                         resampled=False, rank=0, world_size=1))))
    assert batch["frames"].shape == (3, 3, 28, 28) and batch["frame_index"].tolist() == [[0, 0], [1, 1], [2, 2]]
    chosen = batch["chosen_input_ids"][0][batch["chosen_loss_mask"][0].bool()]
    assert smollm2_tokenizer.decode(chosen) == "Left.<|im_end|>"
    assert batch["rejected_input_ids"].shape[1] > batch["chosen_input_ids"].shape[1]


def test_stats_cli(broken_shards, toy_shards, smollm2_tokenizer, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    smollm2_tokenizer.save_pretrained(tok_dir)
    directory, good, bad = broken_shards
    args = ["stats", str(directory), str(toy_shards[0]), str(toy_shards[0] / "s-0000[0-2].tar"),
            "--workers", "2", "--world-size", "2", "--max-frames", "4", "--frame-size", "28",
            "--max-text-tokens", "200", "--tokenizer", str(tok_dir)]
    stats = data.main(args)
    toy = len(toy_shards[1])
    assert stats["samples"] == len(good) + toy + 15 and stats["read"] == stats["samples"] + sum(bad.values())
    assert stats["per_source"] == {"toy": stats["samples"]}
    assert sum(stats["per_rank"]) == stats["samples"]
    assert stats["duplicate_keys"] == 15  # the first three toy shards were named twice
    assert stats["skipped"] == {str(directory): bad}
    # 6-frame toy samples are capped at --max-frames 4: nothing above 4 frames
    assert set(stats["frames"]) <= {"text only", "image", "1 frame", "2-4 frames"}
    assert stats["frames"]["2-4 frames"] > 0 and stats["frames"]["text only"] > 0
    assert stats["text_tokens"]["max"] >= stats["text_tokens"]["median"] > 0
    captured = capsys.readouterr()
    assert "duplicate keys: 15" in captured.out and "bad_json 1" in captured.out
    assert "stats: " in captured.err and "samples read/s" in captured.err  # the progress line


@pytest.mark.parametrize("bad", [dict(stage="pretrain"), dict(resize="short"), dict(max_frames=0),
                                 dict(frame_size=0)])
def test_sample_spec_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SampleSpec(**bad)


def test_bad_sources_and_patterns(tmp_path, smollm2_tokenizer):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        Source.from_patterns("x", tmp_path / "nothing-here*.tar")
    write_shards(tmp_path, 3, 3)
    src = Source.from_patterns("x", tmp_path)
    with pytest.raises(ValueError, match="unique"):
        ShardStream([src, src], SPEC, smollm2_tokenizer, 2, rank=0, world_size=1)
    with pytest.raises(ValueError, match="weight"):
        Source.from_patterns("y", tmp_path, weight=0)
    with pytest.raises(ValueError, match="rank"):
        ShardStream([src], SPEC, smollm2_tokenizer, 2, rank=2, world_size=2)


def cut_shard(directory, member, into=0):
    """Cut DIRECTORY's second shard `into` bytes past the start of `member`'s header."""
    path = sorted(directory.glob("*.tar"))[1]
    with tarfile.open(path) as tar:
        cut = tar.getmember(member).offset + into
    path.write_bytes(path.read_bytes()[:cut])


def test_a_shard_cut_at_a_member_boundary_is_counted_as_corrupt(tmp_path, smollm2_tokenizer):
    keys = write_shards(tmp_path, 9, 3)  # shard 1 holds s0003 (text), s0004 (image), s0005 (frames)
    cut_shard(tmp_path, "s0005.000.jpg")  # the file ends where s0005 starts
    stats = data.collect_stats([tmp_path], SPEC, smollm2_tokenizer)
    # s0004 is whole on disk, but nothing tells it apart from a sample whose last members were cut
    # off: it is the broken sample, counted; s0005 is gone with the rest of the file
    assert stats["samples"] == len(keys) - 2 and stats["read"] == len(keys) - 1
    assert stats["skipped"] == {str(tmp_path): {"corrupt_shard": 1}}
    assert "skipped:\n  " in data.format_stats(stats)  # not "skipped: none"


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_next_to_a_broken_shard_reports_it_once(tmp_path, smollm2_tokenizer, resampled):
    write_shards(tmp_path, 9, 3)
    cut_shard(tmp_path, "s0004.jpg", into=600)  # inside s0004's image
    source = Source.from_patterns("toy", tmp_path)

    def run(start=None, n=24):
        stream = ShardStream([source], SPEC, smollm2_tokenizer, 2, resampled=resampled, seed=1, rank=0, world_size=1)
        stream.start_states = {0: start} if start else {}
        return [((s or {}).get("key"), state) for (s, state), _ in zip(stream.samples(0, 1), range(n))]

    reference = run()
    assert [key for key, _ in reference].count(None) >= 1  # the broken shard was read
    for i, (_, state) in enumerate(reference[:-1]):
        resumed = run(json.loads(json.dumps(state)), len(reference) - i - 1)
        assert [k for k, _ in resumed] == [k for k, _ in reference[i + 1:]], i
        assert resumed[-1][1]["skipped"] == reference[-1][1]["skipped"], i


def test_keys_with_dots_are_named_as_such(tmp_path, smollm2_tokenizer):
    files = {"v2.json": json.dumps(conversation("clip")).encode(), "v2.000.jpg": JPEG}  # clip.v2.json, ...
    with pytest.raises(data.SampleError, match="keys cannot contain dots") as e:
        data.decode_sample("clip", files, SPEC, smollm2_tokenizer)
    assert e.value.reason == "dotted_key" and "clip.v2.json" in str(e.value)
    with pytest.raises(data.SampleError) as e:
        data.decode_sample("clip", {"jpg": JPEG}, SPEC, smollm2_tokenizer)
    assert e.value.reason == "missing_json"
    with ShardWriter(tmp_path) as w:
        w.write("clip", {"v2.json": json.dumps(conversation("clip")).encode(), "v2.000.jpg": JPEG})
        w.write("fine", {"json": conversation("fine"), "jpg": JPEG})
    stats = data.collect_stats([tmp_path], SPEC, smollm2_tokenizer)
    assert stats["samples"] == 1 and stats["skipped"] == {str(tmp_path): {"dotted_key": 1}}


def test_stats_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    for split in ("sft", "eval"):
        write_shards(tmp_path / "synthetic" / split, 2, 2)
    for args, message in [([str(tmp_path / "synthetic")], "its subfolders do: eval, sft"),
                          ([str(tmp_path / "nothing*.tar")], "matches no file"),
                          ([str(tmp_path / "synthetic" / "sft"), "--max-frames", "0"], "max_frames must be >= 1")]:
        with pytest.raises(SystemExit) as e:
            data.main(["stats", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_resume_refuses_a_changed_shard_list(tmp_path, smollm2_tokenizer):
    write_shards(tmp_path, 12, 3)  # 4 shards

    def loader():
        stream = ShardStream([Source.from_patterns("toy", tmp_path)], SPEC, smollm2_tokenizer, 3, rank=0,
                             world_size=1)
        return Loader(stream)

    first = loader()
    next(iter(first))
    state = json.loads(json.dumps(first.state_dict()))
    loader().load_state_dict(state)  # the same shards
    extra = tmp_path / "s-00004.tar"
    extra.write_bytes((tmp_path / "s-00000.tar").read_bytes())
    with pytest.raises(ValueError, match="'toy'.*4 shards then, 5 now.*restore the shard list or start a new run"):
        loader().load_state_dict(state)
    old_format = {k: v for k, v in state.items() if k != "shard_lists"}
    loader().load_state_dict(old_format)  # saved before shard lists were recorded: not checked
    extra.unlink()
    (tmp_path / "s-00003.tar").rename(tmp_path / "s-00009.tar")
    with pytest.raises(ValueError, match="4 shards then and now, but not the same"):
        loader().load_state_dict(state)
    (tmp_path / "s-00009.tar").unlink()
    with pytest.raises(ValueError, match="'toy'.*4 shards then, 3 now"):
        loader().load_state_dict(state)


def test_resume_accepts_the_same_shards_in_a_moved_folder(tmp_path, smollm2_tokenizer):
    write_shards(tmp_path / "a", 12, 3)

    def loader(folder):
        return Loader(ShardStream([Source.from_patterns("toy", folder)], SPEC, smollm2_tokenizer, 3, rank=0,
                                  world_size=1))

    first = loader(tmp_path / "a")
    next(iter(first))
    state = first.state_dict()
    (tmp_path / "a").rename(tmp_path / "b")  # e.g. another $DATA on another cluster
    loader(tmp_path / "b").load_state_dict(state)


# --- precomputed latents (SampleSpec(latents=True)) -------------------------------------------

def latents_npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype == object)
    return buf.getvalue()


def numbered_latents(n):
    """[n, 2, 3, 3] float16 latents whose every value is the frame number."""
    return np.broadcast_to(np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1), (n, 2, 3, 3)).copy()


def grey_jpeg(level):
    return encode_jpeg(torch.full((3, 20, 24), level, dtype=torch.uint8))


def test_latents_are_thinned_with_the_frames(smollm2_tokenizer):
    spec = SampleSpec(stage="sft", frame_size=28, max_frames=4, latents=True)
    files = {"json": json.dumps(conversation("clip")).encode(), "latents.npy": latents_npy(numbered_latents(6)),
             **{f"{i:03d}.jpg": grey_jpeg(40 * i) for i in range(6)}}
    out = data.decode_sample("clip", files, spec, smollm2_tokenizer)
    keep = data.sample_frame_indices(6, 4)
    assert keep == [0, 2, 3, 5]
    assert out["latents"].dtype == torch.float16 and out["latents"].shape == (4, 2, 3, 3)
    assert out["latents"][:, 0, 0, 0].tolist() == keep  # latent i is that of the frame the model sees as i
    assert [round(f.float().mean().item() / 40) for f in out["frames"]] == keep
    one = latents_npy(numbered_latents(1))
    image = data.decode_sample("img", {"json": files["json"], "jpg": JPEG, "latents.npy": one}, spec, smollm2_tokenizer)
    assert image["frames"].shape == (3, 28, 28) and image["latents"].shape == (1, 2, 3, 3)
    assert data.decode_sample("text", {"json": files["json"]}, spec, smollm2_tokenizer)["latents"] is None
    assert "latents" not in data.decode_sample("clip", files, SPEC, smollm2_tokenizer)  # not asked for


def test_samples_without_usable_latents_are_skipped_and_counted(tmp_path, smollm2_tokenizer, capsys):
    frames = {f"{i:03d}.jpg": JPEG for i in range(3)}
    nan = numbered_latents(3)
    nan[1, 0, 0, 0] = np.nan
    cases = {  # key: (skip reason or None, members besides json)
        "good": (None, {**frames, "latents.npy": latents_npy(numbered_latents(3))}),
        "text": (None, {}),
        "image": (None, {"jpg": JPEG, "latents.npy": latents_npy(numbered_latents(1))}),
        "missing": ("missing_latents", dict(frames)),
        "fewer": ("latent_mismatch", {**frames, "latents.npy": latents_npy(numbered_latents(2))}),
        "video": ("missing_latents", {"mp4": write_video(tmp_path / "v.mp4", 4), "latents.npy": b""}),
        "pickled": ("bad_latents", {**frames, "latents.npy": latents_npy(np.array([{"run": "code"}] * 3))}),
        "flat": ("bad_latents", {**frames, "latents.npy": latents_npy(np.zeros((3, 4), np.float16))}),
        "nan": ("bad_latents", {**frames, "latents.npy": latents_npy(nan)}),
    }
    with ShardWriter(tmp_path / "shards") as w:
        for key, (_, members) in cases.items():
            w.write(key, {"json": conversation(key), **members})
    spec = SampleSpec(stage="sft", frame_size=28, max_frames=4, latents=True)
    stats = data.collect_stats([tmp_path / "shards"], spec, smollm2_tokenizer)
    expected = Counter(reason for reason, _ in cases.values() if reason)
    assert stats["skipped"] == {str(tmp_path / "shards"): dict(expected)}
    assert stats["samples"] == sum(reason is None for reason, _ in cases.values())
    # without latents every sample is usable
    assert data.collect_stats([tmp_path / "shards"], SPEC, smollm2_tokenizer)["skipped"] == {}
    with pytest.raises(data.SampleError, match="holds 2 latents but the sample stores 3 frames"):
        data.decode_sample("fewer", {"json": json.dumps(conversation("x")).encode(), **cases["fewer"][1]}, spec,
                           smollm2_tokenizer)
    tok_dir = tmp_path / "tok"
    smollm2_tokenizer.save_pretrained(tok_dir)
    cli = data.main(["stats", str(tmp_path / "shards"), "--latents", "--frame-size", "28", "--json",
                     "--tokenizer", str(tok_dir)])
    assert cli["skipped"] == stats["skipped"]
    assert json.loads(capsys.readouterr().out)["skipped"] == stats["skipped"]
