"""The model and tokenizer a run trains, loaded exactly as the bundle locked them.

Full fine-tuning, LoRA or QLoRA follow the spec's parameterization; the LoRA config comes from the
same builder the compiler counted trainable parameters with (compiler/model.py: lora_config), so
the counted and the trained model cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from sftc.errors import RunError
from sftc.runtime.batching import choose_layout
from sftc.runtime.bundle import Bundle


def load_tokenizer(bundle: Bundle):
    """The compiler's tokenizer loader (one place that turns a bad tokenizer into a clear error),
    with the bundle's chat template."""
    from sftc.compiler.template import load_tokenizer as load_locked_tokenizer

    tok = load_locked_tokenizer(bundle.tokenizer_path, None, bundle.spec.model.trust_remote_code, "tokenizer")
    template = bundle.chat_template
    if template is not None:
        tok.chat_template = template
    return tok


def pad_token_id(bundle: Bundle, tokenizer) -> int:
    for value in (bundle.lock.tokenizer.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise RunError(f"{bundle.dir}: the tokenizer has neither a pad nor an eos token to pad rows with")


def load_model(bundle: Bundle):
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from sftc.compiler.model import lora_config

    spec = bundle.spec
    dtype_name = spec.model.dtype
    attn = spec.model.attn_implementation
    if choose_layout(attn) == "varlen":  # sdpa, plus its varlen path for the flattened micro-batch
        from sftc.runtime.attention import register

        attn = register()
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype_name),
        "attn_implementation": attn,
        # only the spec can allow remote code (the lock's copy is sealed with it)
        "trust_remote_code": spec.model.trust_remote_code,
    }
    param = spec.parameterization
    if param.kind == "qlora":
        from transformers import BitsAndBytesConfig

        q = param.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(bundle.model_path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "quantization_config")
        raise RunError(f"cannot load model {bundle.model_path} as locked ({shown}): {exc}") from None
    # Training never uses the KV cache, and a cache left on makes packed examples read each other.
    model.config.use_cache = False
    if param.kind == "qlora":
        keep_4bit_training_layout(model)
    if param.kind in ("lora", "qlora"):
        from peft import get_peft_model

        if param.kind == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        set_seed(spec.seed)  # the adapters' initial weights are random
        model = get_peft_model(model, lora_config(param))
    return model


def keep_4bit_training_layout(model) -> None:
    """Keep every 4-bit layer in the layout whose matmul has a backward.

    bitsandbytes, on a CPU with AVX512-BF16, repacks a Linear4bit's weights into an inference-only
    layout the first time the layer runs in eval mode without grad, which the contamination probe
    and every checkpoint evaluation do. Training then goes through bitsandbytes::gemv_4bit, which
    has no autograd kernel: torch warns that the backward "may be silently incorrect", and it is:
    the gradient through the frozen base is dropped, so adapters below the last layer get wrong
    gradients (up to 88% relative error measured on a 2-layer model; tests/runtime/test_qlora_layout.py).
    With that path off, evaluation on such CPUs is slower and gradients are exact."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def restore_adapter_dtype(model, spec) -> None:
    """SFTTrainer casts LoRA weights of a 4-bit model to bfloat16 (the QLoRA paper's bf16 compute).
    The spec's compute dtype is the locked choice: with float32 compute, bf16 adapters round away
    updates smaller than 1/256 of a weight, so they are cast back before the optimizer is built."""
    import torch

    if spec.parameterization.kind != "qlora":
        return
    dtype = getattr(torch, spec.parameterization.quantization.compute_dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
