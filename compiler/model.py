"""Pass 8: parameters and a memory estimate, from the model config alone.

The model is built on the meta device (shapes, no storage), so an 8B config is counted in a
second without its weights. `model.parameters()` yields a tied embedding once, so tied input and
output embeddings are counted once. LoRA is applied with peft on the same meta model, so the
trainable count is peft's own.
"""

from __future__ import annotations

from pathlib import Path

from sftc.errors import SpecError
from sftc.io import sha256_file

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_config(model_dir: Path, spec):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=spec.model.trust_remote_code)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise SpecError(f"model.path: {model_dir}: no usable config.json ({first[:200]})") from None


def config_sha256(model_dir: Path) -> str:
    path = model_dir / "config.json"
    if not path.is_file():
        raise SpecError(f"model.path: {model_dir}: config.json not found")
    return "sha256:" + sha256_file(path)


def lora_config(parameterization):
    from peft import LoraConfig

    return LoraConfig(
        r=parameterization.rank,
        lora_alpha=parameterization.alpha,
        lora_dropout=parameterization.dropout,
        target_modules=parameterization.target_modules,
        task_type="CAUSAL_LM",
    )


def count_parameters(config, spec) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    total_base = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    linear_in_layers = sum(
        m.weight.numel() for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not output
    )
    kind = spec.parameterization.kind
    if kind == "full":
        trainable, total = total_base, total_base
    else:
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(spec.parameterization))
        trainable, total = peft_model.get_nb_trainable_parameters()
    return {
        "total": int(total),
        "trainable": int(trainable),
        "trainable_fraction": round(trainable / total, 6),
        "base": int(total_base),
        "embedding": int(embedding),
        "tied_embeddings": bool(tied),
        "quantizable_linear": int(linear_in_layers),
        "hidden_size": int(getattr(config, "hidden_size", 0) or 0),
        "num_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
    }


def estimate_memory(parameters: dict, spec, seq_length: int) -> dict:
    """A per-device estimate, by part, before any sharding. Rough by design; the formula is the point.

    weights: base in model.dtype (qlora: quantizable linear layers at 4 bits + 1/64 for the block
    constants, the rest at compute dtype) plus adapters in float32; gradients: trainable x dtype;
    optimizer: AdamW keeps two float32 moments per trainable parameter; activations: about
    34 x hidden bytes per token per layer at 2-byte precision (the Megatron estimate, no
    recomputation), scaled by dtype, plus float32 logits for the micro-batch.
    """
    dtype_bytes = _DTYPE_BYTES[spec.model.dtype]
    base, trainable = parameters["base"], parameters["trainable"]
    kind = spec.parameterization.kind
    if kind == "qlora":
        quantized = parameters["quantizable_linear"]
        compute_bytes = _DTYPE_BYTES[spec.parameterization.quantization.compute_dtype]
        weights = quantized * 0.5 * (1 + 1 / 64) + (base - quantized) * compute_bytes + trainable * 4
    elif kind == "lora":
        weights = base * dtype_bytes + trainable * 4
    else:
        weights = base * dtype_bytes
    gradients = trainable * (dtype_bytes if kind == "full" else 4)
    optimizer = trainable * 8
    tokens = spec.batch.per_device * seq_length
    act_scale = dtype_bytes / 2
    activations = tokens * parameters["num_layers"] * parameters["hidden_size"] * 34 * act_scale
    logits = tokens * parameters["vocab_size"] * 4 * 2  # logits and their gradient, float32
    parts = {
        "weights_bytes": int(weights),
        "gradients_bytes": int(gradients),
        "optimizer_bytes": int(optimizer),
        "activations_bytes": int(activations + logits),
    }
    parts["total_bytes"] = sum(parts.values())
    parts["total_gib"] = round(parts["total_bytes"] / 2**30, 3)
    parts["basis"] = "per device, unsharded; see compiler/model.py estimate_memory"
    return parts
