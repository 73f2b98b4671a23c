"""scripts/plan_memory.py and memory.py: the estimate against a measured CPU run of the tiny shape,
the 1.7B recipe's plan on 24 GB cards, the shortfall of a config no GPU count fits, and train.py's
warning before a run that will not fit its GPU."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import memory
import train
from config import load_config
from test_train import config_tree, synthetic, write_config  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def plan_memory():
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "scripts" / "plan_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("overrides", [[], ["gradient_checkpointing=true", "optim.grad_accum=2"]])
def test_the_estimate_is_within_15_percent_of_the_measured_peak(synthetic, tmp_path, overrides):  # noqa: F811
    """Two fp32 steps of the tiny shape on this CPU: the peak of live tensor storage (model, optimizer
    states, activations, gradients) against the estimate for the same batches."""
    cfg = load_config(write_config(tmp_path / "c.yaml", config_tree(synthetic, tmp_path / "run")), overrides)
    estimated, measured, line = plan_memory().measured_report(cfg)
    assert abs(estimated - measured) / measured < 0.15, line


def test_live_bytes_counts_what_is_alive_and_the_peak():
    counter = memory.LiveBytes()
    with counter:
        a = torch.ones(1000)
        b = a * 2
        view = b[:10]
        del b
        assert counter.now == 8000  # the view keeps b's storage
        del view
    assert counter.now == 4000 and counter.peak == 8000
    del a
    assert counter.now == 0


def test_the_1_7b_recipe_plans_fsdp_on_24gb_cards_and_a_4gb_card_fits_nothing():
    """configs/stage2_1.7B.yaml (no download: the published architecture's preset): on 4 x 24 GB ddp
    does not fit (about 16 bytes per parameter before activations) while fsdp does; on 2 GB cards
    nothing does, and the report says by how much."""
    tool = plan_memory()
    cfg = load_config(ROOT / "configs" / "stage2_1.7B.yaml")
    report = tool.plan(cfg, 24, 4)
    fitting = [line for line in report.splitlines() if "GPU(s): data.batch_size" in line]
    assert fitting and all("ddp on  1" not in line for line in fitting), report
    assert any(line.strip().startswith("fsdp on  4") for line in fitting), report
    assert not any(line.strip().startswith("ddp on  4") for line in fitting), report
    assert re.search(r"no GPU count fits 2 GiB cards: even fsdp on 64 GPUs.* \d+\.\d\d GiB more than the card",
                     tool.plan(cfg, 2, 4))


def test_train_warns_before_a_run_that_will_not_fit(synthetic, tmp_path):  # noqa: F811
    """The check train.py makes on a CUDA device (here given the card's size): a warning naming the
    estimate and the planner's command, and nothing when the run fits."""
    cfg = load_config(write_config(tmp_path / "c.yaml", config_tree(synthetic, tmp_path / "run")))
    model = train.build_model(cfg)
    warning = train.memory_warning(cfg, model, 1, True, 2**20)
    assert "will probably run out of GPU memory" in warning and "scripts/plan_memory.py" in warning
    assert train.memory_warning(cfg, model, 1, True, 80 * memory.GiB) is None
