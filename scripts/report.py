"""The report of a training run: RUN_DIR/report.md, with its figures in RUN_DIR/report/.

    python scripts/report.py RUN_DIR [--checkpoint PATH] [--clips 6] [--mode coarse_fine] [--frame-size N]

Works on any run directory train.py writes (alignment, SFT, DPO, next-frame prediction). It reads
config.yaml and metrics.csv (required), val.csv and summary.json (optional), and for the attention
maps a model: --checkpoint (an export folder or a training checkpoint file), else RUN_DIR/best,
RUN_DIR/final, the latest RUN_DIR/checkpoints/*.pt. A rerun replaces the report and the fig* files of
RUN_DIR/report/.

The report is the list SECTIONS, in order: each section is a function that takes the loaded run
(`RunFiles`; `run.model` loads the model once for every section) and returns a `Section` (its markdown
and the figures it wrote). A new section (e.g. next-frame predictions: frame t, predicted t+1, actual
t+1, with `read_clips` for the clips) is one such function and one entry in SECTIONS. Figures use
matplotlib's Agg backend (no display) and hold nothing that changes between runs (no dates, no
versions), so the same run and model give the same files.
"""

import argparse
import csv
import dataclasses
import functools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.font_manager import findfont  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ckpt  # noqa: E402
import frames  # noqa: E402
import objectives  # noqa: E402
import train  # noqa: E402
from config import MODES, ConfigError, load_config  # noqa: E402
from data import ShardStream  # noqa: E402
from media import sample_frame_indices  # noqa: E402
from model import load_model  # noqa: E402

NEXT_FRAME = ("loss_fine", "loss_coarse")  # the next-frame objective's losses with and without foveation
REFERENCE_LOSSES = ("copy_loss", "mean_loss")  # its baselines (copy frame t; predict the mean frame)
TRAIN_CURVES = ("rewards/accuracies", "rewards/margins")  # metrics.csv columns with a panel of their own (DPO)
VAL_CURVES = ("loss", "answer_acc", "dpo_loss", "rewards/accuracies", "loss_fine", "loss_coarse")
TABLE_COLUMNS = ("samples", "loss", "token_acc", "answer_acc", "loss_coarse", "loss_fine", "improvement", "copy_loss",
                 "mean_loss", "static_entropy", "dynamic_entropy", "dpo_loss", "rewards/accuracies")
MODE_COLOURS = {"coarse_fine": "C0", "coarse_only": "C1", "autoregressive": "C2"}
KINDS = {"static": "static query", "dynamic": "dynamic query"}  # attention maps, in drawing order
MAX_ROWS = 16  # frames drawn per clip figure, spread over the clip (a 64-frame grid is unreadable); the GIF has all
CMAP = matplotlib.colormaps[frames.CMAP]  # the colour bar of the overlays (frames.overlay)
GIF_PANEL = 192  # px: smaller frames are enlarged (nearest neighbour: one patch stays one block) in the GIF


class ReportError(Exception):
    """Bad input; the message names the file or flag."""


@dataclass
class RunFiles:
    """A run directory as read: its config, logs and the report's options."""
    run_dir: Path
    cfg: object  # config.Config of config.yaml
    metrics: list  # metrics.csv rows (read_csv)
    val: list  # val.csv rows; [] without validation
    summary: dict | None  # summary.json, written when the run finished
    args: argparse.Namespace

    @property
    def out_dir(self) -> Path:
        return self.run_dir / "report"

    @functools.cached_property
    def model(self) -> tuple | None:
        """(FoveatedVLM in eval mode, what was read) of model_source, or None without one: loaded once,
        for every section that needs it."""
        source = model_source(self)
        if source is None:
            return None
        try:
            model, what = load_model(source)
        except (OSError, ValueError) as e:
            raise ReportError(f"{source}: cannot load the model: {e}") from None
        return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), what


@dataclass
class Section:
    markdown: str
    figures: list = field(default_factory=list)  # paths written


# ---- reading the run -----------------------------------------------------------------------------------

def load_run(run_dir: Path, args) -> RunFiles:
    """Read a run directory; missing required files and a missing --checkpoint fail here, first."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    missing = [name for name in ("config.yaml", "metrics.csv") if not (run_dir / name).is_file()]
    if missing:
        raise ReportError(f"{run_dir}: missing {' and '.join(missing)} (train.py writes both once a run has "
                          f"logged a step)")
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise ReportError(f"--checkpoint {args.checkpoint}: no such file or folder")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise ReportError(str(e)) from None
    metrics = read_csv(run_dir / "metrics.csv")
    if not metrics:
        raise ReportError(f"{run_dir / 'metrics.csv'}: no rows yet (the run has not logged a step)")
    val = read_csv(run_dir / "val.csv") if (run_dir / "val.csv").is_file() else []
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    return RunFiles(run_dir, cfg, metrics, val, summary, args)


def read_csv(path: Path) -> list[dict]:
    """Rows of a train.py CSV log: numbers as floats, empty cells as None, mode and source as text."""
    with open(path, newline="") as f:
        return [{k: v if k in ("mode", "source") else _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text):
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def column(rows, name) -> tuple[list, list]:
    """(steps, values) of a column over the rows where it holds a finite number."""
    points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), float) and math.isfinite(r[name])]
    return [s for s, _ in points], [v for _, v in points]


def has(rows, name) -> bool:
    return bool(column(rows, name)[0])


def val_by_mode(run) -> dict[str, list]:
    """Validation rows over all sources ('all'), per mode in the order val.csv first lists them."""
    by_mode = {}
    for row in run.val:
        if row["source"] == "all":
            by_mode.setdefault(row["mode"], []).append(row)
    return by_mode


def ratio(rows) -> tuple[list, list]:
    """(steps, coarse/fine loss ratio): the logged `ratio` column, else computed from the two losses."""
    if has(rows, "ratio"):
        return column(rows, "ratio")
    points = [(r["step"], r["loss_coarse"] / r["loss_fine"]) for r in rows
              if all(isinstance(r.get(c), float) and math.isfinite(r[c]) for c in NEXT_FRAME) and r["loss_fine"] > 0]
    return [s for s, _ in points], [v for _, v in points]


# ---- plotting ----------------------------------------------------------------------------------------

@dataclass
class Line:
    label: str
    steps: list
    values: list
    colour: str | None = None
    dashed: bool = False
    width: float = 1.5


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: list
    hline: tuple | None = None  # (level, label): a reference level drawn across


def draw_panels(panels, path: Path, title: str) -> Path:
    """Panels of lines over steps, three to a row."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.2 * rows), squeeze=False, layout="constrained")
    for ax, panel in zip(axes.flat, panels):
        for line in panel.lines:
            # markers where there are few points: a single validation is a point, not an invisible line
            ax.plot(line.steps, line.values, "--" if line.dashed else "-", color=line.colour, label=line.label,
                    linewidth=line.width, marker="o" if len(line.steps) <= 25 else None, markersize=3)
        if panel.hline:
            ax.axhline(panel.hline[0], color="grey", linewidth=1, linestyle=":", label=panel.hline[1])
        values = [v for line in panel.lines for v in line.values]
        if min(values) > 0 and max(values) / min(values) > 20:  # losses falling from ~10 to ~0.1
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 2.5
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        # under the axes: inside, a legend can hide the lines it names
        entries = len(panel.lines) + bool(panel.hline)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=entries if entries <= 3 else 2,
                  frameon=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    return save(fig, path)


def mode_width(i: int) -> float:
    """Line width of the i-th mode: thinner ones drawn later stay visible on equal values (the coarse
    loss is the same in every mode that computes it)."""
    return max(3.0 - 0.8 * i, 1.0)


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: the same run, the same bytes
    plt.close(fig)
    return path


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else "n/a"


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def image_link(run, path: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run.run_dir).as_posix()})"


# ---- sections ----------------------------------------------------------------------------------------

def overview(run) -> Section:
    """Run facts and Table 1: the last validation per mode."""
    facts = "\n".join(f"| {k} | {v} |" for k, v in run_facts(run))
    return Section(f"# Report: {run.run_dir.name}\n\n| run | |\n|---|---|\n{facts}\n\n"
                   f"## Table 1: the last validation per mode\n\n{validation_table(run)}")


def run_facts(run) -> list[tuple[str, str]]:
    cfg, summary, last = run.cfg, run.summary, run.metrics[-1]
    if summary:
        steps, samples = summary["steps"], summary["samples"]
        wall = f"{duration(summary['wall_seconds'])} ({duration(summary['train_seconds'])} in training steps)"
    else:
        steps, samples = int(last["step"]), int(last["samples"]) if isinstance(last.get("samples"), float) else "n/a"
        logged = duration(last.get("elapsed_s") or 0)
        wall = f"n/a: no summary.json (the run has not finished); {logged} of training logged"
    best = (summary or {}).get("best")
    m = cfg.model
    return [("stage", cfg.stage), ("training mode", cfg.mode), ("steps", f"{steps} of {cfg.optim.steps}"),
            ("samples", f"{samples}"), ("wall time", wall), ("LLM", f"`{m.llm}`"), ("vision backbone", f"`{m.dino}`"),
            ("query_dim / layout", f"{m.query_dim} / {m.layout}"),
            ("frames", f"up to {cfg.data.max_frames} of {cfg.data.frame_size} px"),
            ("init_from", f"`{cfg.init_from}`" if cfg.init_from else "none"), ("seed", f"{cfg.seed}"),
            ("best checkpoint", f"step {best['step']} (validation loss {fmt(best['metric'])})" if best else "n/a")]


def validation_table(run) -> str:
    last = {mode: rows[-1] for mode, rows in val_by_mode(run).items()}
    if not last:
        return "No validation: the run has no val.csv (no `data.val` sources)."
    columns = [c for c in TABLE_COLUMNS if any(isinstance(r.get(c), float) for r in last.values())]
    head = "| mode | step | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2)
    body = "\n".join(f"| {mode} | {int(r['step'])} | " + " | ".join(fmt(r.get(c)) for c in columns) + " |"
                     for mode, r in last.items())
    entropies = "; attention entropies in nats over all blocks, heads and keys" if "static_entropy" in columns else ""
    return f"{head}\n{body}\n\nOver all validation sources (source `all` in val.csv){entropies}."


def training_curves(run) -> Section:
    """Fig. 1: the training losses, then the validation curves per mode."""
    m = run.metrics
    objectives = [c for c in m[0] if c.endswith("_loss") and c not in REFERENCE_LOSSES and has(m, c)]
    panels = [Panel(f"training loss ({run.cfg.stage})", "loss", [Line("loss", *column(m, "loss"), colour="black"),
                                                                *(Line(c, *column(m, c)) for c in objectives)])]
    panels += [Panel(f"training {c}", c, [Line(c, *column(m, c), colour="black")]) for c in TRAIN_CURVES if has(m, c)]
    predicted = [c for c in NEXT_FRAME if has(m, c)]  # loss_coarse alone: one pass (coarse_only, the pooled baseline)
    if "loss_coarse" in predicted:
        panels.append(Panel("next-frame prediction (training)", "loss",
                            [Line(c, *column(m, c), colour=f"C{i}") for i, c in enumerate(predicted)]
                            + [Line(f"{c} (reference)", *column(m, c), colour=f"C{i + 2}", dashed=True)
                               for i, c in enumerate(REFERENCE_LOSSES) if has(m, c)]))
    by_mode = val_by_mode(run)
    for name in VAL_CURVES:
        lines = [Line(mode, *column(rows, name), colour=MODE_COLOURS.get(mode), width=mode_width(i))
                 for i, (mode, rows) in enumerate(by_mode.items()) if has(rows, name)]
        if lines:  # DPO validates the text CE of the chosen replies
            what = " (chosen replies)" if name == "loss" and run.cfg.stage == "dpo" else ""
            panels.append(Panel(f"validation {name}{what}", name, lines))
    path = draw_panels(panels, run.out_dir / "fig1_training_curves.png", f"{run.run_dir.name}: training curves")
    notes = "Training panels: metrics.csv, one point per logged step"
    if "loss_coarse" in predicted:
        notes += " (dashed: the reference losses of copying frame t and of predicting the mean frame)"
    notes += (". Validation panels: val.csv, source `all`, one line per mode." if by_mode else
              ". No validation: the run has no val.csv.")
    return Section(f"## Fig. 1: training curves\n\n{image_link(run, path, 'Fig. 1')}\n\n{notes} A loss axis is "
                   f"logarithmic where the values span more than 20x.", [path])


def coarse_fine_ratio(run) -> Section:
    """Fig. 2: next-frame loss without foveation over loss with it (only runs that log both)."""
    head = "## Fig. 2: coarse / fine loss ratio"
    lines = []
    if ratio(run.metrics)[0]:
        lines.append(Line("train", *ratio(run.metrics), colour="black"))
    lines += [Line(f"val {mode}", *ratio(rows), colour=MODE_COLOURS.get(mode), width=mode_width(i))
              for i, (mode, rows) in enumerate(val_by_mode(run).items()) if ratio(rows)[0]]
    if not lines:
        why = ("one pass, no `loss_fine` (coarse_only, or the pooled baseline)" if has(run.metrics, "loss_coarse")
               else "no `loss_coarse` / `loss_fine` (no next-frame objective)")
        return Section(f"{head}\n\nNot drawn: this run logs {why}.")
    path = draw_panels([Panel("loss_coarse / loss_fine", "ratio", lines, hline=(1.0, "1: fine no better"))],
                       run.out_dir / "fig2_coarse_fine_ratio.png", f"{run.run_dir.name}: coarse / fine ratio")
    last = ", ".join(f"{line.label} {line.values[-1]:.3f} (step {int(line.steps[-1])})" for line in lines)
    return Section(f"{head}\n\n{image_link(run, path, 'Fig. 2')}\n\nAbove 1 the foveated (fine) prediction beats "
                   f"the coarse one. Last: {last}.", [path])


def attention(run) -> Section:
    """Fig. 3: where the static and the dynamic queries look, on clips from the run's data."""
    head = "## Fig. 3: attention maps"
    if run.model is None:
        return Section(f"{head}\n\nNot drawn: no model in {run.run_dir} (best/, final/ or checkpoints/); pass "
                       f"--checkpoint.")
    model, what = run.model
    try:
        model.visual.require_queries("Fig. 3")
    except ValueError as e:
        return Section(f"{head}\n\nNot drawn: {what}: {e}.")
    size, patch = run.args.frame_size or run.cfg.data.frame_size, model.encoder.dino.patch_size
    frames.check_frame_size(size, patch, error=ReportError)
    try:
        samples, key = read_clips(run, model, size)
    except ConfigError as e:  # e.g. the data is not where the run read it
        return Section(f"{head}\n\nNot drawn: {e} (shard paths are read as config.yaml has them: relative ones "
                       f"from the current directory)")
    if not samples:
        return Section(f"{head}\n\nNot drawn: no sample with frames in {key}.")
    clips = [clip_attention(model, s, run.args.mode) for s in samples]
    figures = [draw_clip(c, i, run.out_dir / f"fig3_attention_clip{i}.png") for i, c in enumerate(clips)]
    figures.append(write_gif(clips[0], run.out_dir / "fig3_attention_clip0.gif"))
    gh, gw = next(iter(clips[0]["maps"].values())).shape[1:]
    intro = (f"Model {what}, mode `{run.args.mode}`, {len(clips)} clip(s) from `{key}` at {size} px ({gh} x {gw} "
             f"patches of {patch} px).")
    return Section(attention_markdown(run, head, intro, clips, figures, model.encoder.dino.num_prefix), figures)


def attention_markdown(run, head: str, intro: str, clips: list, figures: list, num_prefix: int) -> str:
    kinds = [k for k in KINDS if k in clips[0]["maps"]]
    missing = [KINDS[k] for k in KINDS if k not in kinds]
    gh, gw = clips[0]["maps"][kinds[0]].shape[1:]
    rows = "\n".join(f"| {KINDS[k]} | {np.mean([c['entropy'][k]['all'] for c in clips]):.3f} | "
                     f"{np.mean([c['entropy'][k]['drawn'] for c in clips]):.3f} |" for k in kinds)
    text = [head,
            f"{intro} Each row is a frame; the overlays are the attention of the query on each patch in the "
            f"backbone's last block, averaged over heads (the CLS / register keys left out), on one colour scale per "
            f"clip (the colour bar). The dynamic query of frame t comes from the LLM's state after frame t - 1 "
            f"(frame 1: the learned q_init). The GIF plays every frame of clip 0."
            + (f" Not computed in `{run.args.mode}`: {', '.join(missing)}." if missing else ""),
            f"Mean attention entropy over these clips (nats; lower: more focused):\n\n| query | all blocks, heads "
            f"and keys (as val.csv; uniform: {math.log(num_prefix + gh * gw):.3f}) | drawn maps, over patches "
            f"(uniform: {math.log(gh * gw):.3f}) |\n|---|---|---|\n{rows}"]
    for i, (c, path) in enumerate(zip(clips, figures)):
        text.append(f"Clip {i}: `{c['source']}` / `{c['key']}`, {len(c['frames'])} frames. "
                    f"Text: `{c['text'] or '(none: one token)'}`\n\n{image_link(run, path, f'Fig. 3, clip {i}')}")
    text.append(f"Clip 0 over time: {image_link(run, figures[-1], 'Fig. 3, clip 0, animated')}")
    return "\n\n".join(text)


# The report, in order. A new section: a function RunFiles -> Section, added here.
PREDICTION_CLIPS = 3  # clips drawn in Fig. 4


def predictions(run) -> Section:
    """Fig. 4 (next-frame runs): frame t, the fine and the coarse prediction of frame t + 1 (a run with
    one pass: its prediction), the actual frame t + 1 (pixels targets upsampled; latents decoded through
    --autoencoder)."""
    head = "## Fig. 4: next-frame predictions"
    if run.cfg.stage != "next_frame":
        return Section("")
    if run.model is None or run.model[0].next_frame is None:
        return Section(f"{head}\n\nNot drawn: no model with a next-frame head in {run.run_dir}.")
    model, what = run.model
    target = run.cfg.next_frame.target
    if target != "pixels" and not run.args.autoencoder:
        return Section(f"{head}\n\nNot drawn: the {target} predictions are latents; pass --autoencoder "
                       f"(the hub id or folder of the {target} that computed them) to decode them.")
    try:
        samples, key = read_clips(run, model, run.cfg.data.frame_size)
    except ConfigError as e:
        return Section(f"{head}\n\nNot drawn: {e}")
    samples = [s for s in samples if s["frames"].dim() == 4][:PREDICTION_CLIPS]
    if not samples:
        return Section(f"{head}\n\nNot drawn: no video in {key}.")
    unit = objectives.build(run.cfg)[0][0]  # the run's NextFrame: how a head output becomes a prediction
    if target != "pixels" and unit.residual and any(s.get("latents") is None for s in samples):
        return Section(f"{head}\n\nNot drawn: a residual {target} head predicts the change from frame t's "
                       f"latent, and a clip of {key} has no precomputed latents.")
    decode = pixels_to_image if target == "pixels" else latent_decoder(run.args.autoencoder, target)
    figures = [draw_predictions(model, unit, s, decode, i, run.out_dir / f"fig4_predictions_clip{i}.png")
               for i, s in enumerate(samples)]
    passes = ("the fine pass (coarse_fine: queries chosen by the LLM) and from the coarse pass (the static query)"
              if model.visual.queries else f"its one pass ({model.visual.mode_text('coarse_only')})")
    text = (f"Model {what}: for each frame t, the prediction of frame t + 1 from {passes}, and the actual frame "
            f"t + 1; {len(samples)} clip(s) from `{key}`, target `{target}`.")
    return Section(f"{head}\n\n{text}\n\n" + "\n".join(image_link(run, f, f"predictions {i}")
                                                        for i, f in enumerate(figures)), figures)


def pixels_to_image(prediction: torch.Tensor, size: int) -> np.ndarray:
    """A pixels-target prediction [3, s, s] in [-1, 1] -> uint8 [size, size, 3]."""
    return upsampled(((prediction.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), size)


def upsampled(image: torch.Tensor, size: int) -> np.ndarray:
    """uint8 [3, h, w] -> [size, size, 3] (nearest: one target pixel stays one block)."""
    image = torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="nearest")[0]
    return image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def latent_decoder(name: str, kind: str):
    from latents import decode, load_autoencoder

    ae = load_autoencoder(name, kind, setting="--autoencoder")
    return lambda prediction, size: upsampled(decode(ae, prediction[None])[0], size)


@torch.no_grad()
def draw_predictions(model, unit, sample, decode, index: int, path: Path) -> Path:
    from latents import pixel_target

    frames = sample["frames"]
    device = next(model.parameters()).device
    states = model.frame_states(frames[None].to(device), mode="coarse_fine")
    current = (pixel_target(frames, unit.pixels_size) if unit.target == "pixels" else sample["latents"]).to(device)
    predict = lambda kind, t: unit.predict(model, states[kind][0, t], current[t])  # noqa: E731
    size = frames.shape[-1]
    rows = sample_frame_indices(len(frames) - 1, MAX_ROWS)
    # the pooled baseline has one pass (no fine one): its column is the prediction
    kinds = {"fine": "fine prediction of t + 1", "coarse": "coarse prediction of t + 1"}
    if states["fine"] is None:
        kinds = {"coarse": "prediction of t + 1"}
    titles = ("frame t", *kinds.values(), "actual t + 1")
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.15 * len(titles), 2.1 * len(rows) + 0.8),
                             squeeze=False, layout="constrained")
    for r, t in enumerate(rows):
        images = (frames[t].permute(1, 2, 0).numpy(), *(decode(predict(k, t), size) for k in kinds),
                  frames[t + 1].permute(1, 2, 0).numpy())
        for c, image in enumerate(images):
            axes[r, c].imshow(image, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(f"t = {t}", fontsize=9)
    fig.suptitle(f"clip {index}: {sample['source'] or '(no source)'} / {sample['key']}", fontsize=10)
    return save(fig, path)


SECTIONS = [overview, training_curves, coarse_fine_ratio, attention, predictions]


# ---- attention maps ------------------------------------------------------------------------------------

def model_source(run) -> Path | None:
    """--checkpoint, else the run's best/ or final/ export, else its latest training checkpoint."""
    if run.args.checkpoint:
        return Path(run.args.checkpoint)
    for folder in (run.run_dir / "best", run.run_dir / "final"):
        if (folder / "config.json").is_file():
            return folder
    return ckpt.latest_checkpoint(run.run_dir)


def read_clips(run, model, frame_size: int) -> tuple[list[dict], str]:
    """(the first --clips samples with frames, which config key they came from): the run's validation
    sources, else its training sources, read once in order as validation reads them, with the training
    sample settings (at frame_size)."""
    cfg = run.cfg
    key = "data.val" if cfg.data.val else "data.train"
    # text-only sources have no frames to look at: not read at all
    sources = [s for s in train.sources(getattr(cfg.data, key.split(".")[1]), key) if not s.text]
    if not sources:
        return [], key
    spec = dataclasses.replace(train.sample_spec(cfg, model), frame_size=frame_size)
    stream = ShardStream(sources, spec, model.tokenizer, batch_size=1, resampled=False, seed=cfg.seed, rank=0,
                         world_size=1)
    clips = []
    for sample, _ in stream.samples():
        if sample is not None and sample["frames"] is not None:
            clips.append(sample)
            if len(clips) == run.args.clips:
                break
    return clips, key


@torch.no_grad()
def clip_attention(model, sample: dict, mode: str) -> dict:
    """One sample through the model: its frames [T, H, W, 3] uint8, its text, and per query kind the
    last block's attention on the patches (mean over heads) [T, grid h, grid w] and entropies."""
    frames = sample["frames"]
    if frames.dim() == 3:  # an image: the model reads it as image_frames visual tokens
        frames = frames.expand(model.image_frames, -1, -1, -1)
    # the sample's own text (a DPO pair's chosen reply); a video-only sample gets one token
    ids = sample.get("input_ids") or sample.get("chosen_ids") or [model.pad_id]
    device = next(model.parameters()).device
    out = model(frames=frames[None].to(device), input_ids=torch.tensor([ids], device=device), mode=mode,
                return_attention=True)
    prefix = model.encoder.dino.num_prefix
    grid = model.encoder.dino.grid(*frames.shape[-2:])
    maps, entropy = {}, {}
    for kind in KINDS:
        attn = out["attention"].get(kind)
        if attn is not None:
            h, n = objectives.attention_entropy(attn, torch.ones(attn.shape[:2], dtype=torch.bool, device=device))
            maps[kind], drawn = last_block_map(attn[0], prefix, grid)
            entropy[kind] = {"all": (h / n).item(), "drawn": drawn}
    return dict(frames=frames.permute(0, 2, 3, 1).numpy(), maps=maps, entropy=entropy, key=sample["key"],
                source=sample["source"] or "(no source)", text=describe(model.tokenizer, ids))


def last_block_map(attn: torch.Tensor, prefix: int, grid: tuple[int, int]) -> tuple[np.ndarray, float]:
    """attention [T, blocks, heads, keys] of one clip -> (the last block's attention on the patches,
    mean over heads, [T, grid h, grid w]; the mean entropy of those maps renormalised over the patches)."""
    try:
        patches = frames.attention_grid(attn, prefix, grid).flatten(1)  # [T, patches], row by row
    except ValueError as e:
        raise ReportError(str(e)) from None
    p = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    drawn = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    return patches.reshape(-1, *grid).numpy(), drawn.item()


def describe(tokenizer, ids) -> str:
    """A sample's turns as one line ('user: ... / assistant: ...'), the system prompt left out."""
    text = tokenizer.decode(ids)
    turns = re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", text, re.S)  # ChatML (SmolLM2)
    line = (" / ".join(f"{role}: {content.strip()}" for role, content in turns if role != "system") if turns
            else tokenizer.decode(ids, skip_special_tokens=True).strip())
    return " ".join(line.replace("`", "'").split())


def clip_panels(clip: dict, t: int, vmax: float) -> list[tuple[str, np.ndarray]]:
    """(title, image) of frame t: the frame, then each attention overlay."""
    frame = clip["frames"][t]
    return [("frame", frame)] + [(KINDS[k], frames.overlay(frame, m[t], vmax)) for k, m in clip["maps"].items()]


def clip_vmax(clip: dict) -> float:
    return float(max(m.max() for m in clip["maps"].values()))  # one colour scale for the whole clip


def draw_clip(clip: dict, index: int, path: Path) -> Path:
    """Rows = frames (at most MAX_ROWS, spread over the clip), columns = the frame and its overlays."""
    t_total, vmax = len(clip["frames"]), clip_vmax(clip)
    rows = sample_frame_indices(t_total, MAX_ROWS)
    cols = 1 + len(clip["maps"])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols + 1.2, 1.9 * len(rows) + 1.1), squeeze=False,
                             layout="constrained")
    for r, t in enumerate(rows):
        for c, (title, image) in enumerate(clip_panels(clip, t, vmax)):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"frame {t + 1}/{t_total}", fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(0, vmax), CMAP), ax=axes[:, 1:].ravel().tolist(), shrink=0.8,
                 label="attention (last block, mean over heads)")
    fig.suptitle(f"clip {index}: {clip['source']} / {clip['key']}", fontsize=10)
    return save(fig, path)


def write_gif(clip: dict, path: Path) -> Path:
    """An animated GIF, one image per frame of the clip: the frame and its overlays side by side,
    with a caption line."""
    vmax, t_total = clip_vmax(clip), len(clip["frames"])
    scale = max(1, math.ceil(GIF_PANEL / clip["frames"].shape[2]))
    font = ImageFont.truetype(findfont("DejaVu Sans"), 12)  # matplotlib's own font: the same on every machine
    images = []
    for t in range(t_total):
        titles, arrays = zip(*clip_panels(clip, t, vmax))
        panels = [Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST) for a in arrays]
        width, height, gap, caption = panels[0].width, panels[0].height, 4, 16
        canvas = Image.new("RGB", (len(panels) * (width + gap) - gap, height + 2 * caption), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (title, panel) in enumerate(zip(titles, panels)):
            canvas.paste(panel, (i * (width + gap), caption))
            draw.text((i * (width + gap) + 3, 1), title, fill="black", font=font)
        # the frame number also keeps consecutive images distinct (Pillow merges identical ones)
        draw.text((3, height + caption + 1), f"frame {t + 1}/{t_total}    colours: attention 0 to {vmax:.3f}",
                  fill="black", font=font)
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=700, loop=0)
    return path


# ---- command line ------------------------------------------------------------------------------------

def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a train.py run directory")
    parser.add_argument("--checkpoint", help="model for the attention maps: an export folder or a training "
                                             "checkpoint file (default: RUN_DIR/best, final, latest checkpoint)")
    parser.add_argument("--clips", type=positive, default=6, help="clips for the attention maps (default: 6)")
    parser.add_argument("--mode", choices=MODES, default="coarse_fine",
                        help="forward mode for the attention maps (default: coarse_fine)")
    parser.add_argument("--frame-size", type=positive, help="frame side for the attention maps (default: the "
                                                            "run's data.frame_size; a multiple of the patch size)")
    parser.add_argument("--autoencoder", help="next-frame runs with a vae / taesd target: the autoencoder (hub id "
                                              "or folder) that made the latents, to decode the predictions")
    args = parser.parse_args(argv)
    run = load_run(args.run_dir, args)
    run.out_dir.mkdir(exist_ok=True)
    for old in run.out_dir.glob("fig*"):  # an earlier report's figures (e.g. of more clips)
        old.unlink()
    sections = [section(run) for section in SECTIONS]
    report = run.run_dir / "report.md"
    report.write_text("\n\n".join(s.markdown.strip() for s in sections if s.markdown.strip()) + "\n")
    figures = [f for s in sections for f in s.figures]
    print(f"{report} ({len(figures)} figures in {run.out_dir})")
    return {"report": report, "figures": figures}


if __name__ == "__main__":
    try:
        main()
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
