"""bfd places examples from their lengths alone (compiler/pack.bfd_bins, issue 17), then the token
file is streamed from the examples in the token store. The rows must be exactly those TRL's
pack_dataset gives when it packs the ids and labels themselves, and the streamed file exactly the
bytes of safetensors.numpy.save over them."""

import numpy as np
import pyarrow as pa
import pytest

from sftc.compiler.pack import mask_segment_starts, pack
from sftc.compiler.store import Tensor, TokenStore, row_sha256, write_safetensors


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
    digests = b"".join(row_sha256(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(row_offsets[:-1], row_offsets[1:]))
    return {"input_ids": flat_ids, "labels": flat_labels, "row_offsets": row_offsets,
            "seq_lengths": seq_lengths, "seq_offsets": seq_offsets,
            "row_sha256": np.frombuffer(digests, dtype=np.uint8).reshape(len(row_offsets) - 1, 32)}


@pytest.mark.parametrize("lengths, seq_length", [
    ("lognormal", 128),  # about one in six longer than seq_length: cut by bfd's truncation
    ("equal", 64),  # every length tied: the order among ties is TRL's sort, whatever the column holds
    ("with_empty", 32),  # empty examples are dropped by TRL
])
def test_bfd_rows_are_trls(lengths, seq_length, tmp_path, monkeypatch):
    import sftc.compiler.pack as pack_mod

    monkeypatch.setattr(pack_mod, "_SEGMENTS_PER_CHUNK", 7)  # rows cut across chunks: the row digests still per row
    rng = np.random.default_rng(7)
    n = 600
    sizes = {"lognormal": rng.lognormal(np.log(60), 0.8, n).astype(int).clip(1, None),
             "equal": np.full(n, 10),
             "with_empty": rng.integers(0, 40, n)}[lengths]
    ids = [rng.integers(0, 150_000, k).astype(np.int32) for k in sizes]
    labels = [np.where(rng.random(k) < 0.5, -100, a).astype(np.int32) for k, a in zip(sizes, ids)]
    store = TokenStore.of(tmp_path, "train", ids, labels)
    packed = pack(store, None, "bfd", seq_length, seed=3)
    expected = reference(ids, labels, seq_length, seed=3)
    for name, array in packed.tensors().items():
        assert array.dtype == expected[name].dtype, name
        assert np.array_equal(array, expected[name]), name
    # the budget's per-row supervised counts from the store's counts equal those of the rows
    mask = (expected["labels"] != -100).astype(np.int64)
    cumulative = np.concatenate([[0], np.cumsum(mask)])
    rows = expected["row_offsets"]
    assert np.array_equal(packed.row_supervised(), cumulative[rows[1:]] - cumulative[rows[:-1]])
    # the streamed token file is byte for byte what safetensors writes from the arrays in memory
    from safetensors.numpy import save

    order = np.random.default_rng(1).permutation(packed.rows).astype(np.int64)
    digest, index = write_safetensors(tmp_path / "t.safetensors", {**packed.token_tensors(), "order": Tensor.of(order)})
    written = (tmp_path / "t.safetensors").read_bytes()
    assert written == save({**expected, "order": order})
    import hashlib
    assert digest == hashlib.sha256(written).hexdigest()
    # the index the lock seals is the reader's: the header and every tensor but the tokens
    from sftc.runtime.bundle import index_sha256

    assert index == index_sha256(written) != index_sha256(written[:-1] + bytes([written[-1] ^ 1]))


def test_picks_repeat_examples_like_the_weighted_lists(tmp_path):
    """data.sources weights pass example indices (repeats included) to pack; the rows must be those
    of packing the repeated arrays themselves."""
    rng = np.random.default_rng(5)
    ids = [rng.integers(0, 1000, k).astype(np.int32) for k in rng.integers(1, 50, 80)]
    labels = [a.copy() for a in ids]
    picks = np.repeat(np.arange(80), rng.integers(0, 3, 80))
    store = TokenStore.of(tmp_path, "train", ids, labels)
    for strategy in ("bfd", "none"):
        packed = pack(store, picks, strategy, 64, seed=2)
        (tmp_path / strategy).mkdir()
        repeated = TokenStore.of(tmp_path / strategy, "train", [ids[i] for i in picks], [labels[i] for i in picks])
        again = pack(repeated, None, strategy, 64, seed=2)
        for name, array in packed.tensors().items():
            assert np.array_equal(array, again.tensors()[name]), (strategy, name)


@pytest.mark.parametrize("shapes", [
    {"a": (0,), "b": (3,)},
    {"order": (7,), "input_ids": (13,), "labels": (13,), "row_offsets": (3,), "seq_lengths": (5,), "seq_offsets": (3,)},
    {"order": (2, 9), "z": (1,), "x": (4,)},
])
def test_streamed_safetensors_equal_save(shapes, tmp_path):
    """The header (dtype order, then names; padding) and the data as safetensors writes them, for
    any sizes, chunked or whole."""
    from safetensors.numpy import save

    rng = np.random.default_rng(len(shapes))
    arrays = {name: rng.integers(-5, 10**6, shape).astype(np.int64 if i % 2 == 0 else np.int32)
              for i, (name, shape) in enumerate(sorted(shapes.items()))}
    tensors = {name: Tensor(a.dtype, a.shape, lambda a=a: iter(np.array_split(a.reshape(-1), 3)))
               for name, a in arrays.items()}
    write_safetensors(tmp_path / "f", tensors)
    assert (tmp_path / "f").read_bytes() == save(arrays)
