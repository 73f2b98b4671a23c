"""Publish a training run's export on the Hugging Face Hub, with a generated model card.

    python scripts/push.py RUN_DIR REPO_ID [--private] [--license LICENCE] [--results results.json]
    python scripts/push.py RUN_DIR REPO_ID --dry-run OUT_DIR     # write what would be uploaded; no network

Uploads RUN_DIR/final (the save_pretrained export train.py writes; RUN_DIR may also be an export folder
itself) plus a README.md model card: the architecture and size (parameters counted from
model.safetensors), the model settings (config.json) and the run's training config (RUN_DIR/config.yaml),
the training data (data.train: names and shard paths), the benchmark table of RUN_DIR/results.json or
--results (benchmark.py's output) when there is one, the licence of the training data (--license; it
is the user's to state) and how to load the model. The repo then loads by id:
FoveatedVLM.from_pretrained(REPO_ID), benchmark.py --checkpoint REPO_ID, train.py init_from=REPO_ID.
Uploading needs a Hub token (`hf auth login` or HF_TOKEN).
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_LICENSE = "unknown: set --license"


def export_folder(run_dir: Path) -> Path:
    for folder in (run_dir / "final", run_dir):
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise FileNotFoundError(f"{run_dir}: no save_pretrained export (config.json + model.safetensors) in final/ or "
                            f"in the folder itself; finish the run first (train.py writes final/)")


def parameter_count(export: Path) -> int:
    """Parameters stored in model.safetensors (a tied output head is stored once), without loading them."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _backbone_line(what: str, name, cfg: dict, keys: tuple) -> str:
    details = ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg)
    kind = cfg.get("model_type", "?")
    return f"- {what}: `{name}` ({kind}{', ' + details if details else ''})"


def _shards(value) -> str:
    values = value if isinstance(value, list) else [value]
    return ", ".join(f"`{v}`" for v in values)


def benchmark_section(results: Path | None) -> str:
    if results is None:
        return ""
    report = json.loads(results.read_text())
    try:
        from bench_report import markdown

        table = markdown(report)
    except (KeyError, TypeError, ValueError):  # not benchmark.py's layout: show it as it is
        table = "```json\n" + json.dumps(report.get("results", report), indent=1) + "\n```"
    return f"## Benchmarks\n\nFrom `{results.name}` (benchmark.py; accuracy in %):\n\n{table}\n"


def model_card(repo_id: str, export: Path, train_config: dict | None, results: Path | None, license: str) -> str:
    settings = _read_json(export / "config.json")
    llm_cfg, dino_cfg = _read_json(export / "llm" / "config.json"), _read_json(export / "dino" / "config.json")
    n = parameter_count(export)
    stage = (train_config or {}).get("stage", "?")
    lines = [
        "---", "library_name: pytorch", "tags:", "- fvlm", "- video", "- vision-language", "---", "",
        f"# {repo_id}", "",
        (f"A foveated vision-language model (fVLM): each video frame becomes one visual token, a query "
         f"pushed through the vision encoder's blocks, and the language model's hidden state produces the "
         f"query for the next frame. Training stage: `{stage}`." if settings.get("tokens_per_frame") is None else
         f"The pooled multi-token baseline of fVLM: each frame becomes {settings['tokens_per_frame']} pooled "
         f"visual tokens. Training stage: `{stage}`."), "",
        "## Architecture", "",
        f"- Parameters: {n:,} ({_size(n)})",
        _backbone_line("Language model", settings.get("llm"), llm_cfg,
                       ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")),
        _backbone_line("Vision encoder", settings.get("dino"), dino_cfg,
                       ("hidden_size", "num_hidden_layers", "patch_size", "image_size")),
        f"- Query width: {settings.get('query_dim', '?')}", "",
        "## Configuration", "",
        "Model settings (`config.json`):", "",
        "```json", json.dumps(settings, indent=2), "```", "",
    ]
    if train_config is not None:
        lines += ["Training config of the run (`config.yaml`):", "",
                  "```yaml", yaml.safe_dump(train_config, sort_keys=False).rstrip(), "```", ""]
    lines += ["## Training data", ""]
    train = ((train_config or {}).get("data") or {}).get("train") or []
    if train:
        lines += ["| source | shards | weight |", "|---|---|---|"]
        lines += [f"| {s.get('name', '?')} | {_shards(s.get('shards'))} | {s.get('weight', '')} |" for s in train]
    else:
        lines.append("Not recorded (no config.yaml with data.train next to the export).")
    lines.append("")
    bench = benchmark_section(results)
    if bench:
        lines += [bench]
    lines += ["## Licence", "", f"Licence of the training data: {license}", "",
              "## How to load", "",
              "With the fvlm code on the Python path (its root folder):", "",
              "```python", "from model import FoveatedVLM", "",
              f'model = FoveatedVLM.from_pretrained("{repo_id}")  # or "{repo_id}@<revision>"', "```", "",
              "or from the command line:", "",
              "```bash", f"python benchmark.py --checkpoint {repo_id} --data-root /data/benchmarks --output results.json",
              f"python train.py --config configs/NEXT_STAGE.yaml init_from={repo_id}", "```", ""]
    return "\n".join(lines)


def stage(run_dir: Path, repo_id: str, out: Path, results: Path | None, license: str) -> Path:
    """Write the folder to upload into out (created; must not exist or be empty)."""
    export = export_folder(run_dir)
    config_path = next((p for p in (run_dir / "config.yaml", export.parent / "config.yaml") if p.is_file()), None)
    train_config = yaml.safe_load(config_path.read_text()) if config_path else None
    if results is None:
        results = next((p for p in (run_dir / "results.json", export / "results.json") if p.is_file()), None)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    shutil.copytree(export, out, dirs_exist_ok=True)
    (out / "README.md").write_text(model_card(repo_id, export, train_config, results, license))
    return out


def main(argv=None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_dir", type=Path, help="run directory (its final/ export is uploaded) or export folder")
    parser.add_argument("repo_id", help="Hub repo to create or update, owner/name")
    parser.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    parser.add_argument("--license", default=NO_LICENSE, help=f"licence of the training data (default: {NO_LICENSE!r})")
    parser.add_argument("--results", type=Path, help="benchmark.py's results.json (default: RUN_DIR/results.json if there)")
    parser.add_argument("--dry-run", type=Path, metavar="OUT_DIR", help="write the folder that would be uploaded to OUT_DIR; "
                                                                       "no network")
    args = parser.parse_args(argv)
    from loading import HUB_ID

    if not HUB_ID.match(args.repo_id) or "@" in args.repo_id:
        parser.error(f"REPO_ID {args.repo_id!r} is not owner/name")
    if args.results is not None and not args.results.is_file():
        parser.error(f"--results {args.results} does not exist")
    if args.dry_run is not None:
        out = stage(args.run_dir, args.repo_id, args.dry_run, args.results, args.license)
        print(f"wrote {out} (not uploaded)")
        return out
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(args.run_dir, args.repo_id, Path(tmp) / "upload", args.results, args.license)
        api = HfApi()
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=args.repo_id,
                          commit_message=f"Upload {args.run_dir.name} with scripts/push.py")
    print(f"uploaded to https://huggingface.co/{args.repo_id}")
    return None


if __name__ == "__main__":
    main()
