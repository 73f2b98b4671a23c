"""scripts/report.py on run directories: one that train.py trains here (slow lane) and one written here
with the next-frame objective's columns and a tiny model export. report.md names every figure, the
figures are real images (not blank), the GIF has one image per frame, the same run gives the same
bytes, Table 1 holds the last validation; the drawn map is the last block's patch attention and sits
on its patch; bad run directories are clear errors."""

import csv
import hashlib
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import test_latents
import test_train

ROOT = Path(__file__).resolve().parents[1]
autoencoders = test_latents.autoencoders  # tiny random autoencoders (fixture)
synthetic = test_train.synthetic  # the training tests' synthetic dataset fixture (clips of 3 frames)
CLIP_FRAMES = 3


def load_report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = load_report()


@pytest.fixture(scope="module")
def trained_run(synthetic, tmp_path_factory):
    """A 4-step SFT run validated at steps 0, 2 and 4 in two modes."""
    root = tmp_path_factory.mktemp("report_run")
    tree = test_train.config_tree(synthetic, root / "run")
    tree["eval"].update(every_steps=2, at_start=True, modes=["coarse_fine", "coarse_only"])
    test_train.train.main(["--config", test_train.write_config(root / "cfg.yaml", tree)])
    return root / "run"


def images_in(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def assert_real_image(path: Path):
    with Image.open(path) as im:
        im.verify()  # a valid file
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        assert min(rgb.size) >= 100, (path, rgb.size)
        assert any(lo != hi for lo, hi in rgb.getextrema()), f"{path} is one colour"
        assert len(rgb.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 20, f"{path} has almost no content"


def digests(run_dir: Path) -> dict:
    files = [run_dir / "report.md", *sorted((run_dir / "report").iterdir())]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def check_figures(out: dict, run_dir: Path, text: str, clips: int):
    """report.md links exactly the figures written; each is a real image; the GIF plays clip 0."""
    assert sorted(run_dir / p for p in images_in(text)) == sorted(out["figures"])
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == sorted(p.name for p in out["figures"])
    assert sum(p.suffix == ".png" and p.name.startswith("fig3_") for p in out["figures"]) == clips
    for path in out["figures"]:
        assert_real_image(path)
    with Image.open(run_dir / "report" / "fig3_attention_clip0.gif") as gif:
        assert gif.n_frames == CLIP_FRAMES
        images = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert not np.array_equal(images[0], images[-1])


def test_next_frame_run_with_an_export(synthetic, tiny_model, tmp_path):
    """A run logging the next-frame objective's columns (written here, as train.py would) with a
    model export and no summary.json yet: all three figures, the GIF and the next-frame table."""
    run_dir = tmp_path / "next_frame"
    run_dir.mkdir()
    test_train.write_config(run_dir / "config.yaml", test_train.config_tree(synthetic, run_dir))
    tiny_model.save_pretrained(run_dir / "final")
    columns = ["loss", "loss_fine", "loss_coarse", "copy_loss", "mean_loss", "ratio", "improvement"]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "samples", "elapsed_s", *columns])
        for step in range(1, 11):
            fine, coarse = 1.0 / step, 1.2 / step
            w.writerow([step, 4 * step, step, fine, fine, coarse, 1.5, 1.0, coarse / fine, (coarse - fine) / coarse])
    with open(run_dir / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "mode", "source", "loss", "loss_fine", "loss_coarse", "improvement"])
        for step in (5, 10):
            w.writerow([step, "coarse_fine", "all", 1 / step, 1 / step, 1.5 / step, 1 / 3])
            w.writerow([step, "coarse_fine", "synthetic/colour", 9.0, 9.0, 9.0, 0.0])  # not the overall row
    out = report.main([str(run_dir), "--clips", "2"])
    text = (run_dir / "report.md").read_text()
    for name in ("Table 1", "Fig. 1", "Fig. 2", "Fig. 3"):
        assert f"## {name}:" in text, name
    check_figures(out, run_dir, text, clips=2)
    assert (run_dir / "report" / "fig2_coarse_fine_ratio.png") in out["figures"]
    assert "val coarse_fine 1.500 (step 10)" in text and "train 1.200 (step 10)" in text
    assert "| mode | step | loss | loss_coarse | loss_fine | improvement |" in text
    assert "| coarse_fine | 10 | 0.1 | 0.15 | 0.1 | 0.3333 |" in text
    assert "no summary.json" in text and "| steps | 10 of 4 |" in text
    assert re.search(r"\| dynamic query \| \d\.\d{3} \| \d\.\d{3} \|", text)


@pytest.mark.slow
def test_report_of_a_trained_run(trained_run):
    out = report.main([str(trained_run), "--clips", "2"])
    text = (trained_run / "report.md").read_text()
    for name in ("Table 1", "Fig. 1", "Fig. 2", "Fig. 3"):
        assert f"## {name}:" in text, name
    assert "Not drawn: this run logs no `loss_coarse`" in text  # an SFT run has no next-frame losses
    check_figures(out, trained_run, text, clips=2)
    # Table 1: the last validation of each mode, with the run's numbers; the run's facts
    with open(trained_run / "val.csv", newline="") as f:
        last = {r["mode"]: r for r in csv.DictReader(f) if r["source"] == "all"}
    assert list(last) == ["coarse_fine", "coarse_only"]
    for mode, row in last.items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {mode} | 4 |"))
        assert f"| {float(row['loss']):.4g} |" in line and f"| {float(row['answer_acc']):.4g} |" in line
    assert "| stage | sft |" in text and "| LLM | `random:tiny` |" in text and "| steps | 4 of 4 |" in text
    # the same run and model: the same files
    before = digests(trained_run)
    report.main([str(trained_run), "--clips", "2"])
    assert digests(trained_run) == before


def test_the_drawn_map_is_the_last_block_over_patches(tiny_model, monkeypatch):
    """The map drawn is the last block's attention, averaged over heads, on the patch keys (after the
    CLS / register keys, row by row); earlier blocks and the prefix keys are left out."""
    model = tiny_model
    prefix, (gh, gw) = model.encoder.dino.num_prefix, model.encoder.dino.grid(56, 56)
    blocks, heads = model.encoder.dino.num_blocks, model.encoder.dino.num_heads
    peaks = [(1, 2), (2, 0), (1, 2)]  # (row, column) of the patch head 0 looks at, per frame

    def fake_forward(frames, input_ids, mode, return_attention):
        attn = torch.zeros(1, frames.shape[1], blocks, heads, prefix + gh * gw)
        attn[..., 0] = 1.0  # on CLS: every head of every block ...
        attn[:, :, :-1, 0, prefix] = 1.0  # ... but head 0, which looks at patch (0, 0) in the earlier blocks
        attn[:, :, :-1, 0, 0] = 0.0
        for t, (row, col) in enumerate(peaks):  # and at its peak in the last block
            attn[0, t, -1, 0, 0] = 0.0
            attn[0, t, -1, 0, prefix + row * gw + col] = 1.0
        return {"attention": {"static": attn, "dynamic": None}}

    monkeypatch.setattr(model, "forward", fake_forward)
    sample = {"frames": torch.zeros(3, 3, 56, 56, dtype=torch.uint8), "input_ids": [1, 2], "key": "k", "source": "s"}
    clip = report.clip_attention(model, sample, "coarse_only")
    assert list(clip["maps"]) == ["static"] and clip["frames"].shape == (3, 56, 56, 3)
    expected = np.zeros((3, gh, gw))
    for t, (row, col) in enumerate(peaks):
        expected[t, row, col] = 1.0 / heads
    np.testing.assert_allclose(clip["maps"]["static"], expected, atol=1e-7)
    assert clip["entropy"]["static"]["drawn"] == pytest.approx(0.0, abs=1e-6)  # one patch: no uncertainty


def test_bad_run_directories_are_clear_errors(synthetic, tmp_path):
    test_train.write_config(tmp_path / "config.yaml", test_train.config_tree(synthetic, tmp_path))
    with pytest.raises(report.ReportError, match=r"missing metrics\.csv"):
        report.main([str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(report.ReportError, match=r"missing config\.yaml and metrics\.csv"):
        report.main([str(empty)])
    with pytest.raises(report.ReportError, match="no such run directory"):
        report.main([str(tmp_path / "absent")])
    (tmp_path / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(report.ReportError, match="metrics.csv: no rows yet"):
        report.main([str(tmp_path)])
    (tmp_path / "metrics.csv").write_text("step,samples,loss\n1,4,2.0\n")
    with pytest.raises(report.ReportError, match="--checkpoint .*absent"):
        report.main([str(tmp_path), "--checkpoint", str(tmp_path / "absent")])
    with pytest.raises(SystemExit):  # argparse: --clips must be >= 1
        report.main([str(tmp_path), "--clips", "0"])
    (tmp_path / "config.yaml").write_text("stage: sft\nrun_dir: x\nmodle: {}\n")
    with pytest.raises(report.ReportError, match=r"config\.yaml: unknown key 'modle'"):
        report.main([str(tmp_path)])


@pytest.mark.slow
@pytest.mark.parametrize("pooled", [False, True])
def test_a_next_frame_run_gets_its_prediction_figure(synthetic, tmp_path, pooled):
    """A real (2-step) next_frame run: Fig. 4 shows frame t, both predictions of t + 1 and the actual one;
    for the pooled baseline (the positive control) its one prediction, and no attention maps."""
    tree = test_train.config_tree(synthetic, tmp_path / "run", stage="alignment")
    tree.update(stage="next_frame", coarse_weight=0.0 if pooled else 1.0,
                next_frame={"target": "pixels", "pixels_size": 8})
    tree["model"].update(next_frame=[3, 8, 8], next_frame_width=16)
    if pooled:
        tree.update(mode="coarse_only")
        tree["model"]["tokens_per_frame"] = 4
    tree["optim"]["steps"] = 2
    test_train.train.main(["--config", test_train.write_config(tmp_path / "cfg.yaml", tree)])
    out = report.main([str(tmp_path / "run"), "--clips", "2"])
    text = (tmp_path / "run" / "report.md").read_text()
    predictions = [p for p in out["figures"] if p.name.startswith("fig4_predictions")]
    assert len(predictions) == 2 and "## Fig. 4: next-frame predictions" in text
    assert sorted(tmp_path / "run" / p for p in images_in(text)) == sorted(out["figures"])
    assert ("its one pass (4 pooled tokens per frame" in text) == pooled
    assert ("## Fig. 3: attention maps\n\nNot drawn" in text) == pooled
    for path in predictions:
        assert_real_image(path)



def test_latent_predictions_are_decoded_through_the_autoencoder(autoencoders):
    """--autoencoder: a predicted latent becomes the decoder's image, upsampled to the frame size."""
    import diffusers

    from latents import decode

    to_image = report.latent_decoder(autoencoders["vae"], "vae")
    latent = torch.randn(4, 8, 8)
    image = to_image(latent, 32)  # the tiny VAE decodes 8 x 8 latents to 16 x 16 images
    expected = decode(diffusers.AutoencoderKL.from_pretrained(autoencoders["vae"]), latent[None])[0]
    assert image.shape == (32, 32, 3) and np.array_equal(image[::2, ::2], expected.permute(1, 2, 0).numpy())
