"""Pass 3: the held-out split, by group, provably disjoint.

Rows are never split one by one: several messages of one incident share facts and phrasing,
so a random row split lets training imitate evaluation. Each group's side is a pure function
of (seed, group key). Before that, groups whose prompts are near copies of each other are
merged, so a near copy cannot straddle the split.

Near-duplicate search is MinHash over word 3-shingles with LSH banding (candidates), then an
exact Jaccard check on each candidate pair: O(n) instead of comparing every pair, which at
38k rows would be 700M comparisons.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from sftc.compiler.data import Example
from sftc.errors import DataError

_WORD = re.compile(r"[a-z0-9]+")
_PERMUTATIONS = 64
_BANDS = 16  # 16 bands x 4 rows: pairs above ~0.5 Jaccard become candidates; the exact check decides
_MERSENNE = np.uint64((1 << 61) - 1)


def normalized_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, size: int = 3) -> set[str]:
    words = normalized_words(text)
    if len(words) < size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 3


def prompt_text(example: Example) -> str:
    """The part of a row that identifies the case: its user turns (or the raw text)."""
    if example.text is not None:
        return example.text
    return "\n".join(m["content"] for m in example.messages or [] if m["role"] == "user")


class _UnionFind:
    def __init__(self, items):
        self.parent = {item: item for item in items}

    def find(self, item):
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller key becomes the root so the result does not depend on visit order
            low, high = sorted((ra, rb))
            self.parent[high] = low


def near_duplicate_pairs(texts: list[str], threshold: float, seed: int = 0) -> list[tuple[int, int]]:
    """Index pairs whose word-shingle Jaccard similarity is >= threshold."""
    return sorted(set(iter_near_duplicates(texts, threshold, seed)))


def iter_near_duplicates(texts: list[str], threshold: float, seed: int = 0, component=None):
    """Yield near-duplicate index pairs as they are found.

    `component(i)` may name the merged group row i is in now; a candidate pair inside one
    component cannot change the split, so it skips the exact check, and a bucket whose members are
    all in one component is skipped whole. Lazily yielded so the caller's merges are visible at
    once. Skipping only ever drops an edge inside a connected component, so the components come
    out the same as from every pair (tests/compiler/test_near_duplicates.py). On OrgAccess (38k rows,
    thousands per group) almost all of the 6.4M candidate pairs fall in such buckets.
    """
    sets = [shingles(t) for t in texts]
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_MERSENNE), size=_PERMUTATIONS, dtype=np.uint64)
    b = rng.integers(0, int(_MERSENNE), size=_PERMUTATIONS, dtype=np.uint64)
    rows_per_band = _PERMUTATIONS // _BANDS
    buckets: dict[tuple, list[int]] = {}
    for index, items in enumerate(sets):
        if not items:
            continue
        hashes = np.fromiter((_stable_hash(s) for s in items), dtype=np.uint64, count=len(items))
        # (a*h + b) mod p with wraparound: a universal-hash family is all MinHash needs here
        signature = ((hashes[:, None] * a[None, :] + b[None, :]) % _MERSENNE).min(axis=0)
        for band in range(_BANDS):
            key = (band, signature[band * rows_per_band : (band + 1) * rows_per_band].tobytes())
            buckets.setdefault(key, []).append(index)
    pairs = set()
    for members in buckets.values():
        if len(members) < 2:
            continue
        if component is not None and len({component(m) for m in members}) == 1:
            continue
        for i, left in enumerate(members):
            for right in members[i + 1 :]:
                if (left, right) in pairs or (component is not None and component(left) == component(right)):
                    continue
                inter = len(sets[left] & sets[right])
                if inter / len(sets[left] | sets[right]) >= threshold:
                    pairs.add((left, right))
                    yield left, right


def side_of(group: str, seed: int, eval_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


@dataclass
class SplitResult:
    train: list[Example]
    eval: list[Example]
    record: dict


def split_examples(examples: list[Example], split_spec) -> SplitResult:
    groups = sorted({e.group for e in examples})
    union = _UnionFind(groups)
    if split_spec.near_duplicates is not None:
        texts = [prompt_text(e) for e in examples]
        def component(i: int) -> str:
            return union.find(examples[i].group)

        for left, right in iter_near_duplicates(texts, split_spec.near_duplicates, split_spec.seed, component=component):
            union.union(examples[left].group, examples[right].group)
    clusters: dict[str, list[str]] = {}
    for group in groups:
        clusters.setdefault(union.find(group), []).append(group)

    if split_spec.eval_groups is not None:
        wanted = set(split_spec.eval_groups)
        unknown = sorted(wanted - set(groups))
        if unknown:
            # a typo here would silently shrink (or empty) the held-out set
            raise DataError(
                f"split.eval_groups: {unknown[:10]} {'is' if len(unknown) == 1 else 'are'} not the group of any "
                f"accepted row ({len(groups)} groups, e.g. {groups[:5]})"
            )
        eval_roots = {root for root, members in clusters.items() if wanted & set(members)}
    else:
        eval_roots = {root for root in clusters if side_of(root, split_spec.seed, split_spec.eval_fraction) == "eval"}
        if split_spec.eval_fraction > 0 and not eval_roots and len(clusters) > 1:
            # a small dataset can hash every group to train; hold out the lowest-hash one so eval is never empty
            eval_roots = {min(clusters, key=lambda r: hashlib.sha256(f"{split_spec.seed}:{r}".encode()).digest())}
    if len(eval_roots) == len(clusters) and len(clusters) > 1:
        eval_roots.discard(max(eval_roots))

    eval_groups = sorted(g for root in eval_roots for g in clusters[root])
    eval_set = set(eval_groups)
    train = [e for e in examples if e.group not in eval_set]
    held = [e for e in examples if e.group in eval_set]
    train_groups = sorted({e.group for e in train})
    overlap = sorted(set(train_groups) & eval_set)
    assert not overlap, f"split bug: groups on both sides: {overlap[:5]}"
    record = {
        "by": "group",
        "seed": split_spec.seed,
        "eval_fraction": split_spec.eval_fraction,
        "near_duplicate_threshold": split_spec.near_duplicates,
        "train_groups": train_groups,
        "eval_groups": eval_groups,
        "train_rows": len(train),
        "eval_rows": len(held),
        "merged_near_duplicates": sorted(sorted(m) for m in clusters.values() if len(m) > 1),
        "disjoint": not overlap,
        "overlap": overlap,
    }
    return SplitResult(train, held, record)
