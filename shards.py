"""The WebDataset shard format: expanding shard patterns, reading a tar as raw samples, writing shards.

A sample is the run of consecutive tar members that share a key: the member path up to the first
dot of its file name (`clip7.000.jpg` -> key `clip7`, extension `000.jpg`). Keys therefore never
contain dots. A sample holds `KEY.json` plus its media: frames `KEY.000.jpg, KEY.001.jpg, ...`,
a video `KEY.mp4`, an image `KEY.jpg`/`KEY.png`, or nothing (text only).
"""

import glob
import io
import json
import re
import tarfile
import zlib
from pathlib import Path

KEY_CHARS = re.compile(r"^[A-Za-z0-9_\-/]+$")
EXT_CHARS = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class ShardError(Exception):
    """A shard that cannot be read to its end (truncated or corrupt tar). `samples` counts the
    complete samples before the break (yielded or skipped); the one after them is lost."""

    def __init__(self, message: str, samples: int = 0):
        super().__init__(message)
        self.samples = samples


def expand(patterns) -> list[str]:
    """Shard paths from one pattern or a list: globs, `{000..099}` ranges, directories (every *.tar in
    them). Each pattern must match something; the result is sorted and free of repeats."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    found = []
    for pattern in patterns:
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


def read_samples(path, skip: int = 0):
    """Yield (key, {extension: bytes}) for each sample of a tar shard, after skipping `skip` samples
    without reading their data. Raises ShardError when the tar breaks off or lacks its end-of-archive
    marker (a shard cut at a member boundary); the samples before the break have been yielded, the
    one being read is lost (never yielded with members missing)."""
    key, files, index = None, {}, 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if not ext or k.rsplit("/", 1)[-1].startswith("."):
                    continue
                if k != key or ext in files:  # a new sample starts
                    if key is not None:
                        if index >= skip:
                            yield key, files
                        index += 1
                    key, files = k, {}
                files[ext] = tar.extractfile(member).read() if index >= skip else b""
            missing_end = None if _ends_with_marker(tar) else tar.offset
    # zlib.error: a damaged .tar.gz whose deflate stream breaks inside member data (tarfile converts
    # it to ReadError only in headers)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        raise ShardError(f"{path}: unreadable after {index} samples ({type(e).__name__}: {e})", index) from e
    if missing_end is not None:
        # tarfile ends its member loop without an error where the file stops at or inside a header,
        # or where a header is garbage. Members of the pending sample may be missing: drop it too.
        raise ShardError(f"{path}: truncated or corrupt tar (no end-of-archive marker at byte {missing_end}); "
                         f"{index} complete samples before it, the one being read there is lost", index)
    if key is not None and index >= skip:
        yield key, files


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
