"""Pass 3: the held-out split, by group, provably disjoint.

Rows are never split one by one: several messages of one incident share facts and phrasing,
so a random row split lets training imitate evaluation. Each group's side is a pure function
of (seed, group key). Before that, groups whose prompts are near copies of each other are
merged, so a near copy cannot straddle the split.

Near-duplicate search: rows with identical shingle sets merge by hashing first; the rest go
through MinHash over word 3-shingles with LSH banding (candidates), then an exact Jaccard check
on candidate pairs that could still merge two groups, bounded per bucket (iter_near_duplicates):
about linear instead of comparing every pair, which at 38k rows would be 700M comparisons.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import tempfile
from array import array
from dataclasses import dataclass, field

import numpy as np

from sftc.compiler.data import Example
from sftc.errors import DataError

_WORD = re.compile(r"[a-z0-9]+")
_PERMUTATIONS = 64
_BANDS = 16  # 16 bands x 4 rows: pairs above ~0.5 Jaccard become candidates; the exact check decides
_MERSENNE = np.uint64((1 << 61) - 1)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: an odd multiplier that spreads bits
# Exact Jaccard checks per LSH bucket before it is left unfinished (see iter_near_duplicates): at
# ~10 us a check, about 0.2 s for one pathological bucket. On OrgAccess easy it is reached in 5 of
# 47k buckets (rows sharing a permissions list, not near copies) with the same clusters as uncapped.
MAX_COMPARISONS_PER_BUCKET = 20_000


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
    _, messages, text = example.content  # one read when the content is on disk
    if text is not None:
        return text
    return "\n".join(m["content"] for m in messages or [] if m["role"] == "user")


class _PromptTexts:
    """The rows' prompt texts, read when needed: never all held at once (issue 17)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> str:
        return prompt_text(self.examples[i])


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
    """Index pairs whose word-shingle Jaccard similarity is >= threshold, among LSH candidates:
    every candidate pair is checked (quadratic per bucket), the reference split_examples's
    shortcuts are tested against."""
    return sorted(set(iter_near_duplicates(texts, threshold, seed)))


def _shingle_hashes(text: str) -> np.ndarray:
    """A row's shingle set as sorted unique 61-bit hashes: what MinHash hashes anyway, and ~10x
    smaller than the set of shingle strings (which was most of the compile's per-row memory)."""
    items = shingles(text)
    return np.unique(np.fromiter((_stable_hash(s) for s in items), dtype=np.uint64, count=len(items)))


class _Shingles:
    """Every row's sorted shingle hashes, appended in one flat sequence with offsets: one object for
    n rows instead of n Python sets (or n numpy arrays, ~100 bytes of header each).

    With a `directory` the hashes go to an unlinked file there and a check reads its two rows back
    with pread (issue 17): only candidate pairs are ever read, and the flat hashes (~0.6 KB a row)
    were the largest thing the compile held. Without one they stay in memory (small inputs, tests)."""

    def __init__(self, directory=None):
        self._offsets = array("q", [0])
        self._file = tempfile.TemporaryFile(dir=directory) if directory is not None else None
        self._flat = array("Q")

    def extend(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Append rows whose hashes are `flat`, one after another, `sizes` of them each."""
        data = np.ascontiguousarray(flat, dtype=np.uint64).tobytes()
        if self._file is not None:
            self._file.write(data)
        else:
            self._flat.frombytes(data)
        self._offsets.extend((self._offsets[-1] + np.cumsum(sizes)).tolist())

    def freeze(self, kept: np.ndarray) -> None:
        """Keep the rows at positions `kept` (in append order), numbered 0.. in that order."""
        offsets = np.frombuffer(self._offsets, dtype=np.int64)
        self.starts, self.ends = offsets[kept], offsets[kept + 1]
        self._offsets = None
        if self._file is not None:
            self._file.flush()
        else:
            self.flat = np.frombuffer(self._flat, dtype=np.uint64)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _row(self, k: int) -> np.ndarray:
        lo, hi = int(self.starts[k]), int(self.ends[k])
        if self._file is None:
            return self.flat[lo:hi]
        return np.frombuffer(os.pread(self._file.fileno(), (hi - lo) * 8, lo * 8), dtype=np.uint64)

    def size(self, k: int) -> int:
        return int(self.ends[k] - self.starts[k])

    def jaccard_at_least(self, i: int, j: int, threshold: float) -> bool:
        si, sj = self.size(i), self.size(j)
        if min(si, sj) < threshold * max(si, sj):  # |A & B| / |A | B| <= min/max: exact, no intersection needed
            return False
        inter = len(np.intersect1d(self._row(i), self._row(j), assume_unique=True))
        return inter / (si + sj - inter) >= threshold


def _band_keys(signatures: np.ndarray) -> np.ndarray:
    """One 64-bit key per LSH band (rows x bands) from the MinHash signatures (rows x permutations).

    Rows agree on a band exactly when their band's values are equal; a key mixes them into one
    word, so each row holds 16 words instead of 64 (issue 17). Two unequal bands sharing a key
    (about 2^-64 a pair) only add a candidate: the exact Jaccard check decides every pair."""
    rows_per_band = _PERMUTATIONS // _BANDS
    bands = signatures.reshape(len(signatures), _BANDS, rows_per_band)
    key = np.zeros((len(signatures), _BANDS), dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        for column in range(rows_per_band):
            key = (key ^ bands[:, :, column]) * _MIX
            key ^= key >> np.uint64(31)
    return key


def _lsh_buckets(band_keys: np.ndarray):
    """Index arrays (ascending) of the rows whose keys agree on one band, band by band.

    A sort per band instead of a dict keyed by every (band, signature slice): the dict held 16
    tuples per row, a few KB of the compile's per-row memory. Buckets come in key order."""
    for band in range(band_keys.shape[1]):
        keys = band_keys[:, band]
        order = np.argsort(keys, kind="stable")  # equal keys keep ascending row order
        ordered = keys[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
        sizes = np.diff(starts)
        several = sizes > 1
        for lo, size in zip(starts[:-1][several].tolist(), sizes[several].tolist()):
            yield order[lo : lo + size]


def _first_occurrences(digests: np.ndarray) -> np.ndarray:
    """For each row, the position of the first row with the same digest (itself when first)."""
    n = len(digests)
    if not n:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), digests[:, 1], digests[:, 0]))  # by digest, then position
    ordered = digests[order]
    new = np.r_[True, np.any(ordered[1:] != ordered[:-1], axis=1)]
    first_in_run = order[np.flatnonzero(new)][np.cumsum(new) - 1]
    first = np.empty(n, dtype=np.int64)
    first[order] = first_in_run
    return first


def _hash_rows(texts, lo: int, hi: int, a: np.ndarray, b: np.ndarray):
    """Rows lo..hi: (their shingle hashes flat, the count of each row, a 16-byte digest of each
    row's shingle set as two words, each row's LSH band keys); zeros for a row without shingles."""
    flat, counts = [], np.zeros(hi - lo, dtype=np.int64)
    digests = np.zeros((hi - lo, 2), dtype=np.uint64)
    signatures = np.zeros((hi - lo, _PERMUTATIONS), dtype=np.uint64)
    for offset in range(hi - lo):
        hashes = _shingle_hashes(texts[lo + offset])
        if len(hashes):
            counts[offset] = len(hashes)
            flat.append(hashes)
            digests[offset] = np.frombuffer(hashlib.blake2b(hashes.tobytes(), digest_size=16).digest(), dtype=np.uint64)
            # (a*h + b) mod p with wraparound: a universal-hash family is all MinHash needs here
            signatures[offset] = ((hashes[:, None] * a[None, :] + b[None, :]) % _MERSENNE).min(axis=0)
    return (np.concatenate(flat) if flat else np.zeros(0, dtype=np.uint64)), counts, digests, _band_keys(signatures)


def _hash_range(k: int, inputs, a: np.ndarray, b: np.ndarray):
    lo, texts = inputs
    return (lo, *_hash_rows(texts, 0, len(texts), a, b))


def iter_near_duplicates(texts, threshold: float, seed: int = 0, component=None,
                         max_comparisons_per_bucket: int = MAX_COMPARISONS_PER_BUCKET, stats: dict | None = None,
                         workers: int = 1, spill_dir=None):
    """Yield near-duplicate index pairs as they are found.

    `texts`: a sequence (len and index) of the rows' texts. Without `component`: every LSH
    candidate pair is checked (near_duplicate_pairs).

    With `component(i)` naming the merged group row i is in now, only pairs that can still change
    the merged groups are looked for, so the components come out the same as from every pair
    (tests/compiler/test_near_duplicates.py), in about linear work:
    - rows with identical shingle sets (identical normalised text) are merged by hashing, without
      MinHash: their Jaccard is 1 and their signatures are equal, so every candidate of one is a
      candidate of the other;
    - inside an LSH bucket a row is compared with the rows of each other component only until one
      matches (it then joins that component; the rest of it cannot add a merge). On duplicate-heavy
      data a bucket of m near copies costs about m checks, not m^2/2.
    - at most `max_comparisons_per_bucket` exact checks per bucket: a bucket of many rows that are
      not near copies of each other (LSH false positives) would otherwise still cost m^2/2. A capped
      bucket can miss a merge; `stats` counts capped buckets and rows left unchecked. Lazily
      yielded so the caller's merges are visible at once.

    Memory: per row a 16-byte digest, 16 band keys and two offsets; the shingle hashes go to a file
    in `spill_dir` when one is given (see _Shingles).
    """
    stats = {} if stats is None else stats
    store = _Shingles(spill_dir)
    try:
        yield from _search(texts, threshold, seed, component, max_comparisons_per_bucket, stats, workers, store)
    finally:
        store.close()


def _search(texts, threshold, seed, component, max_comparisons_per_bucket, stats, workers, store):
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_MERSENNE), size=_PERMUTATIONS, dtype=np.uint64)
    b = rng.integers(0, int(_MERSENNE), size=_PERMUTATIONS, dtype=np.uint64)
    from sftc.compiler.workers import map_ranges

    # the rows with shingles, in row order: their index, digest and band keys (filled block by block)
    indices, digests, keys = array("q"), array("Q"), array("Q")
    # shingling, MinHash and the digests are per row (most of the pass's time): in worker processes
    # over contiguous ranges, taken back in row order, so what follows is the same for any worker count
    # on a Ray cluster: the range's texts are read here and hashed there (workers.RayCluster)
    remote = (lambda lo, hi: (lo, [texts[i] for i in range(lo, hi)]), functools.partial(_hash_range, a=a, b=b))
    for lo, flat, counts, range_digests, range_keys in map_ranges(
            lambda k, lo, hi: (lo, *_hash_rows(texts, lo, hi, a, b)), len(texts), workers, remote):
        present = np.flatnonzero(counts)
        store.extend(flat, counts[present])  # `flat` holds exactly the present rows' hashes, in order
        indices.extend((present + lo).tolist())
        digests.frombytes(np.ascontiguousarray(range_digests[present]).tobytes())
        keys.frombytes(np.ascontiguousarray(range_keys[present]).tobytes())
    indices = np.frombuffer(indices, dtype=np.int64)
    keys = np.frombuffer(keys, dtype=np.uint64).reshape(-1, _BANDS)
    if component is not None:
        # identical shingle sets: every row after the first of its set is merged with that first row
        first = _first_occurrences(np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2))
        positions = np.arange(len(first))
        kept = np.flatnonzero(first == positions)
        copies = np.flatnonzero(first != positions)
        exact_left, exact_right = indices[first[copies]], indices[copies]
    else:
        kept = np.arange(len(indices))
        exact_left = exact_right = np.zeros(0, dtype=np.int64)
    del digests
    store.freeze(kept)
    rows, keys = indices[kept], keys[kept]
    stats.update(rows=len(texts), exact_duplicates=len(exact_left), lsh_rows=len(rows), candidate_buckets=0,
                 largest_bucket=0, comparisons=0, capped_buckets=0, rows_unchecked_by_cap=0,
                 max_comparisons_per_bucket=max_comparisons_per_bucket if component is not None else None)
    for left, right in zip(exact_left.tolist(), exact_right.tolist()):
        if component(left) != component(right):
            yield left, right
    if not len(rows):
        return
    rows = rows.tolist()
    found = set()
    for members in _lsh_buckets(keys):
        stats["candidate_buckets"] += 1
        stats["largest_bucket"] = max(stats["largest_bucket"], len(members))
        members = members.tolist()
        if component is None:
            for i, left in enumerate(members):
                for right in members[i + 1 :]:
                    if (left, right) not in found:
                        stats["comparisons"] += 1
                        if store.jaccard_at_least(left, right, threshold):
                            found.add((left, right))
                            yield rows[left], rows[right]
            continue
        if len({component(rows[m]) for m in members}) == 1:
            continue
        yield from _walk_bucket(members, rows, store, threshold, component, max_comparisons_per_bucket, stats)


def _walk_bucket(members, rows, store, threshold, component, cap, stats):
    # members of this bucket seen so far, one list per component (as of when they were merged)
    parts: list[list[int]] = []
    budget = cap
    for position, x in enumerate(members):
        for part in parts:
            if component(rows[part[0]]) == component(rows[x]):
                continue  # already one component: no pair here can merge anything
            for y in part:
                if budget == 0:
                    stats["capped_buckets"] += 1
                    stats["rows_unchecked_by_cap"] += len(members) - position
                    return
                budget -= 1
                stats["comparisons"] += 1
                if store.jaccard_at_least(y, x, threshold):
                    yield rows[y], rows[x]
                    break
        # regroup by the components as they are now: merges above (or in other buckets) join parts
        by_root: dict = {}
        for part in parts:
            by_root.setdefault(component(rows[part[0]]), []).extend(part)
        by_root.setdefault(component(rows[x]), []).append(x)
        parts = list(by_root.values())


_SPELLING = re.compile(r"[\s_\-]+")
# near-identical group keys are reported, not merged: at most this many pairs go into the lock
MAX_NEAR_IDENTICAL_REPORTED = 200


def normalized_group_key(key: str) -> str:
    """The key as a person means it: case, whitespace and `_` / `-` are spelling, not identity
    (OrgAccess has `Risk Manager` and `Risk_Manager`, one role on both sides of the split)."""
    return _SPELLING.sub(" ", key.casefold()).strip()


_WHOLE = 511  # the position recorded for a key's whole normalised spelling (deletions: 0..255)


def _key_variants(key: str) -> dict[str, int]:
    """A key's normalised spelling and its one-deletion variants (never deleting a digit), each with
    the position deleted (_WHOLE: none); none for a key too short to have a typo worth naming or
    too long to be one."""
    norm = normalized_group_key(key)
    if len(norm) < 4 or len(norm) > 256:
        return {}
    variants = {norm: _WHOLE}
    for i, ch in enumerate(norm):
        if not ch.isdigit():
            variants.setdefault(norm[:i] + norm[i + 1:], i)
    return variants


def _variant(key: str, position: int) -> str:
    norm = normalized_group_key(key)
    return norm if position == _WHOLE else norm[:position] + norm[position + 1:]


# (variant hash, key) entries a partition of the near-identical key search holds at once: 32 MB
VARIANTS_PER_PARTITION = 2_000_000


def near_identical_keys(keys: list[str], same_cluster, spill_dir=None,
                        variant_hash=hash) -> tuple[list[list[str]], int]:
    """Pairs of keys one edit apart (a letter or sign inserted, deleted or replaced; two adjacent
    swapped), not in one cluster already: (up to MAX_NEAR_IDENTICAL_REPORTED pairs, how many in all).

    Keys sharing a one-deletion variant are candidates, so the work is linear in the keys' total
    length rather than quadratic in their number. An edit to a digit never counts: `T101` and
    `T102` are two threads, not a typo. A variant shared by more than 64 keys is a naming scheme,
    not a typo, and is passed over.

    Memory (issue 17): a key has about as many variants as letters, and a dict of every variant
    string held ~3 KB per key (10 GB at 3M uuid-like keys). Each variant is kept as 16 bytes instead:
    its hash, and the key's index with the position deleted (so the variant is rebuilt in one
    step), sorted so that equal hashes are adjacent; with `spill_dir` they are first spread over
    files by hash, a partition of VARIANTS_PER_PARTITION sorted at a time. Keys of one hash are
    then regrouped by the variants themselves, so a hash collision cannot make or hide a pair: the
    result is the same whatever `variant_hash` is (tests/compiler/test_group_keys.py passes one
    that collides everywhere) and the process's string-hash seed does not change it.
    """
    bound = sum(len(key) + 1 for key in keys)  # about the number of variants, without making them
    parts = max(1, -(-bound // VARIANTS_PER_PARTITION)) if spill_dir is not None else 1
    files: list = []
    buffers = [array("q") for _ in range(parts)]
    try:
        if parts > 1:
            for _ in range(parts):
                files.append(tempfile.TemporaryFile(dir=spill_dir))  # unlinked at once: nothing to leave behind
        for index, key in enumerate(keys):
            for variant, position in _key_variants(key).items():
                h = variant_hash(variant)
                buffer = buffers[h % parts]
                buffer.append(h)
                buffer.append(index << 9 | position)
                if files and len(buffer) >= 1 << 16:
                    files[h % parts].write(buffer.tobytes())
                    del buffer[:]
        pairs: set = set()
        for part in range(parts):
            if files:
                files[part].write(buffers[part].tobytes())
                buffers[part] = None
                files[part].seek(0)
                entries = np.frombuffer(files[part].read(), dtype=np.int64).reshape(-1, 2)
                files[part].close()
            else:
                entries = np.frombuffer(buffers[part], dtype=np.int64).reshape(-1, 2)
            _pairs_in(entries, keys, same_cluster, pairs)
            del entries
    finally:
        for handle in files:
            handle.close()
    ordered = sorted(pairs)
    return [list(p) for p in ordered[:MAX_NEAR_IDENTICAL_REPORTED]], len(ordered)


def _pairs_in(entries: np.ndarray, keys, same_cluster, pairs: set) -> None:
    """Add to `pairs` the near-identical pairs among (hash, key index << 9 | position) `entries`."""
    order = np.argsort(entries[:, 0], kind="stable")
    hashes = entries[order, 0]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1], True])
    sizes = np.diff(starts)
    for lo, size in zip(starts[:-1][sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        by_variant: dict[str, list[str]] = {}
        for entry in entries[order[lo : lo + size], 1].tolist():
            key = keys[entry >> 9]
            by_variant.setdefault(_variant(key, entry & 511), []).append(key)
        for members in by_variant.values():
            if len(members) < 2 or len(members) > 64:  # a variant shared by dozens of keys is a naming scheme
                continue
            for i, left in enumerate(members):
                for right in members[i + 1:]:
                    if left != right and not same_cluster(left, right):
                        pairs.add(tuple(sorted((left, right))))


def side_of(group: str, seed: int, eval_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


@dataclass
class SplitResult:
    train: list[Example]
    eval: list[Example]
    record: dict
    # the near-duplicate search's work (exact duplicates, comparisons, capped buckets); not in the
    # lock, whose Split record has no field for it
    near_duplicate_search: dict = field(default_factory=dict)


def split_examples(examples: list[Example], split_spec, workers: int = 1, work=None) -> SplitResult:
    """`work`: a directory for the near-duplicate search's shingle hashes (the compile's work
    directory); without one they are held in memory."""
    groups = sorted({e.group for e in examples})
    union = _UnionFind(groups)
    normalize = getattr(split_spec, "normalize_group_keys", True)
    merged_spellings = []
    if normalize:
        # keys of one spelling side by side (a sort, not a dict of every key: issue 17's memory)
        for _, members in itertools.groupby(sorted(groups, key=normalized_group_key), key=normalized_group_key):
            members = list(members)
            for other in members[1:]:
                union.union(members[0], other)
            if len(members) > 1:
                merged_spellings.append(members)
    merged_spellings.sort()
    search: dict = {}
    if split_spec.near_duplicates is not None:
        def component(i: int) -> str:
            return union.find(examples[i].group)

        for left, right in iter_near_duplicates(_PromptTexts(examples), split_spec.near_duplicates, split_spec.seed,
                                                component=component, stats=search, workers=workers,
                                                spill_dir=work):
            union.union(examples[left].group, examples[right].group)
    clusters: dict[str, list[str]] = {}
    for group in groups:
        clusters.setdefault(union.find(group), []).append(group)
    near_identical, near_identical_count = near_identical_keys(groups, lambda a, b: union.find(a) == union.find(b),
                                                                 spill_dir=work)

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
        # clusters that near-duplicate prompts made: more than one key even after spelling is set aside
        "merged_near_duplicates": sorted(
            sorted(m) for m in clusters.values() if len({normalized_group_key(g) if normalize else g for g in m}) > 1
        ),
        "group_keys_normalized": normalize,
        "merged_group_spellings": merged_spellings,
        "near_identical_groups": near_identical,
        "near_identical_group_pairs": near_identical_count,
        "disjoint": not overlap,
        "overlap": overlap,
    }
    return SplitResult(train, held, record, search)
