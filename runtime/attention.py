"""SDPA with a variable-length path: packed examples attend within themselves, at their own length.

Why this exists. flash-attention reads example boundaries from reset position ids (varlen) and
costs nothing extra; PyTorch's SDPA has no such path on CPU (`torch.nn.attention.varlen` is
CUDA-only in torch 2.13). Fed a packed row, transformers' sdpa builds a dense block-diagonal mask
(a full L x L attention per row, off SDPA's fused causal kernel); fed one example per padded row,
every linear layer also runs on the pad. This implementation takes the micro-batch's examples
flattened into one row with no pad at all, runs the projections and MLPs on real tokens only, and
calls causal SDPA once per example inside attention: the work of varlen flash-attention, done as
a loop (measured on CPU, demo model: faster than both, see benchmarks/).

It is registered with transformers' AttentionInterface and AttentionMaskInterface under
`VARLEN_SDPA` and is plain sdpa everywhere else: a call that carries an attention mask or reads a
KV cache (batched generation during evaluation, left padding) goes to transformers' own
`sdpa_attention_forward` unchanged. Only a maskless, cacheless forward (how the trainer and the
probe call the model) is split at the position-id resets. Whether that keeps examples apart is not
assumed: the contamination probe (runtime/probe.py) measures it on the model at every start.
"""

from __future__ import annotations

from typing import Any

VARLEN_SDPA = "sftc_sdpa_varlen"

# Attention features this loop does not implement: refused rather than silently dropped. A
# sliding window is only refused where it would bite (an example longer than the window).
_UNSUPPORTED = ("softcap", "s_aux")


def segment_bounds(position_ids) -> list[list[tuple[int, int]]]:
    """[start, end) of each example in each batch row: an example starts where its position id is 0."""
    import torch

    rows = []
    for row in position_ids.tolist() if isinstance(position_ids, torch.Tensor) else position_ids:
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or starts[0] != 0:
            raise ValueError(f"{VARLEN_SDPA}: a packed row must start at position id 0 (found {row[:1]})")
        rows.append(list(zip(starts, starts[1:] + [len(row)])))
    return rows


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any):
    """AttentionInterface signature: query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    present = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if present or not getattr(module, "is_causal", True) or is_causal is False:
        found = ", ".join(present) or "non-causal attention"
        raise ValueError(
            f"{VARLEN_SDPA}: {type(module).__name__} uses {found}, which the varlen loop does not implement; "
            f"set model.attn_implementation to flash_attention_2 (GPU) or eager in the spec"
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{VARLEN_SDPA}: {type(module).__name__} did not pass position_ids to attention, "
                         f"so example boundaries are unknown")
    all_bounds = segment_bounds(position_ids.expand(query.shape[0], -1))
    window = kwargs.get("sliding_window")
    longest = max(e - s for bounds in all_bounds for s, e in bounds)
    if window is not None and longest > window:
        raise ValueError(
            f"{VARLEN_SDPA}: {type(module).__name__} has sliding_window={window} and an example of {longest} "
            f"tokens, which the varlen loop does not window; set model.attn_implementation to "
            f"flash_attention_2 (GPU) or eager in the spec"
        )
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, bounds in enumerate(all_bounds):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in bounds
        ], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def varlen_mask(*, attention_mask=None, q_length: int, kv_length: int, q_offset: int = 0, **kwargs):
    """No mask for a maskless, cacheless forward (attention splits it by position ids); sdpa's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, q_offset=q_offset, **kwargs)


def register() -> str:
    """Make VARLEN_SDPA loadable by name (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, sdpa_varlen_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_mask)
    return VARLEN_SDPA
