"""bfd packs a column naming each token's example, then builds the rows from the examples' own arrays
(compiler/pack.py, issue 17: half the bytes in TRL's intermediate tables). The rows must be exactly
those TRL's pack_dataset gives when it packs the ids and labels themselves."""

import numpy as np
import pyarrow as pa
import pytest

from sftc.compiler.pack import mask_segment_starts, pack


def reference(input_ids, labels, seq_length, seed):
    """TRL's pack_dataset over the ids and labels, as pack() ran it before the change."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    order = np.random.default_rng(seed).permutation(len(input_ids))

    def column(arrays):
        picked = [arrays[i] for i in order]
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in picked])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(picked)))

    dataset = Dataset(pa.table({"input_ids": column(input_ids), "labels": column(labels)}))
    table = pack_dataset(dataset, seq_length, "bfd", {"batch_size": len(dataset)}).with_format("arrow").data
    table = getattr(table, "table", table)
    ids = table.column("input_ids").combine_chunks()
    seq = table.column("seq_lengths").combine_chunks()
    flat_ids = ids.flatten().to_numpy().astype(np.int32)
    flat_labels = table.column("labels").combine_chunks().flatten().to_numpy().astype(np.int32)
    row_offsets = np.concatenate([[0], np.cumsum(ids.value_lengths().to_numpy())]).astype(np.int64)
    seq_lengths = seq.flatten().to_numpy().astype(np.int32)
    seq_offsets = np.concatenate([[0], np.cumsum(seq.value_lengths().to_numpy())]).astype(np.int64)
    mask_segment_starts(flat_labels, row_offsets, seq_lengths, seq_offsets)
    return {"input_ids": flat_ids, "labels": flat_labels, "row_offsets": row_offsets,
            "seq_lengths": seq_lengths, "seq_offsets": seq_offsets}


@pytest.mark.parametrize("lengths, seq_length", [
    ("lognormal", 128),  # about one in six longer than seq_length: cut by bfd's truncation
    ("equal", 64),  # every length tied: the order among ties is TRL's sort, whatever the column holds
    ("with_empty", 32),  # empty examples are dropped by TRL
])
def test_bfd_rows_are_trls(lengths, seq_length):
    rng = np.random.default_rng(7)
    n = 600
    sizes = {"lognormal": rng.lognormal(np.log(60), 0.8, n).astype(int).clip(1, None),
             "equal": np.full(n, 10),
             "with_empty": rng.integers(0, 40, n)}[lengths]
    ids = [rng.integers(0, 150_000, k).astype(np.int32) for k in sizes]
    labels = [np.where(rng.random(k) < 0.5, -100, a).astype(np.int32) for k, a in zip(sizes, ids)]
    packed = pack(ids, labels, "bfd", seq_length, seed=3)
    expected = reference(ids, labels, seq_length, seed=3)
    for name, array in packed.tensors().items():
        assert array.dtype == expected[name].dtype, name
        assert np.array_equal(array, expected[name]), name
