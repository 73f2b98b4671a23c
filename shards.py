"""The WebDataset shard format: expanding shard patterns, reading a tar as raw samples, writing shards.

A sample is the run of consecutive tar members that share a key: the member path up to the first
dot of its file name (`clip7.000.jpg` -> key `clip7`, extension `000.jpg`). Keys therefore never
contain dots. A sample holds `KEY.json` plus its media: frames `KEY.000.jpg, KEY.001.jpg, ...`,
a video `KEY.mp4`, an image `KEY.jpg`/`KEY.png`, or nothing (text only).
"""

import dataclasses
import glob
import http.client
import io
import json
import logging
import os
import re
import select
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger("fvlm.shards")

KEY_CHARS = re.compile(r"^[A-Za-z0-9_\-/]+$")
EXT_CHARS = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: `C:\...` stays a path


@dataclasses.dataclass(frozen=True)
class RemoteOptions:
    """How shards named by URL are read. timeout: seconds any one read (and the connection) may wait
    for data before the attempt fails; retries: re-openings of a shard after failed attempts that read
    no new sample (each skips, without keeping their data, the samples already read; an attempt that
    read some starts the count again), with a pause of backoff x 2^k seconds before the k-th; then
    the shard counts as unreadable."""
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"remote shard timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not (isinstance(self.retries, int) and not isinstance(self.retries, bool) and self.retries >= 0):
            raise ValueError(f"remote shard retries must be an integer >= 0, got {self.retries!r}")
        if not (isinstance(self.backoff, (int, float)) and self.backoff >= 0):
            raise ValueError(f"remote shard backoff must be seconds >= 0, got {self.backoff!r}")


REMOTE = RemoteOptions()


def configure_remote(**changes) -> RemoteOptions:
    """Change the module's RemoteOptions (timeout=, retries=, backoff=; validated) and return them.
    Set them before a DataLoader starts its workers: forked workers inherit them."""
    global REMOTE
    REMOTE = dataclasses.replace(REMOTE, **changes)
    return REMOTE


def is_url(shard) -> bool:
    """Whether a shard is named by URL (SCHEME://..., pipe:CMD) rather than a path (a path like
    `C:\\x.tar` or `v2:x.tar` stays one, and so does a file: URL: see local_path)."""
    return isinstance(shard, str) and bool(_SCHEME.match(shard)) and not _is_file_url(shard) and (
        "://" in shard[:shard.index(":") + 3] or shard.lower().startswith("pipe:"))


def _is_file_url(shard) -> bool:
    return isinstance(shard, str) and shard.lower().startswith("file:")


def local_path(shard):
    """A file: URL (file:PATH, file:///abs/path, file://localhost/abs/path) -> its path, read as a
    local file (checked when expanded, no download and no retries); anything else as it is."""
    if not _is_file_url(shard):
        return shard
    url = urlparse(shard)
    if url.netloc not in ("", "localhost"):
        raise ValueError(f"shard URL {shard!r}: a file: URL on another host ({url.netloc}) cannot be read")
    return unquote(url.path)


class ShardError(Exception):
    """A shard that cannot be read to its end (truncated or corrupt tar; for a URL also a failed
    download). `samples` counts the complete samples before the break (yielded or skipped); the one
    after them is lost. `reason`: 'corrupt_shard' (the tar), or 'unreadable_shard' (a URL that could
    not be fetched to its end: HTTP error, dropped connection, timeout, failed pipe command)."""

    def __init__(self, message: str, samples: int = 0, reason: str = "corrupt_shard"):
        super().__init__(message)
        self.samples, self.reason = samples, reason


def expand(patterns) -> list[str]:
    """Shard paths from one pattern or a list: globs, `{000..099}` ranges, directories (every *.tar in
    them); a file: URL is its path (local_path). Each pattern must match something; the result is
    sorted and free of repeats. A URL
    (`https://host/train-{00000..00099}.tar`, `pipe:CMD`, ...) expands by its brace ranges only and is
    never checked against the disk or listed; a glob in one is an error."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    found = []
    for pattern in map(local_path, patterns):
        if is_url(pattern):
            found += _expand_url(pattern)
            continue
        matched, hints = [], []
        for p in _expand_braces(str(pattern)):
            if Path(p).is_dir():
                matched += sorted(glob.glob(str(Path(p) / "*.tar")))
                hints += _split_folders_hint(Path(p))
            else:
                for m in (sorted(glob.glob(p)) if glob.has_magic(p) else [p]):
                    # a glob may match folders (`data/*/`): their *.tar, as for a folder named outright
                    matched += sorted(glob.glob(str(Path(m) / "*.tar"))) if Path(m).is_dir() else \
                        ([m] if Path(m).is_file() else [])
        if not matched:
            raise FileNotFoundError(f"shard pattern {str(pattern)!r} matches no file" + "".join(hints))
        found += matched
    return sorted(set(found))


def _expand_url(pattern: str) -> list[str]:
    scheme = _SCHEME.match(pattern).group(1).lower()
    if scheme not in _schemes():
        example = "pipe:aws s3 cp {url} -" if scheme == "s3" else "pipe:COMMAND-THAT-PRINTS-THE-SHARD {url}"
        raise ValueError(f"shard URL {pattern!r}: no handler for {scheme}:// — read it through a command, "
                         f"e.g. {example.format(url=pattern)!r}")
    # the path only: `?` also starts a query (https://.../resolve/main/x.tar?download=true)
    where = pattern[5:] if scheme == "pipe" else urlparse(pattern).path
    if any(c in where for c in "*?["):
        raise ValueError(f"shard URL {pattern!r} holds a glob: URLs are not listed; name the shards with a "
                         "{000..099} range instead")
    return _expand_braces(pattern)


def _split_folders_hint(directory: Path) -> list[str]:
    """For a folder without *.tar whose subfolders hold some (a dataset root with one folder per
    split, e.g. data/synthetic/{sft,eval}): the message naming them."""
    if any(directory.glob("*.tar")):
        return []
    subfolders = sorted(d.name for d in directory.iterdir() if d.is_dir() and any(d.glob("*.tar")))
    if not subfolders:
        return []
    names = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
    return [(f": {directory} holds no *.tar shards itself; its subfolders do: {names} — name one of them "
             f"(or a glob like {directory / '*' / '*.tar'})")]


def _expand_braces(pattern: str) -> list[str]:
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for i in range(int(lo), int(hi) + 1) for x in _expand_braces(f"{head}{i:0{width}d}{tail}")]


def split_name(name: str) -> tuple[str, str]:
    """Tar member path -> (key, extension), extension lower-cased."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def read_samples(path, skip: int = 0, remote: RemoteOptions | None = None):
    """Yield (key, {extension: bytes}) for each sample of a tar shard, after skipping `skip` samples
    without reading their data. Raises ShardError when the tar breaks off or lacks its end-of-archive
    marker (a shard cut at a member boundary); the samples before the break have been yielded, the
    one being read is lost (never yielded with members missing).

    A URL (is_url) is read as a stream through webdataset's gopen (open_url), with `remote` (default:
    the module's REMOTE) for its timeout and retries: a failed download (not an HTTP 4xx other than
    408/429, nor a tar that is corrupt) is re-opened, skipping the samples already read, until it reads
    to its end or `retries` attempts in a row read nothing new; then ShardError(reason 'unreadable_shard')."""
    if not is_url(path):
        yield from _read_local(local_path(path), skip)
        return
    options = remote or REMOTE
    done, failures, reached, progress = skip, 0, -1, skip
    while True:
        try:
            for sample in _read_stream(path, done, options.timeout):
                done += 1
                yield sample
            return
        except ShardError as e:
            # Where it broke: the samples read past the first skip count too, as on a retry the break
            # may come earlier (a resumed read that fails while skipping reports where it failed).
            reached = max(reached, e.samples, done if done > skip else -1)
            if done > progress:  # this attempt read new samples: the limit counts retries without progress
                failures, progress = 0, done
            cause = e.__cause__
            if not _transient(cause) or failures >= options.retries:
                if failures and _transient(cause):
                    e = ShardError(f"{e} (after {failures} retr{'y' if failures == 1 else 'ies'})", reached,
                                   e.reason)
                e.samples = reached
                raise e from cause
            failures += 1
            pause = options.backoff * 2 ** (failures - 1)
            log.warning("%s: retry %d of %d in %.1f s after %d samples (%s)", path, failures, options.retries,
                        pause, done, cause)
            time.sleep(pause)


def _transient(error) -> bool:
    """Whether a failed download may succeed when tried again."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    return isinstance(error, OSError)


class _MarkedTarInfo(tarfile.TarInfo):
    """Records on the TarFile that its member loop ended at an end-of-archive marker (a full block of
    zeros), which a stream cannot seek back to check afterwards."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.fvlm_end_marker = True
            raise


def _grouped(tar, skip, state):
    """A tar's members as samples: consecutive members sharing a key, hidden and key-less names left
    out. Yields every complete sample from the `skip`-th on (the skipped ones' data is not read);
    state["index"] counts the complete samples passed, for the caller's error messages, and
    state["pending"] holds the last sample, which the caller yields only once the tar proved complete."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        k, ext = split_name(member.name)
        if not ext or k.rsplit("/", 1)[-1].startswith("."):
            continue
        if k != key or ext in files:  # a new sample starts
            if key is not None:
                if state["index"] >= skip:
                    yield key, files
                state["index"] += 1
            key, files = k, {}
        files[ext] = tar.extractfile(member).read() if state["index"] >= skip else b""
        state["pending"] = (key, files)


def _last_sample(name, state, skip, missing_end):
    """The end of a tar read by _grouped: its pending last sample, yielded only where the tar ended at
    an end-of-archive marker (missing_end None). tarfile ends its member loop without an error where
    the data stops at or inside a header, or where a header is garbage; then members of the pending
    sample may be missing, so it is dropped too and ShardError says where the tar broke off."""
    if missing_end is not None:
        n = state["index"]
        raise ShardError(f"{name}: truncated or corrupt tar (no end-of-archive marker at byte {missing_end}); "
                         f"{n} complete samples before it, the one being read there is lost", n)
    key, files = state["pending"]
    if key is not None and state["index"] >= skip:
        yield key, files


def _read_stream(url, skip, timeout):
    state = {"index": 0, "pending": (None, {})}
    try:
        with open_url(url, timeout) as stream, \
                tarfile.open(fileobj=stream, mode="r|*", tarinfo=_MarkedTarInfo) as tar:
            yield from _grouped(tar, skip, state)
            missing_end = None if getattr(tar, "fvlm_end_marker", False) else tar.offset
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        reason = "unreadable_shard" if isinstance(e, OSError) else "corrupt_shard"
        n = state["index"]
        raise ShardError(f"{url}: unreadable after {n} samples ({type(e).__name__}: {e})", n, reason) from e
    yield from _last_sample(url, state, skip, missing_end)


def _schemes() -> set:
    """The URL schemes shards can be read from: webdataset's gopen table (pipe:, gs:// through gsutil,
    ...) and ours (OPENERS)."""
    from webdataset.gopen import gopen_schemes  # (webdataset.gopen the attribute is the function)

    return set(gopen_schemes) | set(OPENERS)


def open_url(url: str, timeout: float | None = None):
    """A shard URL opened for reading: http(s):// and hf:// through our openers (OPENERS), any other
    scheme through webdataset's gopen (its table is left as it is), as a stream whose every read fails
    with TimeoutError after `timeout` seconds without data (default REMOTE.timeout)."""
    from webdataset.gopen import Pipe, gopen

    timeout = timeout or REMOTE.timeout
    scheme = _SCHEME.match(url)
    opener = OPENERS.get(scheme.group(1).lower()) if scheme else None
    stream = opener(url, "rb", timeout=timeout) if opener else gopen(url, "rb")
    return _PipeReader(stream, timeout, url) if isinstance(stream, Pipe) else stream


def _gopen_http(url, mode="rb", bufsize=8192, timeout=None):
    """An http(s) shard through urllib, with a timeout on every read (webdataset's own opener runs
    curl, which waits on a stalled server for ever and retries 30 times)."""
    timeout = timeout or REMOTE.timeout
    if mode[0] != "r":
        raise ValueError(f"{url}: shards are read, not written, over http")
    request = urllib.request.Request(url, headers={"User-Agent": "fvlm-shards"})
    host = urlparse(url).hostname or ""
    if host == "huggingface.co" or host.endswith(".huggingface.co"):
        token = _hub_token()
        if token:  # not sent on to where the Hub redirects (its CDN)
            request.add_unredirected_header("Authorization", f"Bearer {token}")
    return _HTTPReader(urllib.request.urlopen(request, timeout=timeout), url)


def hf_url(url: str) -> str:
    """hf://datasets/OWNER/NAME[@REVISION]/PATH -> its https resolve URL on the Hub (HF_ENDPOINT)."""
    parts = url[len("hf://"):].split("/")
    kinds = {"datasets": "dataset", "spaces": "space", "models": "model"}
    if len(parts) < 4 or parts[0] not in kinds or not parts[-1]:
        raise ValueError(f"{url!r}: expected hf://datasets/OWNER/NAME[@REVISION]/PATH/TO/SHARD.tar")
    name, _, revision = parts[2].partition("@")
    from huggingface_hub import hf_hub_url

    return hf_hub_url(f"{parts[1]}/{name}", "/".join(parts[3:]), repo_type=kinds[parts[0]],
                      revision=revision or None)


def _gopen_hf(url, mode="rb", bufsize=8192, timeout=None):
    return _gopen_http(hf_url(url), mode, bufsize, timeout)


OPENERS = {"http": _gopen_http, "https": _gopen_http, "hf": _gopen_hf}  # ours, before webdataset's table


def _hub_token():
    try:
        from huggingface_hub import get_token
    except ImportError:
        return os.environ.get("HF_TOKEN")
    return get_token()


class _Stream(io.RawIOBase):
    """A readable raw stream whose subclass defines read(size)."""

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _HTTPReader(_Stream):
    """An HTTP response body as a stream: a connection closed before Content-Length bytes (which
    http.client's read(n) returns as a short end) or a cut chunked body is a ConnectionError."""

    def __init__(self, response, url):
        self.response, self.url, self.got = response, url, 0
        self.expected = response.length  # None: chunked or unknown

    def read(self, size=-1):
        try:
            data = self.response.read(size if size is not None and size >= 0 else None)
        except http.client.HTTPException as e:  # IncompleteRead and the like
            raise ConnectionError(f"{self.url}: {type(e).__name__}: {e}") from e
        self.got += len(data)
        if not data and size != 0 and self.expected is not None and self.got < self.expected:
            raise ConnectionError(f"{self.url}: connection closed after {self.got} of {self.expected} bytes")
        return data

    def close(self):
        self.response.close()
        super().close()


class _PipeReader(_Stream):
    """A webdataset Pipe (pipe:CMD, gsutil, ...) read straight from its file descriptor, each read
    waiting at most `timeout` seconds; a command that fails (exit status) raises at the end, and one
    left before its end (an error, a timeout) is killed."""

    def __init__(self, pipe, timeout, url):
        self.pipe, self.timeout, self.url, self.ended = pipe, timeout, url, False
        pipe.timeout = timeout  # how long close() waits for the command to exit

    def read(self, size=-1):
        if size is None or size < 0:
            return self.readall()
        if self.ended or size == 0:
            return b""
        fd = self.pipe.stream.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            raise TimeoutError(f"{self.url}: no data for {self.timeout} s")
        data = os.read(fd, size)
        if not data:
            self.ended = True
            try:
                self.pipe.close()  # raises IOError on a failed command
            except subprocess.TimeoutExpired as e:
                raise TimeoutError(f"{self.url}: command did not exit within {self.timeout} s") from e
        return data

    def close(self):
        if not self.ended:
            self.ended = True
            try:
                self.pipe.proc.kill()
                self.pipe.close()
            except Exception:  # noqa: BLE001 - a killed command's exit status is of no interest
                pass
        super().close()


def _read_local(path, skip: int = 0):
    """Yield (key, {extension: bytes}) for each sample of a tar shard, after skipping `skip` samples
    without reading their data. Raises ShardError when the tar breaks off or lacks its end-of-archive
    marker (a shard cut at a member boundary); the samples before the break have been yielded, the
    one being read is lost (never yielded with members missing)."""
    state = {"index": 0, "pending": (None, {})}
    try:
        with tarfile.open(path, "r:*") as tar:
            yield from _grouped(tar, skip, state)
            missing_end = None if _ends_with_marker(tar) else tar.offset
    # zlib.error: a damaged .tar.gz whose deflate stream breaks inside member data (tarfile converts
    # it to ReadError only in headers)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        n = state["index"]
        raise ShardError(f"{path}: unreadable after {n} samples ({type(e).__name__}: {e})", n) from e
    yield from _last_sample(path, state, skip, missing_end)


def _ends_with_marker(tar) -> bool:
    """Whether tarfile stopped at an end-of-archive marker: a full 512-byte block of zeros where the
    next header would be (POSIX writes two; one is enough to know nothing was cut before it)."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return block == bytes(tarfile.BLOCKSIZE)


class ShardWriter:
    """Write samples into `DIR/PREFIX-00000.tar, ...`, starting a new shard every `max_samples`
    samples or `max_bytes` bytes of member data. Members are written in sorted name order with fixed metadata, so the
    same samples give byte-identical shards."""

    def __init__(self, directory, prefix: str = "shard", max_samples: int = 1000, max_bytes: int = 1 << 30,
                 overwrite: bool = False):
        """Refuses a folder that already holds PREFIX-*.tar shards (a smaller rerun would leave stale
        higher-numbered shards that shard patterns pick up) unless overwrite=True deletes them."""
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        old = sorted(self.directory.glob(f"{prefix}-*.tar"))
        if old and not overwrite:
            raise FileExistsError(f"{self.directory} already holds {len(old)} {prefix}-*.tar shards")
        for path in old:
            path.unlink()
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.paths, self.count, self._tar, self._in_shard, self._bytes = [], 0, None, 0, 0

    def write(self, key: str, files: dict):
        """files: {extension: bytes or JSON-able object for 'json'}."""
        if not KEY_CHARS.match(key) or key.startswith("/"):
            raise ValueError(f"sample key {key!r}: use letters, digits, '_', '-' or '/' (no dots)")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        if self._tar is None or self._in_shard >= self.max_samples or self._bytes >= self.max_bytes:
            self._next_shard()
        for ext in sorted(files):
            if not EXT_CHARS.match(ext):
                raise ValueError(f"sample {key!r}: bad extension {ext!r}")
            data = files[ext]
            if ext == "json" and not isinstance(data, bytes):
                data = json.dumps(data, ensure_ascii=False).encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data)
        self._in_shard += 1
        self.count += 1

    def _next_shard(self):
        self.close()
        path = self.directory / f"{self.prefix}-{len(self.paths):05d}.tar"
        # Written under a temporary name and renamed when complete: a crashed build never leaves a
        # truncated shard that shard patterns would pick up.
        self._tar = tarfile.open(path.with_suffix(".tar.partial"), "w")
        self.paths.append(str(path))
        self._in_shard, self._bytes = 0, 0

    def close(self):
        if self._tar is not None:
            self._tar.close()
            Path(self.paths[-1] + ".partial").replace(self.paths[-1])
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
