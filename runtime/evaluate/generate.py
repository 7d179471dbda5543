"""Generate greedy replies to the held-out prompts and score them (behaviour metrics).

Loss says how surprised the model is by the reference answers; it does not say whether the replies
it would actually give are valid and correct.
"""

from __future__ import annotations

import time
from typing import Any

from sftc.runtime.evaluate.rules import Rules
from sftc.runtime.evaluate.score import aggregate, score


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model, tokenizer, eos_token_ids: list[int] | None = None) -> list[int]:
    """Every id that ends a reply: the model's generation eos, the tokenizer's eos, and the
    template's turn terminator. Missing the terminator makes a model that learned to stop look
    like one that rambles."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for value in (_as_list(eos_token_ids), _as_list(getattr(generation_config, "eos_token_id", None)),
                  _as_list(getattr(tokenizer, "eos_token_id", None))):
        for i in value:
            if i not in ids:
                ids.append(i)
    return ids


def _device_of(model):
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def generate_ids(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                 eos_token_ids: list[int] | None = None) -> list[dict]:
    """Greedy continuations of each prompt, in the order given.

    Returns per prompt `{"ids": generated ids without the stop token, "stopped": whether a stop
    token ended it}`. Prompts are generated `batch_size` at a time, left-padded, with the KV cache
    on. The model is put in eval mode and restored afterwards, and the global RNG state (CPU and the
    model's CUDA device) is restored, so evaluating mid-run does not change the rest of training.
    """
    import torch
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    stops = stop_token_ids(model, tokenizer, eos_token_ids)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = stops[0] if stops else 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=stops or None,
        pad_token_id=pad_id,
        # Explicit neutral values: the model's own generation_config would otherwise fill them in.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
    )
    device = _device_of(model)
    # A prompt and its reply must fit the model's positions (compile refuses a max_new_tokens that
    # fills them alone); a batch whose longest prompt leaves less room generates what fits, and
    # those replies count as unfinished (`stopped` False), like any reply cut at max_new_tokens.
    positions = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)
    # Sorting by length keeps padding (wasted compute) small; results go back in the given order.
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    out: list[dict | None] = [None] * len(prompt_ids)
    was_training = model.training
    rng_devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(prompt_ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids = prompt_ids[i]
                    if not ids:
                        raise ValueError(f"prompt {i} is empty")
                    input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention[row, width - len(ids):] = 1
                room = min(max_new_tokens, positions - width) if positions else max_new_tokens
                if room < 1:
                    for i in chunk:
                        out[i] = {"ids": [], "stopped": False}
                    continue
                generated = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
                    **({"max_new_tokens": room} if room != max_new_tokens else {}),
                )
                new = generated[:, width:].tolist()
                for row, i in enumerate(chunk):
                    ids = new[row]
                    cut = next((k for k, t in enumerate(ids) if t in stops), None)
                    out[i] = {"ids": ids if cut is None else ids[:cut], "stopped": cut is not None}
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def decode_reply(tokenizer, ids: list[int]) -> str:
    # Special tokens are kept: a reply that emits a stray control token is not the reply a client
    # would get cleaned up, and must not pass a format check.
    return tokenizer.decode(ids, skip_special_tokens=False)


def generate_replies(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                     eos_token_ids: list[int] | None = None) -> list[str]:
    """Decoded greedy replies, in the order given (see generate_ids)."""
    return [decode_reply(tokenizer, g["ids"])
            for g in generate_ids(model, tokenizer, prompt_ids, max_new_tokens, batch_size, eos_token_ids)]


def behaviour_metrics(model, tokenizer, prompts: list[dict], rules: Rules, max_new_tokens: int, batch_size: int,
                      eos_token_ids: list[int] | None = None, max_prompts: int | None = None) -> dict:
    """Generate a reply to each held-out prompt and score it.

    `prompts` are rows of the bundle's eval_prompts.jsonl. Returns every declared metric, plus
    `n_prompts`, per-check pass rates, how many replies ran out of tokens before stopping, and the
    first three samples (prompt, reply, checks) for people to read.
    """
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    started = time.perf_counter()
    generated = generate_ids(model, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens, batch_size,
                             eos_token_ids)
    seconds = time.perf_counter() - started
    per_row = []
    samples = []
    for prompt, gen in zip(prompts, generated):
        reply = decode_reply(tokenizer, gen["ids"])
        checks = score(reply, prompt.get("fields", {}), rules)
        per_row.append(checks)
        if len(samples) < 3:
            samples.append({"index": prompt.get("index"), "prompt_text": prompt.get("prompt_text"), "reply": reply,
                            "reference": prompt.get("reference"), "stopped": gen["stopped"], "checks": checks})
    result: dict[str, Any] = dict(aggregate(per_row, rules))
    result.update({
        "n_prompts": len(prompts),
        "check_pass_rates": aggregate(per_row),
        "replies_truncated": sum(1 for g in generated if not g["stopped"]),
        "generated_tokens": sum(len(g["ids"]) for g in generated),
        "generation_seconds": round(seconds, 3),
        "samples": samples,
    })
    return result
