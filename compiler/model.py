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
    # bitsandbytes quantizes every nn.Linear but the output head (transformers' skip list)
    quantizable = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]
    linear_in_layers = sum(m.weight.numel() for m in quantizable)
    kind = spec.parameterization.kind
    if kind == "full":
        trainable, total = total_base, total_base
        trained = model
    else:
        from peft import get_peft_model

        # B @ A has rank at most min(in, out) of the matrix it adapts: past the largest such bound
        # of any linear layer a rank adds parameters and time, never expressiveness (rank 65536 on a
        # 64-wide model made one step 25x slower than any other spec extreme in
        # tests/reliability/test_fuzz_extremes.py). Checked before peft builds the adapters, which
        # it allocates on the CPU even under the meta device: minutes and gigabytes on a 7B model.
        bound = max((min(m.in_features, m.out_features) for m in quantizable), default=0)
        if bound and spec.parameterization.rank > bound:
            raise SpecError(f"parameterization.rank: {spec.parameterization.rank} exceeds {bound}, the largest rank a "
                            "LoRA update of any linear layer of this model can have (the smaller dimension of its "
                            f"largest matrix). Set rank to at most {bound}")
        try:
            trained = get_peft_model(model, lora_config(spec.parameterization))
        except ValueError as exc:  # peft's NoMatchingPeftModuleError and config checks: the spec's to fix
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise SpecError(f"parameterization.target_modules: {spec.parameterization.target_modules!r} cannot be "
                            f"adapted in this model: {first[:300]}") from None
        trainable, total = trained.get_nb_trainable_parameters()
    shapes = [tuple(p.shape) for p in trained.parameters() if p.requires_grad]
    attention_heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // attention_heads if attention_heads else 0))
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or attention_heads)
    return {
        "total": int(total),
        "trainable": int(trainable),
        "trainable_fraction": round(trainable / total, 6),
        "base": int(total_base),
        "embedding": int(embedding),
        "tied_embeddings": bool(tied),
        "quantizable_linear": int(linear_in_layers),
        "quantizable_linear_layers": len(quantizable),
        "hidden_size": hidden,
        "intermediate_size": int(getattr(config, "intermediate_size", 0) or 4 * hidden),
        "num_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "num_attention_heads": attention_heads,
        "kv_dim": kv_heads * head_dim,
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        # what the optimizer-state formulas need beyond the count (estimate_memory)
        "trainable_tensors": len(shapes),
        "trainable_small": int(sum(_numel(s) for s in shapes if _numel(s) < BNB_MIN_8BIT_SIZE)),
        "trainable_factored": int(sum(_factored_elements(s) for s in shapes)),
    }


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _factored_elements(shape: tuple) -> int:
    """Adafactor's second-moment state: a row and a column vector for a matrix, the full tensor otherwise."""
    if len(shape) >= 2:
        return _numel(shape[:-1]) + _numel(shape[:-2] + shape[-1:])
    return _numel(shape)


# --- the memory estimate (docs/memory.md has each formula and its source) ------------------

# bitsandbytes' blockwise 4-bit storage: one absmax per 64 weights, float32, or with double
# quantization an 8-bit absmax whose own float32 constants cover 256 blocks (QLoRA paper 3:
# 32/64 = 0.5 bit/param, 8/64 + 32/(64*256) = 0.127 bit/param).
NF4_BLOCK = 64
NESTED_BLOCK = 256
# per quantized tensor: the 16-entry 4-bit code book (float32), and with double quantization the
# 256-entry 8-bit code book and the float32 offset (bitsandbytes QuantState)
CODEBOOK_BYTES = 16 * 4
NESTED_CODEBOOK_BYTES = 256 * 4 + 4
# bitsandbytes 8-bit optimizers: tensors under 4096 elements keep float32 states; larger ones
# one uint8 per moment plus a float32 absmax per 256 elements (bnb.optim Optimizer2State)
BNB_MIN_8BIT_SIZE = 4096
BNB_8BIT_BLOCK = 256
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor")


def quantized_weight_bytes(elements: int, tensors: int, double_quant: bool) -> dict:
    """4-bit storage of `elements` weights in `tensors` bitsandbytes Params4bit tensors."""
    data = elements // 2
    blocks = elements / NF4_BLOCK
    if double_quant:
        constants = blocks * 1 + (blocks / NESTED_BLOCK) * 4 + tensors * (CODEBOOK_BYTES + NESTED_CODEBOOK_BYTES)
    else:
        constants = blocks * 4 + tensors * CODEBOOK_BYTES
    return {"data": int(data), "constants": int(round(constants))}


def optimizer_state_bytes(name: str, parameters: dict, param_bytes: int) -> int:
    """Optimizer state held for the trainable parameters, by HF `optim` name."""
    n, tensors = parameters["trainable"], parameters["trainable_tensors"]
    if name in ("adamw_torch", "adamw_torch_fused"):
        # torch.optim.AdamW: exp_avg and exp_avg_sq like the parameter, plus a float32 step tensor each
        return 2 * param_bytes * n + 4 * tensors
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        small = parameters["trainable_small"]
        big = n - small
        # plus the two 256-entry float32 code books, shared by every tensor
        return int(small * 8 + big * 2 + 2 * 4 * (big / BNB_8BIT_BLOCK)) + (2 * 256 * 4 if big else 0)
    if name == "paged_adamw_32bit":
        return 8 * n  # bitsandbytes keeps 32-bit states in float32 whatever the parameter dtype
    if name == "adafactor":
        # transformers' Adafactor as HF's Trainer builds it: beta1=None (no first moment), the
        # second moment factored into row and column statistics, in the parameter dtype, and a
        # float32 RMS scalar per tensor
        return param_bytes * parameters["trainable_factored"] + 4 * tensors
    raise ValueError(f"optimizer.name: {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def activation_bytes_per_token(parameters: dict, spec, act_bytes: int, adapter_bytes: int, residual_bytes: int) -> dict:
    """What autograd saves per token: one decoder layer, and outside the layers.

    Counted from what a Llama-style decoder layer (RMSNorm, rotary attention, SwiGLU MLP) hands
    to autograd in transformers' and peft's code, checked against saved-tensor hooks in
    benchmarks/bench_memory.py. `act_bytes`: projections' outputs; `residual_bytes`: the residual
    stream and norms (float32 under QLoRA, where peft upcasts embeddings and norms);
    `adapter_bytes`: LoRA weights, to whose dtype peft casts each adapter's input. Frozen base
    layers save no input (their weight needs no gradient).
    """
    h, i, kv = parameters["hidden_size"], parameters["intermediate_size"], parameters["kv_dim"]
    b = act_bytes
    param = spec.parameterization
    # RMSNorm upcasts to float32 and keeps that input for pow and rsqrt
    norm = 4 * h
    if param.kind == "full":
        # plus the normalized input of the weight's gradient and the scaled output the projections save
        norm_trained = norm + 2 * b * h
        layer = 2 * norm_trained + b * (3 * h + 2 * kv) + 4 * b * i
        return {"layer": int(layer), "outside": int(norm_trained)}
    # q, k, v (rotated) and the attention output for sdpa's backward; gate, up, silu(gate) for the MLP
    layer = 2 * norm + b * (2 * h + 2 * kv) + 3 * b * i
    a = adapter_bytes
    for width, modules, input_bytes in _adapted_inputs(param.target_modules, h, i, residual_bytes, b):
        if param.dropout > 0:  # each adapter's own dropout output and its bool mask
            layer += modules * (a * width + width)
        elif a != input_bytes:  # each adapter's own copy of the input cast to its dtype
            layer += modules * a * width
        else:  # the shared input, once
            layer += a * width
        layer += modules * param.rank * a  # lora_A's output, saved for lora_B
    return {"layer": int(layer), "outside": int(norm)}


def _adapted_inputs(targets, h: int, i: int, residual_bytes: int, act_bytes: int) -> list[tuple[int, int, int]]:
    """(input width, adapted modules, input dtype bytes) per distinct input of a Llama-style layer."""
    groups = [(h, ["q_proj", "k_proj", "v_proj"], residual_bytes), (h, ["o_proj"], act_bytes),
              (h, ["gate_proj", "up_proj"], residual_bytes), (i, ["down_proj"], act_bytes)]
    chosen = []
    for width, names, input_bytes in groups:
        modules = len(names) if targets == "all-linear" else sum(n in targets for n in names)
        if modules:
            chosen.append((width, modules, input_bytes))
    return chosen


def estimate_memory(parameters: dict, spec, seq_length: int) -> dict:
    """Training memory per device, by part, in bytes, with the assumptions that produced it.

    A flat record: every value an int, bool or str. Each part's formula and its check against
    published numbers are in docs/memory.md; benchmarks/bench_memory.py measures the same parts.
    """
    dtype_bytes = _DTYPE_BYTES[spec.model.dtype]
    param = spec.parameterization
    kind = param.kind
    base, trainable = parameters["base"], parameters["trainable"]
    quantized = {"data": 0, "constants": 0}
    if kind == "qlora":
        q = param.quantization
        compute_bytes = _DTYPE_BYTES[q.compute_dtype]
        quantized = quantized_weight_bytes(parameters["quantizable_linear"], parameters["quantizable_linear_layers"], q.double_quant)
        # peft's prepare_model_for_kbit_training casts every 16-bit parameter left unquantized
        # (embeddings, lm_head, norms) to float32; the runtime restores adapters to compute dtype
        unquantized = (base - parameters["quantizable_linear"]) * 4
        trainable_bytes = compute_bytes
        # bitsandbytes returns each 4-bit layer's output in its input's dtype: the float32 stream
        act_bytes = 4
    elif kind == "lora":
        unquantized = base * dtype_bytes
        trainable_bytes = 4  # peft keeps adapters in float32 (autocast_adapter_dtype) over a 16-bit base
        act_bytes = dtype_bytes
    else:
        unquantized = 0
        trainable_bytes = dtype_bytes
        act_bytes = dtype_bytes
    adapters = trainable * trainable_bytes if kind != "full" else 0
    frozen_weights = quantized["data"] + quantized["constants"] + unquantized
    weights = frozen_weights + adapters + (base * dtype_bytes if kind == "full" else 0)
    gradients = trainable * trainable_bytes
    optimizer = optimizer_state_bytes(spec.optimizer.name, parameters, trainable_bytes)

    tokens = spec.batch.per_device * seq_length
    residual_bytes = 4 if kind == "qlora" else act_bytes
    per_token = activation_bytes_per_token(parameters, spec, act_bytes, trainable_bytes, residual_bytes)
    layers = parameters["num_layers"]
    checkpointing = spec.distributed.activation_checkpointing
    if checkpointing:
        # each layer keeps only its input; one layer's activations are rebuilt at a time in the backward
        layer_activations = tokens * layers * residual_bytes * parameters["hidden_size"]
        recompute = tokens * per_token["layer"]
    else:
        layer_activations = tokens * layers * per_token["layer"]
        recompute = 0
    attention = spec.model.attn_implementation
    scores = 0
    # QLoRA with 16-bit compute over peft's float32 stream hands sdpa float32 q/k/v, and on CUDA
    # sdpa then takes its math path, which keeps softmax(QK^T) like eager does (measured on an
    # H200: benchmarks/results/memory-h200.json)
    fp32_sdpa = kind == "qlora" and attention == "sdpa" and param.quantization.compute_dtype != "float32"
    if attention == "eager" or fp32_sdpa:
        # softmax(QK^T) per head: seq^2 per row (float32 softmax, cast back for a 16-bit eager model)
        per_row = parameters["num_attention_heads"] * seq_length * seq_length * (4 + (act_bytes if act_bytes != 4 else 0))
        if checkpointing:  # rebuilt with its layer in the backward
            recompute += spec.batch.per_device * per_row
        else:
            scores = spec.batch.per_device * per_row * layers
    # logits: the head's output (float32 under QLoRA, whose lm_head peft upcasts), which the model
    # output keeps alive, the float32 log-softmax the loss saves, and the float32 gradient the
    # backward starts from (checked against max_memory_allocated: docs/memory.md)
    logit_bytes = 4 if kind == "qlora" else act_bytes
    logits = tokens * parameters["vocab_size"] * (logit_bytes + 4 + 4)
    activations = layer_activations + recompute + scores + tokens * per_token["outside"] + logits

    strategy = spec.distributed.strategy
    shards = spec.distributed.nodes * spec.distributed.procs_per_node if strategy == "fsdp" else 1
    offloaded = spec.distributed.cpu_offload and shards > 1
    gathered = 0
    if shards > 1:
        # FSDP2 all-gathers one layer's parameters for compute and prefetches the next
        gathered = 2 * (frozen_weights + (base * dtype_bytes if kind == "full" else 0)) // max(layers, 1)
    record = {
        "weights_bytes": int(weights // shards) if not offloaded else 0,
        "weights_quantized_bytes": int(quantized["data"] // shards),
        "weights_quantization_constants_bytes": int(quantized["constants"] // shards),
        "weights_unquantized_bytes": int((unquantized + (base * dtype_bytes if kind == "full" else 0)) // shards),
        "weights_adapter_bytes": int(adapters // shards),
        "gradients_bytes": int(gradients // shards) if not offloaded else 0,
        "optimizer_bytes": int(optimizer // shards) if not offloaded else 0,
        "activations_bytes": int(activations),
        "activations_layers_bytes": int(layer_activations + scores + tokens * per_token["outside"]),
        "activations_recompute_bytes": int(recompute),
        "activations_logits_bytes": int(logits),
        "fsdp_gathered_bytes": int(gathered),
        "cpu_offloaded_bytes": int((weights + gradients + optimizer) // shards) if offloaded else 0,
    }
    record["total_bytes"] = (record["weights_bytes"] + record["gradients_bytes"] + record["optimizer_bytes"]
                             + record["activations_bytes"] + record["fsdp_gathered_bytes"])
    record["total_gib"] = round(record["total_bytes"] / 2**30, 3)
    record.update({
        "optimizer": spec.optimizer.name,
        "optimizer_paged": spec.optimizer.name.startswith("paged_"),
        "activation_checkpointing": bool(checkpointing),
        "double_quant": bool(kind == "qlora" and param.quantization.double_quant),
        "attention": attention,
        "micro_batch_tokens": int(tokens),
        "shards": int(shards),
        "basis": "per device at the optimizer step; weights, gradients and optimizer divided across fsdp shards; "
                 "see docs/memory.md",
    })
    return record
