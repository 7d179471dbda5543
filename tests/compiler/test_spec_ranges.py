"""Every spec field has a range the later passes can honour, and work that grows with a value is
bounded before it starts (issue 14: values that validated, then hung or crashed)."""

from __future__ import annotations

import time

import pytest

from sftc.compiler.spec import MAX_PLANNED_ROWS, parse_spec
from sftc.errors import SftcError, SpecError

from tests.compiler.conftest import base_spec

ROWS = [{"thread_id": f"t{i}", "prompt": f"Key T{i} is stale.", "completion": f"Rotate key T{i}."} for i in range(12)]


@pytest.mark.parametrize("overrides,key", [
    ({"seed": -1}, "seed"),
    ({"seed": 2**70}, "seed"),  # numpy / torch seeds are 0..2**32-1: a traceback at run before
    ({"split": {"seed": -5}}, "split.seed"),
    ({"parameterization": {"kind": "lora", "rank": 10**12}}, "parameterization.rank"),
    ({"schedule": {"max_steps": 10**12}}, "schedule.max_steps"),
    ({"schedule": {"epochs": 1e15}}, "schedule.epochs"),
    ({"batch": {"per_device": 10**9}}, "batch.per_device"),
    ({"select": {"require": {"eval_loss": "<= ."}}}, "select.require.eval_loss"),
    ({"select": {"require": {"eval_loss": "<= 1e999"}}}, "select.require.eval_loss"),
    ({"optimizer": {"lr": 1e-4, "betas": [1.5, 0.999]}}, "optimizer.betas"),
    ({"model": {"path": "mo\x00del"}}, "model.path"),
    ({"eval": {"max_new_tokens": 10**9}}, "eval.max_new_tokens"),
    ({"tokenize": {"max_length": 10**12}}, "tokenize.max_length"),
    ({"verify": {"probe_examples": 10**9}}, "verify.probe_examples"),
    ({"parameterization": {"kind": "lora", "target_modules": []}}, "parameterization.target_modules"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_out_of_range_values_are_spec_errors_naming_the_key(overrides, key):
    with pytest.raises(SpecError) as err:
        parse_spec(base_spec(**overrides), "spec.yaml")
    assert f"spec.yaml: {key}" in str(err.value), str(err.value)


def test_a_constraint_the_selector_can_parse_is_accepted():
    spec = parse_spec(base_spec(select={"require": {"eval_loss": "<= 2.5"}}), "spec.yaml")
    assert spec.select.require == {"eval_loss": "<= 2.5"}


def test_seeds_at_their_extremes_compile(project):
    project.write_jsonl("data/rows.jsonl", ROWS)
    for seed in (0, 2**32 - 1):
        _, lock, _ = project.compile(base_spec(seed=seed, split={"seed": seed, "eval_fraction": 0.2}))
        assert lock.spec.seed == seed


@pytest.mark.parametrize("overrides", [
    {"batch": {"per_device": 2**16, "grad_accum": 2**16}},       # 2**32 rows per update, one step
    {"schedule": {"epochs": 10_000.0}, "batch": {"per_device": 1}, "packing": {"strategy": "none"}},
], ids=["rows-per-update", "epochs"])
def test_a_schedule_too_big_to_plan_is_refused_before_the_order_is_built(project, overrides):
    rows = ROWS * 1 if "epochs" not in str(overrides) else [
        {"thread_id": f"t{i}", "prompt": f"Key T{i} is stale.", "completion": f"Rotate key T{i}."} for i in range(4000)]
    project.write_jsonl("data/rows.jsonl", rows)
    started = time.monotonic()
    with pytest.raises(SftcError, match=f"at most {MAX_PLANNED_ROWS} rows"):
        project.compile(base_spec(**overrides))
    assert time.monotonic() - started < 60
    assert project.leftovers() == []


def test_lora_target_modules_the_model_lacks_are_a_spec_error(project):
    # peft's NoMatchingPeftModuleError was a traceback from the parameter count
    project.write_jsonl("data/rows.jsonl", ROWS)
    with pytest.raises(SpecError, match=r"parameterization.target_modules: \['nonexistent'\] cannot be adapted"):
        project.compile(base_spec(parameterization={"kind": "lora", "target_modules": ["nonexistent"]}))


RULES = """version: 1
parse: json
checks:
  - name: valid_json
    kind: json_valid
metrics:
  format_pass_rate: [valid_json]
"""


@pytest.mark.parametrize("select,ok", [
    ({"require": {"format_pass_rate": ">= 0.9"}, "maximize": "format_pass_rate"}, True),
    ({"require": {"eval_loss": "<= 9"}, "tie_break": {"minimize": "val_loss"}}, True),
    ({"maximize": "policy_pass_rate"}, False),  # a typo: every checkpoint would be ineligible after the run
    ({"require": {"fromat_pass_rate": ">= 0.9"}}, False),
])
def test_select_may_only_name_metrics_an_evaluation_reports(project, select, ok):
    project.write_jsonl("data/rows.jsonl", ROWS)
    (project.root / "rules.yaml").write_text(RULES, encoding="utf-8")
    spec = base_spec(eval={"rules": "rules.yaml"}, select=select, split={"eval_fraction": 0.3})
    if ok:
        project.compile(spec)
        return
    with pytest.raises(SpecError, match="is not a metric of the rules file") as err:
        project.compile(spec)
    assert "format_pass_rate" in str(err.value)  # what is allowed
