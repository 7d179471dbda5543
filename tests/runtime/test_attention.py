"""Varlen sdpa (runtime.attention): the flattened micro-batch trains exactly like one example per
row, generation is untouched, and what the loop cannot do is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftc.runtime.attention import VARLEN_SDPA, register, sdpa_varlen_attention, segment_bounds
from sftc.runtime.batching import collate
from sftc.runtime.bundle import load_bundle
from sftc.runtime.model import load_model, load_tokenizer, pad_token_id


def _rows(bundle, n: int) -> list[dict]:
    tf = bundle.train
    picked = [r for r in range(tf.n_rows) if len(tf.row(r)[2]) >= 2][:n]
    assert len(picked) == n
    return [dict(zip(("input_ids", "labels", "seq_lengths"), tf.row(r))) for r in picked]


def _loss_and_grads(model, batch: dict) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum") / (labels != -100).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_varlen_layout_trains_like_one_example_per_row(project):
    bundle = load_bundle(project.compile())
    model = load_model(bundle)
    assert model.config._attn_implementation == VARLEN_SDPA
    pad = pad_token_id(bundle, load_tokenizer(bundle))
    rows = _rows(bundle, 3)
    flat, lengths = collate(rows, pad, "varlen")
    # one row, no pad: every token of the micro-batch once, boundaries from the position ids
    assert list(flat["input_ids"].shape) == [1, sum(len(r["input_ids"]) for r in rows)] == [1, lengths[0]]
    starts = np.cumsum([0] + [int(n) for r in rows for n in r["seq_lengths"]])[:-1]
    assert flat["position_ids"][0, starts].tolist() == [0] * len(starts)
    assert (flat["labels"][0, starts] == -100).all()

    separate, _ = collate(rows, pad, "segments")
    assert separate["input_ids"].shape[0] == len(starts)
    loss_flat, grads_flat = _loss_and_grads(model, flat)
    loss_sep, grads_sep = _loss_and_grads(model, separate)
    assert abs(loss_flat - loss_sep) < 1e-5
    assert grads_flat.keys() == grads_sep.keys() and grads_flat
    for name, g in grads_flat.items():
        torch.testing.assert_close(g, grads_sep[name], rtol=1e-4, atol=1e-6, msg=name)


def test_flattened_rows_leak_without_the_varlen_path(project):
    """The control: the same flattened row through transformers' plain sdpa with a mask reads
    across examples, so the equality above is the varlen path's doing."""
    from transformers import AutoModelForCausalLM

    bundle = load_bundle(project.compile())
    varlen = load_model(bundle).eval()
    pad = pad_token_id(bundle, load_tokenizer(bundle))
    flat, _ = collate(_rows(bundle, 3), pad, "varlen")
    inputs = {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"]}
    plain = AutoModelForCausalLM.from_pretrained(bundle.model_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ours = varlen(**inputs, use_cache=False).logits
        leaked = plain(**inputs, attention_mask=torch.ones_like(flat["input_ids"]), use_cache=False).logits
    assert (ours - leaked).abs().max() > 1e-3


def test_generation_is_plain_sdpa(project):
    """Batched, left-padded generation with the KV cache gives the same tokens as stock sdpa."""
    from transformers import AutoModelForCausalLM

    bundle = load_bundle(project.compile())
    tokenizer = load_tokenizer(bundle)
    tokenizer.padding_side = "left"
    prompts = ["Ticket 1: the stale key", "Ticket 22: the admin role of user u3 needs a decision", "hi", "Ticket 7"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # really padded
    outs = {}
    for name in ("sdpa", register()):
        model = AutoModelForCausalLM.from_pretrained(bundle.model_path, attn_implementation=name).eval()
        model.generation_config.pad_token_id = pad_token_id(bundle, tokenizer)
        with torch.no_grad():
            outs[name] = model.generate(**enc, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(outs["sdpa"], outs[VARLEN_SDPA])


@pytest.mark.parametrize("kwarg", ["sliding_window", "softcap", "s_aux"])
def test_features_the_loop_lacks_are_refused(kwarg):
    q = torch.randn(1, 2, 6, 8)
    kv = torch.randn(1, 1, 6, 8)
    module = torch.nn.Module()
    module.is_causal = True
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    out, _ = sdpa_varlen_attention(module, q, kv, kv, None, position_ids=pos)
    assert out.shape == (1, 6, 2, 8)
    with pytest.raises(ValueError, match=kwarg):
        sdpa_varlen_attention(module, q, kv, kv, None, position_ids=pos, **{kwarg: 2})
    if kwarg == "sliding_window":  # a window no example reaches never bites: same output
        same, _ = sdpa_varlen_attention(module, q, kv, kv, None, position_ids=pos, sliding_window=3)
        torch.testing.assert_close(same, out)
    module.is_causal = False
    with pytest.raises(ValueError, match="non-causal"):
        sdpa_varlen_attention(module, q, kv, kv, None, position_ids=pos)


def test_segment_bounds():
    assert segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [[(0, 3), (3, 5), (5, 6)]]
    with pytest.raises(ValueError, match="position id 0"):
        segment_bounds([[3, 4, 0, 1]])
