"""Token files are memory-mapped once verified (runtime/bundle.py, issue 17): a rank pages in only
the rows it trains on, the arrays are the file's bytes (no copy), a replacement of the file by
rename after loading changes nothing, and a forged header is refused with the file named."""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np
import pytest

from sftc.errors import BundleError
from sftc.runtime.bundle import load_bundle, safetensors_views


def _base(array):
    while isinstance(getattr(array, "base", None), np.ndarray):
        array = array.base
    base = array.base
    return base.obj if isinstance(base, memoryview) else base


def test_token_arrays_are_views_of_the_verified_map(project):
    bundle = project.compile()
    loaded = load_bundle(bundle)
    train = loaded.train
    for name in ("input_ids", "labels", "row_offsets", "seq_lengths", "seq_offsets", "order"):
        array = getattr(train, name)
        assert not array.flags.owndata and not array.flags.writeable, name
        assert isinstance(_base(array), mmap.mmap), name
    from safetensors.numpy import load_file

    expected = load_file(str(bundle / "train.safetensors"))
    before = {k: v.copy() for k, v in expected.items()}
    # replaced by rename, as sftc and DVC write: the mapped inode is the one verified
    replacement = bundle / ".replacement"
    forged = {k: (v + 1 if k in ("input_ids", "labels") else v) for k, v in before.items()}
    from safetensors.numpy import save_file

    save_file(forged, str(replacement))
    os.replace(replacement, bundle / "train.safetensors")
    for name, array in before.items():
        assert np.array_equal(getattr(train, name), array), name
    # counted a block of rows at a time: the same counts as over the whole labels array at once
    keep = before["labels"] != -100
    starts = np.concatenate([[0], np.cumsum(before["seq_lengths"].astype(np.int64))[:-1]])
    keep[starts] = False
    cumulative = np.concatenate([[0], np.cumsum(keep)])
    rows = before["row_offsets"]
    assert np.array_equal(train.row_supervised, cumulative[rows[1:]] - cumulative[rows[:-1]])


def test_row_supervised_across_scan_blocks(project, monkeypatch):
    import sftc.runtime.bundle as bundle_mod

    bundle = project.compile()
    whole = load_bundle(bundle).train.row_supervised
    monkeypatch.setattr(bundle_mod, "_ROWS_PER_SCAN", 3)
    assert np.array_equal(load_bundle(bundle).train.row_supervised, whole)


def _file(header: dict | bytes, body: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


@pytest.mark.parametrize("data, why", [
    (b"\x01\x02", "shorter than a safetensors header"),
    (_file({}, length=10**12), "past the file"),
    (_file(b"{not json"), "not JSON"),
    (_file(b"[1, 2]"), "not a JSON object"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype 'F32'"),
    (_file({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "do not hold shape"),
    (_file({"a": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "do not hold shape"),
    (_file({"a": {"dtype": "I32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "malformed"),
    (_file({"a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4), "entry is not"),
    (_file({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "I32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "share bytes"),
])
def test_a_forged_token_file_header_is_refused_with_the_file_named(data, why):
    with pytest.raises(BundleError) as caught:
        safetensors_views(data, "bundles/x/train.safetensors", "train")
    assert "bundles/x/train.safetensors: cannot read the train token file" in str(caught.value)
    assert why in str(caught.value)


def test_views_equal_safetensors_own_reader():
    from safetensors.numpy import load, save

    rng = np.random.default_rng(0)
    arrays = {"order": rng.integers(0, 9, (3, 4)).astype(np.int64), "ids": rng.integers(-5, 5, 11).astype(np.int32),
              "empty": np.zeros(0, np.int64), "scalar": np.array(7, dtype=np.int32)}
    data = save(arrays, metadata={"k": "v"})
    views = safetensors_views(data, "f", "train")
    for name, array in load(data).items():
        assert views[name].dtype == array.dtype and np.array_equal(views[name], array), name
