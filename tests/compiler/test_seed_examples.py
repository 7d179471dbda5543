"""The seed document's small examples, through the real compiler.

Validation (empty completion, missing group key, with row numbers), the group split (every
message of an incident on one side), the response-only mask (answer + end-of-turn token, no
prompt token), truncation that removes the answer, position ids reset per packed example, and
the examples-per-update arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest

from sftc.compiler.pack import position_ids
from sftc.compiler.spec import examples_per_update
from sftc.errors import DataError, SftcError

from .conftest import IGNORE_INDEX, base_spec, bundle_tokenizer, load_tokens, read_jsonl, segments

# rows 0..2 are the seed's validation example; rows 3..5 complete its split example
SEED_ROWS = [
    {"thread_id": "T102", "turn": 1, "prompt": "Stale key", "completion": "Request rotation evidence."},
    {"thread_id": "B550", "prompt": "Expired key", "completion": ""},
    {"prompt": "Wrong size", "completion": "Offer an exchange label."},
    {"thread_id": "T102", "turn": 2, "prompt": "Rotation proof for T102 is attached.",
     "completion": "Approve access after rotation proof."},
    {"thread_id": "R550", "turn": 1, "prompt": "A privileged role changed overnight.",
     "completion": "Escalate privileged-role changes."},
    {"thread_id": "P771", "turn": 1, "prompt": "How long may a session stay idle?",
     "completion": "Cite the session-timeout policy."},
]


@pytest.fixture
def seed_bundle(project):
    project.write_jsonl("data/rows.jsonl", SEED_ROWS)
    bundle, lock, reused = project.compile(base_spec(split={"eval_groups": ["R550"]}))
    assert not reused
    return bundle, lock


# --- validation --------------------------------------------------------------------------------


def test_rejects_empty_completion_and_missing_group_with_row_numbers(seed_bundle):
    bundle, lock = seed_bundle
    rejects = read_jsonl(bundle / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "empty_completion"), (3, "missing_field")]  # 1-based lines
    assert all(r["file"] == "data/rows.jsonl" for r in rejects)
    assert "thread_id" in rejects[1]["detail"]

    manifest = lock.data_manifest.model_dump(mode="json")
    assert manifest["rows_read"] == 6
    assert manifest["rejected"] == {"empty_completion": 1, "missing_field": 1}
    (file_entry,) = manifest["files"]
    assert file_entry["path"] == "data/rows.jsonl"
    assert file_entry["rows_read"] == 6 and file_entry["accepted"] == 4
    assert file_entry["rejected"] == {"empty_completion": 1, "missing_field": 1}
    # every row is accounted for exactly once
    assert manifest["train_examples"] + manifest["eval_examples"] + len(rejects) == manifest["rows_read"]


def test_accepted_threads_are_the_seed_answer(seed_bundle):
    _, lock = seed_bundle
    accepted = set(lock.split.train_groups) | set(lock.split.eval_groups)
    assert "B550" not in accepted  # its only row had an empty completion
    assert accepted == {"T102", "R550", "P771"}


def test_too_many_rejects_fail_compile_listing_reasons(project):
    project.write_jsonl("data/rows.jsonl", SEED_ROWS)
    with pytest.raises(DataError) as info:
        project.compile(base_spec(data={"max_reject_fraction": 0.05}, split={"eval_groups": ["R550"]}))
    text = str(info.value)
    assert "max_reject_fraction" in text
    assert "empty_completion: 1" in text and "missing_field: 1" in text
    assert "data/rows.jsonl:2" in text  # an example names file and 1-based line
    assert project.leftovers() == []


# --- split -------------------------------------------------------------------------------------


def test_split_keeps_incident_together(seed_bundle):
    bundle, lock = seed_bundle
    split = lock.split.model_dump(mode="json")
    assert split["eval_groups"] == ["R550"]
    assert split["train_groups"] == ["P771", "T102"]
    assert split["disjoint"] is True and split["overlap"] == []
    assert split["train_rows"] == 3 and split["eval_rows"] == 1  # T102 turns 1 and 2 both train

    prompts = read_jsonl(bundle / "eval_prompts.jsonl")
    assert [p["group"] for p in prompts] == ["R550"]
    assert prompts[0]["reference"] == "Escalate privileged-role changes."
    assert prompts[0]["source"] == "data/rows.jsonl:5"  # file:line, 1-based


@pytest.mark.parametrize("held_out", [["T102"], ["P771", "R550"]])
def test_split_by_group_never_by_row(project, held_out):
    project.write_jsonl("data/rows.jsonl", SEED_ROWS)
    _, lock, _ = project.compile(base_spec(split={"eval_groups": held_out}))
    split = lock.split.model_dump(mode="json")
    assert split["eval_groups"] == sorted(held_out)
    assert set(split["train_groups"]).isdisjoint(split["eval_groups"])
    if "T102" in held_out:  # both turns held out together
        assert split["eval_rows"] == 2 and split["train_rows"] == 2
    else:  # both turns trained on together
        assert split["train_groups"] == ["T102"] and split["train_rows"] == 2 and split["eval_rows"] == 2


def test_split_by_hash_keeps_every_turn_of_a_group_together(project):
    rows = [
        {"thread_id": f"G{g}", "prompt": f"Incident {g} message {t} about key k{g * 7 + t}",
         "completion": f"Answer {g}.{t}"}
        for g in range(12) for t in range(3)
    ]
    project.write_jsonl("data/rows.jsonl", rows)
    bundle, lock, _ = project.compile(base_spec(split={"eval_fraction": 0.3, "near_duplicates": None}))
    split = lock.split.model_dump(mode="json")
    assert split["eval_groups"] and split["train_groups"]
    assert set(split["train_groups"]).isdisjoint(split["eval_groups"])
    assert split["eval_rows"] == 3 * len(split["eval_groups"])
    assert split["train_rows"] == 3 * len(split["train_groups"])
    held = {p["group"] for p in read_jsonl(bundle / "eval_prompts.jsonl")}
    assert held == set(split["eval_groups"])


# --- the mask ----------------------------------------------------------------------------------


def test_mask_supervises_exactly_answer_and_terminator(project):
    rows = [{"thread_id": "T102", "prompt": "Key T102 is stale.", "completion": "Ask for rotation evidence within 24 hours."}]
    project.write_jsonl("data/rows.jsonl", rows)
    bundle, lock, _ = project.compile(base_spec(template={"system": "Follow access policy."}))
    tokenizer = bundle_tokenizer(bundle, lock)
    terminator, terminator_id = lock.template.terminator, lock.template.terminator_id
    assert tokenizer.convert_tokens_to_ids(terminator) == terminator_id

    data = load_tokens(bundle)
    (row,) = list(segments(data))
    _, ids, labels = row
    supervised = labels != IGNORE_INDEX
    assert np.array_equal(labels[supervised], ids[supervised])  # a label is the token itself
    decoded = tokenizer.decode(ids[supervised].tolist(), skip_special_tokens=False)
    assert decoded == "Ask for rotation evidence within 24 hours." + terminator

    # the prompt (system, user, generation prompt) is a prefix with no label, and the
    # supervised span is one contiguous block that ends on the terminator
    messages = [{"role": "system", "content": "Follow access policy."}, {"role": "user", "content": "Key T102 is stale."}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    assert not supervised[: len(prompt_ids)].any()
    positions = np.flatnonzero(supervised)
    assert positions[0] == len(prompt_ids)
    assert np.array_equal(positions, np.arange(positions[0], positions[-1] + 1))
    assert ids[positions[-1]] == terminator_id
    assert not supervised[positions[-1] + 1 :].any()  # whatever the template writes after the turn
    prompt_decoded = tokenizer.decode(ids[~supervised].tolist(), skip_special_tokens=False)
    assert "Key T102 is stale." in prompt_decoded and "Follow access policy." in prompt_decoded
    # the terminator after the user turn is context, not a target
    assert int((labels == terminator_id).sum()) == 1
    assert int((ids == terminator_id).sum()) >= 3


def test_every_compiled_example_supervises_only_its_answer(seed_bundle):
    bundle, lock = seed_bundle
    tokenizer = bundle_tokenizer(bundle, lock)
    terminator = lock.template.terminator
    answers = {r["completion"] for r in SEED_ROWS if r.get("completion") and r.get("thread_id")}
    prompts = [r["prompt"] for r in SEED_ROWS]
    seen = set()
    for which in ("train", "eval"):
        for _, ids, labels in segments(load_tokens(bundle, which)):
            supervised = labels != IGNORE_INDEX
            decoded = tokenizer.decode(ids[supervised].tolist(), skip_special_tokens=False)
            assert decoded.endswith(terminator)
            answer = decoded[: -len(terminator)]
            assert answer in answers
            assert not any(p in decoded for p in prompts)
            seen.add(answer)
    assert seen == answers


# --- truncation --------------------------------------------------------------------------------

LONG_PROMPT = " ".join(f"The stale access key number {i} belongs to Victor Haddad." for i in range(40))


def _truncation_rows():
    return [
        {"thread_id": "T1", "prompt": "Stale key", "completion": "Request rotation evidence."},
        {"thread_id": "T2", "prompt": LONG_PROMPT, "completion": "Revoke the stale key now."},
        {"thread_id": "T3", "prompt": "Expired key", "completion": "Renew after approval."},
    ]


def test_truncation_that_cuts_the_answer_is_rejected(project):
    project.write_jsonl("data/rows.jsonl", _truncation_rows())
    bundle, lock, _ = project.compile(base_spec(tokenize={"max_length": 48}))
    rejects = read_jsonl(bundle / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "answer_truncated")]
    assert "max_length 48" in rejects[0]["detail"]
    assert lock.data_manifest.rejected == {"answer_truncated": 1}
    assert lock.tokenize.truncated_rejected == 1
    assert lock.data_manifest.train_examples == 2
    data = load_tokens(bundle)
    assert all(len(ids) <= 48 for _, ids, _ in segments(data))
    assert all((labels != IGNORE_INDEX).any() for _, _, labels in segments(data))


def test_truncation_that_cuts_the_answer_can_fail_the_compile(project):
    project.write_jsonl("data/rows.jsonl", _truncation_rows())
    with pytest.raises(SftcError) as info:
        project.compile(base_spec(tokenize={"max_length": 48, "on_truncated_answer": "error"}))
    assert "data/rows.jsonl:2" in str(info.value)
    assert "on_truncated_answer" in str(info.value)
    assert project.leftovers() == []


def test_long_enough_max_length_keeps_the_row(project):
    project.write_jsonl("data/rows.jsonl", _truncation_rows())
    bundle, lock, _ = project.compile(base_spec(tokenize={"max_length": 1024}, packing={"seq_length": 1024}))
    assert read_jsonl(bundle / "rejects.jsonl") == []
    assert lock.data_manifest.train_examples == 3


def test_bfd_packing_cannot_cut_an_answer_that_tokenization_kept(project):
    """seq_length below max_length: bfd truncates each example to one row, so the answer check must
    use that cut too. Otherwise the long row is packed with its answer gone and no reject."""
    project.write_jsonl("data/rows.jsonl", _truncation_rows())
    bundle, lock, _ = project.compile(base_spec(tokenize={"max_length": 1024}, packing={"strategy": "bfd", "seq_length": 48}))
    rejects = read_jsonl(bundle / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "answer_truncated")]
    assert lock.packing.overflow_tokens_dropped == 0
    data = load_tokens(bundle)
    for _, ids, labels in segments(data):
        assert len(ids) <= 48
        assert (labels != IGNORE_INDEX).any()
    assert lock.budget.supervised_tokens_per_update.min > 0


# --- packing -----------------------------------------------------------------------------------


def test_packed_position_ids_reset_at_each_example(seed_bundle):
    bundle, lock = seed_bundle
    data = load_tokens(bundle)
    assert lock.packing.strategy == "bfd"
    row_lengths = np.diff(data["row_offsets"])
    assert len(row_lengths) == 1  # three short examples fit one 256-token row
    seg = data["seq_lengths"][data["seq_offsets"][0] : data["seq_offsets"][1]]
    assert len(seg) == 3
    assert int(seg.sum()) == int(row_lengths[0])
    pos = position_ids(seg)
    assert len(pos) == row_lengths[0]
    starts = np.concatenate([[0], np.cumsum(seg)[:-1]])
    assert (pos[starts] == 0).all()
    assert int((pos == 0).sum()) == len(seg)
    assert pos.tolist() == [p for n in seg for p in range(int(n))]
    # each segment is exactly one example: it opens with the prompt's first token and has one
    # supervised terminator
    terminator_id = lock.template.terminator_id
    firsts = {int(ids[0]) for _, ids, _ in segments(data)}
    assert len(firsts) == 1
    for _, _, labels in segments(data):
        assert int((labels == terminator_id).sum()) == 1


def test_position_ids_function():
    assert position_ids([3, 2, 3]).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert position_ids([]).tolist() == []


# --- batch arithmetic --------------------------------------------------------------------------


def test_examples_per_update():
    assert examples_per_update(4, 8, 4) == 128
    assert examples_per_update(2, 16, 8) == 256
    assert examples_per_update(2, 16, 8) == 2 * examples_per_update(4, 8, 4)
