"""Generate a procedural video QA dataset whose answers hinge on one small object, so that a single
static glance at a downscaled frame cannot answer but a model that learns where to look can.

Every clip has `--frames` frames of `--frame-size` px: a light neutral background (plain, or softly
mottled) and small objects, all the same size (1/12 of the frame side, at least 10 px; `--object-scale`),
at random non-overlapping positions, in a palette of 8 clearly distinct colours (red, orange, yellow,
green, cyan, blue, purple, pink) or grey. Shapes: circle, square, triangle, cross. `--tasks` picks the
clips' tasks, in turn (default colour, shape, motion). Three families:
- content-findable (a fixed query can learn where the answer is; `--distractors` counts the others):
  - colour: the target is the only circle; the distractors are squares, triangles and crosses in random
    palette colours (the target's included). "What colour is the circle?" Static clip.
  - shape: the target is the only coloured object, in a random shape; the distractors are grey, in
    random shapes. "What shape is the red object?" Static clip.
  - motion: as in shape, but the target moves steadily left, right, up or down over the clip (30-50%
    of the frame side in all) while the grey distractors stay still. "Which way does the red object move?"
- question-dependent (every clip holds several candidates; only the question says which one is asked about):
  - qcolour: one object of each shape, in four different colours. "What colour is the triangle?"
    (`--distractors` does not apply: another object would share a named shape.)
  - qshape: four objects in four different colours and random shapes; the other objects, up to the
    distractor count, grey. "What shape is the blue object?" (the shape task's question, with three
    coloured look-alikes).
- history-dependent (the target is findable only by comparing frames):
  - mcolour: one object moves as in motion; the distractors stay still, in any palette colour but the
    mover's. "What colour is the object that moves?"
Each split is its own folder of WebDataset shards (shards.ShardWriter, 500 samples a shard):
alignment/ (captions: "Describe the video." -> e.g. "A small red triangle moves to the left among grey
shapes."), sft/ (question -> answer sentence), dpo/ (question; chosen = the answer sentence, rejected =
the same sentence with a wrong colour, shape or direction), eval/ (4-way multiple choice, the correct
letter uniform over A-D) and text/ (text-only arithmetic and word questions for the text-retention
mix), plus held-out val_alignment/, val_sft/ and val_dpo/ in the training formats, for validation during
training. --size N samples in each training split, --held-out (default max(100, N // 10)) in eval and
in each val split, max(50, N // 5) in text; --splits writes only some of them.
The ground truth is in each sample's "meta" (task, family, answer, colour, shape, direction, the
target's box in every frame, the other objects); --out/README.json holds the counts, arguments,
palette and each task's answer vocabulary. Output is byte-identical for the same arguments.
"""

import argparse
import functools
import json
import multiprocessing
import random
import sys
from contextlib import nullcontext
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media import encode_jpeg  # noqa: E402
from shards import ShardWriter  # noqa: E402

PALETTE = {"red": (220, 30, 30), "orange": (245, 135, 20), "yellow": (240, 215, 20), "green": (40, 160, 60),
           "cyan": (20, 190, 210), "blue": (40, 70, 220), "purple": (135, 60, 190), "pink": (245, 110, 190)}
GREY = (120, 120, 120)
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
FAMILIES = {"colour": "content", "shape": "content", "motion": "content", "qcolour": "question",
            "qshape": "question", "mcolour": "history"}  # task -> family
TASKS = tuple(FAMILIES)
DEFAULT_TASKS = ("colour", "shape", "motion")
NAMED = 4  # qshape's coloured candidates
SPLITS = ("alignment", "sft", "dpo", "eval", "text", "val_alignment", "val_sft", "val_dpo")
SHARD_SAMPLES = 500
UNRECORDED = ("out", "workers")  # arguments that do not change the output, left out of README.json
JPEG_QUALITY = 90  # object centres stay within ~20 levels of their palette colour (~35 at 10 px)
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
WORDS = ("apple", "river", "candle", "garden", "window", "planet", "silver", "forest", "pencil", "basket",
         "ladder", "mirror", "rocket", "saddle", "tunnel", "velvet", "wizard", "meadow", "harbor", "lantern")


def draw_shape(draw, shape, colour, x, y, s):
    """An s x s shape with its top-left pixel at (x, y)."""
    box = [x, y, x + s - 1, y + s - 1]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":  # apex up, base along the bottom row
        draw.polygon([(x + (s - 1) / 2, y), (x + s - 1, y + s - 1), (x, y + s - 1)], fill=colour)
    else:  # cross: bars a third of the side thick
        a, lo = max(2, s // 3), (s - max(2, s // 3)) // 2
        draw.rectangle([x, y + lo, x + s - 1, y + lo + a - 1], fill=colour)
        draw.rectangle([x + lo, y, x + lo + a - 1, y + s - 1], fill=colour)


def place(rng, count, s, px, taken):
    """Top-left corners of `count` s-px objects, kept s // 2 px clear of each other and of the boxes in
    `taken` (extended in place), so that every object can be measured on its own."""
    gap, corners = s // 2, []
    if count == 0:
        return corners
    for _ in range(10000):
        x, y = rng.randrange(px - s + 1), rng.randrange(px - s + 1)
        if all(x >= r + gap or x + s + gap <= l or y >= b + gap or y + s + gap <= t for l, t, r, b in taken):
            taken.append((x, y, x + s, y + s))
            corners.append((x, y))
            if len(corners) == count:
                return corners
    raise ValueError(f"cannot place {count} objects of {s} px in a {px}-px frame")


def background(rng, px):
    """A light neutral tone, half the time softly mottled: noise drawn at a quarter of the resolution
    and upsampled, so it looks like texture rather than sensor noise and costs JPEG little."""
    tone = rng.randint(185, 240)
    image = Image.new("RGB", (px, px), tuple(tone + rng.randint(-8, 8) for _ in range(3)))
    if rng.random() < 0.5:
        n = max(2, px // 4)
        noise = Image.frombytes("L", (n, n), rng.randbytes(n * n)).point(lambda v: v * 24 // 255)
        noise = noise.resize((px, px), Image.BILINEAR)
        image = ImageChops.add(image, Image.merge("RGB", (noise,) * 3), offset=-12)
    return image


def object_size(px: int, object_scale: float) -> int:
    """The side of every object in a px-wide frame: below ~10 px JPEG smears shapes and colours."""
    return max(10, round(px * object_scale))


def target_path(rng, px, s, frames, direction):
    """The target's top-left corner in every frame: still, or moving steadily towards `direction`."""
    x, y = rng.randrange(px - s + 1), rng.randrange(px - s + 1)
    if not direction:
        return [(x, y)] * frames
    dx, dy = DIRECTIONS[direction]
    travel = min(round(px * rng.uniform(0.3, 0.5)), px - s)
    # start far enough from the edge we head for that the whole path stays inside the frame
    start = rng.randrange(px - s + 1 - travel) + (travel if dx + dy < 0 else 0)
    x, y = (start, y) if dx else (x, start)
    return [(x + round(dx * travel * t / (frames - 1)), y + round(dy * travel * t / (frames - 1)))
            for t in range(frames)]


def sweep(path, s):
    """The box the target covers over the whole clip (others keep clear of it)."""
    xs, ys = [p[0] for p in path], [p[1] for p in path]
    return (min(xs), min(ys), max(xs) + s, max(ys) + s)


def others(rng, count, s, px, taken, pick):
    """`count` still objects placed clear of `taken`; pick(i) -> (shape, colour) of the i-th."""
    return [dict(zip(("shape", "colour"), pick(i)), box=[left, top, left + s, top + s])
            for i, (left, top) in enumerate(place(rng, count, s, px, taken))]


def content_scene(rng, task, px, frames, s, distractor_range):
    """colour / shape / motion: the target is the only circle, or the only coloured object."""
    colour = rng.choice(sorted(PALETTE))
    shape = "circle" if task == "colour" else rng.choice(SHAPES)
    direction = rng.choice(sorted(DIRECTIONS)) if task == "motion" else None
    path = target_path(rng, px, s, frames, direction)
    corners = place(rng, rng.randint(*distractor_range), s, px, [sweep(path, s)])
    if task == "colour":  # any colour, the target's too: only the shape singles the target out
        pick = lambda: (rng.choice(SHAPES[1:]), rng.choice(sorted(PALETTE)))  # noqa: E731
    else:
        pick = lambda: (rng.choice(SHAPES), "grey")  # noqa: E731
    rest = []
    for left, top in corners:  # drawn after placing, in this order: the published default clips stay the same
        shape_, colour_ = pick()
        rest.append({"shape": shape_, "colour": colour_, "box": [left, top, left + s, top + s]})
    return {"colour": colour, "shape": shape, "direction": direction, "path": path}, rest


def qcolour_scene(rng, px, frames, s, distractor_range):
    """One object of each shape in four different colours; the question names the target's shape."""
    colours = rng.sample(sorted(PALETTE), len(SHAPES))
    shapes = list(SHAPES)
    rng.shuffle(shapes)
    path = target_path(rng, px, s, frames, None)
    rest = others(rng, len(SHAPES) - 1, s, px, [sweep(path, s)], lambda i: (shapes[i + 1], colours[i + 1]))
    return {"colour": colours[0], "shape": shapes[0], "direction": None, "path": path}, rest


def qshape_scene(rng, px, frames, s, distractor_range):
    """NAMED objects of different colours (the target one of them); the other objects, up to the
    distractor count, grey."""
    colours = rng.sample(sorted(PALETTE), NAMED)
    shapes = [rng.choice(SHAPES) for _ in colours]
    path = target_path(rng, px, s, frames, None)
    count = max(NAMED - 1, rng.randint(*distractor_range))
    rest = others(rng, count, s, px, [sweep(path, s)],
                  lambda i: (shapes[i + 1], colours[i + 1]) if i < NAMED - 1 else (rng.choice(SHAPES), "grey"))
    return {"colour": colours[0], "shape": shapes[0], "direction": None, "path": path}, rest


def mcolour_scene(rng, px, frames, s, distractor_range):
    """One object moves; still ones in any palette colour but its own: only the frames' history tells
    which one moves."""
    colour, shape = rng.choice(sorted(PALETTE)), rng.choice(SHAPES)
    direction = rng.choice(sorted(DIRECTIONS))
    path = target_path(rng, px, s, frames, direction)
    still = [c for c in sorted(PALETTE) if c != colour]
    rest = others(rng, rng.randint(*distractor_range), s, px, [sweep(path, s)],
                  lambda i: (rng.choice(SHAPES), rng.choice(still)))
    return {"colour": colour, "shape": shape, "direction": direction, "path": path}, rest


SCENES = {"qcolour": qcolour_scene, "qshape": qshape_scene, "mcolour": mcolour_scene}


def make_scene(rng, task, px, frames, object_scale=1 / 12, distractor_range=(6, 12)):
    """One clip's objects, not drawn: (target {"colour", "shape", "direction", "path"}, the other
    objects [{"shape", "colour", "box"}], the object side in px)."""
    s = object_size(px, object_scale)
    if task in SCENES:
        return (*SCENES[task](rng, px, frames, s, distractor_range), s)
    return (*content_scene(rng, task, px, frames, s, distractor_range), s)


def make_clip(rng, task, px, frames, object_scale=1 / 12, distractor_range=(6, 12)):
    """Render one clip: (list of JPEG bytes, one per frame; meta with the ground truth)."""
    target, rest, s = make_scene(rng, task, px, frames, object_scale, distractor_range)
    scene = background(rng, px)
    draw = ImageDraw.Draw(scene)
    for d in rest:
        draw_shape(draw, d["shape"], PALETTE.get(d["colour"], GREY), d["box"][0], d["box"][1], s)
    path, jpegs = target["path"], []
    for t, (tx, ty) in enumerate(path):
        if t and path[t] == path[t - 1]:  # a static clip: encode once, repeat the bytes
            jpegs.append(jpegs[-1])
            continue
        frame = scene.copy()
        draw_shape(ImageDraw.Draw(frame), target["shape"], PALETTE[target["colour"]], tx, ty, s)
        jpegs.append(encode_jpeg(frame, quality=JPEG_QUALITY))
    meta = {"task": task, "family": FAMILIES[task], "colour": target["colour"], "shape": target["shape"],
            "direction": target["direction"], "frame_size": px, "object_size": s,
            "boxes": [[x_, y_, x_ + s, y_ + s] for x_, y_ in path], "distractors": rest}
    meta["answer"] = answer_key(meta)[0]
    return jpegs, meta


def vocabulary(task: str) -> list[str]:
    """The values an answer to `task` can take."""
    return {"colour": sorted(PALETTE), "qcolour": sorted(PALETTE), "mcolour": sorted(PALETTE),
            "shape": list(SHAPES), "qshape": list(SHAPES), "motion": list(DIRECTIONS)}[task]


def answer_key(meta):
    """(the value asked about, all values it could take, question, answer sentence template)."""
    task, c, shape = meta["task"], meta["colour"], meta["shape"]
    if task == "colour":
        return c, vocabulary(task), "What colour is the circle?", "The circle is {}."
    if task in ("shape", "qshape"):
        return shape, vocabulary(task), f"What shape is the {c} object?", f"The {c} object is a {{}}."
    if task == "qcolour":
        return c, vocabulary(task), f"What colour is the {shape}?", f"The {shape} is {{}}."
    if task == "mcolour":
        return c, vocabulary(task), "What colour is the object that moves?", "The object that moves is {}."
    return (meta["direction"], vocabulary(task), f"Which way does the {c} object move?",
            f"The {c} object moves {{}}.")


def phrase(meta, value):
    """How a value reads in an answer sentence ("left" -> "to the left")."""
    return DIRECTION_PHRASES[value] if meta["task"] == "motion" else value


def listing(objects) -> str:
    """"a red circle, a blue square and a green cross"."""
    named = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']}" for o in objects]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def caption(meta):
    c, shape, task = meta["colour"], meta["shape"], meta["task"]
    if task == "colour":
        return f"A small {c} circle sits among small squares, triangles and crosses of many colours."
    if task == "shape":
        return f"A small {c} {shape} sits among grey shapes."
    if task in ("qcolour", "qshape"):
        named = [{"colour": c, "shape": shape}] + [d for d in meta["distractors"] if d["colour"] != "grey"]
        named.sort(key=lambda o: (SHAPES.index(o["shape"]), o["colour"]))
        text = listing(named)
        return text[0].upper() + text[1:] + (" among grey shapes." if task == "qshape" else ".")
    mover = f"A small {c} {shape} moves {DIRECTION_PHRASES[meta['direction']]}"
    return mover + (" among grey shapes." if task == "motion" else " among still shapes of other colours.")


def video_sample(split, rng, task, args):
    """One sample of a video split: {extension: data} for ShardWriter."""
    jpegs, meta = make_clip(rng, task, args.frame_size, args.frames, args.object_scale, args.distractors)
    truth, values, question, template = answer_key(meta)
    sample = {}
    split = split.removeprefix("val_")  # held-out splits share their training split's format
    if split == "alignment":
        sample["messages"] = [{"role": "user", "content": "Describe the video."},
                              {"role": "assistant", "content": caption(meta)}]
    elif split == "sft":
        sample["messages"] = [{"role": "user", "content": question},
                              {"role": "assistant", "content": template.format(phrase(meta, truth))}]
    elif split == "dpo":
        wrong = rng.choice([v for v in values if v != truth])
        sample["messages"] = [{"role": "user", "content": question}]
        sample["chosen"] = template.format(phrase(meta, truth))
        sample["rejected"] = template.format(phrase(meta, wrong))
    else:  # eval: the truth and three wrong values, shuffled so the letter carries no signal
        options = [truth] + rng.sample([v for v in values if v != truth], 3)
        rng.shuffle(options)
        letter = "ABCD"[options.index(truth)]
        choices = "".join(f"\n{'ABCD'[i]}. {o}" for i, o in enumerate(options))
        sample["messages"] = [{"role": "user", "content": f"{question}{choices}\n{MCQ_SUFFIX}"},
                              {"role": "assistant", "content": letter}]
        sample.update(question=question, options=options, answer=letter)
    sample.update(source=f"synthetic/{task}", meta=meta)
    return {"json": sample, **{f"{t:03d}.jpg": data for t, data in enumerate(jpegs)}}


def text_sample(rng):
    """A text-only question with a procedurally computed answer: (kind, question, answer)."""
    a, b, w = rng.randint(2, 99), rng.randint(2, 99), rng.choice(WORDS)
    kind = rng.choice(("add", "subtract", "multiply", "compare", "length", "reverse", "first_letter"))
    if kind == "add":
        return kind, f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == "subtract":
        hi, lo = max(a, b), min(a, b)
        return kind, f"What is {hi} - {lo}?", f"{hi} - {lo} = {hi - lo}."
    if kind == "multiply":
        a, b = a % 12 + 2, b % 12 + 2
        return kind, f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == "compare":
        b = b if b != a else a + 1
        return kind, f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger."
    if kind == "length":
        return kind, f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.'
    if kind == "reverse":
        return kind, f'Spell the word "{w}" backwards.', f'"{w}" backwards is "{w[::-1]}".'
    return kind, f'What is the first letter of the word "{w}"?', f'The first letter of "{w}" is "{w[0]}".'


def split_sizes(size, held_out=None):
    held_out = held_out or max(100, size // 10)
    return {"alignment": size, "sft": size, "dpo": size, "eval": held_out, "text": max(50, size // 5),
            "val_alignment": held_out, "val_sft": held_out, "val_dpo": held_out}


def make_sample(split, split_seed, args, i):
    """Sample i of a split: (task, {extension: data}). It draws from its own sub-seeded Random, so it does
    not depend on the samples before it (a larger --size only appends samples; workers may draw it)."""
    rng = random.Random(split_seed * 2**32 + i)
    if split == "text":
        kind, question, answer = text_sample(rng)
        return "text", {"json": {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "source": "synthetic/text", "meta": {"task": "text", "kind": kind}}}
    task = args.tasks[i % len(args.tasks)]
    return task, video_sample(split, rng, task, args)


def write_split(out, split, split_seed, count, args, pool=None):
    """Write one split; returns {task: count}. With a pool its workers draw the samples and this process
    writes them in order, so the shards are the same bytes as without one."""
    counts = {}
    draw = functools.partial(make_sample, split, split_seed, args)
    samples = pool.imap(draw, range(count), chunksize=32) if pool else map(draw, range(count))
    with ShardWriter(out / split, prefix=split, max_samples=SHARD_SAMPLES) as writer:
        for i, (task, files) in enumerate(samples):
            writer.write(f"{split}-{i:06d}", files)
            counts[task] = counts.get(task, 0) + 1
    return counts


def recorded(args: argparse.Namespace) -> dict:
    """The arguments README.json records (as JSON reads them back), without those that do not change the
    output: what a caller compares to decide whether a folder holds the dataset it asks for."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in UNRECORDED}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (its split folders must hold no shards)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=2000, help="samples per training split")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--object-scale", type=float, default=1 / 12,
                        help="object side as a fraction of the frame side (at least 10 px)")
    parser.add_argument("--distractors", type=int, nargs=2, default=(6, 12), metavar=("MIN", "MAX"),
                        help="distractors per clip, drawn uniformly")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(DEFAULT_TASKS),
                        help="the clips' tasks, in turn (e.g. motion only: every clip has a moving target, "
                             "for next-frame prediction; qcolour qshape mcolour: the question- and "
                             "history-dependent ones)")
    parser.add_argument("--held-out", type=int, help="samples in eval and in each val split "
                                                     "(default max(100, size // 10))")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="the splits to write")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing clips (the output does not depend on it)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("need --workers >= 1")
    if args.size < 1 or args.frames < 2 or args.frame_size < 96 or (args.held_out is not None and args.held_out < 1):
        parser.error("need --size >= 1, --held-out >= 1, --frames >= 2 (for motion), --frame-size >= 96 "
                     "(room for 13 objects)")
    if not 0 < args.object_scale <= 0.25 or not 0 <= args.distractors[0] <= args.distractors[1]:
        parser.error("need 0 < --object-scale <= 0.25 and 0 <= MIN <= MAX distractors")
    args.distractors = tuple(args.distractors)
    stale = [split for split in SPLITS if any((args.out / split).glob(f"{split}-*.tar"))]
    if stale:  # checked up front so that no split is half written
        parser.error(f"{args.out / stale[0]} already holds shards; choose an empty --out")
    master = random.Random(args.seed)
    split_seeds = {split: master.getrandbits(64) for split in SPLITS}  # independent clips per split
    sizes = {split: n for split, n in split_sizes(args.size, args.held_out).items() if split in args.splits}
    # spawn, not fork: a caller (scripts/ablate.py) may hold torch's threads, which a fork would copy mid-state
    with multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else nullcontext() as pool:
        counts = {split: write_split(args.out, split, split_seeds[split], n, args, pool) for split, n in sizes.items()}
    # the folder and the worker count are left out, so that the whole folder is byte-identical wherever and
    # however it is generated
    summary = {"description": __doc__, "arguments": recorded(args),
               "counts": counts, "palette": PALETTE, "grey": GREY, "shapes": SHAPES, "directions": list(DIRECTIONS),
               "vocabulary": {task: vocabulary(task) for task in args.tasks}, "shard_samples": SHARD_SAMPLES,
               "jpeg_quality": JPEG_QUALITY}
    (args.out / "README.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
