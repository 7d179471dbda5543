"""Contamination probe: do packed examples stay apart under the real model and kernel?

Packing is only sound if an example's loss in a packed row equals its loss alone. Whether it does
depends on the attention implementation and on how the forward is called, not on the packer. On
transformers 5.23 sdpa and eager honour position-id boundaries only when no attention_mask is
passed and use_cache is off; passing a mask (even all ones) or leaving the cache on silently lets
an example read the ones before it (measured: |diff| ~3e-2 on a tiny Llama, vs <1e-6 when called
right). So the probe runs the exact call the trainer makes, and refuses to train if it leaks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sftc.runtime.batching import collate, collate_rows
from sftc.runtime.bundle import IGNORE, Bundle
from sftc.errors import RunError

PAD_TAIL = 5  # a short pad segment, so the probe also covers right padding in the batch


def pick_examples(bundle: Bundle, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first k train examples (in the locked order) that have at least two scored tokens."""
    tf = bundle.train
    picked = []
    for r in dict.fromkeys(tf.epochs[0].tolist()):
        for ids, labels in tf.examples(r):
            if int((labels[1:] != IGNORE).sum()) >= 2:
                picked.append((ids, labels))
                if len(picked) == k:
                    return picked
    if len(picked) < 2:
        raise RunError(f"{bundle.dir}: the contamination probe needs 2 examples with supervised tokens, found {len(picked)}")
    return picked


def _example_losses(logits, labels, position_ids) -> list[float]:
    """Mean next-token loss of each example (segment) in one row, in float32."""
    import torch

    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = labels[1:]
    mask = target != IGNORE
    nll = -logp.gather(-1, target.clamp(min=0)[:, None]).squeeze(-1)
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        # positions a..b-1 are one segment; its scored targets are target[a .. b-2]
        seg = slice(a, b - 1)
        n = int(mask[seg].sum())
        if n:
            out.append(float((nll[seg] * mask[seg]).sum() / n))
    return out


def probe_contamination(
    model,
    examples: list[tuple[np.ndarray, np.ndarray]],
    *,
    pad_token_id: int,
    tolerance: float,
    pass_attention_mask: bool = False,
    use_cache: bool = False,
    layout: str = "packed_rows",
) -> dict[str, Any]:
    """Per-example loss alone vs packed into rows with reset position ids; report the largest gap.

    `pass_attention_mask` / `use_cache` reproduce the two ways of calling the model that leak,
    so a test can watch the probe catch them. The trainer's own call is the default.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def forward(batch: dict) -> Any:
        kwargs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        if pass_attention_mask:
            kwargs["attention_mask"] = batch["real"].to(device).long()
        kwargs.pop("real", None)
        return model(**kwargs, use_cache=use_cache).logits

    try:
        with torch.no_grad():
            alone = []
            for ids, labels in examples:
                row = {"input_ids": ids, "labels": labels, "seq_lengths": np.array([len(ids)])}
                batch = collate_rows([row], pad_token_id)
                batch["real"] = torch.ones_like(batch["input_ids"])
                alone.append(_example_losses(forward(batch)[0].cpu(), batch["labels"][0], batch["position_ids"][0])[0])

            # Two rows as the trainer stacks them: row 0 packs every example and ends in a pad tail;
            # row 1 packs all but the first and is right-padded to row 0's width.
            def packed(idx: list[int], tail: int) -> dict:
                ids = np.concatenate([examples[i][0] for i in idx] + [np.full(tail, pad_token_id)])
                labels = np.concatenate([examples[i][1] for i in idx] + [np.full(tail, IGNORE)])
                lengths = [len(examples[i][0]) for i in idx] + ([tail] if tail else [])
                return {"input_ids": ids, "labels": labels, "seq_lengths": np.array(lengths)}

            layouts = [list(range(len(examples))), list(range(1, len(examples)))]
            rows = [packed(layouts[0], PAD_TAIL), packed(layouts[1], 0)]
            # the micro-batch exactly as the trainer's collator lays it out for this run
            batch, lengths = collate(rows, pad_token_id, layout)
            real = torch.zeros_like(batch["input_ids"])
            for j, n in enumerate(lengths):
                real[j, :n] = 1
            if layout in ("packed_rows", "varlen"):  # row 0's pad tail (varlen: mid-row, before row 1)
                real[0, len(rows[0]["input_ids"]) - PAD_TAIL : len(rows[0]["input_ids"])] = 0
            batch["real"] = real
            logits = forward(batch).cpu()
    finally:
        model.train(was_training)

    # per-example losses in row order; pad segments carry no scored token and yield none
    losses = [
        loss for j in range(logits.shape[0])
        for loss in _example_losses(logits[j], batch["labels"][j], batch["position_ids"][j])
    ]
    slots = [(r, slot, i) for r, idx in enumerate(layouts) for slot, i in enumerate(idx)]
    if len(losses) != len(slots):
        raise RunError(f"contamination probe: expected {len(slots)} example losses, got {len(losses)}")
    per_example = [
        {"example": i, "row": r, "slot": slot, "alone": alone[i], "packed": loss, "diff": abs(loss - alone[i])}
        for (r, slot, i), loss in zip(slots, losses)
    ]
    if not all(np.isfinite([p["alone"] for p in per_example] + [p["packed"] for p in per_example])):
        raise RunError(
            "contamination probe: the model gives a non-finite loss on the probe examples before any "
            "training; the base weights (or their dtype) are broken"
        )
    max_diff = max(p["diff"] for p in per_example)
    config = getattr(model, "config", None)
    return {
        "passed": bool(max_diff <= tolerance),
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "examples": len(examples),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attention_mask_passed": pass_attention_mask,
        "use_cache": use_cache,
        "layout": layout,
        "layout_description": {
            "packed_rows": "packed rows stacked, right-padded, position ids reset per example, no attention_mask",
            "varlen": "the rows flattened into one, position ids reset per example, no attention_mask, "
                      "attention split at the resets (runtime.attention)",
            "segments": "each packed example its own right-padded row, no attention_mask",
        }[layout],
        "per_example": per_example,
    }


def describe_failure(result: dict) -> str:
    worst = max(result["per_example"], key=lambda p: p["diff"])
    path = (
        f"attn_implementation={result['attn_implementation']}, dtype={result['dtype']}, "
        f"attention_mask {'passed' if result['attention_mask_passed'] else 'not passed'}, "
        f"use_cache={result['use_cache']}"
    )
    return (
        f"contamination probe failed: packed examples read each other under {path}: "
        f"max |packed - alone| loss = {result['max_abs_diff']:.3g} > verify.probe_tolerance {result['tolerance']:g} "
        f"(example {worst['example']} in slot {worst['slot']} of row {worst['row']}: "
        f"alone {worst['alone']:.6f}, packed {worst['packed']:.6f}). "
        "sdpa and eager keep packed examples apart only with no attention_mask and use_cache off; "
        "flash_attention_2/3 need a CUDA device. Use packing.strategy: none, or a kernel that honours "
        "position ids, or raise verify.probe_tolerance if the gap is numerical noise of a low-precision dtype."
    )


def run_probe(model, bundle: Bundle, pad_token_id: int, **call) -> dict[str, Any]:
    """Probe with the spec's k and tolerance; raise RunError if packed examples leak."""
    spec = bundle.spec
    examples = pick_examples(bundle, spec.verify.probe_examples)
    result = probe_contamination(
        model, examples, pad_token_id=pad_token_id, tolerance=spec.verify.probe_tolerance, **call
    )
    if not result["passed"]:
        raise RunError(describe_failure(result))
    return result
