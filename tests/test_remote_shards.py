"""Shards named by URL (shards.read_samples through webdataset's gopen), over a loopback HTTP server:
the same samples and keys as the local files, exact coverage over ranks x workers, resume inside a
remote shard, retries that skip what was read, and broken downloads (cut, 404, stalled) counted
without losing the shards that work. Offline: 127.0.0.1 only."""

import json
import tarfile
import threading
import time
from collections import Counter
from urllib.parse import quote
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data
import shards
from data import Loader, ShardStream, Source
from shards import RemoteOptions, ShardError, expand, hf_url, read_samples
from test_data import SPEC, keys_of, write_shards
from test_shards import cut_points, read_until_error, shard  # noqa: F401 - shard: a fixture

FAST = RemoteOptions(timeout=0.4, retries=2, backoff=0.01)
STALL_S = 2.0


class _Handler(BaseHTTPRequestHandler):
    """/ok/NAME: the shard; /cut/NAME: Content-Length of the whole, the connection closed after CUT
    bytes; /flaky/NAME: cut like that on the first request only; /stall/NAME: 1 KB, then a pause
    past the timeout; anything else: 404. Requests are counted per path."""

    def do_GET(self):
        server = self.server
        with server.lock:
            server.hits[self.path] += 1
            first = server.hits[self.path] == 1
        kind, _, name = self.path.lstrip("/").partition("/")
        path = server.root / name
        if kind not in ("ok", "cut", "flaky", "stall") or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if kind == "cut" or (kind == "flaky" and first):
                self.wfile.write(body[:server.cut])
                self.wfile.flush()
                self.close_connection = True
            elif kind == "stall":
                self.wfile.write(body[:1024])
                self.wfile.flush()
                time.sleep(STALL_S)
                self.close_connection = True
            else:
                self.wfile.write(body)
        except OSError:  # the client gave up first
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, shard folder, keys, server): 5 shards of 5 samples, the last one short."""
    root = tmp_path_factory.mktemp("served")
    keys = write_shards(root, 5 * 5 - 2, 5)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.hits, httpd.lock = root, Counter(), threading.Lock()
    # the cut falls inside the third sample's members of s-00001.tar
    httpd.cut = (root / "s-00001.tar").stat().st_size // 2
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, keys, httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fast_remote(monkeypatch):
    monkeypatch.setattr(shards, "REMOTE", FAST)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def samples_before(path, cut):
    """The samples of a shard cut after `cut` bytes that are complete: those whose next sample's
    first header lies wholly before the cut (a sample ends where the next one starts)."""
    with tarfile.open(path) as tar:
        starts, key = [], None
        for member in tar:
            k = shards.split_name(member.name)[0]
            if k != key:
                starts.append(member.offset)
                key = k
    return sum(1 for start in starts[1:] if start + 512 <= cut)


def local_samples(path, skip=0):
    return list(read_samples(path, skip=skip))


def test_urls_expand_by_braces_only():
    assert expand("https://host.invalid/train-{00..02}.tar") == [f"https://host.invalid/train-{i:02d}.tar"
                                                                for i in range(3)]
    hub = "https://huggingface.co/datasets/o/n/resolve/main/x-{0..1}.tar?download=true"  # a query is no glob
    assert expand(hub) == [hub.replace("{0..1}", "0"), hub.replace("{0..1}", "1")]
    assert expand(["pipe:cat /nowhere/a-{1..2}.tar", "gs://b/c.tar"]) == [
        "gs://b/c.tar", "pipe:cat /nowhere/a-1.tar", "pipe:cat /nowhere/a-2.tar"]
    with pytest.raises(ValueError, match=r"https://host.invalid/\*\.tar.*glob"):
        expand("https://host.invalid/*.tar")
    with pytest.raises(ValueError, match="pipe:aws s3 cp s3://bucket/a.tar -"):
        expand("s3://bucket/a.tar")
    assert hf_url("hf://datasets/owner/name@v1/train/x-0.tar").endswith(
        "/datasets/owner/name/resolve/v1/train/x-0.tar")
    with pytest.raises(ValueError, match="hf://datasets/OWNER"):
        hf_url("hf://owner/name")


def test_http_and_pipe_read_the_same_samples_as_the_files(server):
    base, root, _, _ = server
    for path in sorted(root.glob("*.tar"))[:2]:
        local = local_samples(path)
        for url in (f"{base}/ok/{path.name}", f"pipe:cat {path}"):
            assert list(read_samples(url)) == local
            assert list(read_samples(url, skip=3)) == local[3:]  # skipped, not yielded
    with pytest.raises(ShardError) as failed:  # a failing command counts, after its retries
        list(read_samples(f"pipe:cat {root}/missing.tar", remote=RemoteOptions(retries=1, backoff=0)))
    assert failed.value.reason == "unreadable_shard" and "after 1 retry" in str(failed.value)
    start = time.perf_counter()
    with pytest.raises(ShardError, match="no data for 0.4 s"):  # a stalled command times out too
        list(read_samples(f"pipe:sleep {STALL_S}; cat {path}", remote=RemoteOptions(timeout=0.4, retries=0)))
    assert time.perf_counter() - start < STALL_S
    assert not shards.is_url("v2:x.tar") and not shards.is_url("C:\\x.tar") and shards.is_url("s3://b/x.tar")


def test_a_dropped_connection_is_retried_skipping_what_was_read(server):
    base, root, _, httpd = server
    name = "s-00002.tar"
    assert list(read_samples(f"{base}/flaky/{name}")) == local_samples(root / name)  # whole, no repeats
    assert httpd.hits[f"/flaky/{name}"] == 2


def test_broken_downloads_are_counted_and_the_rest_kept(server, smollm2_tokenizer):
    base, root, keys, httpd = server
    patterns = [f"{base}/ok/s-{{00000..00004}}.tar",
                f"{base}/cut/s-00001.tar", f"{base}/missing/s-00000.tar", f"{base}/stall/s-00003.tar"]
    start = time.perf_counter()
    stats = data.collect_stats(patterns, SPEC, smollm2_tokenizer, workers=2, world_size=1)
    # 1 + 2 retries of the stall, each timing out; never the stall's full pause per read
    assert time.perf_counter() - start < 3 * STALL_S
    before_cut = samples_before(root / "s-00001.tar", httpd.cut)
    assert stats["per_source"] == {"toy": len(keys) + before_cut}
    assert stats["skipped"] == {p: {"unreadable_shard": 1} for p in patterns[1:]}
    assert stats["read"] == len(keys) + before_cut + 3
    assert httpd.hits["/cut/s-00001.tar"] == 3 and httpd.hits["/stall/s-00003.tar"] == 3
    assert httpd.hits["/missing/s-00000.tar"] == 1  # a 404 is not retried


def test_cut_shard_reports_the_samples_read(server):
    base, root, _, _ = server
    with pytest.raises(ShardError) as failed:
        for _ in read_samples(f"{base}/cut/s-00001.tar", remote=RemoteOptions(retries=0)):
            pass
    assert failed.value.samples == samples_before(root / "s-00001.tar", server[3].cut) > 0
    assert failed.value.reason == "unreadable_shard"
    assert "closed after" in str(failed.value)


@pytest.mark.parametrize("world_size,workers", [(2, 2)])
def test_exact_coverage_over_ranks_and_workers_equals_local(server, smollm2_tokenizer, world_size, workers):
    base, root, keys, _ = server
    remote = Source.from_patterns("toy", f"{base}/ok/s-{{00000..00004}}.tar")
    local = Source.from_patterns("toy", root)
    seen = []
    for rank in range(world_size):
        streams = [ShardStream([s], SPEC, smollm2_tokenizer, batch_size=4, resampled=False, rank=rank,
                               world_size=world_size) for s in (remote, local)]
        for w in range(workers):
            got = keys_of(streams[0], w, workers)
            assert got == keys_of(streams[1], w, workers)
            seen += got
    assert sorted(seen) == keys


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_a_remote_shard_equals_an_uninterrupted_run(server, smollm2_tokenizer, workers):
    base = server[0]
    source = Source.from_patterns("toy", f"{base}/ok/s-{{00000..00004}}.tar")

    def loader():
        stream = ShardStream([source], SPEC, smollm2_tokenizer, batch_size=3, resampled=False, seed=5, rank=0,
                             world_size=1)
        return Loader(stream, num_workers=workers)

    reference = [b["keys"] for b in loader()]
    first = loader()
    for i, batch in enumerate(first):
        assert batch["keys"] == reference[i]
        if i == 2:
            break
    state = json.loads(json.dumps(first.state_dict()))
    assert any(w["positions"]["toy"]["offset"] % 5 for w in state["workers"].values())  # inside a shard
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b["keys"] for b in resumed] == reference[3:]


@pytest.mark.parametrize("bad", [dict(timeout=0), dict(retries=-1), dict(retries=1.5), dict(backoff=-1)])
def test_remote_options_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RemoteOptions(**bad)


def test_stats_cli_reads_urls(server, smollm2_tokenizer, tmp_path, capsys):
    base, _, keys, _ = server
    tok_dir = tmp_path / "tok"
    smollm2_tokenizer.save_pretrained(tok_dir)
    common = ["--max-frames", "4", "--frame-size", "28", "--max-text-tokens", "200", "--tokenizer", str(tok_dir)]
    stats = data.main(["stats", f"{base}/ok/s-{{00000..00004}}.tar", "--timeout", "5", "--retries", "1", *common])
    assert stats["samples"] == len(keys)
    with pytest.raises(SystemExit) as exited:
        data.main(["stats", f"{base}/ok/s-00000.tar", "--retries", "-1", *common])
    assert exited.value.code == 2 and "retries" in capsys.readouterr().err


def test_every_cut_of_a_streamed_shard_yields_a_complete_prefix_or_everything(shard, tmp_path):
    """tests/test_shards.py's check of every cut, on the stream reader (pipe:cat streams the file through gopen)."""
    data, samples, marker_end = shard
    path = tmp_path / "cut.tar"
    for cut in cut_points(data):
        path.write_bytes(data[:cut])
        got, error = read_until_error(f"pipe:cat {path}")
        if cut >= marker_end:
            assert error is None and got == samples, cut
            continue
        assert error is not None and got == samples[: len(got)] and error.samples == len(got), cut
        assert error.reason == "corrupt_shard", cut  # a bad tar is not retried
        for skip in {0, len(got) // 2, len(got), len(got) + 1}:
            again, e = read_until_error(f"pipe:cat {path}", skip=skip)
            assert again == samples[skip: len(got)] and e is not None and e.samples == len(got), (cut, skip)


def test_the_retry_limit_counts_only_retries_that_read_nothing_new(monkeypatch):
    """A connection that drops after every sample still reads the whole shard with retries=1: each
    attempt reads one new sample, so no two failures in a row are without progress."""
    samples = [(f"k{i}", {"txt": str(i).encode()}) for i in range(4)]

    def drops_after_each_sample(url, skip, timeout):
        for i in range(skip, len(samples)):
            yield samples[i]
            if i < len(samples) - 1:
                try:
                    raise ConnectionResetError("dropped")
                except OSError as e:
                    raise ShardError(f"{url}: dropped", i + 1, "unreadable_shard") from e

    monkeypatch.setattr(shards, "_read_stream", drops_after_each_sample)
    assert list(read_samples("https://example.invalid/s.tar", remote=RemoteOptions(retries=1, backoff=0))) == samples

    def never_progresses(url, skip, timeout):
        try:
            raise ConnectionResetError("dropped")
        except OSError as e:
            raise ShardError(f"{url}: dropped", skip, "unreadable_shard") from e
        yield  # a generator, as _read_stream

    monkeypatch.setattr(shards, "_read_stream", never_progresses)
    with pytest.raises(ShardError, match="after 1 retry"):
        list(read_samples("https://example.invalid/s.tar", remote=RemoteOptions(retries=1, backoff=0)))


def test_webdatasets_scheme_table_is_left_as_it_is(shard, tmp_path):
    """Our http(s) and hf openers are looked up before webdataset's gopen, not patched into its
    module-wide table (which other users of webdataset in the process share)."""
    from webdataset.gopen import gopen_schemes

    before = dict(gopen_schemes)
    assert expand("https://host/s-{00000..00001}.tar") == ["https://host/s-00000.tar", "https://host/s-00001.tar"]
    data, samples, _ = shard
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    assert len(list(read_samples(f"pipe:cat {path}"))) == len(samples)
    assert dict(gopen_schemes) == before


def test_a_file_url_is_read_as_the_local_file_it_names(shard, tmp_path):
    """file: URLs are paths: expanded and checked like one (a missing file is an error at once, not a
    download retried), read by the local reader."""
    data, samples, _ = shard
    path = tmp_path / "s 1.tar"
    path.write_bytes(data)
    for url in (f"file:{path}", f"file://{quote(str(path))}", f"file://localhost{quote(str(path))}"):
        assert expand(url) == [str(path)] and list(read_samples(url)) == samples, url
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        expand(f"file:{tmp_path}/missing.tar")
    assert time.monotonic() - start < 1
    with pytest.raises(ValueError, match="another host"):
        expand("file://example.com/s.tar")
