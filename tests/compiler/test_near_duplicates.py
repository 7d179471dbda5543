"""Near copies across groups cannot straddle the split: they are merged and land on one side."""

from __future__ import annotations

import pytest

from sftc.compiler.data import Example
from sftc.compiler.split import iter_near_duplicates, near_duplicate_pairs, shingles, split_examples
from sftc.compiler.spec import SplitSpec

from .conftest import base_spec, bundle_tokenizer, load_tokens, read_jsonl, segments

BASE = (
    "We found a stale access key belonging to Victor Haddad in the Workday tenant and it has not "
    "been used for one hundred and eighty seven days while the owner says it is still needed for the "
    "quarterly payroll export that runs on the first business day of every month from the finance "
    "reporting server in the primary data centre"
)
NEAR = BASE.replace("Victor", "Lucas")  # one word changed
UNRELATED = [
    "A contractor asks for a login to the data warehouse without a signed contract or a ticket",
    "The reviewer ignored the access review campaign for fifteen days and nobody answered",
    "A service account token was committed to a public repository this morning by mistake",
    "Someone wants a shared admin password for the payments cluster to speed up deployments",
    "An employee left last week but their VPN account still shows logins from home",
]


def _jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_fixture_prompts_are_near_but_not_exact_copies():
    assert BASE != NEAR
    assert 0.85 <= _jaccard(BASE, NEAR) < 1.0
    assert all(_jaccard(BASE, u) < 0.2 for u in UNRELATED)


def _spec(**split):
    # the near-copy prompts are long for the tiny tokenizer: leave room so nothing is truncated
    return base_spec(split=split, tokenize={"max_length": 512}, packing={"seq_length": 512})


def _rows():
    rows = [
        {"thread_id": "A100", "prompt": BASE, "completion": "Keep the key with an exception ticket."},
        {"thread_id": "B200", "prompt": NEAR, "completion": "Keep the key with an approved exception."},
    ]
    rows += [{"thread_id": f"U{i}", "prompt": p, "completion": f"Answer {i}."} for i, p in enumerate(UNRELATED)]
    return rows


@pytest.mark.parametrize("held_out", ["A100", "B200"])
def test_near_duplicate_groups_follow_an_explicit_held_out_group(project, held_out):
    project.write_jsonl("data/rows.jsonl", _rows())
    bundle, lock, _ = project.compile(_spec(eval_groups=[held_out]))
    assert read_jsonl(bundle / "rejects.jsonl") == []
    split = lock.split.model_dump(mode="json")
    assert split["merged_near_duplicates"] == [["A100", "B200"]]
    assert split["eval_groups"] == ["A100", "B200"]  # the near copy follows its twin to eval
    assert set(split["train_groups"]) == {f"U{i}" for i in range(len(UNRELATED))}
    assert set(split["train_groups"]).isdisjoint(split["eval_groups"])
    assert split["disjoint"] is True

    # and the token files agree: no train row contains either near copy
    tokenizer = bundle_tokenizer(bundle, lock)
    train_text = [tokenizer.decode(ids.tolist()) for _, ids, _ in segments(load_tokens(bundle))]
    assert len(train_text) == len(UNRELATED)
    assert not any("Workday tenant" in text for text in train_text)
    assert sorted(p["group"] for p in read_jsonl(bundle / "eval_prompts.jsonl")) == ["A100", "B200"]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_near_duplicate_groups_share_a_side_under_hashing(project, seed):
    project.write_jsonl("data/rows.jsonl", _rows())
    _, lock, _ = project.compile(_spec(eval_fraction=0.5, seed=seed))
    split = lock.split.model_dump(mode="json")
    assert ["A100", "B200"] in split["merged_near_duplicates"]
    assert ({"A100", "B200"} <= set(split["train_groups"])) or ({"A100", "B200"} <= set(split["eval_groups"]))
    assert set(split["train_groups"]).isdisjoint(split["eval_groups"])
    assert set(split["train_groups"]) | set(split["eval_groups"]) == {r["thread_id"] for r in _rows()}


def test_near_duplicate_merge_can_be_turned_off(project):
    project.write_jsonl("data/rows.jsonl", _rows())
    _, lock, _ = project.compile(_spec(eval_groups=["A100"], near_duplicates=None))
    assert lock.split.merged_near_duplicates == []
    assert lock.split.eval_groups == ["A100"]
    assert "B200" in lock.split.train_groups


def _example(group: str, prompt: str) -> Example:
    return Example("f", 0, group, {}, messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": "x"}])


def test_split_examples_merges_transitively_and_stays_disjoint():
    # C is a near copy of B, B of A: all three are one cluster even if A and C are further apart
    a = BASE
    b = BASE.replace("Victor", "Lucas")
    c = b.replace("payroll", "payments")
    examples = [_example("A", a), _example("B", b), _example("C", c)]
    examples += [_example(f"U{i}", p) for i, p in enumerate(UNRELATED)]
    result = split_examples(examples, SplitSpec(eval_groups=["C"]))
    assert result.record["merged_near_duplicates"] == [["A", "B", "C"]]
    assert result.record["eval_groups"] == ["A", "B", "C"]
    assert {e.group for e in result.train}.isdisjoint({e.group for e in result.eval})


def test_near_duplicate_pairs_finds_the_pair_and_nothing_else():
    texts = [BASE, *UNRELATED, NEAR]
    assert near_duplicate_pairs(texts, 0.85) == [(0, len(texts) - 1)]


def test_skipping_pairs_inside_merged_groups_gives_the_components_of_every_pair():
    """split_examples skips candidate pairs (and whole buckets) already inside one merged group;
    its clusters must equal the connected components over every near-duplicate pair."""
    import random

    rng = random.Random(5)
    names = ["Victor", "Lucas", "Maya", "Ines", "Omar", "Kenji", "Ana", "Lena"]
    families = [BASE, *[(u + " ") * 4 for u in UNRELATED]]
    examples = []
    for i in range(160):
        text = rng.choice(families)
        for name in rng.sample(names, 2):  # one or two words changed: near, not exact, copies
            text = text.replace(rng.choice(text.split()), name, 1)
        examples.append(_example(f"G{rng.randrange(60)}", text))

    result = split_examples(examples, SplitSpec(eval_fraction=0.3, seed=3, near_duplicates=0.8))
    parent = {e.group: e.group for e in examples}

    def find(g):
        while parent[g] != g:
            g = parent[g]
        return g

    for left, right in near_duplicate_pairs([e.messages[0]["content"] for e in examples], 0.8):
        a, b = find(examples[left].group), find(examples[right].group)
        parent[max(a, b)] = min(a, b)
    expected = {}
    for g in parent:
        expected.setdefault(find(g), []).append(g)
    expected = sorted(sorted(m) for m in expected.values() if len(m) > 1)
    assert len(expected) >= 3 and result.record["merged_near_duplicates"] == expected


def test_pairs_inside_one_component_are_skipped_and_bridges_still_found():
    third = NEAR.replace("Workday", "Okta")
    texts = [BASE, NEAR, third, *UNRELATED]
    assert {(0, 1), (0, 2), (1, 2)} <= set(near_duplicate_pairs(texts, 0.8))
    merged = {0: "x", 1: "x"}  # rows 0 and 1 already in one group: only a pair reaching row 2 matters
    found = list(iter_near_duplicates(texts, 0.8, component=lambda i: merged.get(i, i)))
    assert found and all(2 in pair for pair in found)
    assert list(iter_near_duplicates(texts, 0.8, component=lambda i: "x")) == []


def _components(groups: list[str], pairs) -> list[list[str]]:
    parent = {g: g for g in groups}

    def find(g):
        while parent[g] != g:
            g = parent[g]
        return g

    for left, right in pairs:
        a, b = find(groups[left]), find(groups[right])
        parent[max(a, b)] = min(a, b)
    out: dict[str, list[str]] = {}
    for g in sorted(set(groups)):
        out.setdefault(find(g), []).append(g)
    return sorted(m for m in out.values() if len(m) > 1)


def test_exact_copies_merge_by_hashing_without_minhash():
    # the same normalised text (case and punctuation differ) in three groups, plus unrelated rows
    texts = [BASE, BASE.upper(), BASE.replace(" ", ", "), NEAR, *UNRELATED, UNRELATED[0].lower() + "!"]
    groups = ["A", "B", "C", "D", *[f"U{i}" for i in range(len(UNRELATED))], "V"]
    examples = [_example(g, t) for g, t in zip(groups, texts)]
    result = split_examples(examples, SplitSpec(eval_fraction=0.3, seed=1, near_duplicates=0.85))
    search = result.near_duplicate_search
    assert search["exact_duplicates"] == 3 and search["lsh_rows"] == len(texts) - 3
    assert result.record["merged_near_duplicates"] == _components(groups, near_duplicate_pairs(texts, 0.85))
    assert result.record["merged_near_duplicates"] == [["A", "B", "C", "D"], ["U0", "V"]]


def _row_number_copies(n: int) -> list[str]:
    # issue 17's duplicate-heavy shape: one prompt repeated with the row number appended
    return [f"{BASE} {i}" for i in range(n)]


def test_a_bucket_of_near_copies_costs_linear_checks_and_merges_the_same():
    texts = _row_number_copies(240)
    groups = [f"G{i // 3:03d}" for i in range(len(texts))]  # 80 groups of 3 rows
    result = split_examples([_example(g, t) for g, t in zip(groups, texts)],
                            SplitSpec(eval_fraction=0.3, seed=2, near_duplicates=0.85))
    assert result.record["merged_near_duplicates"] == _components(groups, near_duplicate_pairs(texts, 0.85))
    assert result.record["merged_near_duplicates"] == [sorted(set(groups))]
    # every pair of a bucket would be up to 28,680 checks; a row that joins the first component it
    # is compared with costs one, and the other 15 bands' buckets are then inside one component
    search = result.near_duplicate_search
    assert search["largest_bucket"] >= len(texts) // 2 and search["comparisons"] <= len(texts)
    assert search["capped_buckets"] == 0


def test_the_per_bucket_cap_bounds_the_work_and_says_so():
    # near copies under a threshold none of them reaches: no merge, every bucket all-to-all
    texts = _row_number_copies(60)
    merged = {}
    stats: dict = {}
    found = list(iter_near_duplicates(texts, 0.99, component=lambda i: merged.get(i, i),
                                      max_comparisons_per_bucket=25, stats=stats))
    assert found == []
    assert stats["capped_buckets"] >= 1 and stats["rows_unchecked_by_cap"] > 0
    assert stats["comparisons"] <= 25 * stats["candidate_buckets"]
    uncapped: dict = {}
    assert list(iter_near_duplicates(texts, 0.99, component=lambda i: i, stats=uncapped)) == []
    assert uncapped["capped_buckets"] == 0 and uncapped["comparisons"] > stats["comparisons"]
