"""Spec values at their validated extremes, run through compile and a one-step run (issue 14:
values that validated, then hung or crashed). Every field's bounds are read from the Spec model
itself, so a new field or a changed bound is fuzzed without editing this file. Each input must end
in a bundle or a clear SftcError, within a wall-clock bound: no traceback, no hang. Each bundle is
then trained for one optimizer step the same way: with `schedule.max_steps: 1` added (and a rules
file, so the step's checkpoint evaluates, generates, selects and exports) where the extreme is not a
schedule field itself, else the bundle as compiled, stopped after step 1.

Found this way: `eval.max_new_tokens: 32768` on a 512-position model (a checkpoint's generation ran
past 10 minutes) and `parameterization.rank: 65536` on a 64-wide model (one step 25x slower than
any other extreme); the compiler now refuses both, naming the bound.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
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
RULES = """version: 1
parse: text
checks:
  - {name: says_rotate, kind: regex, pattern: Rotate}
metrics:
  rotate_rate: [says_rotate]
"""
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


class _Hang(BaseException):
    """Raised by the alarm in _bounded: a BaseException, so no `except Exception` in the runtime eats it."""


@contextlib.contextmanager
def _bounded(seconds: float, what: str, figures):
    """Fail (and count a hang) when the body runs past `seconds`: an in-process run cannot be killed
    from outside, so SIGALRM interrupts it instead."""
    def alarm(signum, frame):
        raise _Hang(what)

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Hang:
        figures["hangs"] += 1
        pytest.fail(f"{what} ran past {seconds} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _compile_outcome(cproject, overrides: dict, figures):
    """The bundle compiled from the base spec with `overrides`, or None after a clear SftcError."""
    figures["inputs_tried"] += 1
    figures["inputs_tried_extremes"] += 1
    started = time.monotonic()
    try:
        bundle, _, _ = cproject.compile(deep_merge(base_spec(split={"eval_fraction": 0.2}), overrides), force=True)
    except SftcError as exc:
        assert str(exc).strip()
        bundle = None
    except Exception:
        figures["tracebacks"] += 1
        raise
    if time.monotonic() - started > SECONDS_PER_INPUT:
        figures["hangs"] += 1
        pytest.fail(f"compile took more than {SECONDS_PER_INPUT} s with {overrides}")
    return bundle


def _one_step(cproject, overrides: dict, bundle, figures) -> str:
    """Train what `overrides` compiled to for one optimizer step: "run", or "error" (a clear SftcError)."""
    from sftc.runtime.run import run_bundle

    stop_after = None
    if "schedule" in overrides:  # the extreme is a schedule field: keep it, stop after the first step
        stop_after = 1
    else:  # one whole run of one step: checkpoint, evaluation with generation, selection, export
        (cproject.root / "rules.yaml").write_text(RULES, encoding="utf-8")
        bundle = _compile_outcome(cproject, deep_merge(overrides, {"schedule": {"max_steps": 1},
                                                                   "eval": {"rules": "rules.yaml"}}), figures)
        figures["inputs_tried"] -= 1  # the same input, compiled for its run
        figures["inputs_tried_extremes"] -= 1
        if bundle is None:
            return "error"
    figures["extremes_run_one_step"] += 1
    with _bounded(SECONDS_PER_INPUT, f"one step of {overrides}", figures):
        try:
            run_bundle(bundle, run_dir=cproject.root / "runs" / bundle.name, fresh=True, stop_after_steps=stop_after)
            return "run"
        except SftcError as exc:
            assert str(exc).strip()
            return "error"
        except Exception:
            figures["tracebacks"] += 1
            raise


PINNED = {
    ("seed",), ("split", "seed"), ("schedule", "max_steps"), ("schedule", "epochs"), ("batch", "per_device"),
    ("batch", "grad_accum"), ("parameterization", "rank"), ("tokenize", "max_length"), ("packing", "seq_length"),
    ("split", "near_duplicates"), ("split", "eval_fraction"), ("eval", "max_new_tokens")}
OTHERS = [e for e in EXTREMES if e[0] not in PINNED]


@pytest.mark.parametrize("path,value", [e for e in EXTREMES if e[0] in PINNED], ids=str)
def test_the_extremes_that_hung_or_crashed_before(cproject, path, value, figures):
    cproject.write_jsonl("data/rows.jsonl", ROWS)
    overrides = _override(path, value)
    bundle = _compile_outcome(cproject, overrides, figures)
    if bundle is not None:
        _one_step(cproject, overrides, bundle, figures)


# every other single extreme: a fixed quarter of them in CI (highs and lows alternate), all of them at a raised fuzz scale
@pytest.mark.parametrize("path,value", OTHERS[1::4] if EXAMPLES == 1 else OTHERS, ids=str)
def test_each_other_extreme_compiles_and_runs_one_step_or_errs_clearly(cproject, path, value, figures):
    test_the_extremes_that_hung_or_crashed_before(cproject, path, value, figures)


@settings(max_examples=10 * EXAMPLES, deadline=None, derandomize=EXAMPLES == 1,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(chosen=st.lists(st.sampled_from(EXTREMES), min_size=1, max_size=3, unique_by=lambda e: e[0]))
def test_combined_extremes_end_in_a_bundle_or_a_clear_error(cproject, chosen, figures):
    cproject.write_jsonl("data/rows.jsonl", ROWS)
    overrides: dict = {}
    for path, value in chosen:
        overrides = deep_merge(overrides, _override(path, value))
    bundle = _compile_outcome(cproject, overrides, figures)
    if bundle is not None:
        _one_step(cproject, overrides, bundle, figures)


@pytest.mark.parametrize("overrides,needle", [
    ({"eval": {"rules": "rules.yaml", "max_new_tokens": 32768}},
     "eval.max_new_tokens: 32768 generated tokens would fill the model's 512 positions"),
    (_override(("parameterization", "rank"), 65536), "parameterization.rank: 65536 exceeds 64"),
], ids=["max-new-tokens-past-the-model-positions", "lora-rank-past-the-adapted-matrix"])
def test_extremes_that_validated_then_hung_are_refused_at_compile(cproject, overrides, needle):
    cproject.write_jsonl("data/rows.jsonl", ROWS)
    (cproject.root / "rules.yaml").write_text(RULES, encoding="utf-8")
    with pytest.raises(SftcError) as err:
        cproject.compile(deep_merge(base_spec(split={"eval_fraction": 0.2}), overrides), force=True)
    assert needle in str(err.value) and ("at most" in str(err.value) or "below" in str(err.value)), str(err.value)
