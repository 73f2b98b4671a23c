"""Run by tests/test_train.py under torchrun: train.main with optional injected faults
(FVLM_TEST_FAULT="oom:RANK:CALL,nan:RANK:CALL,term:RANK:CALL" makes that rank's CALL-th micro-batch
raise a CUDA OOM, return a NaN loss, or send its own process SIGTERM), then write this rank's summary
and a digest of its weights (or the step a signal stopped it at) to rank<RANK>.json next to the
config. Under distributed: fsdp the weights are gathered to rank 0 (the other ranks' digest is None).
With FVLM_TEST_STACKS_AFTER=SECONDS, a worker still running then
prints every thread's stack and exits (a hang shows where it waits)."""

import faulthandler
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

import train
from config import load_config


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    if os.environ.get("FVLM_TEST_STACKS_AFTER"):
        faulthandler.dump_traceback_later(float(os.environ["FVLM_TEST_STACKS_AFTER"]), exit=True)
    rank = int(os.environ["RANK"])
    argv = sys.argv[1:]
    config = argv[argv.index("--config") + 1]
    faults = {}
    for spec in filter(None, os.environ.get("FVLM_TEST_FAULT", "").split(",")):
        kind, fault_rank, call = spec.split(":")
        if int(fault_rank) == rank:
            faults[int(call)] = kind
    calls = {"n": 0}
    real_loss, real_finish = train.micro_batch_losses, train.finish

    def loss(model, batch, *args):
        calls["n"] += 1
        if faults.get(calls["n"]) == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        if faults.get(calls["n"]) == "oom":
            raise torch.OutOfMemoryError("injected")
        nan = faults.get(calls["n"]) == "nan"
        return [(value * float("nan") if nan else value, extra) for value, extra in real_loss(model, batch, *args)]

    seen = {}

    def finish(run):
        # the weights training ended with (gathered from the shards under fsdp: a collective)
        state = train.distributed.full_state_dict(run.root) if run.root is not None else run.model.state_dict()
        seen["digest"] = digest(state) if state else None
        return real_finish(run)

    train.micro_batch_losses, train.finish = loss, finish
    initial = digest(train.build_model(load_config(config, argv[argv.index("--config") + 2:])).state_dict())
    out = Path(config).parent / f"rank{rank}.json"
    try:
        summary = train.main(argv)
    except train.Stopped as stopped:
        out.write_text(json.dumps({"stopped_at": stopped.args[0]}))
        return
    out.write_text(json.dumps({"digest": seen["digest"], "initial_digest": initial, "summary": summary}))


if __name__ == "__main__":
    main()
