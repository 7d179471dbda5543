"""Parameter counting from real published configs, through compiler.model.count_parameters."""

from __future__ import annotations

import pytest

from sftc.compiler.model import count_parameters, estimate_memory, load_config
from sftc.compiler.spec import parse_spec

from .conftest import base_spec, external_path


def _spec(parameterization: dict, **overrides):
    return parse_spec(base_spec(parameterization=parameterization, **overrides))


@pytest.fixture(scope="module")
def qwen_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(external_path("model-configs", "qwen2.5_0.5b_instruct")))


def test_qwen25_05b_full_counts_published_total(qwen_config):
    counts = count_parameters(qwen_config, _spec({"kind": "full"}))
    assert counts["total"] == 494_032_768
    assert counts["trainable"] == counts["total"]
    assert counts["trainable_fraction"] == 1.0
    assert counts["tied_embeddings"] is True  # the tied lm_head is counted once
    assert counts["embedding"] == 151_936 * 896
    # the published non-embedding share (0.36B)
    assert round((counts["total"] - counts["embedding"]) / 1e9, 2) == 0.36


def test_qwen25_05b_lora_r16_all_linear(qwen_config):
    counts = count_parameters(qwen_config, _spec({"kind": "lora", "rank": 16, "target_modules": "all-linear"}))
    assert counts["trainable"] == 8_798_208
    assert counts["total"] == 494_032_768 + 8_798_208
    assert counts["base"] == 494_032_768
    # by hand: r x (in + out) for q, k, v, o, gate, up, down in each of 24 layers
    hidden, inter, kv = 896, 4864, 128
    per_layer = 16 * ((hidden + hidden) + (hidden + kv) * 2 + (hidden + hidden) + (hidden + inter) * 2 + (inter + hidden))
    assert counts["trainable"] == 24 * per_layer


def test_lora_rank_scales_trainable_linearly(qwen_config):
    r8 = count_parameters(qwen_config, _spec({"kind": "lora", "rank": 8}))["trainable"]
    r16 = count_parameters(qwen_config, _spec({"kind": "lora", "rank": 16}))["trainable"]
    assert r16 == 2 * r8


def test_lora_named_modules_count_only_those(qwen_config):
    counts = count_parameters(qwen_config, _spec({"kind": "lora", "rank": 16, "target_modules": ["q_proj", "v_proj"]}))
    assert counts["trainable"] == 24 * 16 * ((896 + 896) + (896 + 128))


def test_llama31_8b_counts_published_total():
    from transformers import AutoConfig

    path = external_path("model-configs", "llmprof_model_configs", "Llama-3.1-8B.config.json")
    config = AutoConfig.from_pretrained(str(path))
    counts = count_parameters(config, _spec({"kind": "full"}))
    assert counts["total"] == 8_030_261_248
    assert counts["tied_embeddings"] is False


def test_memory_estimate_parts_add_up(qwen_config):
    spec = _spec({"kind": "lora", "rank": 16})
    counts = count_parameters(qwen_config, spec)
    memory = estimate_memory(counts, spec, 512)
    parts = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")
    assert memory["total_bytes"] == sum(memory[p] for p in parts)
    # two float32 Adam moments per adapter weight, a float32 step per adapter tensor
    assert memory["optimizer_bytes"] == 8 * counts["trainable"] + 4 * counts["trainable_tensors"]
    assert counts["trainable_tensors"] == 24 * 7 * 2  # lora_A and lora_B on 7 projections in 24 layers
    weight_parts = ("weights_quantized_bytes", "weights_quantization_constants_bytes", "weights_unquantized_bytes",
                    "weights_adapter_bytes")
    assert memory["weights_bytes"] == sum(memory[p] for p in weight_parts)
    full = estimate_memory(count_parameters(qwen_config, _spec({"kind": "full"})), _spec({"kind": "full"}), 512)
    assert full["optimizer_bytes"] > 50 * memory["optimizer_bytes"]


def test_bundle_records_parameter_counts(project):
    """The compiled lock carries the same numbers count_parameters gives for its config."""
    project.write_jsonl("data/rows.jsonl", [{"thread_id": "T1", "prompt": "Stale key", "completion": "Rotate it."}])
    bundle, lock, _ = project.compile(base_spec(parameterization={"kind": "lora", "rank": 4}))
    spec = parse_spec(lock.spec.model_dump(mode="json"))
    expected = count_parameters(load_config(project.root / "model", spec), spec)
    assert lock.parameters.model_dump(mode="json") == expected
    assert 0 < lock.parameters.trainable < lock.parameters.base
