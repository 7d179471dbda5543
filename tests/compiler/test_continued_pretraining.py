"""continued_pretraining on raw text: every token is a target; bfd_split keeps every token,
bfd truncates and counts what it drops."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import base_spec, bundle_tokenizer, load_tokens, segments

SENTENCE = "Stale credentials are revoked unless the owner files an exception ticket approved by their manager. "
DOCS = [{"doc_id": f"AC-{100 + i}", "text": f"Policy AC-{100 + i}. " + SENTENCE * (2 + 3 * i)} for i in range(8)]


def _spec(strategy: str, **overrides):
    return base_spec(
        objective="continued_pretraining",
        data={"format": "text", "fields": {"group": "doc_id"}},
        split={"eval_groups": ["AC-100"]},
        tokenize={"max_length": 64},
        packing={"strategy": strategy, "seq_length": 64},
        **overrides,
    )


def _expected_train_tokens(lock, bundle) -> dict[str, list[int]]:
    tokenizer = bundle_tokenizer(bundle, lock)
    train = set(lock.split.train_groups)
    return {
        d["doc_id"]: tokenizer(d["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for d in DOCS if d["doc_id"] in train
    }


@pytest.fixture
def docs(project):
    project.write_jsonl("data/rows.jsonl", DOCS)


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "none", "wrapped"])
def test_every_token_is_supervised(project, docs, strategy):
    spec = _spec(strategy)
    if strategy == "wrapped":
        spec["packing"]["allow_mixing"] = True
    bundle, lock, _ = project.compile(spec)
    assert lock.template is None and lock.template_version is None
    for which in ("train", "eval"):
        data = load_tokens(bundle, which)
        assert len(data["input_ids"]) > 0
        # every token is a target except each segment's first: nothing in its own example predicts it
        starts = np.zeros(len(data["input_ids"]), dtype=bool)
        for r in range(len(data["row_offsets"]) - 1):
            lengths = data["seq_lengths"][data["seq_offsets"][r] : data["seq_offsets"][r + 1]]
            starts[data["row_offsets"][r] + np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
        assert np.all(data["labels"][starts] == -100), f"{which}: a segment start carries a label"
        assert np.array_equal(data["labels"][~starts], data["input_ids"][~starts]), f"{which}: a text token is not a target"
    budget = lock.budget.model_dump(mode="json")
    assert 0 < budget["supervised_tokens"] < budget["total_tokens"]


def test_bfd_split_preserves_every_token(project, docs):
    bundle, lock, _ = project.compile(_spec("bfd_split"))
    expected = _expected_train_tokens(lock, bundle)
    data = load_tokens(bundle)
    total = sum(len(v) for v in expected.values())
    assert max(len(v) for v in expected.values()) > 64  # the test needs documents longer than a row
    assert len(data["input_ids"]) == total
    assert lock.packing.overflow_tokens_dropped == 0
    # the multiset of tokens is exactly the documents' tokens
    assert np.array_equal(np.sort(data["input_ids"]), np.sort(np.concatenate([np.array(v) for v in expected.values()])))
    assert int(np.diff(data["row_offsets"]).max()) <= 64
    # every eos survives: one per train document
    tokenizer = bundle_tokenizer(bundle, lock)
    assert int((data["input_ids"] == tokenizer.eos_token_id).sum()) == len(expected)


def test_bfd_truncates_and_counts_the_overflow(project, docs):
    bundle, lock, _ = project.compile(_spec("bfd"))
    expected = _expected_train_tokens(lock, bundle)
    data = load_tokens(bundle)
    overflow = sum(max(len(v) - 64, 0) for v in expected.values())
    assert overflow > 0
    assert lock.packing.overflow_tokens_dropped == overflow
    assert len(data["input_ids"]) == sum(len(v) for v in expected.values()) - overflow
    assert int(np.diff(data["row_offsets"]).max()) <= 64
    # each kept document is its own segment, truncated to seq_length, starting at its first token
    assert len(data["seq_lengths"]) == len(expected)
    starts = {tuple(ids[:5].tolist()) for _, ids, _ in segments(data)}
    assert starts == {tuple(v[:5]) for v in expected.values()}


def test_text_eval_set_is_the_held_out_document(project, docs):
    bundle, lock, _ = project.compile(_spec("bfd"))
    assert lock.split.eval_groups == ["AC-100"]
    data = load_tokens(bundle, "eval")
    tokenizer = bundle_tokenizer(bundle, lock)
    assert tokenizer.decode(data["input_ids"].tolist(), skip_special_tokens=True) == DOCS[0]["text"]
    assert (bundle / "eval_prompts.jsonl").read_text() == ""  # no chat prompts for raw text
