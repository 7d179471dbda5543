"""The memory estimate moves the way its formulas say (docs/memory.md), part by part.

Expected values are worked by hand from a tiny Llama config (hidden 64, intermediate 128, 2
layers, 2 heads, vocab 320, untied) and, for optimizer state, measured from the real optimizer
HF's Trainer builds for each `optim` name after one step.
"""

from __future__ import annotations

import pytest

from sftc.compiler.model import count_parameters, estimate_memory
from sftc.compiler.spec import parse_spec

from .conftest import base_spec, external_path

H, I, L, V = 64, 128, 2, 320
# embed + lm_head + per layer (q, k, v, o, gate, up, down, 2 norms) + final norm
FULL_PARAMS = 2 * V * H + L * (4 * H * H + 3 * H * I + 2 * H) + H
SEQ = 256


@pytest.fixture(scope="module")
def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)


def _estimate(config, parameterization, **overrides):
    spec = parse_spec(base_spec(parameterization=parameterization, **overrides))
    return count_parameters(config, spec), estimate_memory(count_parameters(config, spec), spec, SEQ)


def test_full_parts_from_the_formulas(tiny_config):
    counts, memory = _estimate(tiny_config, {"kind": "full"})
    assert counts["base"] == FULL_PARAMS == 123_200
    assert memory["weights_bytes"] == 4 * FULL_PARAMS
    assert memory["gradients_bytes"] == 4 * FULL_PARAMS
    # two float32 moments, and a float32 step per tensor (21 tensors)
    assert memory["optimizer_bytes"] == 8 * FULL_PARAMS + 4 * 21
    # per token per layer: 2 norms x (4h fp32 input + 2 x 4h) + 4 x (3h + 2 kv) + 4 x 4 x i
    per_layer = 2 * (4 * H + 8 * H) + 4 * (3 * H + 2 * H) + 16 * I
    assert per_layer == 4864
    outside = 4 * H + 8 * H  # the final norm
    logits = SEQ * V * 12  # float32 logits, their log-softmax and its gradient
    assert memory["activations_bytes"] == SEQ * (L * per_layer + outside) + logits


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer(tiny_config):
    _, off = _estimate(tiny_config, {"kind": "full"})
    _, on = _estimate(tiny_config, {"kind": "full"}, distributed={"activation_checkpointing": True})
    per_layer = 4864
    # stored for the backward: every layer's float32 input instead of every layer's activations
    assert off["activations_layers_bytes"] - on["activations_layers_bytes"] == SEQ * (L * per_layer - L * 4 * H)
    # rebuilt during the backward: one layer at a time
    assert on["activations_recompute_bytes"] == SEQ * per_layer and off["activations_recompute_bytes"] == 0
    assert off["activations_bytes"] - on["activations_bytes"] == SEQ * ((L - 1) * per_layer - L * 4 * H)
    for part in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_logits_bytes"):
        assert on[part] == off[part]
    assert on["activation_checkpointing"] is True and off["activation_checkpointing"] is False


def test_checkpointing_saving_grows_with_depth_and_tokens():
    """On LLaMA-65B (80 layers) checkpointing keeps 1 of ~hundreds of h-vectors per token and layer."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(external_path("model-configs", "llama_65b_hf")))
    lora = {"kind": "lora", "rank": 64}
    _, off = _estimate(config, lora, model={"path": "model", "dtype": "bfloat16"})
    _, on = _estimate(config, lora, model={"path": "model", "dtype": "bfloat16"}, distributed={"activation_checkpointing": True})
    h = 8192
    assert on["activations_layers_bytes"] < off["activations_layers_bytes"] / 20
    assert on["activations_layers_bytes"] > SEQ * 80 * 2 * h  # at least every layer's bf16 input


def test_double_quant_constants_match_the_qlora_paper():
    """0.5 bit/param of constants without double quantization, 0.127 with (QLoRA paper, 3)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(external_path("model-configs", "llama_65b_hf")))
    qlora = {"kind": "qlora", "rank": 64, "quantization": {"double_quant": False}}
    counts, single = _estimate(config, qlora)
    _, double = _estimate(config, {**qlora, "quantization": {"double_quant": True}})
    n, tensors = counts["quantizable_linear"], counts["quantizable_linear_layers"]
    assert tensors == 80 * 7
    assert single["weights_quantization_constants_bytes"] == round(n / 64 * 4 + tensors * 64)
    assert double["weights_quantization_constants_bytes"] == round(n / 64 + n / 64 / 256 * 4 + tensors * (64 + 1028))
    assert round(single["weights_quantization_constants_bytes"] * 8 / n, 3) == 0.5
    assert round(double["weights_quantization_constants_bytes"] * 8 / n, 3) == 0.127
    assert single["weights_quantized_bytes"] == double["weights_quantized_bytes"] == n // 2
    assert single["total_bytes"] - double["total_bytes"] == (
        single["weights_quantization_constants_bytes"] - double["weights_quantization_constants_bytes"])


OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor"]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_optimizer_state_equals_the_real_optimizer(tiny_config, name, kind):
    """The estimate's optimizer bytes equal the state tensors HF's optimizer for `optim` holds after a step."""
    torch = pytest.importorskip("torch")
    if "8bit" in name or "paged" in name:
        pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    parameterization = {"kind": kind} if kind == "full" else {"kind": "lora", "rank": 32, "dropout": 0.0}
    counts, memory = _estimate(tiny_config, parameterization, optimizer={"name": name, "lr": 1e-4})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config)
    if kind == "lora":
        from peft import get_peft_model

        from sftc.compiler.model import lora_config

        model = get_peft_model(model, lora_config(parse_spec(base_spec(parameterization=parameterization)).parameterization))
    args = TrainingArguments(output_dir="unused", optim=name, use_cpu=True, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    ids = torch.randint(0, V, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    seen, held = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                held += value.nbytes
    assert memory["optimizer_bytes"] == held
    assert memory["optimizer"] == name
    assert memory["optimizer_paged"] is name.startswith("paged_")


def test_optimizers_order_as_their_state_sizes(tiny_config):
    sizes = {name: _estimate(tiny_config, {"kind": "full"}, optimizer={"name": name, "lr": 1e-4})[1]["optimizer_bytes"]
             for name in OPTIMIZERS}
    assert sizes["adamw_torch"] == sizes["adamw_torch_fused"] == sizes["paged_adamw_32bit"] + 4 * 21
    assert sizes["adamw_8bit"] == sizes["paged_adamw_8bit"] < sizes["adamw_torch"] / 3
    assert sizes["adafactor"] < sizes["adamw_8bit"] / 10


def test_fsdp_divides_model_state_not_activations(tiny_config):
    _, one = _estimate(tiny_config, {"kind": "full"})
    _, four = _estimate(tiny_config, {"kind": "full"}, batch={"per_device": 1, "grad_accum": 1, "world_size": 4},
                        distributed={"strategy": "fsdp", "procs_per_node": 4})
    assert four["shards"] == 4
    for part in ("weights_bytes", "gradients_bytes", "optimizer_bytes"):
        assert four[part] == one[part] // 4
    assert four["activations_bytes"] == one["activations_bytes"]
    assert four["fsdp_gathered_bytes"] == 2 * 4 * FULL_PARAMS // L


def test_bitsandbytes_optimizer_without_bitsandbytes_is_a_spec_error(monkeypatch):
    from importlib import metadata

    from sftc.errors import SpecError

    real = metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(SpecError) as caught:
        parse_spec(base_spec(optimizer={"name": "paged_adamw_8bit", "lr": 1e-4}))
    assert "optimizer.name: 'paged_adamw_8bit' is a bitsandbytes optimizer" in str(caught.value)
    parse_spec(base_spec(optimizer={"name": "adafactor", "lr": 1e-4}))  # needs nothing extra
