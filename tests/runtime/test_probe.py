"""The contamination probe catches the two ways of calling sdpa/eager that leak across packed
examples on transformers 5.23, and passes the call the trainer actually makes."""

from __future__ import annotations

import pytest

from sftc.runtime.attention import VARLEN_SDPA
from sftc.runtime.batching import choose_layout, collate_rows
from sftc.runtime.bundle import load_bundle
from sftc.runtime.probe import pick_examples, probe_contamination, run_probe
from sftc.runtime.model import load_model, load_tokenizer, pad_token_id
from sftc.errors import RunError


@pytest.fixture(params=["sdpa", "eager"])
def probed(request, project):
    """The model as `sftc run` loads it: sdpa runs as runtime.attention's varlen sdpa."""
    bundle = load_bundle(project.compile(model={"path": "model", "attn_implementation": request.param}))
    model = load_model(bundle)
    assert model.config._attn_implementation == {"sdpa": VARLEN_SDPA, "eager": "eager"}[request.param]
    pad = pad_token_id(bundle, load_tokenizer(bundle))
    return bundle, model, pad


@pytest.fixture(params=["sdpa", "eager"])
def plain(request, project):
    """transformers' own sdpa/eager, as any other trainer would load them."""
    from transformers import AutoModelForCausalLM

    bundle = load_bundle(project.compile(model={"path": "model", "attn_implementation": request.param}))
    model = AutoModelForCausalLM.from_pretrained(bundle.model_path, attn_implementation=request.param)
    model.config.use_cache = False
    return bundle, model, pad_token_id(bundle, load_tokenizer(bundle))


def test_trainer_call_keeps_packed_examples_apart(probed):
    bundle, model, pad = probed
    examples = pick_examples(bundle, 4)
    assert len(examples) == 4
    own = choose_layout(bundle.lock.spec.model.attn_implementation)
    assert own == {"sdpa": "varlen", "eager": "segments"}[bundle.lock.spec.model.attn_implementation]
    for layout in (own, "packed_rows"):  # the run's own layout, and stacked packed rows
        result = probe_contamination(model, examples, pad_token_id=pad, tolerance=1e-4, layout=layout)
        assert result["passed"], result
        # 4 examples in row 0 plus 3 in row 1, each compared with its loss alone
        assert len(result["per_example"]) == 7
        assert result["max_abs_diff"] < 1e-5
        assert result["attention_mask_passed"] is False and result["use_cache"] is False
        assert result["layout"] == layout


@pytest.mark.parametrize("bad", [{"pass_attention_mask": True}, {"use_cache": True}])
def test_leaking_calls_are_caught(plain, bad):
    bundle, model, pad = plain
    examples = pick_examples(bundle, 4)
    result = probe_contamination(model, examples, pad_token_id=pad, tolerance=1e-4, **bad)
    assert not result["passed"]
    # the first example of each row has nothing before it to read: only later ones leak
    firsts = [p for p in result["per_example"] if p["slot"] == 0]
    assert all(p["diff"] < 1e-5 for p in firsts)
    assert result["max_abs_diff"] > 1e-3
    with pytest.raises(RunError) as err:
        run_probe(model, bundle, pad, **bad)
    message = str(err.value)
    assert "contamination probe failed" in message
    assert ("attention_mask passed" in message) if "pass_attention_mask" in bad else ("use_cache=True" in message)


def test_varlen_sdpa_leaks_under_a_mask_and_the_probe_says_so(project):
    """With a mask, varlen sdpa is plain sdpa (that is how generation stays correct), so a mask
    passed with packed rows leaks there too; the probe on the run's own layout catches it."""
    bundle = load_bundle(project.compile())
    model = load_model(bundle)
    assert model.config._attn_implementation == VARLEN_SDPA
    pad = pad_token_id(bundle, load_tokenizer(bundle))
    result = probe_contamination(model, pick_examples(bundle, 4), pad_token_id=pad, tolerance=1e-4,
                                 pass_attention_mask=True, layout="varlen")
    assert not result["passed"] and result["max_abs_diff"] > 1e-3


def test_collated_rows_restart_positions_and_mask_boundaries(project):
    bundle = load_bundle(project.compile())
    tf = bundle.train
    row = next(r for r in range(tf.n_rows) if len(tf.row(r)[2]) >= 2)
    short = next(r for r in range(tf.n_rows) if len(tf.row(r)[0]) < len(tf.row(row)[0]))
    rows = []
    for r in (row, short):
        ids, labels, lengths = tf.row(r)
        rows.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    batch = collate_rows(rows, pad_token_id=1)
    assert "attention_mask" not in batch
    ids, labels, lengths = tf.row(row)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + int(n))
    assert batch["position_ids"][0, starts].tolist() == [0] * len(starts)
    assert (batch["labels"][0, starts] == -100).all()
    n_short = len(tf.row(short)[0])
    assert (batch["input_ids"][1, n_short:] == 1).all() and (batch["labels"][1, n_short:] == -100).all()
    # the pad tail is its own segment, positions restart at 0
    assert batch["position_ids"][1, n_short] == 0
