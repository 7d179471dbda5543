"""One strict YAML loader (sftc/yaml.py) for specs and rules files, fuzzed the same way for both.

Before it, the rules-file loader was a weaker copy: `? [a, b]\\n: 1` was a TypeError and 5000-deep
`[` a RecursionError. Every input must end in a parsed value or an SftcError naming the file.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftc.compiler.spec import load_spec, load_spec_text
from sftc.errors import SftcError, SpecError
from sftc.runtime.evaluate import RulesError, load_rules, load_rules_text

VALID_RULES = """version: 1
parse: json
checks:
  - name: valid_json
    kind: json_valid
metrics:
  format_pass_rate: [valid_json]
"""

NASTY = [
    ("? [a, b]\n: 1\n", "found a list key", 1),
    ("? {a: 1}\n: 1\n", "found a mapping key", 1),
    ("1: a\n", "found a int key", 1),
    ("on: a\n", "found a bool key", 1),
    ("~: a\n", "found a null key", 1),
    ("[" * 5000, "nested more than 64", 1),
    ("{a: " * 3000, "nested more than 64", 1),
    ("- " * 3000, "nested more than 64", 1),
    ("version: 1\nversion: 2\n", "duplicate key 'version'", 2),
    ("a: &x [1]\nb: &y [*x, *x, *x, *x, *x, *x, *x, *x, *x, *x]\n" + "".join(
        f"c{i}: &c{i} [" + ", ".join([f"*{'y' if i == 0 else f'c{i - 1}'}"] * 10) + "]\n" for i in range(6)),
     "more than 100000 values", None),
    ("a: !!python/object/apply:os.system [echo]\n", "not valid YAML", 1),
    ("x: " + "y" * (1 << 20) + "\n", "at most", None),
]


@pytest.mark.parametrize("text,needle,line", NASTY, ids=[
    "list-key", "map-key", "int-key", "bool-key", "null-key", "deep-list", "deep-map", "deep-seq", "duplicate",
    "laughs", "python-tag", "too-big"])
@pytest.mark.parametrize("loader", ["spec", "rules"])
def test_specs_and_rules_files_share_every_guard(text, needle, line, loader, figures):
    figures["inputs_tried"] += 1
    figures["inputs_tried_yaml"] += 1
    load, error = (load_spec_text, SpecError) if loader == "spec" else (load_rules_text, RulesError)
    with pytest.raises(error) as err:
        load(text, "nasty.yaml")
    message = str(err.value)
    assert needle in message and "nasty.yaml" in message, message
    if line is not None:
        assert f"line {line}" in message, message


@pytest.mark.parametrize("loader", [load_spec, load_rules])
def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path, loader):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"version: 1\nparse: json\nchecks: \xff\xfe\n")
    with pytest.raises(SftcError, match=r"bad\.yaml: line 3: .*not UTF-8"):
        loader(path)


def test_the_valid_rules_file_loads():
    # the mutations below start from something that parses, or they prove nothing
    assert load_rules_text(VALID_RULES, "ok.yaml").metric_names == ["format_pass_rate"]


EXAMPLES = int(os.environ.get("SFTC_FUZZ_EXAMPLES", "1"))  # scripts/reliability_report.py --fuzz-scale
yaml_noise = st.text(alphabet=st.sampled_from(list("[]{}:-?&*!|>'\"#,\n abc01~")), max_size=300)


@settings(max_examples=300 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(yaml_noise, st.text(max_size=300)),
       cut=st.integers(0, len(VALID_RULES)), insert=st.text(max_size=30))
def test_fuzzed_rules_files_end_in_rules_or_a_clear_error(text, cut, insert, figures):
    for candidate in (text, VALID_RULES[:cut] + insert + VALID_RULES[cut:]):
        figures["inputs_tried"] += 1
        figures["inputs_tried_rules"] += 1
        started = time.monotonic()
        try:
            load_rules_text(candidate, "fuzz.yaml")
        except RulesError as exc:
            assert "fuzz.yaml" in str(exc)
        assert time.monotonic() - started < 5, "a rules file took more than 5 s to load or refuse"


@pytest.mark.parametrize("loader", [load_spec, load_rules])
def test_a_fifo_is_refused_instead_of_blocking_the_read(tmp_path, loader):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SftcError, match="not a regular file"):
        loader(fifo)
