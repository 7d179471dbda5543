"""Token files are memory-mapped and verified a row at a time (runtime/bundle.py, issue 17): a rank
checks the sealed index, then reads and checks only the rows it trains on; the arrays are the
file's bytes (no copy); a replacement of the file by rename after loading changes nothing; a forged
header or index is refused with the file named, an edited row with the row named."""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np
import pytest

from sftc.compiler.store import Tensor
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
    # counted row by row as each row is checked: the same counts as over the whole labels array at once
    keep = before["labels"] != -100
    starts = np.concatenate([[0], np.cumsum(before["seq_lengths"].astype(np.int64))[:-1]])
    keep[starts] = False
    cumulative = np.concatenate([[0], np.cumsum(keep)])
    rows = before["row_offsets"]
    per_row = cumulative[rows[1:]] - cumulative[rows[:-1]]
    assert [train.supervised([r]) for r in range(train.n_rows)] == per_row.tolist()
    assert train.supervised(train.epochs[0]) == int(per_row[train.epochs[0]].sum())


def _rewrite(path, at: int, value: bytes) -> None:
    """Overwrite bytes in place (not by rename), as a damaged disk or a stray writer would."""
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(value)


def _data_start(path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return 8 + n, json.loads(data[8 : 8 + n])


def test_an_edited_row_is_refused_by_the_rank_that_reads_it(project):
    bundle = project.compile()
    path = bundle / "train.safetensors"
    body, header = _data_start(path)
    train = load_bundle(bundle).train
    victim = int(train.epochs[0][len(train.epochs[0]) // 2])
    token = int(train.row_offsets[victim]) + 1
    at = body + header["labels"]["data_offsets"][0] + 4 * token
    _rewrite(path, at, struct.pack("<i", 7))  # a masked label turned into a scored one, say

    train = load_bundle(bundle).train  # the index is intact: the bundle loads
    others = [r for r in range(train.n_rows) if r != victim]
    train.verify_rows(others)  # a rank whose rows do not include it trains
    with pytest.raises(BundleError) as caught:
        train.verify_rows([others[0], victim])
    message = str(caught.value)
    assert f"{path}: 1 row(s) of the train token file differ from their row_sha256 (rows {victim})" in message
    assert "restore the bundle" in message
    with pytest.raises(BundleError, match=f"rows {victim}"):
        train.row(victim)
    with pytest.raises(BundleError, match=f"rows {victim}"):
        train.supervised([victim])
    # `sftc verify` checks the index; --all-rows hashes the token files whole and finds the row
    from sftc.runtime.verify import verify_bundle

    assert verify_bundle(bundle)["bundle_id"] == bundle.name
    with pytest.raises(BundleError) as caught:
        verify_bundle(bundle, all_rows=True)
    assert f"{path}: edited after compile (sha256 differs from bundle.lock.json files['train.safetensors'])" in caught.value.problems[0]


@pytest.mark.parametrize("tensor", ["row_offsets", "order", "row_sha256", "seq_lengths"])
def test_an_edited_index_is_refused_at_load(project, tensor):
    bundle = project.compile()
    path = bundle / "train.safetensors"
    body, header = _data_start(path)
    begin = header[tensor]["data_offsets"][0]
    original = path.read_bytes()[body + begin]
    _rewrite(path, body + begin, bytes([original ^ 1]))
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    assert "edited after compile (the sha256 of its index" in "\n".join([str(caught.value), *caught.value.problems])


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps): the pages it touched."""
    total, current = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                current = len(fields) >= 6 and fields[-1] == str(path)
            elif current and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_a_rank_pages_in_only_the_index_and_its_rows(tmp_path):
    from types import SimpleNamespace

    from sftc.compiler.pack import Packed
    from sftc.compiler.store import write_safetensors
    from sftc.runtime.bundle import Bundle, index_sha256

    # rows of 4 MiB of ids and 4 MiB of labels: a touched page maps up to a 2 MiB folio on recent
    # kernels, so smaller rows would make any access pattern look like the whole file
    rows, width = 16, 1 << 20
    ids = (np.arange(rows * width, dtype=np.int64) % 50021).astype(np.int32)
    offsets = np.arange(0, rows * width + 1, width, dtype=np.int64)
    packed = Packed(row_offsets=offsets, seq_lengths=np.full(rows, width, np.int32), seq_offsets=np.arange(rows + 1),
                    record={}, input_ids=ids, labels=ids)
    path = tmp_path / "train.safetensors"
    order = np.random.default_rng(0).permutation(rows).astype(np.int64)
    _, index = write_safetensors(path, {**packed.token_tensors(), "order": Tensor.of(order)})
    del ids, packed
    size_kb = path.stat().st_size // 1024
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    assert index_sha256(mapped) == index
    bundle = Bundle(dir=tmp_path, lock=SimpleNamespace(token_index={"train.safetensors": index}),
                    contents={"train.safetensors": mapped})
    train = bundle.train
    assert train._apart  # rows this large are asked for apart (runtime/bundle.py)
    at_load = _mapped_kb(path)
    assert at_load < size_kb * 0.1, (at_load, size_kb)  # the header and the index only
    # datasets fingerprints a table by hashing it, which read every page on every rank; the
    # bundle names it by the sealed index's sha256 instead
    dataset = bundle.train_dataset()
    assert _mapped_kb(path) == at_load
    mine = order[0::4]  # rank 0 of 4
    train.verify_rows(mine)
    read = _mapped_kb(path) - at_load
    assert size_kb * 0.2 <= read <= size_kb * 0.45, (read, size_kb)  # its quarter (and folio edges), not the rest
    assert np.array_equal(dataset[int(mine[0])]["input_ids"], train.row(int(mine[0]))[0])


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


def test_a_damaged_eval_row_stops_the_run_before_the_model_loads(project, monkeypatch):
    # the eval file is no longer hashed whole at load: the ranks that evaluate check its rows at
    # start, instead of refusing at the first checkpoint's evaluation (and losing its updates)
    import sftc.runtime.run as run_mod
    from sftc.runtime.run import run_bundle

    bundle = project.compile()
    path = bundle / "eval.safetensors"
    body, header = _data_start(path)
    at = body + header["input_ids"]["data_offsets"][0]
    _rewrite(path, at, bytes([path.read_bytes()[at] ^ 1]))
    loads = []
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: loads.append(1))
    with pytest.raises(BundleError, match=r"eval\.safetensors: 1 row\(s\) of the eval token file differ .*\(rows 0\)"):
        run_bundle(bundle)
    assert not loads


def test_a_header_nested_past_the_parser_is_refused_cleanly(project):
    bundle = project.compile()
    path = bundle / "train.safetensors"
    nested = b"[" * 200_000
    path.write_bytes(struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    assert "edited after compile (the sha256 of its index" in "\n".join(caught.value.problems)
    with pytest.raises(BundleError, match="header is not JSON"):
        safetensors_views(path.read_bytes(), str(path), "train")
