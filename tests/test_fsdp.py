"""distributed: fsdp on CPU (gloo): the same losses as today's data parallel and as one process on the
same global batches (SFT and DPO, with text-only micro-batches on one rank only), an export that loads
without torch.distributed and gives the one-process model's outputs, exact resume after a kill,
skipped steps (OOM through a restart, non-finite, SIGTERM), multi-node torchrun with a c10d
rendezvous on 127.0.0.1, sharded checkpoints that cannot run code, and the errors for what fsdp
cannot do."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
import distributed
import loading
import train
from config import ConfigError, load_config
from model import FoveatedVLM
from test_train import (assert_resumed_like_uninterrupted, config_tree, final_state, read_csv,  # noqa: F401
                        synthetic, write_config)  # (synthetic: a fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
# micro-batches made text-only (step, rank): fsdp must even out the LLM passes of those steps
TEXT_ONLY = "3:1,7:0,8:1,12:1"


def env():
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1",
                FVLM_TEST_STACKS_AFTER="540")  # a hang shows its stacks before the 600 s timeout


def torchrun(*args, fault: str = "", ok: bool = True):
    """Two gloo processes on this machine running args (a script and its arguments); they must succeed
    (ok) or fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, env=dict(env(), FVLM_TEST_FAULT=fault), capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def harness(tmp_path, name, tree, ranks: int) -> list[dict]:
    """tests/fsdp_worker.py on tree: its per-step rows (rank 0's)."""
    folder = tmp_path / name
    folder.mkdir()
    tree = dict(tree, run_dir=str(folder / "run"))
    config = write_config(folder / "cfg.yaml", tree)
    args = [str(ROOT / "tests" / "fsdp_worker.py"), "--config", config, "--steps", str(STEPS), "--text-only", TEXT_ONLY]
    if ranks == 2:
        torchrun(*args)
    else:
        done = subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "rank0.json").read_text())


def outputs(folder, batch) -> torch.Tensor:
    """The exported model's per-sample log-probs on a batch, loaded in this process (no torch.distributed)."""
    model = FoveatedVLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**batch, mode="coarse_fine")["logp_sum"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_fsdp_trains_like_data_parallel_and_like_one_process(synthetic, tmp_path, stage):  # noqa: F811
    """20 steps on the same global batches: 2 fsdp ranks (with gradient checkpointing), 2 ddp ranks and
    one process (both micro-batches accumulated) give the same losses within fp32 reduction order,
    and fsdp's export gives the one-process model's outputs."""
    tree = config_tree(synthetic, tmp_path / "unused", stage=stage)
    tree["data"].update(batch_size=2, val=[])
    tree["optim"].update(steps=STEPS, warmup_ratio=0.1)
    rows = {"fsdp": harness(tmp_path, "fsdp", dict(tree, distributed="fsdp", gradient_checkpointing=True), 2),
            "ddp": harness(tmp_path, "ddp", dict(tree, distributed="ddp"), 2)}
    tree["optim"]["grad_accum"] = 2
    rows["one"] = harness(tmp_path, "one", tree, 1)
    assert [r["status"] for r in rows["fsdp"]] == ["ok"] * STEPS
    losses = {k: torch.tensor([r["loss"] for r in v], dtype=torch.float64) for k, v in rows.items()}
    norms = {k: torch.tensor([r["grad_norm"] for r in v], dtype=torch.float64) for k, v in rows.items()}
    assert losses["one"][-1] < losses["one"][0]  # it learns, so the comparison means something
    for other in ("ddp", "one"):
        assert (losses["fsdp"] - losses[other]).abs().max() < 2e-5, (losses["fsdp"] - losses[other]).tolist()
        assert ((norms["fsdp"] - norms[other]).abs() / norms[other]).max() < 1e-4
    assert (losses["ddp"] - losses["one"]).abs().max() < 2e-5
    print(f"{stage}: max |loss difference| fsdp-ddp {(losses['fsdp'] - losses['ddp']).abs().max():.2e}, "
          f"fsdp-one {(losses['fsdp'] - losses['one']).abs().max():.2e}, "
          f"ddp-one {(losses['ddp'] - losses['one']).abs().max():.2e}")
    cfg = load_config(tmp_path / "one" / "cfg.yaml")
    run_ = train.setup(cfg, distributed.setup("cpu"))
    host = next(iter(run_.loader))
    batch = {k: host[k] for k in ("frames", "frame_index")}
    side = "chosen_" if stage == "dpo" else ""
    batch.update({k: host[side + k] for k in ("input_ids", "attention_mask", "loss_mask")})
    one, sharded = (outputs(tmp_path / name / "run" / "final", batch) for name in ("one", "fsdp"))
    torch.testing.assert_close(sharded, one, rtol=1e-4, atol=1e-4)


def test_fsdp_refuses_one_process_and_autoregressive_training(synthetic, tmp_path, monkeypatch):  # noqa: F811
    """distributed: fsdp without torchrun, under torchrun with one process, or with mode: autoregressive:
    one ConfigError naming the key and the alternative, before the run directory is touched."""
    tree = config_tree(synthetic, tmp_path / "run")
    config = write_config(tmp_path / "c.yaml", tree)
    with pytest.raises(ConfigError, match=r"distributed: fsdp .* one process \(no torchrun\).* use distributed: ddp "
                                          r".* torchrun"):
        train.main(["--config", config, "distributed=fsdp"])
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "fvlm")  # torchrun --nproc-per-node 1
    with pytest.raises(ConfigError, match=r"one process \(torchrun with a world size of 1\).* distributed: ddp"):
        distributed.check_fsdp(load_config(config, ["distributed=fsdp"]), distributed.Dist(0, 1, torch.device("cpu")))
    cfg = load_config(config, ["distributed=fsdp", "mode=autoregressive"])
    two = distributed.Dist(0, 2, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"mode: autoregressive .* coarse_fine .* distributed: ddp"):
        distributed.check_fsdp(cfg, two)
    distributed.check_fsdp(load_config(config, ["distributed=fsdp"]), two)  # coarse_fine on 2 ranks: fine


def test_resuming_on_another_number_of_ranks_is_refused_naming_both(synthetic, tmp_path):  # noqa: F811
    """A checkpoint holds each rank's data position and RNG state, so an exact resume needs the world
    size it was written with: the error names both sizes and the init_from way to go on."""
    tree = config_tree(synthetic, tmp_path / "run")
    cfg = load_config(write_config(tmp_path / "c.yaml", tree))
    ckpt.save_checkpoint(tmp_path / "run", 4, {"config": cfg.to_dict(), "data": [{}, {}], "rng": [{}, {}]})
    with pytest.raises(ConfigError, match=r"step_00000004.pt was written by 2 rank\(s\) and this run has 1.*init_from"):
        train.main(["--config", str(tmp_path / "c.yaml")])


class Payload:
    """Unpickling this creates a file: the visible stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_sharded_checkpoint_cannot_run_code(tmp_path):
    """DCP unpickles a checkpoint's .metadata and torch.loads non-tensor entries with weights_only=False;
    ours reads the metadata through an allow-list and loads tensors only. Neither payload runs."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_metadata"
    evil.mkdir()
    (evil / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    assert ckpt.is_sharded(evil)
    with pytest.raises(loading.UntrustedCheckpoint, match=r"names (io|builtins).open"):
        ckpt.load_sharded_weights(evil)
    entry = tmp_path / "evil_entry"
    with pytest.warns(UserWarning, match="single process"):
        save({"model": {"w": torch.ones(3), "b": Payload(marker)}}, storage_writer=FileSystemWriter(entry),
             no_dist=True)
    assert list(ckpt.load_sharded_weights(entry)) == ["w"]  # the weights, without the foreign entry
    with pytest.raises(loading.UntrustedCheckpoint, match=r"model.b as pickled Python data"), \
            pytest.warns(UserWarning, match="single process"):
        ckpt.load_sharded(entry, {"model": {"w": torch.zeros(3), "b": torch.zeros(3)}})
    assert not marker.exists()


def train_cmd(config) -> list[str]:
    return [str(ROOT / "train.py"), "--config", str(config)]


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_like_an_uninterrupted_one(synthetic, tmp_path):  # noqa: F811
    """train.py under torchrun with fsdp (text-only samples mixed in, validation every 4 steps): kill -9
    the whole job after its step-4 sharded checkpoint; the same command then finishes with the
    metrics, validations and final weights of a run that was never stopped."""
    tree = config_tree(synthetic, tmp_path / "whole")
    tree["distributed"] = "fsdp"
    tree["data"]["train"].append({"name": "text", "shards": str(synthetic / "text"), "text": True})
    tree["data"].update(text_ratio=0.3, batch_size=2)
    tree["optim"]["steps"] = 8
    tree["eval"]["every_steps"] = 4
    tree["checkpoint"]["every_steps"] = 4
    whole = write_config(tmp_path / "whole.yaml", tree)
    tree["run_dir"] = str(tmp_path / "killed")
    killed = write_config(tmp_path / "killed.yaml", tree)
    torchrun(*train_cmd(whole))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *train_cmd(killed)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "checkpoints" / "step_00000004" / ckpt.SHARDED_EXTRA).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    time.sleep(torch.rand(()).item())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    torchrun(*train_cmd(killed))
    assert_resumed_like_uninterrupted(tmp_path / "whole", tmp_path / "killed", steps=8)
    best = json.loads((tmp_path / "killed" / "checkpoints" / "best.json").read_text())
    assert (tmp_path / "killed" / "checkpoints" / best["file"]).is_dir()  # kept apart from pruning
    assert (tmp_path / "killed" / "best" / "model.safetensors").is_file()


WORKER = ROOT / "tests" / "torchrun_worker.py"


@pytest.mark.slow
def test_fsdp_skips_an_oom_through_a_rerun_and_a_nan_in_place_like_ddp(synthetic, tmp_path):  # noqa: F811
    """Rank 1's 2nd micro-batch gives a NaN, rank 0's 4th runs out of memory. ddp skips both steps in
    place. fsdp skips the NaN step in place; the OOM ends the run with an error that says what to do,
    and the same command (what torchrun --max-restarts would run) resumes from the step-2 checkpoint
    and skips the OOM step on every rank. Both end with the same counts and the same weights."""
    tree = config_tree(synthetic, tmp_path / "unused")
    tree["data"].update(val=[], batch_size=2)
    tree["optim"]["steps"] = 6
    results = {}
    for kind in ("ddp", "fsdp"):
        folder = tmp_path / kind
        folder.mkdir()
        config = write_config(folder / "c.yaml", dict(tree, distributed=kind, run_dir=str(folder / "run")))
        faults = "nan:1:2,oom:0:4"
        if kind == "fsdp":
            done = torchrun(str(WORKER), "--config", config, fault=faults, ok=False)
            assert "CUDA out of memory at step 2 on rank 0" in done.stdout and "resume" in done.stdout
            assert ckpt.oom_attempts(folder / "run") == {3}  # steps 1, (NaN), 2, then the OOM
            faults = ""
        torchrun(str(WORKER), "--config", config, fault=faults)
        results[kind] = json.loads((folder / "rank0.json").read_text())["summary"]
    for key in ("steps", "samples", "tokens", "skipped_oom", "skipped_nonfinite"):
        assert results["fsdp"][key] == results["ddp"][key], key
    assert results["fsdp"]["skipped_oom"] == results["fsdp"]["skipped_nonfinite"] == 1
    sa, sb = final_state(tmp_path / "ddp" / "run"), final_state(tmp_path / "fsdp" / "run")
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(config, fault: str = "") -> list[dict]:
    """tests/torchrun_worker.py on two torchrun agents (two "nodes" of one process each) meeting
    through a c10d rendezvous on 127.0.0.1: each rank's result."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"fvlm-{port}",
           str(WORKER), "--config", str(config)]
    agents = [subprocess.Popen(cmd, env=dict(env(), FVLM_TEST_FAULT=fault), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return [json.loads((Path(config).parent / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_nodes_on_loopback_stop_on_a_signal_and_resume_exactly(synthetic, tmp_path):  # noqa: F811
    """torchrun --nnodes 2 --nproc-per-node 1 with a c10d rendezvous on 127.0.0.1, fsdp: SIGTERM reaches
    rank 0 in step 3; both nodes stop after that step with one sharded checkpoint, and the same
    command on both nodes finishes with the weights of an uninterrupted two-node run."""
    tree = config_tree(synthetic, tmp_path / "whole")
    tree["distributed"] = "fsdp"
    tree["data"]["val"] = []
    tree["optim"]["steps"] = 5
    tree["checkpoint"]["every_steps"] = 4
    (tmp_path / "whole").mkdir()
    whole = two_nodes(write_config(tmp_path / "whole" / "c.yaml", tree))
    tree["run_dir"] = str(tmp_path / "stopped")
    (tmp_path / "stopped").mkdir()
    config = write_config(tmp_path / "stopped" / "c.yaml", tree)
    assert two_nodes(config, fault="term:0:3") == [{"stopped_at": 3}, {"stopped_at": 3}]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "stopped")] == [3]
    resumed = two_nodes(config)
    assert resumed[0]["digest"] == whole[0]["digest"] != whole[0]["initial_digest"]
    assert resumed[0]["summary"]["samples"] == whole[0]["summary"]["samples"]
    assert "resumed from" in (tmp_path / "stopped" / "train.log").read_text()
