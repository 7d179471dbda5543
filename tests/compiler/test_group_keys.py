"""Group keys that differ only in spelling are one group (issue 14, found on real data): on
OrgAccess medium grouped by user_role, `Risk Manager` (train) and `Risk_Manager` (eval) put eval
rows next to their own role in train."""

from __future__ import annotations

import random

import pytest

from sftc.compiler.data import Example
from sftc.compiler.spec import SplitSpec
import sftc.compiler.split as split_module
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


def _near_identical_reference(keys, same_cluster):
    """The search as first written: a dict of every variant string (~3 KB a key, issue 17)."""
    buckets = {}
    for key in keys:
        norm = normalized_group_key(key)
        if len(norm) < 4 or len(norm) > 256:
            continue
        for variant in {norm} | {norm[:i] + norm[i + 1:] for i, ch in enumerate(norm) if not ch.isdigit()}:
            buckets.setdefault(variant, []).append(key)
    pairs = set()
    for members in buckets.values():
        if 2 <= len(members) <= 64:
            for i, left in enumerate(members):
                for right in members[i + 1:]:
                    if left != right and not same_cluster(left, right):
                        pairs.add(tuple(sorted((left, right))))
    ordered = sorted(pairs)
    return [list(p) for p in ordered[:split_module.MAX_NEAR_IDENTICAL_REPORTED]], len(ordered)


def _typo_keys(rng: random.Random, n: int) -> list[str]:
    """Keys with typos of each other, spelling variants, digits, a naming scheme shared by more than
    64 keys (`role a1` ... differ only by a deleted letter) and keys too short to count."""
    words = ["finance", "lead", "risk", "manager", "auditor", "ops", "cloud", "dba", "hr", "team"]
    keys = set()
    while len(keys) < n:
        key = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) + rng.choice(["", "", " 1", "_2", "-x"])
        if rng.random() < 0.4:  # one edit
            i = rng.randrange(len(key))
            key = rng.choice([key[:i] + key[i + 1:], key[:i] + rng.choice("aeiou") + key[i:],
                              key[:i] + rng.choice("xyz") + key[i + 1:], key[:i] + key[i + 1:i + 2] + key[i:i + 1] + key[i + 2:]])
        keys.add(key)
        if rng.random() < 0.1:
            keys.add(key.upper().replace(" ", "_"))  # the same key in another spelling: every variant shared
    letters = "abcdefghijklmnopqrstuvwxyz"
    # 78 keys one insertion away from `scheme`: a variant shared by more than 64 keys is passed over
    keys |= {f"scheme{c}" for c in letters} | {f"{c}scheme" for c in letters} | {f"sch{c}eme" for c in letters}
    return sorted(keys)


@pytest.mark.parametrize("variant_hash", [hash, lambda v: len(v) % 3], ids=["str-hash", "colliding-hash"])
@pytest.mark.parametrize("spilled", [False, True])
def test_near_identical_search_in_bounded_memory_equals_the_dict_of_every_variant(tmp_path, monkeypatch,
                                                                                  variant_hash, spilled):
    # partitions of a few hundred entries, so the spilled search really spreads over several files
    monkeypatch.setattr(split_module, "VARIANTS_PER_PARTITION", 300)
    monkeypatch.setattr(split_module, "MAX_NEAR_IDENTICAL_REPORTED", 10**6)  # compare every pair
    rng = random.Random(7)
    keys = _typo_keys(rng, 600)
    same = lambda a, b: (len(a) + len(b)) % 5 == 0  # some pairs already in one cluster
    got = near_identical_keys(keys, same, spill_dir=tmp_path if spilled else None, variant_hash=variant_hash)
    expected = _near_identical_reference(keys, same)
    assert got == expected
    assert expected[1] > 50  # the keys do have typos of each other to find
    pairs = {tuple(p) for p in _near_identical_reference(keys, lambda a, b: False)[0]}
    assert ("schemea", "schemeb") not in pairs and ("schemea", "schemeb") not in {tuple(p) for p in got[0]}
    assert not list(tmp_path.iterdir())  # the partitions' files are gone
