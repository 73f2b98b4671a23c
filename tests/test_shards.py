"""Reading shards: a torn or damaged tar never loses samples silently and never yields a sample
with members missing; shard patterns name what they matched (or why they matched nothing)."""

import gzip
import io
import random
import tarfile
import zlib

import pytest

from shards import ShardError, ShardWriter, expand, read_samples

# Member sizes around the 512-byte block size, an empty member among them: cuts then land inside
# headers, inside data, in data padding and exactly on block boundaries.
SIZES = [(1, 511), (512, 0), (513, 1024), (1500, 3)]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """(tar bytes, the samples written, offset of the end of the first end-of-archive block)."""
    directory = tmp_path_factory.mktemp("whole")
    rng = random.Random(0)
    samples = []
    with ShardWriter(directory) as w:
        for i, (jpg, txt) in enumerate(SIZES):
            files = {"json": f'{{"i": {i}}}'.encode(), "jpg": rng.randbytes(jpg), "txt": rng.randbytes(txt)}
            w.write(f"k{i}", files)
            samples.append((f"k{i}", files))
    data = (directory / "shard-00000.tar").read_bytes()
    with tarfile.open(directory / "shard-00000.tar") as tar:
        last = tar.getmembers()[-1]
    marker_end = last.offset_data + -(-last.size // 512) * 512 + 512
    assert len(data) > marker_end  # tarfile pads the archive past its end marker: cuts there lose nothing
    return data, samples, marker_end


def read_until_error(path, skip=0):
    got = []
    try:
        for key, files in read_samples(path, skip=skip):
            got.append((key, files))
    except ShardError as e:
        return got, e
    return got, None


def cut_points(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        headers = [m.offset for m in tar.getmembers()]
    rng = random.Random(1)
    inside_headers = [h + d for h in headers for d in (1, 100, 156, 157, 300, 511)]
    return sorted(set(range(0, len(data) + 1, 512)) | set(inside_headers)
                  | {rng.randrange(len(data)) for _ in range(60)})


def test_every_cut_yields_a_complete_prefix_or_everything(shard, tmp_path):
    data, samples, marker_end = shard
    path = tmp_path / "cut.tar"
    results = {}
    for cut in cut_points(data):
        path.write_bytes(data[:cut])
        results[cut] = read_until_error(path)
    silent = [(cut, len(got)) for cut, (got, error) in results.items() if error is None and got != samples]
    assert not silent, (f"{len(silent)} cuts lose samples without an error, e.g. at (byte, samples read) "
                        f"{silent[:8]} of {len(data)} bytes")
    for cut, (got, error) in results.items():
        if cut >= marker_end:  # only padding after the end marker is gone
            assert error is None and got == samples, cut
            continue
        assert error is not None and got == samples[: len(got)], cut  # every yielded sample whole
        assert error.samples == len(got), cut
        # What a resume relies on: skipping k samples reports the same break after the same samples
        path.write_bytes(data[:cut])
        for skip in {0, len(got) // 2, len(got), len(got) + 1}:
            again, e = read_until_error(path, skip=skip)
            assert again == samples[skip: len(got)] and e is not None and e.samples == len(got), (cut, skip)


def test_cut_at_a_member_boundary_names_the_shard(shard, tmp_path):
    data = shard[0]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        boundary = tar.getmember("k2.jpg").offset  # k1 ends here, complete (members go in sorted order)
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:boundary])
    got, error = read_until_error(path)
    # k1 is whole on disk, but nothing tells it apart from a sample whose later members were cut off
    assert [k for k, _ in got] == ["k0"]
    assert "truncated or corrupt" in str(error) and str(path) in str(error) and "1 complete samples" in str(error)


def test_member_data_cut_short_and_garbage_headers(shard, tmp_path):
    data, samples, _ = shard
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        jpg, header = tar.getmember("k2.jpg"), tar.getmember("k3.jpg").offset
    path = tmp_path / "bad.tar"
    path.write_bytes(data[: jpg.offset_data + jpg.size - 1])  # the member's data one byte short
    got, error = read_until_error(path)
    assert got == samples[:2] and "unreadable after 2 samples" in str(error)
    path.write_bytes(data[:header] + b"A" * 512 + data[header + 512:])  # a header overwritten by junk
    got, error = read_until_error(path)
    assert got == samples[:2] and error.samples == 2  # k2 (pending when the junk ends the loop) is dropped


def test_gzip_shards(shard, tmp_path):
    data, samples, _ = shard
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(data))
    assert read_until_error(path) == (samples, None)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        boundary = tar.getmember("k3.jpg").offset
    path.write_bytes(gzip.compress(data[:boundary]))  # a tar torn where k3 starts, compressed afterwards
    got, error = read_until_error(path)
    assert got == samples[:2] and error.samples == 2 and "truncated or corrupt" in str(error)
    path.write_bytes(gzip.compress(data)[:-len(data) // 8])  # a torn gzip stream
    got, error = read_until_error(path)
    assert error is not None and got == samples[: len(got)]


def test_a_damaged_deflate_stream_inside_member_data(tmp_path):
    rng = random.Random(0)
    samples = [("a", {"json": b"{}"}), ("b", {"jpg": rng.randbytes(100_000), "json": b"{}"})]
    with ShardWriter(tmp_path) as w:
        for key, files in samples:
            w.write(key, files)
    data = (tmp_path / "shard-00000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        middle = tar.getmember("b.jpg").offset_data + 50_000
    # An invalid deflate block type inside b.jpg's data (far past the reader's read-ahead of its
    # header): zlib.error comes out of the member's read, where tarfile does not convert it
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(data[:middle]) + deflate.flush(zlib.Z_FULL_FLUSH) + b"\x07" + bytes(64)
    path = tmp_path / "damaged.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body)  # a gzip header, no trailer
    got, error = read_until_error(path)
    assert got == samples[:1] and error.samples == 1 and "invalid block type" in str(error)


def test_a_folder_of_split_folders_names_them(tmp_path):
    for split in ("sft", "eval", "dpo"):
        (tmp_path / "synthetic" / split).mkdir(parents=True)
        (tmp_path / "synthetic" / split / "shard-00000.tar").write_bytes(b"")
    (tmp_path / "synthetic" / "notes").mkdir()  # a subfolder without shards is not suggested
    with pytest.raises(FileNotFoundError) as e:
        expand(tmp_path / "synthetic")
    message = str(e.value)
    assert "holds no *.tar shards itself" in message and "dpo, eval, sft" in message and "notes" not in message
    assert str(tmp_path / "synthetic" / "*" / "*.tar") in message
    every = sorted(str(tmp_path / "synthetic" / s / "shard-00000.tar") for s in ("sft", "eval", "dpo"))
    assert expand(tmp_path / "synthetic" / "*" / "*.tar") == every
    assert expand(str(tmp_path / "synthetic" / "*") + "/") == every  # a glob of folders: their shards
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="matches no file") as e:
        expand(tmp_path / "empty")
    assert "subfolders" not in str(e.value)
