"""Group keys that differ only in spelling are one group (issue 14, found on real data): on
OrgAccess medium grouped by user_role, `Risk Manager` (train) and `Risk_Manager` (eval) put eval
rows next to their own role in train."""

from __future__ import annotations

import pytest

from sftc.compiler.data import Example
from sftc.compiler.spec import SplitSpec
from sftc.compiler.split import near_identical_keys, normalized_group_key, split_examples

from .conftest import external_path


def _examples(pairs):
    return [Example("rows.jsonl", i, group, {}, messages=[{"role": "user", "content": text},
                                                          {"role": "assistant", "content": "ok"}])
            for i, (group, text) in enumerate(pairs)]


def _straddling(result) -> list[str]:
    train = {normalized_group_key(e.group) for e in result.train}
    return sorted({normalized_group_key(e.group) for e in result.eval} & train)


@pytest.fixture(scope="module")
def orgaccess_medium():
    import pyarrow.parquet as pq

    rows = pq.read_table(external_path("datasets", "orgaccess", "medium-00000-of-00001.parquet"),
                         columns=["user_role", "query"]).to_pylist()
    return _examples([(r["user_role"], r["query"]) for r in rows])


def test_spellings_of_one_role_never_straddle_the_split(orgaccess_medium):
    before = split_examples(orgaccess_medium, SplitSpec(eval_fraction=0.15, seed=13, near_duplicates=None,
                                                        normalize_group_keys=False))
    assert _straddling(before), "the data no longer shows the problem; the test would prove nothing"
    after = split_examples(orgaccess_medium, SplitSpec(eval_fraction=0.15, seed=13, near_duplicates=None))
    assert _straddling(after) == []
    record = after.record
    assert record["group_keys_normalized"] is True
    assert ["Risk Manager", "Risk_Manager"] in record["merged_group_spellings"]
    assert ["Senior Manager - Engineering", "Senior Manager Engineering", "Senior_Manager_Engineering"] \
        in record["merged_group_spellings"]
    # spelling merges are not reported as near-duplicate prompt merges
    assert record["merged_near_duplicates"] == []


def test_normalisation_off_keeps_keys_as_written():
    examples = _examples([("Risk Manager", "a b c d"), ("Risk_Manager", "e f g h"), ("Auditor", "i j k l")])
    record = split_examples(examples, SplitSpec(eval_fraction=0.5, near_duplicates=None,
                                                normalize_group_keys=False)).record
    assert record["merged_group_spellings"] == [] and record["group_keys_normalized"] is False


def test_near_identical_keys_that_remain_are_reported_not_merged():
    examples = _examples([("Risk Manager", "a b c d"), ("Risk Manger", "e f g h"), ("T101", "i j k l"),
                          ("T102", "m n o p"), ("Auditor", "q r s t")])
    record = split_examples(examples, SplitSpec(eval_fraction=0.5, near_duplicates=None)).record
    assert record["near_identical_groups"] == [["Risk Manager", "Risk Manger"]]
    assert record["near_identical_group_pairs"] == 1
    assert record["merged_group_spellings"] == []


def test_near_identical_search_finds_one_edit_and_ignores_digits():
    keys = ["Finance Lead", "Finance Leed", "Finance Leads", "Fniance Lead", "Team 1", "Team 2", "Sales"]
    pairs, count = near_identical_keys(keys, lambda a, b: False)
    assert ["Finance Lead", "Finance Leed"] in pairs and ["Finance Lead", "Finance Leads"] in pairs
    assert ["Finance Lead", "Fniance Lead"] in pairs
    assert not any("Team 1" in p for p in pairs)
    assert count == len(pairs)
