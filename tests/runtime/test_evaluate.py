"""Held-out behaviour scoring and generation, on a real tiny Llama (no mocks of what is tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftc.runtime.evaluate import (RulesError, aggregate, behaviour_metrics, generate_ids, generate_replies, load_rules,
                              load_rules_text, row_problems, score, stop_token_ids)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "evals" / "access_policy.yaml"

TOPICS = [("AC-101", "stale key", "revoke"), ("AC-104", "vendor wants admin", "escalate"),
          ("AC-107", "no ticket attached", "request_evidence"), ("AC-110", "approved ticket attached", "approve"),
          ("AC-112", "shared password", "deny")]


def _rows() -> list[dict]:
    rows = []
    for i, (policy, what, decision) in enumerate(TOPICS * 2):
        prompt = f"Ticket {i}: {what} on host {i * 7 % 11}. What now?"
        completion = json.dumps({"decision": decision, "policy": policy, "reply": f"Per {policy}, {decision}."})
        rows.append({"prompt": prompt, "completion": completion, "policy_id": policy, "expected_decision": decision})
    return rows


def _train(model, tokenizer, rows, steps: int) -> None:
    """A few hundred fast updates so replies are JSON-shaped and logits are well separated."""
    seqs = []
    for row in rows:
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        seqs.append(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(ids == pad, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo.tiny_model import build_tiny

    rows = _rows()
    out = build_tiny(tmp_path_factory.mktemp("tiny"), [r["prompt"] + " " + r["completion"] for r in rows] * 20,
                     vocab_size=512)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    _train(model, tokenizer, rows, steps=60)
    prompts = []
    for i, row in enumerate(rows):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        prompts.append({"index": i, "group": str(i), "prompt_ids": ids, "prompt_text": tokenizer.decode(ids),
                        "reference": row["completion"],
                        "fields": {"policy_id": row["policy_id"], "expected_decision": row["expected_decision"]}})
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    return model, tokenizer, prompts, end_id


# --- rules and scoring -----------------------------------------------------------------------

FIELDS = {"expected_decision": "escalate", "policy_id": "AC-107"}


@pytest.fixture(scope="module")
def rules():
    return load_rules(RULES)


def test_access_policy_rules_declare_the_selection_metrics(rules):
    assert {"format_pass_rate", "policy_pass_rate"} <= set(rules.metric_names)
    assert rules.sha256.startswith("sha256:") and len(rules.sha256) == 7 + 64
    assert rules.row_fields == ["expected_decision", "policy_id"]


def test_correct_reply_passes_every_check(rules):
    reply = '{"decision": "escalate", "policy": "AC-107", "reply": "Escalating under AC-107."}'
    assert all(score(reply, FIELDS, rules).values())


@pytest.mark.parametrize("reply, failing", [
    ('{"decision": "deny", "policy": "AC-107", "reply": "Denied under AC-107."}', {"decision_matches"}),
    ('{"decision": "escalate", "policy": "AC-104", "reply": "Escalating under AC-104."}',
     {"cites_policy", "reply_names_policy"}),
    ('{"decision": "escalate", "policy": "AC-107", "reply": ""}', {"valid_format", "reply_names_policy"}),
    ('{"decision": "panic", "policy": "AC-107", "reply": "AC-107"}', {"valid_format", "decision_matches"}),
    ('{"decision": "escalate", "policy": "AC-107", "reply": "AC-107", "x": 1}', {"valid_format"}),
    ('{"decision": "escalate", "policy": "AC-107", "reply": "AC-107"', None),      # truncated JSON
    ('Sure! {"decision": "escalate", "policy": "AC-107", "reply": "AC-107"}', None),  # prose around it
    ('{"decision": "deny", "decision": "escalate", "policy": "AC-107", "reply": "AC-107"}', None),  # dup key
    ("", None),
])
def test_bad_replies_fail_the_right_checks(rules, reply, failing):
    result = score(reply, FIELDS, rules)
    failed = {name for name, ok in result.items() if not ok}
    assert failed == (set(result) if failing is None else failing)


def test_whitespace_around_json_is_allowed(rules):
    reply = '  {"decision": "escalate", "policy": "AC-107", "reply": "AC-107 applies."}\n'
    assert all(score(reply, FIELDS, rules).values())


def test_reference_completions_in_the_demo_data_pass_all_checks(rules, tmp_path):
    # generated here (deterministic, well under a second) so a fresh clone runs the check too
    from demo.generate_data import main as generate

    assert generate(["--out", str(tmp_path), "--seed", "7"]) == 0
    path = tmp_path / "sft_rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:400]]
    good = [r for r in rows if r["completion"].strip()]
    per_row = [score(r["completion"], r, rules) for r in good]
    assert aggregate(per_row, rules) == {m: 1.0 for m in rules.metric_names}


def test_aggregate_counts_rows_where_all_named_checks_pass(rules):
    per_row = [
        {"valid_format": True, "decision_matches": True, "cites_policy": True, "reply_names_policy": True},
        {"valid_format": True, "decision_matches": False, "cites_policy": True, "reply_names_policy": True},
        {"valid_format": False, "decision_matches": True, "cites_policy": True, "reply_names_policy": False},
        {"valid_format": True, "decision_matches": True, "cites_policy": False, "reply_names_policy": True},
    ]
    assert aggregate(per_row, rules) == {"format_pass_rate": 0.75, "policy_pass_rate": 0.5, "citation_pass_rate": 0.75}
    assert aggregate([], rules)["policy_pass_rate"] is None
    assert aggregate(per_row)["decision_matches"] == 0.75


def test_text_rules_regex_and_contains():
    rules = load_rules_text(
        "version: 1\nparse: text\nchecks:\n"
        "  - {name: starts_ok, kind: regex, pattern: '^OK: ', ignore_case: true}\n"
        "  - {name: whole, kind: regex, pattern: '[a-z: ]+', match: fullmatch, ignore_case: true}\n"
        "  - {name: names_user, kind: contains_row_field, row_field: user}\n"
        "metrics: {ok_rate: [starts_ok, names_user]}\n", "inline.yaml")
    assert score("ok: hello bob", {"user": "bob"}, rules) == {"starts_ok": True, "whole": True, "names_user": True}
    assert score("hello bob!", {"user": "bob"}, rules) == {"starts_ok": False, "whole": False, "names_user": True}
    with pytest.raises(RulesError, match="row field 'user'"):
        score("ok", {"name": "bob"}, rules)
    assert row_problems(rules, [{"index": 3, "fields": {"name": "x"}}]) == [
        "eval row 3: missing field(s) ['user'] needed by inline.yaml"]


def test_malformed_rules_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\nparse: json\nchecks:\n"
        "  - {name: valid_format, kind: json_schema, schema: {type: objekt}}\n"
        "  - {name: decision_matches, kind: json_field_equals, feild: decision, row_field: expected_decision}\n"
        "metrics: {policy_pass_rate: [decision_matches]}\n")
    with pytest.raises(RulesError) as err:
        load_rules(path)
    text = str(err.value)
    assert str(path) in text
    assert "checks[1] (decision_matches).feild: unknown key" in text
    assert "checks[1] (decision_matches).field: required key is missing" in text

    path.write_text(
        "version: 1\nparse: json\nchecks:\n  - {name: valid_format, kind: json_schema, schema: {type: objekt}}\n"
        "metrics: {format_pass_rate: [valid_format, nope]}\n")
    with pytest.raises(RulesError) as err:
        load_rules(path)
    text = str(err.value)
    assert "checks[0] (valid_format).schema: not a valid JSON Schema" in text
    assert "metrics.format_pass_rate: unknown check 'nope'" in text

    path.write_text("version: 1\nparse: json\nparse: text\n")
    with pytest.raises(RulesError, match="line 3.*duplicate key 'parse'"):
        load_rules(path)
    path.write_text("version: 2\nparse: xml\nchecks: []\nmetrics: {}\n")
    with pytest.raises(RulesError) as err:
        load_rules(path)
    assert "version:" in str(err.value) and "parse:" in str(err.value)


# --- generation ------------------------------------------------------------------------------


def test_stop_tokens_include_the_template_terminator(tiny):
    model, tokenizer, _, end_id = tiny
    stops = stop_token_ids(model, tokenizer, [end_id])
    assert stops[0] == end_id and tokenizer.eos_token_id in stops


def test_batched_generation_equals_one_at_a_time_and_keeps_rng_and_mode(tiny):
    model, tokenizer, prompts, end_id = tiny
    ids = [p["prompt_ids"] for p in prompts]
    assert len({len(i) for i in ids}) > 1, "prompts of different lengths, so left padding is exercised"
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batched = generate_ids(model, tokenizer, ids, max_new_tokens=32, batch_size=4, eos_token_ids=[end_id])
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training, "the caller's train mode is restored"
    single = generate_ids(model, tokenizer, ids, max_new_tokens=32, batch_size=1, eos_token_ids=[end_id])
    assert batched == single
    # And both are plain greedy decoding: the same as HF generate on the unpadded prompt.
    for prompt, got in list(zip(ids, batched))[:3]:
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, eos_token_id=[end_id, tokenizer.eos_token_id],
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert ref[:len(got["ids"])] == got["ids"]
        if got["stopped"]:
            assert ref[len(got["ids"])] == end_id or ref[len(got["ids"])] == tokenizer.eos_token_id
    # Continuing after evaluation draws the same numbers as if no evaluation had happened.
    after_eval = torch.rand(3)
    torch.set_rng_state(before)
    assert torch.equal(torch.rand(3), after_eval)
    assert any(g["stopped"] for g in batched), "the trained model ends some replies with <|end|>"
    assert all(end_id not in g["ids"] for g in batched)


def test_behaviour_metrics_scores_generated_replies(tiny, rules):
    model, tokenizer, prompts, end_id = tiny
    model.eval()
    result = behaviour_metrics(model, tokenizer, prompts, rules, max_new_tokens=40, batch_size=3,
                               eos_token_ids=[end_id])
    assert not model.training
    assert result["n_prompts"] == len(prompts)
    for name in rules.metric_names:
        assert 0.0 <= result[name] <= 1.0
    assert len(result["samples"]) == 3
    sample = result["samples"][0]
    assert set(sample["checks"]) == set(rules.check_names)
    assert sample["prompt_text"] == prompts[0]["prompt_text"]
    # The metrics are exactly the rules applied to the replies generate_replies gives.
    replies = generate_replies(model, tokenizer, [p["prompt_ids"] for p in prompts], 40, 5, [end_id])
    per_row = [score(r, p["fields"], rules) for r, p in zip(replies, prompts)]
    assert {k: result[k] for k in rules.metric_names} == aggregate(per_row, rules)
    assert sample["reply"] == replies[0]
    capped = behaviour_metrics(model, tokenizer, prompts, rules, 8, 4, [end_id], max_prompts=2)
    assert capped["n_prompts"] == 2


def test_generation_stops_at_the_models_positions(tiny):
    """A prompt near the model's positions generates only what fits, as an unfinished reply,
    rather than running past them; a prompt that fills them generates nothing."""
    model, tokenizer, prompts, end_id = tiny
    positions = model.config.max_position_embeddings
    filler = prompts[0]["prompt_ids"][0]
    near = [filler] * (positions - 3)
    full = [filler] * positions
    short = prompts[0]["prompt_ids"]
    out = generate_ids(model, tokenizer, [near, full, short], max_new_tokens=32, batch_size=1, eos_token_ids=[])
    assert len(out[0]["ids"]) <= 3 and not out[0]["stopped"]
    assert out[1] == {"ids": [], "stopped": False}
    assert out[2] == generate_ids(model, tokenizer, [short], max_new_tokens=32, batch_size=1, eos_token_ids=[])[0]
