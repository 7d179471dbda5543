"""Every spec the project ships parses, and its rules file (if any) loads: a config that rots
in specs/ fails here, not in someone's first run."""

from pathlib import Path

import pytest

from sftc.compiler.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "specs").rglob("*.yaml"))


def test_specs_are_shipped():
    assert len(SPECS) >= 4


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_spec_loads(path):
    spec = load_spec(path)
    assert spec.name in path.stem or path.parent.name == "examples"
    if spec.eval.rules:
        from sftc.runtime.evaluate import load_rules

        rules = load_rules(REPO / spec.eval.rules)
        for metric in spec.select.require:
            assert metric in rules.metric_names
        if spec.select.maximize:
            assert spec.select.maximize in rules.metric_names
