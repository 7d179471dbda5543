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


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_spec_passes_the_json_schema(path):
    """What `sftc schema` prints is what editors validate against: it must accept every spec
    sftc accepts (a mapping `select.tie_break` was flagged by the schema while sftc took it)."""
    import jsonschema
    import yaml

    from sftc.compiler.spec import json_schema

    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(json_schema()).iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def test_tie_break_mapping_and_list_canonicalize_alike():
    """The schema's widened tie_break type must not change what the lock records."""
    from sftc.compiler.spec import canonical_spec, load_spec_text

    text = (REPO / "specs/access-policy-lora.yaml").read_text()
    spec = load_spec_text(text, "lora")
    assert canonical_spec(spec)["select"]["tie_break"] == [{"minimize": "eval_loss", "maximize": None}]
