"""Spec values at their validated extremes, run through compile (issue 14: values that validated,
then hung or crashed). Every field's bounds are read from the Spec model itself, so a new field or
a changed bound is fuzzed without editing this file. Each input must end in a bundle or a clear
SftcError, within a wall-clock bound: no traceback, no hang.
"""

from __future__ import annotations

import math
import os
import sys
import time
import typing

import annotated_types as at
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sftc.compiler.spec import LoraParameterization, Spec
from sftc.errors import SftcError

from tests.compiler.conftest import base_spec, deep_merge

EXAMPLES = int(os.environ.get("SFTC_FUZZ_EXAMPLES", "1"))  # the report script raises it
SECONDS_PER_INPUT = 60
ROWS = [{"thread_id": f"t{i % 7}", "prompt": f"Key T{i} is stale.", "completion": f"Rotate key T{i} today."}
        for i in range(24)]


def _bounds(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    """(key path, lowest valid value, highest valid value) of every numeric field."""
    for name, field in model.model_fields.items():
        args = typing.get_args(field.annotation) or (field.annotation,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested and name != "parameterization":
            yield from _bounds(nested[0], prefix + (name,))
            continue
        kind = next((a for a in args if a in (int, float)), None)
        if kind is None:
            continue
        lo, hi = (0, None) if kind is int else (-sys.float_info.max, sys.float_info.max)
        for m in field.metadata:
            if isinstance(m, at.Ge):
                lo = m.ge
            elif isinstance(m, at.Gt):
                lo = m.gt + 1 if kind is int else math.nextafter(m.gt, math.inf)
            elif isinstance(m, at.Le):
                hi = m.le
            elif isinstance(m, at.Lt):
                hi = m.lt - 1 if kind is int else math.nextafter(m.lt, -math.inf)
        if hi is None:
            hi = 2**63 - 1 if kind is int else sys.float_info.max
        yield prefix + (name,), kind(lo), kind(hi)


EXTREMES = [(path, value) for path, lo, hi in [*_bounds(Spec), *_bounds(LoraParameterization, ("parameterization",))]
            for value in (lo, hi)]


def _override(path: tuple[str, ...], value) -> dict:
    out: dict = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    if path[0] == "parameterization":
        out["parameterization"]["kind"] = "lora"
    return out


def test_every_numeric_field_has_two_extremes():
    paths = {path for path, _ in EXTREMES}
    assert ("seed",) in paths and ("schedule", "epochs") in paths and ("parameterization", "rank") in paths
    assert len(EXTREMES) >= 50


def _compile_outcome(cproject, overrides: dict, figures) -> str:
    figures["inputs_tried"] += 1
    figures["inputs_tried_extremes"] += 1
    started = time.monotonic()
    try:
        cproject.compile(deep_merge(base_spec(split={"eval_fraction": 0.2}), overrides), force=True)
        outcome = "bundle"
    except SftcError as exc:
        assert str(exc).strip()
        outcome = "error"
    except Exception:
        figures["tracebacks"] += 1
        raise
    if time.monotonic() - started > SECONDS_PER_INPUT:
        figures["hangs"] += 1
        pytest.fail(f"compile took more than {SECONDS_PER_INPUT} s with {overrides}")
    return outcome


@pytest.mark.parametrize("path,value", [e for e in EXTREMES if e[0] in {
    ("seed",), ("split", "seed"), ("schedule", "max_steps"), ("schedule", "epochs"), ("batch", "per_device"),
    ("batch", "grad_accum"), ("parameterization", "rank"), ("tokenize", "max_length"), ("packing", "seq_length"),
    ("split", "near_duplicates"), ("split", "eval_fraction")}], ids=str)
def test_the_extremes_that_hung_or_crashed_before(cproject, path, value, figures):
    cproject.write_jsonl("data/rows.jsonl", ROWS)
    _compile_outcome(cproject, _override(path, value), figures)


@settings(max_examples=10 * EXAMPLES, deadline=None, derandomize=EXAMPLES == 1,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(chosen=st.lists(st.sampled_from(EXTREMES), min_size=1, max_size=3, unique_by=lambda e: e[0]))
def test_combined_extremes_end_in_a_bundle_or_a_clear_error(cproject, chosen, figures):
    cproject.write_jsonl("data/rows.jsonl", ROWS)
    overrides: dict = {}
    for path, value in chosen:
        overrides = deep_merge(overrides, _override(path, value))
    _compile_outcome(cproject, overrides, figures)
