"""A two-minute CPU tour of the FoveatedVLM API on tiny random backbones: the three forward modes, a
few optimizer steps on one batch, and generation. (Training itself: train.py, scripts/quickstart.py.)"""

import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import MODES, FoveatedVLM  # noqa: E402


def main():
    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = FoveatedVLM(llm_name="random:tiny", dino_name="random:tiny", query_dim=32)
    print(f"FoveatedVLM with tiny random backbones: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    frames = torch.randn(2, 4, 3, 56, 56)  # two 4-frame clips, already normalised
    pairs = [("What moves?", "A small red square."), ("Which way?", "Left.")]
    rows, masks = [], []
    for question, answer in pairs:
        user = [{"role": "user", "content": question}]
        prompt = model.chat_ids(user)
        rows.append(model.chat_ids(user + [{"role": "assistant", "content": answer}], add_generation_prompt=False))
        masks.append([0] * len(prompt) + [1] * (len(rows[-1]) - len(prompt)))  # answer + <|im_end|>
    width = max(map(len, rows))
    pad = lambda r, v: r + [v] * (width - len(r))  # noqa: E731
    ids = torch.tensor([pad(r, model.tokenizer.pad_token_id) for r in rows])
    am = torch.tensor([pad([1] * len(r), 0) for r in rows])
    batch = dict(frames=frames, input_ids=ids, attention_mask=am, loss_mask=torch.tensor([pad(m, 0) for m in masks]))

    model.eval()
    with torch.no_grad():
        for mode in MODES:
            print(f"  {mode:15s} loss {model(**batch, mode=mode)['loss'].item():.3f}")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(1, 61):
        loss = model(**batch, mode="coarse_fine")["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"  step {step:3d}  coarse_fine loss {loss.item():.3f}  ({time.perf_counter() - start:.1f}s)")

    model.eval()
    for mode in MODES:
        reply = model.generate(frames[0], pairs[0][0], max_new_tokens=12, mode=mode)
        print(f"  generate[{mode}]: {reply!r}")


if __name__ == "__main__":
    main()
