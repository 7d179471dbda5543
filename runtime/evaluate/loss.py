"""Held-out loss: the token-weighted mean loss over the eval split's supervised (response) tokens."""

from __future__ import annotations

from sftc.runtime.batching import collate_rows
from sftc.runtime.bundle import TokenFile


def eval_loss(model, tf: TokenFile, pad_id: int, batch_size: int) -> dict:
    """Token-weighted mean loss over the held-out examples' supervised (response) tokens.

    Uses TRL's fused LM head (patched onto the model by SFTTrainer), so the full
    (batch, length, vocab) logits are never materialized.
    """
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, tf.n_rows, batch_size):
            rows = []
            for r in range(start, min(start + batch_size, tf.n_rows)):
                ids, labels, lengths = tf.row(r)
                rows.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
            batch = {k: v.to(device) for k, v in collate_rows(rows, pad_id).items()}
            out = model(**batch, use_cache=False, fused_lm_head=True)
            total += float(-out.log_probs.double().sum())
            count += int(out.label_mask.sum())
    return {"eval_loss": total / count if count else None, "eval_tokens": count}
