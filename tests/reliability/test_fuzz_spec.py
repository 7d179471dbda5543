"""Specs fuzzed with hypothesis: whatever the text, loading gives a valid Spec or an SftcError
(a message for a person), never another exception, and a valid Spec can be hashed into a bundle id.

Found by these tests and fixed in compiler/spec.py: a complex YAML key (`? [a] : 1`) raised a bare
TypeError, deep nesting (`[[[[...`) a RecursionError, and a few lines of aliases ("billion laughs")
made pydantic walk 10^7+ values.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftc.compiler.spec import Spec, canonical_spec, load_spec_text, parse_spec
from sftc.errors import SftcError
from sftc.io import canonical_json

from tests.compiler.conftest import base_spec

EXAMPLES = int(os.environ.get("SFTC_FUZZ_EXAMPLES", "1"))  # scripts/reliability_report.py --fuzz-scale
SETTINGS = settings(max_examples=200 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELD_NAMES = sorted({
    *Spec.model_fields, "kind", "rank", "alpha", "dropout", "path", "dtype", "files", "format", "fields", "group",
    "lr", "epochs", "max_steps", "every_steps", "per_device", "grad_accum", "seq_length", "strategy", "chat",
    "rules", "require", "maximize", "tie_break", "minimize", "trust_remote_code", "allow_external_paths",
})

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(10**40), max_value=10**40),  # huge values
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.text(alphabet=st.characters(min_codepoint=0x80), max_size=20),  # unicode
    st.sampled_from(["full", "lora", "qlora", "sft", "text", "bfd", "wrapped", "cosine", "1e400", "-0", ">= 0.5"]),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=12), st.integers(-5, 5), st.booleans())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)


def _outcome(load) -> str:
    """Run a load; 'spec' or 'error', and a valid Spec must survive the bundle-hash path."""
    try:
        spec = load()
    except SftcError as exc:
        assert str(exc).strip(), "an SftcError with no message"
        return "error"
    assert isinstance(spec, Spec)
    canonical_json(canonical_spec(spec))  # what the bundle hash is computed from
    return "spec"


@SETTINGS
@given(text=st.text(max_size=400))
def test_arbitrary_text(text, figures):
    figures["inputs_tried"] += 1
    figures["inputs_tried_spec"] += 1
    _outcome(lambda: load_spec_text(text, "fuzz.yaml"))


@SETTINGS
@given(raw=values)
def test_arbitrary_structures_through_yaml_and_directly(raw, figures):
    figures["inputs_tried"] += 2
    figures["inputs_tried_spec"] += 2
    _outcome(lambda: parse_spec(raw, "fuzz"))
    text = yaml.safe_dump(raw, allow_unicode=True)
    _outcome(lambda: load_spec_text(text, "fuzz.yaml"))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, prefix + (key,))


VALID = base_spec()
PATHS = [p for p in _paths(VALID) if p]


@SETTINGS
@given(path=st.sampled_from(PATHS), action=st.sampled_from(["set", "delete", "add"]), value=values,
       extra_key=st.text(min_size=1, max_size=10))
def test_mutations_of_a_valid_spec(path, action, value, extra_key, figures):
    """One change to a spec that compiles: random value, deleted key, or an unknown key added."""
    figures["inputs_tried"] += 1
    figures["inputs_tried_spec"] += 1
    spec = copy.deepcopy(VALID)
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    if action == "set":
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent.get(path[-1]), dict):
        parent[path[-1]][extra_key] = value
    else:
        parent[extra_key] = value
    result = _outcome(lambda: parse_spec(spec, "fuzz"))
    if action == "add" and extra_key not in Spec.model_fields and parent is spec:
        assert result == "error", f"unknown top-level key {extra_key!r} was accepted"


def test_the_unmodified_spec_is_valid():
    # the fuzzed mutations above start from something that parses, or they prove nothing
    assert isinstance(parse_spec(copy.deepcopy(VALID), "base"), Spec)


def _laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nname: t\n"


@pytest.mark.parametrize("text,needle", [
    ("? [a, b]\n: 1\n", "found a list key"),
    ("[" * 5000, "nested more than 64"),
    ("{a: " * 3000, "nested more than 64"),
    ("- " * 3000, "nested more than 64"),
    ("name: " + "[" * 100 + "]" * 100, "nested more than"),
    (_laughs(9), "more than 100000 values"),  # 10^9 values if expanded
    ("name: \x00\n", "not valid YAML"),
    ("\ufeffname: t\n", "problem(s)"),
    ("name: !!binary aGVsbG8=\n", "problem(s)"),
    ("lr: 1e400\n", "problem(s)"),
], ids=["complex-key", "deep-list", "deep-map", "deep-seq", "deep-value", "billion-laughs", "nul", "bom",
        "binary-tag", "overflow-float"])
def test_hand_written_nasty_specs(text, needle, figures):
    figures["inputs_tried"] += 1
    figures["inputs_tried_spec"] += 1
    with pytest.raises(SftcError) as err:
        load_spec_text(text, "nasty.yaml")
    assert needle in str(err.value), str(err.value)
    assert "nasty.yaml" in str(err.value)


def test_nan_and_inf_are_refused_where_they_would_poison_the_run():
    # `epochs: .inf` used to pass gt=0 and crash the budget pass with OverflowError
    for key, section in (("lr", "optimizer"), ("epochs", "schedule"), ("eval_fraction", "split")):
        for value in (math.nan, math.inf):
            with pytest.raises(SftcError) as err:
                parse_spec(base_spec(**{section: {key: value}}), "s")
            assert f"{section}.{key}" in str(err.value)
