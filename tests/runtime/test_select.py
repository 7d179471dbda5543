"""Checkpoint selection: constraints first, then the product metric, then tie-breaks."""

from __future__ import annotations

import json

import pytest

from sftc.compiler.spec import SelectSpec
from sftc.runtime.select import parse_constraint, select_best, select_run

# The seed document's example, verbatim (it says val_loss; the runtime logs eval_loss).
SEED = [
    {"step": 200, "val_loss": 1.91, "policy_pass_rate": 0.93, "format_pass_rate": 0.99},
    {"step": 400, "val_loss": 1.77, "policy_pass_rate": 0.91, "format_pass_rate": 1.00},
    {"step": 600, "val_loss": 1.79, "policy_pass_rate": 0.97, "format_pass_rate": 0.98},
]


def _rule(**overrides) -> dict:
    """Spec.select dumped, as the runtime passes it."""
    raw = {"require": {"format_pass_rate": ">= 0.98"}, "maximize": "policy_pass_rate",
           "tie_break": {"minimize": "eval_loss"}, **overrides}
    return SelectSpec.model_validate(raw).model_dump(mode="json")


def _as_logged(rows):
    return [{"step": r["step"], "eval_loss": r["val_loss"], "policy_pass_rate": r["policy_pass_rate"],
             "format_pass_rate": r["format_pass_rate"]} for r in rows]


def test_seed_example_picks_600_not_the_lowest_loss_400():
    result = select_best(_as_logged(SEED), _rule())
    assert result["best_step"] == 600
    assert result["lowest_loss_step"] == 400
    assert [c["eligible"] for c in result["candidates"]] == [True, True, True]
    assert {c["step"]: c["rank"] for c in result["candidates"]} == {600: 1, 200: 2, 400: 3}
    assert result["why"].startswith("Step 600 selected: highest policy_pass_rate (0.97")
    assert "step 400" in result["why"] and "not selected" in result["why"]
    json.dumps(result)  # best.json is written as JSON


def test_seed_example_with_its_own_val_loss_name():
    assert select_best(SEED, _rule(tie_break={"minimize": "val_loss"}))["best_step"] == 600


def test_constraint_boundary_is_inclusive_and_exact():
    # 0.98 passes '>= 0.98' even when computed as 49/50; 0.97999 does not.
    rows = _as_logged(SEED)
    rows[2]["format_pass_rate"] = 49 / 50
    assert select_best(rows, _rule())["best_step"] == 600
    rows[2]["format_pass_rate"] = 0.97999
    result = select_best(rows, _rule())
    assert result["best_step"] == 200
    assert result["candidates"][2]["failed"] == ["format_pass_rate 0.97999 fails >= 0.98"]


def test_tie_on_metric_is_broken_by_loss_then_earliest_step():
    rows = _as_logged(SEED)
    rows[0]["policy_pass_rate"] = 0.97  # step 200 ties 600 on the metric, has higher loss
    result = select_best(rows, _rule())
    assert result["best_step"] == 600
    assert "tie broken by lower eval_loss" in result["why"]
    rows[0]["eval_loss"] = 1.79
    assert select_best(rows, _rule())["best_step"] == 200


def test_tie_breaks_apply_in_order():
    rows = [{"step": 1, "eval_loss": 1.0, "m": 0.5, "length": 30.0},
            {"step": 2, "eval_loss": 1.0, "m": 0.5, "length": 20.0},
            {"step": 3, "eval_loss": 0.9, "m": 0.4, "length": 10.0}]
    rule = _rule(require={}, maximize="m", tie_break=[{"minimize": "eval_loss"}, {"minimize": "length"}])
    assert select_best(rows, rule)["best_step"] == 2
    rule = _rule(require={}, maximize=None, tie_break=[{"minimize": "eval_loss"}])
    assert select_best(rows, rule)["best_step"] == 3


def test_none_eligible():
    rows = _as_logged(SEED)
    result = select_best(rows, _rule(require={"format_pass_rate": ">= 0.995"}))
    assert result["best_step"] == 400  # the only one at 1.00
    result = select_best(rows, _rule(require={"format_pass_rate": ">= 1.0", "policy_pass_rate": ">= 0.95"}))
    assert result["best_step"] is None and result["export_step"] is None
    assert result["fallback_step"] == 600  # best by the same ordering among the ineligible
    assert result["why"].startswith("No checkpoint meets the requirements")
    assert "nothing is exported" in result["why"]
    assert all(not c["eligible"] and c["failed"] for c in result["candidates"])
    allowed = select_best(rows, _rule(require={"format_pass_rate": ">= 1.5"}, export_if_none_eligible=True))
    assert allowed["best_step"] is None and allowed["export_step"] == allowed["fallback_step"] == 600
    assert "exported anyway" in allowed["why"]


def test_missing_metric_makes_a_candidate_ineligible():
    rows = _as_logged(SEED)
    del rows[2]["policy_pass_rate"]
    rows[1]["format_pass_rate"] = float("nan")
    result = select_best(rows, _rule())
    assert result["best_step"] == 200
    failed = {c["step"]: c["failed"] for c in result["candidates"]}
    assert failed[400] == ["format_pass_rate missing (required >= 0.98)"]
    assert failed[600] == ["policy_pass_rate missing (the metric to maximize)"]


def test_no_candidates():
    result = select_best([], _rule())
    assert result["best_step"] is None and result["fallback_step"] is None
    assert "No checkpoint has been evaluated" in result["why"]


def test_parse_constraint():
    assert parse_constraint(">= 0.98") == (">=", 0.98)
    assert parse_constraint("<1e-3") == ("<", 0.001)
    with pytest.raises(ValueError):
        parse_constraint("about 0.9")


def test_select_run_reads_metrics_and_writes_best_json(tmp_path):
    run = tmp_path / "runs" / "b-1"
    (run / "checkpoints" / "checkpoint-600").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-600" / "checkpoint.json").write_text("{}")
    lines = [{"kind": "train", "step": 10, "loss": 2.0}]
    # Step 600 was logged twice (a resume re-ran it); the last line is the one that counts.
    lines += [{"kind": "eval", **r} for r in _as_logged(SEED)]
    lines[-1] = {**lines[-1], "policy_pass_rate": 0.5}
    lines += [{"kind": "eval", **_as_logged(SEED)[2]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "ev')
    result = select_run(run, _rule())
    assert result["best_step"] == 600
    on_disk = {c["step"]: c["on_disk"] for c in result["candidates"]}
    assert on_disk == {200: False, 400: False, 600: True}
    assert json.loads((run / "best.json").read_text())["best_step"] == 600
