"""Convert a public dataset from its own on-disk format into this project's WebDataset shards.

Each subcommand reads one dataset's files and turns every row into one sample (`KEY.json` with
`messages`, `source` and the dataset's own `id`, plus JPEG frames, a raw video, one JPEG image or no
media; see shards.py). Rows that cannot become a sample are skipped and counted per reason.

    python scripts/build_shards.py llava-video --json cap.json --video-root videos --out shards/llava
"""

import argparse
import csv
import io
import json
import random
import re
import sys
from bisect import bisect_right
from collections import Counter
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

import av
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import media  # noqa: E402
import tokenization  # noqa: E402
from progress import Progress  # noqa: E402
from shards import ShardWriter  # noqa: E402

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"<(image|video)>")
PREFIX_CHARS = re.compile(r"^[A-Za-z0-9_\-]+$")  # a key prefix that is also a safe shard file name
RESERVED = ("messages", "source", "id", "chosen", "rejected")


class Skip(Exception):
    """A row that cannot become a sample; `reason` names its counter in the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# --- media -> sample files -------------------------------------------------------------------

def fit(frames: torch.Tensor, args) -> torch.Tensor:
    """Short side to --frame-size with the aspect kept (nothing cut), or the centre square with
    --crop; --frame-size 0 keeps the resolution."""
    h, w = frames.shape[-2:]
    if args.crop:
        return media.resize(frames, args.frame_size or min(h, w), "crop")
    return media.resize(frames, args.frame_size, "short") if args.frame_size else frames


def jpeg_frames(frames, args) -> dict:
    return {f"{i:03d}.jpg": media.encode_jpeg(f, args.jpeg_quality) for i, f in enumerate(frames)}


def image(data: bytes, args) -> torch.Tensor:
    # Always decoded and re-encoded: that validates the bytes and gives every image one format and scale.
    try:
        return fit(media.decode_image(data), args)
    except media.MediaError as e:
        raise Skip("bad_image", str(e)) from e


def image_files(data: bytes, args) -> dict:
    return {"jpg": media.encode_jpeg(image(data, args), args.jpeg_quality)}


def images_as_frames(images: list, args) -> dict:
    return jpeg_frames([image(d, args) for d in images], args)


def read_media(root: Path, rel) -> bytes:
    path = root / str(rel)
    if not path.is_file():
        raise Skip("missing_file", str(path))
    return path.read_bytes()


def video_files(data: bytes, ext: str, args) -> dict:
    if args.video_mode == "frames":
        try:
            size = args.frame_size or None
            frames = media.decode_video(data, args.max_frames, size, "crop" if args.crop else "short",
                                        target_fps=args.target_fps or None)
        except media.MediaError as e:
            raise Skip("bad_video", str(e)) from e
        return jpeg_frames(frames, args)
    # Raw: open the container without decoding, so a truncated download fails here, not in training.
    try:
        with av.open(io.BytesIO(data)) as container:
            has_video = bool(container.streams.video)
    except Exception as e:  # PyAV raises many types on damaged containers
        raise Skip("bad_video", f"unreadable video ({type(e).__name__}: {e})") from e
    if not has_video:
        raise Skip("bad_video", "no video stream")
    return {ext: data}


def path_files(root: Path, rel, args) -> dict:
    """Files for a media path (video or image, by extension) or a list of frame paths."""
    if isinstance(rel, list):
        # Already-extracted frames: keep at most --max-frames, picked by the shared uniform rule.
        picks = media.sample_frame_indices(len(rel), args.max_frames)
        return images_as_frames([read_media(root, rel[i]) for i in picks], args)
    ext = Path(str(rel)).suffix.lower().lstrip(".")
    if ext in media.VIDEO_EXTENSIONS:
        return video_files(read_media(root, rel), ext, args)
    if ext in media.IMAGE_EXTENSIONS:
        return image_files(read_media(root, rel), args)
    raise Skip("unknown_media_type", str(rel))


# --- text ------------------------------------------------------------------------------------

def check_messages(messages, dpo: bool):
    """The loader's rules, checked here so that bad rows never reach a shard."""
    try:
        tokenization.check_messages(messages, "user" if dpo else "assistant")
    except tokenization.SampleError as e:
        raise Skip(e.reason, str(e)) from e


def sample(messages, source: str, id_, media_files=None, chosen=None, rejected=None, **extra):
    dpo = chosen is not None or rejected is not None
    check_messages(messages, dpo)
    meta = {"messages": messages, "source": source, "id": id_, **extra}
    if dpo:
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise Skip("missing_fields", "DPO rows need 'chosen' and 'rejected' strings")
        meta.update(chosen=chosen, rejected=rejected)
    return meta, media_files or {}


def need(row: dict, *fields):
    missing = [f for f in fields if row.get(f) in (None, "")]
    if missing:
        raise Skip("missing_fields", ", ".join(missing))


# --- datasets: each reader gives a sequence of (file, row number, row); each builder one sample --

class ParquetRows:
    """Rows of parquet files by global index, converted one at a time: the tables stay in Arrow
    form (image bytes are not copied into Python objects until their row is built)."""

    def __init__(self, paths, columns):
        self.tables, self.starts, n = [], [], 0
        for p in paths:
            names = set(pq.ParquetFile(p).schema_arrow.names)  # optional columns may be absent
            table = pq.read_table(p, columns=[c for c in columns if c in names])
            self.tables.append((Path(p), table))
            self.starts.append(n)
            n += table.num_rows
        self.len = n

    def __len__(self):
        return self.len

    def __getitem__(self, i):
        t = bisect_right(self.starts, i) - 1
        path, table = self.tables[t]
        j = i - self.starts[t]
        return path, j, table.slice(j, 1).to_pylist()[0]


def read_folder(args):
    lines = Path(args.jsonl).read_text().splitlines()
    return [(Path(args.jsonl), i, line) for i, line in enumerate(lines) if line.strip()]


def build_folder(record, args):
    path, i, line = record
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise Skip("bad_json", f"{path.name}:{i}: {e}") from e
    if not isinstance(row, dict):
        raise Skip("bad_json", f"{path.name}:{i}: not an object")
    need(row, "messages")
    root = Path(args.media_root) if args.media_root else path.parent
    files = path_files(root, row["media"], args) if row.get("media") else None
    extra = {k: v for k, v in row.items() if k not in RESERVED + ("media",)}
    return sample(row["messages"], row.get("source") or path.stem, row.get("id", f"{path.name}:{i}"), files,
                  row.get("chosen"), row.get("rejected"), **extra)


def read_llava_video(args):
    return [(Path(args.json), i, item) for i, item in enumerate(json.loads(Path(args.json).read_text()))]


def build_llava_video(record, args):
    _, _, item = record
    need(item, "id", "video", "conversations")
    messages = []
    for turn in item["conversations"]:
        if turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise Skip("missing_fields", f"turn {turn!r:.80}")
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": PLACEHOLDER.sub("", turn["value"]).strip()})
    source = "llava_video_178k" + (f"/{item['data_source']}" if item.get("data_source") else "")
    return sample(messages, source, item["id"], path_files(Path(args.video_root), item["video"], args),
                  video=item["video"])


def read_openvid(args):
    with open(args.csv, newline="") as f:
        return [(Path(args.csv), i, row) for i, row in enumerate(csv.DictReader(f))]


def build_openvid(record, args):
    _, _, row = record
    need(row, "video", "caption")
    messages = [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": row["caption"].strip()}]
    # The csv's scores, fps and duration describe the source file; kept apart from the sample's keys.
    meta = {k: v for k, v in row.items() if k not in ("video", "caption")}
    return sample(messages, "openvid", row["video"], path_files(Path(args.video_root), row["video"], args), meta=meta)


def build_cauldron(record, args):
    path, j, row = record
    need(row, "texts")
    messages = []
    for t in row["texts"]:
        messages += [{"role": "user", "content": t.get("user")}, {"role": "assistant", "content": t.get("assistant")}]
    images = [im.get("bytes") if isinstance(im, dict) else None for im in row.get("images") or []]
    if None in images:
        raise Skip("missing_file", "an image without bytes")
    if len(images) > 1 and args.multi_image == "skip":
        raise Skip("multi_image", f"{len(images)} images")
    if len(images) > args.max_frames:
        raise Skip("too_many_images", f"{len(images)} images > --max-frames")
    files = None if not images else image_files(images[0], args) if len(images) == 1 else images_as_frames(images, args)
    subset = args.subset or path.parent.name
    return sample(messages, f"cauldron/{subset}", f"{subset}/{path.stem}/{j}", files)


def build_smoltalk(record, args):
    path, j, row = record
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in row.get("messages") or []]
    return sample(messages, f"smoltalk/{row.get('source') or path.stem}", f"{path.stem}/{j}")


def build_rlaif_v(record, args):
    path, j, row = record
    need(row, "question", "chosen", "rejected")
    data = (row.get("image") or {}).get("bytes")
    if not data:
        raise Skip("missing_file", "no image bytes")
    id_ = row["idx"] if row.get("idx") is not None else f"{path.stem}/{j}"
    return sample([{"role": "user", "content": row["question"]}], "rlaif_v", id_,
                  image_files(data, args), row["chosen"], row["rejected"],
                  ds_name=row.get("ds_name"), origin_dataset=row.get("origin_dataset"))


RLAIF_COLUMNS = ["image", "question", "chosen", "rejected", "ds_name", "origin_dataset", "idx"]
DATASETS = {  # subcommand: (rows reader, row -> sample)
    "folder": (read_folder, build_folder),
    "llava-video": (read_llava_video, build_llava_video),
    "openvid": (read_openvid, build_openvid),
    "cauldron": (lambda args: ParquetRows(args.parquet, ["images", "texts"]), build_cauldron),
    "smoltalk": (lambda args: ParquetRows(args.parquet, ["messages", "source"]), build_smoltalk),
    "rlaif-v": (lambda args: ParquetRows(args.parquet, RLAIF_COLUMNS), build_rlaif_v),
}


# --- driver ----------------------------------------------------------------------------------

_JOB = None  # (rows, builder, args), set before converting; forked workers inherit it


def _set_job(job, worker: bool = False):
    global _JOB
    _JOB = job
    if worker:
        torch.set_num_threads(1)  # the pool is the parallelism; one intra-op thread per worker


def _convert(index):
    """(index, (meta, files) or None, (reason, detail) or None) for one input row."""
    rows, builder, args = _JOB
    try:
        return index, builder(rows[index], args), None
    except Skip as e:
        return index, None, (e.reason, e.detail)
    except Exception as e:  # one odd row must not end a many-hour build; counted and shown below
        return index, None, (f"error_{type(e).__name__}", str(e)[:200])


def build(args) -> dict:
    """Write the shards; returns {"written", "shards", "skipped": Counter, "examples": {reason: detail}}."""
    read, builder = DATASETS[args.command]
    rows = read(args)
    order = list(range(min(len(rows), args.limit) if args.limit else len(rows)))
    if not args.no_shuffle:
        random.Random(args.shuffle_seed).shuffle(order)
    skipped, examples, job = Counter(), {}, (rows, builder, args)
    _set_job(job)
    # fork: workers inherit the rows instead of receiving a pickled copy of every table.
    pool = get_context("fork").Pool(args.workers, _set_job, (job, True)) if args.workers > 1 else nullcontext()
    with pool, ShardWriter(args.out, args.prefix, args.samples_per_shard, overwrite=args.overwrite) as writer, \
            Progress(len(order), args.command, "rows") as bar:
        results = pool.imap(_convert, order, chunksize=4) if args.workers > 1 else map(_convert, order)
        for index, result, skip in results:
            bar.update()
            if skip:
                skipped[skip[0]] += 1
                examples.setdefault(skip[0], skip[1])
                continue
            meta, files = result
            # Keys come from the input position, so a sample keeps its key under any shuffle seed.
            writer.write(f"{args.prefix}_{index:08d}", {"json": meta, **files})
    return {"written": writer.count, "shards": writer.paths, "skipped": skipped, "examples": examples}


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder for PREFIX-00000.tar, ...")
    common.add_argument("--prefix", help="shard name and key prefix (default: the subcommand, '-' -> '_')")
    common.add_argument("--samples-per-shard", type=int, default=1000)
    common.add_argument("--shuffle-seed", type=int, default=0, help="samples are written in this seeded random order")
    common.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    common.add_argument("--limit", type=int, default=0, help="use only the first N input rows")
    common.add_argument("--workers", type=int, default=1, help="processes decoding media")
    common.add_argument("--overwrite", action="store_true", help="delete this prefix's existing shards first")
    common.add_argument("--video-mode", choices=("frames", "raw"), default="frames",
                        help="frames: uniformly sampled JPEG frames; raw: the video file's bytes")
    common.add_argument("--target-fps", type=float, default=1.0, help="frames per second kept (0: only --max-frames)")
    common.add_argument("--max-frames", type=int, default=64)
    common.add_argument("--frame-size", type=int, default=224, help="short side in pixels, aspect kept (0: keep)")
    common.add_argument("--crop", action="store_true", help="centre-crop to a square (cuts content)")
    common.add_argument("--jpeg-quality", type=int, default=90)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("folder", parents=[common], help="generic JSONL of {messages, source, media, ...}")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--media-root", help="media paths are relative to this (default: the JSONL's folder)")
    p = sub.add_parser("llava-video", parents=[common], help="LLaVA-Video-178K annotation JSON")
    p.add_argument("--json", required=True)
    p.add_argument("--video-root", required=True)
    p = sub.add_parser("openvid", parents=[common], help="OpenVid-1M csv (captions)")
    p.add_argument("--csv", required=True)
    p.add_argument("--video-root", required=True)
    p.add_argument("--prompt", default="Write a brief caption for this video.")
    p = sub.add_parser("cauldron", parents=[common], help="The Cauldron subset parquet files")
    p.add_argument("--parquet", nargs="+", required=True)
    p.add_argument("--subset", help="default: each parquet file's folder name")
    p.add_argument("--multi-image", choices=("skip", "frames"), default="skip",
                   help="rows with several images: skip them or store the images as frames")
    for name, help_ in (("smoltalk", "SmolTalk parquet files (text only)"), ("rlaif-v", "RLAIF-V parquet (DPO)")):
        sub.add_parser(name, parents=[common], help=help_).add_argument("--parquet", nargs="+", required=True)
    args = parser.parse_args(argv)
    args.prefix = args.prefix or args.command.replace("-", "_")
    if not PREFIX_CHARS.match(args.prefix):
        parser.error(f"--prefix {args.prefix!r}: use letters, digits, '_' or '-'")
    if args.samples_per_shard < 1 or args.max_frames < 1 or args.workers < 1:
        parser.error("--samples-per-shard, --max-frames and --workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = build(args)
    except FileExistsError as e:
        print(f"{e}; pass --overwrite to replace them", file=sys.stderr)
        return 2
    print(f"wrote {result['written']} samples in {len(result['shards'])} shards to {args.out}")
    skipped = result["skipped"]
    print(f"skipped {sum(skipped.values())}" + "".join(f", {r}={n}" for r, n in sorted(skipped.items())))
    for reason, detail in sorted(result["examples"].items()):
        print(f"  first {reason}: {detail}", file=sys.stderr)
    return 0 if result["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
