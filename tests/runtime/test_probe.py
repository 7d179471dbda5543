"""The contamination probe catches the two ways of calling sdpa/eager that leak across packed
examples on transformers 5.23, and passes the call the trainer actually makes."""

from __future__ import annotations

import pytest

from runtime.bundle import collate_rows, load_bundle
from runtime.probe import pick_examples, probe_contamination, run_probe
from runtime.train import load_model, load_tokenizer, pad_token_id
from sftc.errors import RunError


@pytest.fixture(params=["sdpa", "eager"])
def probed(request, project):
    bundle = load_bundle(project.compile(model={"path": "model", "attn_implementation": request.param}))
    model = load_model(bundle)
    assert model.config._attn_implementation == request.param
    pad = pad_token_id(bundle, load_tokenizer(bundle))
    return bundle, model, pad


def test_trainer_call_keeps_packed_examples_apart(probed):
    bundle, model, pad = probed
    examples = pick_examples(bundle, 4)
    assert len(examples) == 4
    result = probe_contamination(model, examples, pad_token_id=pad, tolerance=1e-4)
    assert result["passed"], result
    # 4 examples in row 0 plus 3 in row 1, each compared with its loss alone
    assert len(result["per_example"]) == 7
    assert result["max_abs_diff"] < 1e-5
    assert result["attention_mask_passed"] is False and result["use_cache"] is False


@pytest.mark.parametrize("bad", [{"pass_attention_mask": True}, {"use_cache": True}])
def test_leaking_calls_are_caught(probed, bad):
    bundle, model, pad = probed
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
