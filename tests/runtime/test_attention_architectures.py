"""Varlen sdpa on the attention code of real model families (configs from ../shared/external,
shrunk to a few thousand parameters, random weights): packed examples get exactly their
logits alone, and a family whose attention the loop cannot reproduce is refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sftc.runtime.attention import register

EXTERNAL = Path(os.environ.get("SFTC_EXTERNAL", Path(__file__).resolve().parents[3] / "shared" / "external"))
CONFIGS = EXTERNAL / "model-configs"


def tiny_model(rel: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = CONFIGS / rel
    if not path.exists():
        pytest.skip(f"external test material not found at {path} (set SFTC_EXTERNAL to its directory)")
    raw = json.loads(path.read_text())
    # the family's own attention code and options, at a size a unit test can run
    for key in ("layer_types", "rope_scaling", "rope_parameters", "max_window_layers", "torch_dtype", "dtype"):
        raw.pop(key, None)
    raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512, pad_token_id=0,
               **overrides)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=register(), dtype=torch.float32).eval()


def packed_vs_alone(model, lengths=(7, 12, 5)) -> float:
    gen = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, 256, (n,), generator=gen) for n in lengths]
    flat = torch.cat(examples)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=flat, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=e[None], use_cache=False).logits[0] for e in examples])
    return float((packed - alone).abs().max())


@pytest.mark.parametrize("rel", [
    "qwen2.5_0.5b_instruct/config.json",
    "llmprof_model_configs/Qwen3-4B.config.json",  # q/k norms
    "mlc_llm_model_presets/phi-3_5.config.json",  # sliding_window 262144: longer than any example
    "mlc_llm_model_presets/smollm2_135m.config.json",
    "llmprof_model_configs/Llama-3.1-8B.config.json",
])
def test_packed_examples_match_alone(rel):
    model = tiny_model(rel)
    assert model.config._attn_implementation == register()
    assert packed_vs_alone(model) < 1e-5


def test_a_window_an_example_outgrows_is_refused():
    model = tiny_model("mlc_llm_model_presets/phi-3_5.config.json", sliding_window=8)
    assert packed_vs_alone(model, lengths=(7, 8, 5)) < 1e-5  # the window never bites
    with pytest.raises(ValueError, match="sliding_window=8 and an example of 12 tokens"):
        packed_vs_alone(model, lengths=(7, 12, 5))


def test_a_family_without_sdpa_support_is_refused_at_load():
    """transformers checks sdpa support for any implementation named *sdpa*, so Gemma-2 (soft-capped
    attention, no sdpa in transformers) fails at load, before the loop could drop its soft cap."""
    with pytest.raises(ValueError, match="does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"):
        tiny_model("mlc_llm_model_presets/gemma2_2b.config.json")
