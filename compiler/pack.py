"""Pass 6: pack examples into rows with TRL's own packing, so the bundle holds exactly the rows
the trainer will see.

Packed rows keep their segment lengths; position ids restart at each segment. A row of three
examples (lengths 3, 2, 3) and the attention it must get:

    tokens        a0 a1 a2 b0 b1 c0 c1 c2
    position_ids   0  1  2  0  1  0  1  2
    attention     a0 a1 a2 b0 b1 c0 c1 c2
        a0         1
        a1         1  1
        a2         1  1  1
        b0                  1
        b1                  1  1
        c0                        1
        c1                        1  1
        c2                        1  1  1

Position ids are boundary *metadata*; whether the attention kernel honours them is proven at run
time by the contamination probe (runtime/probe.py), not assumed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftc.compiler.store import IGNORE_INDEX, RowDigests, Tensor, TokenStore

# rows read back from the token store per batch while a token file is written: a few MB of tokens
_SEGMENTS_PER_CHUNK = 4096


@dataclass
class Packed:
    """Packed rows. bfd and strategy none keep them as references: segment k is the first
    seq_lengths[k] tokens of example segment_examples[k] in `store` (issue 17: the token stream is
    read back from disk only as the token file is written). bfd_split and wrapped cut examples
    apart, so their rows are flat arrays (input_ids, labels) as TRL built them."""

    row_offsets: np.ndarray  # int64 [R+1]
    seq_lengths: np.ndarray  # int32 [S]
    seq_offsets: np.ndarray  # int64 [R+1]
    record: dict
    store: TokenStore | None = None
    segment_examples: np.ndarray | None = None  # int64 [S]
    input_ids: np.ndarray | None = None  # int32 [T], flat rows only
    labels: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.row_offsets) - 1

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    def row_segments(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    def row_supervised(self) -> np.ndarray:
        if self.store is None:
            mask = (self.labels != IGNORE_INDEX).astype(np.int64)
            cumulative = np.concatenate([[0], np.cumsum(mask)])
            return cumulative[self.row_offsets[1:]] - cumulative[self.row_offsets[:-1]]
        # the store counts each example's supervised labels past its first token (the one masked at
        # a segment start); a segment cut short of its example is counted from its tokens
        per_segment = self.store.supervised()[self.segment_examples]
        cut = np.flatnonzero(self.seq_lengths != self.store.lengths()[self.segment_examples])
        for k in cut:
            n = int(self.seq_lengths[k])
            per_segment[k] = int(np.count_nonzero(self.store.labels(int(self.segment_examples[k]), n)[1:] != IGNORE_INDEX))
        cumulative = np.concatenate([[0], np.cumsum(per_segment)])
        return cumulative[self.seq_offsets[1:]] - cumulative[self.seq_offsets[:-1]]

    def _segment_chunks(self, labels: bool, lo: int = 0, hi: int | None = None):
        """The segments' tokens in row order, a batch at a time, each segment's first label masked."""
        hi = len(self.seq_lengths) if hi is None else hi
        read = self.store.labels if labels else self.store.ids
        for at in range(lo, hi, _SEGMENTS_PER_CHUNK):
            upto = min(at + _SEGMENTS_PER_CHUNK, hi)
            lengths = self.seq_lengths[at:upto]
            parts = [read(int(e), int(n)) for e, n in zip(self.segment_examples[at:upto], lengths)]
            flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
            if labels:
                flat = flat.copy()
                starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]) if len(lengths) else lengths
                flat[starts[lengths > 0]] = IGNORE_INDEX
            yield flat

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, seq_lengths) of row r, as the token file holds it."""
        s, t = int(self.seq_offsets[r]), int(self.seq_offsets[r + 1])
        if self.store is None:
            a, b = int(self.row_offsets[r]), int(self.row_offsets[r + 1])
            return self.input_ids[a:b], self.labels[a:b], self.seq_lengths[s:t]
        ids = np.concatenate([*self._segment_chunks(False, s, t), np.zeros(0, np.int32)])
        labels = np.concatenate([*self._segment_chunks(True, s, t), np.zeros(0, np.int32)])
        return ids, labels, self.seq_lengths[s:t]

    def token_tensors(self) -> dict[str, Tensor]:
        """The token file's tensors, streamed (compiler/store.write_safetensors)."""
        tokens = int(self.row_offsets[-1])
        if self.store is None:
            ids, labels = (lambda: iter([self.input_ids])), (lambda: iter([self.labels]))
        else:
            ids, labels = (lambda: self._segment_chunks(False)), (lambda: self._segment_chunks(True))
        digests = RowDigests(self.row_offsets)  # hashed as the tokens stream past: no second read
        return {"input_ids": Tensor(np.int32, (tokens,), digests.tap("input_ids", ids)),
                "labels": Tensor(np.int32, (tokens,), digests.tap("labels", labels)),
                "row_offsets": Tensor.of(self.row_offsets), "seq_lengths": Tensor.of(self.seq_lengths),
                "seq_offsets": Tensor.of(self.seq_offsets), "row_sha256": digests.tensor()}

    def tensors(self) -> dict[str, np.ndarray]:
        """The same tensors in memory (tests, small files)."""
        return {name: np.concatenate([*(c.ravel() for c in t.chunks()), np.zeros(0, t.dtype)]).astype(t.dtype, copy=False)
                .reshape(t.shape) for name, t in self.token_tensors().items()}


def mask_segment_starts(labels: np.ndarray, row_offsets: np.ndarray, seq_lengths: np.ndarray, seq_offsets: np.ndarray) -> None:
    """Set the label of each segment's first token to -100, in place.

    A causal LM predicts label t from position t-1; at a segment start that position belongs to
    the previous example, so the label could only be learned across the boundary. Masking it here
    makes the bundle's labels exactly the targets the trainer scores (and the budget's counts exact).
    """
    starts = []
    for r in range(len(row_offsets) - 1):
        lengths = seq_lengths[seq_offsets[r] : seq_offsets[r + 1]]
        starts.append(row_offsets[r] + np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    if starts:
        labels[np.concatenate(starts).astype(np.int64)] = IGNORE_INDEX


def _flat(arrays: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # copy=False: concatenate already made the one copy (astype's default would make a second)
    flat = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)
    return flat, offsets


def _all(store: TokenStore, picks: np.ndarray | None) -> np.ndarray:
    return np.arange(len(store), dtype=np.int64) if picks is None else np.asarray(picks, dtype=np.int64)


def unpacked(store: TokenStore, picks: np.ndarray | None = None) -> Packed:
    """One example per row (strategy none, and the eval set); `picks` are the examples in order
    (with data.sources weights applied), all of the store's by default."""
    picks = _all(store, picks)
    seq_lengths = store.lengths()[picks].astype(np.int32)
    row_offsets = np.concatenate([[0], np.cumsum(seq_lengths, dtype=np.int64)]).astype(np.int64)
    seq_offsets = np.arange(len(picks) + 1, dtype=np.int64)
    record = {"strategy": "none", "rows": len(picks), "examples": len(picks),
              "overflow_tokens_dropped": 0, "orphaned_supervised_tokens": 0, "boundary_safe": True}
    return Packed(row_offsets, seq_lengths, seq_offsets, record, store=store, segment_examples=picks)


def bfd_bins(lengths: np.ndarray, seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TRL's best-fit-decreasing placement (trl.data_utils._pack_bfd, truncate mode) from the
    lengths alone: (segment positions into `lengths`, their lengths cut to seq_length, segments per
    row), in TRL's row and segment order.

    Written out because TRL's function takes the token columns themselves and copies them through
    ~5 Arrow tables (filter, slice, take, the dataset writer): at a few million rows that is tens of
    GB. Its placement depends on the lengths only, so this runs the same loop over TRL's own segment
    tree on one int per example. tests/compiler/test_pack_by_name.py checks the rows are TRL's.
    """
    from collections import defaultdict, deque

    from trl.data_utils import _SegmentTree

    kept = np.flatnonzero(lengths > 0)  # TRL drops empty sequences
    cut = np.minimum(lengths[kept], seq_length)
    # TRL sorts (length, id) descending by length with Arrow's stable sort: ties keep their order
    by_length = np.argsort(-cut, kind="stable")
    tree = _SegmentTree(seq_length)
    tree.add(seq_length)
    space_to_bin: dict[int, deque] = defaultdict(deque)
    bins: list[list] = []  # [ids, length]
    for length, idx in zip(cut[by_length].tolist(), by_length.tolist()):
        space = tree.search(length)
        if space < seq_length:
            found = space_to_bin[space].popleft()
        else:
            found = [[], 0]
            bins.append(found)
        found[0].append(idx)
        found[1] += length
        if space < seq_length and not space_to_bin[space]:
            tree.remove(space)
        space -= length
        space_to_bin[space].append(found)
        if space > 0:
            tree.add(space)
    placed = np.fromiter((i for b in bins for i in b[0]), dtype=np.int64, count=len(kept))
    per_row = np.fromiter((len(b[0]) for b in bins), dtype=np.int64, count=len(bins))
    return kept[placed], cut[placed], per_row


def pack(store: TokenStore, picks: np.ndarray | None, strategy: str, seq_length: int, seed: int) -> Packed:
    """Pack the store's examples `picks` (all by default) into rows of seq_length tokens."""
    picks = _all(store, picks)
    if strategy == "none":
        packed = unpacked(store, picks)
        packed.record["seq_length"] = seq_length
        return packed
    # TRL shuffles before packing so unrelated examples share rows; a seeded permutation does the
    # same here and keeps the result a pure function of the inputs
    order = np.random.default_rng(seed).permutation(len(picks))
    lengths = store.lengths()[picks]
    if strategy == "bfd":
        positions, seq_lengths, per_row = bfd_bins(lengths[order], seq_length)
        row_lengths = np.add.reduceat(seq_lengths, np.concatenate([[0], np.cumsum(per_row)[:-1]])) if len(per_row) else per_row
        row_offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
        seq_offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
        packed = Packed(row_offsets, seq_lengths.astype(np.int32), seq_offsets, {}, store=store,
                        segment_examples=picks[order[positions]])
        overflow = int(np.maximum(lengths - seq_length, 0).sum())
    else:
        packed = _pack_with_trl([store.ids(int(i)) for i in picks[order]], [store.labels(int(i)) for i in picks[order]],
                                strategy, seq_length)
        overflow = 0
    orphaned = 0
    if strategy == "bfd_split":
        # TRL splits a long sequence into seq_length fragments; every fragment after the first has
        # lost its prompt, so the answer tokens in it are trained without their context
        orphaned = int(sum(int(np.sum(store.labels(int(i))[seq_length:] != IGNORE_INDEX))
                           for i in picks[lengths > seq_length]))
    packed.record = {
        "strategy": strategy,
        "seq_length": seq_length,
        "rows": packed.rows,
        "examples": len(picks),
        "ideal_rows": int(-(-int(lengths.sum()) // seq_length)),
        "overflow_tokens_dropped": overflow,
        "orphaned_supervised_tokens": orphaned,
        "boundary_safe": strategy != "wrapped",
    }
    return packed


def _pack_with_trl(input_ids: list[np.ndarray], labels: list[np.ndarray], strategy: str, seq_length: int) -> Packed:
    """bfd_split and wrapped cut examples into fragments: TRL's pack_dataset over the shuffled ids
    and labels, its rows kept as flat arrays (continued pretraining's corpora)."""
    import pyarrow as pa
    from datasets import Dataset, disable_progress_bars
    from trl.data_utils import pack_dataset

    disable_progress_bars()

    def column(arrays: list[np.ndarray]):
        # Arrow list column straight from one flat buffer: the same column Dataset.from_dict
        # builds from Python lists, without converting every token to a Python int. int32 list
        # offsets, as from_dict makes; a single column past 2**31 tokens becomes a large_list.
        flat, offsets = _flat(arrays, np.int32)
        if offsets[-1] < 2**31:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))

    dataset = Dataset(pa.table({"input_ids": column(input_ids), "labels": column(labels)}))
    del input_ids, labels
    # TRL's packing code, run as one batch: SFTTrainer's default map batch of 1000 examples leaves
    # a partly filled bin per batch (measured on OrgAccess: 0.969 efficiency vs 0.98+ in one pass)
    result = pack_dataset(dataset, seq_length, strategy, {"batch_size": max(1, len(dataset))}).with_format("arrow")
    del dataset
    table = result.data.table if hasattr(result.data, "table") else result.data
    del result
    ids_col = table.column("input_ids").combine_chunks()
    lab_col = table.column("labels").combine_chunks()
    seq_col = table.column("seq_lengths").combine_chunks() if "seq_lengths" in table.column_names else None
    del table
    flat_ids = ids_col.flatten().to_numpy().astype(np.int32, copy=False)
    flat_labels = lab_col.flatten().to_numpy().astype(np.int32)  # a copy: mask_segment_starts writes into it
    row_lengths = ids_col.value_lengths().to_numpy().astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
    if seq_col is not None:
        seq_lengths = seq_col.flatten().to_numpy().astype(np.int32)
        seq_offsets = np.concatenate([[0], np.cumsum(seq_col.value_lengths().to_numpy())]).astype(np.int64)
    else:  # wrapped: no boundaries survive, the whole row is one sequence
        seq_lengths = row_lengths.astype(np.int32)
        seq_offsets = np.arange(len(row_lengths) + 1, dtype=np.int64)
    mask_segment_starts(flat_labels, row_offsets, seq_lengths, seq_offsets)
    # Arrow's allocator keeps the pages of TRL's intermediate tables for reuse by Arrow only; the
    # passes after this allocate with malloc (measured: 250 MB given back on 17k rows)
    pa.default_memory_pool().release_unused()
    return Packed(row_offsets, seq_lengths, seq_offsets, {}, input_ids=flat_ids, labels=flat_labels)


def position_ids(seq_lengths) -> np.ndarray:
    """Positions restarting at 0 at each segment: [3, 2] -> [0 1 2 0 1]."""
    return np.concatenate([np.arange(n) for n in seq_lengths]) if len(seq_lengths) else np.zeros(0, np.int64)
