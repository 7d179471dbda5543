"""Token arrays on disk while a compile runs, and token files written by streaming (issue 17).

Tokenization appends each kept example's ids and labels (int32) to two files in the compile's work
directory; what stays in memory per example is its offset, its supervised count and nothing else.
Packing places examples by their lengths, and the bundle's token files are written a batch of
rows at a time, read back from those files, hashed as they are written. So the token stream of a
compile is never in RAM at once, however many rows it has: before this, every token sat in memory
three to six times (per-example arrays, packed arrays, TRL's Arrow tables, the safetensors bytes).

RowStore does the same for the rows' content (fields, messages or text) from the moment a row is
read and accepted: an Example keeps where its content is, and each pass reads it back.

Examples are read back with pread, not a memory map: the kernel counts a mapped file's touched
pages in the process's resident set, and the compile's peak RSS is what this module bounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from array import array
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

IGNORE_INDEX = -100


class TokenStore:
    """Append-only (input_ids, labels) per example, on disk; `ids(i)`, `labels(i)` read one back."""

    def __init__(self, directory: str | os.PathLike, name: str):
        self.directory, self.name = Path(directory), name
        self._paths = (self.directory / f"{name}.ids.i32", self.directory / f"{name}.labels.i32")
        self._files = [open(path, "w+b") for path in self._paths]
        self._offsets = array("q", [0])
        # supervised labels at positions 1.. of each example: position 0 is never scored (nothing in
        # the example predicts it), so a row's supervised count is the sum over its segments
        self._supervised = array("q")
        self.max_id = -1
        self._writing = True

    @classmethod
    def of(cls, directory, name: str, input_ids: Iterable[np.ndarray], labels: Iterable[np.ndarray]) -> "TokenStore":
        store = cls(directory, name)
        for ids, lab in zip(input_ids, labels):
            store.append(ids, lab)
        return store.finish()

    def append(self, ids: np.ndarray, labels: np.ndarray) -> None:
        assert self._writing, "TokenStore: append after finish()"
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        assert len(ids) == len(labels)
        self._files[0].write(ids.tobytes())
        self._files[1].write(labels.tobytes())
        self._offsets.append(self._offsets[-1] + len(ids))
        self._supervised.append(int(np.count_nonzero(labels[1:] != IGNORE_INDEX)))
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))

    def flush(self) -> None:
        for handle in self._files:
            handle.flush()

    def finish(self) -> "TokenStore":
        self.flush()
        self._writing = False
        return self

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def part(self, k: int) -> "TokenStore":
        """A store for range k of a pass run in worker processes (compiler/workers.py)."""
        return TokenStore(self.directory, f"{self.name}.part{k}")

    def state(self) -> dict:
        """What a finished part hands back to the parent process: small (no tokens)."""
        return {"paths": [str(p) for p in self._paths], "offsets": self._offsets.tobytes(),
                "supervised": self._supervised.tobytes(), "max_id": self.max_id}

    def extend(self, state: dict) -> None:
        """Append a finished part's examples after this store's, then remove the part's files."""
        import shutil

        assert self._writing, "TokenStore: extend after finish()"
        for handle, path in zip(self._files, state["paths"]):
            with open(path, "rb") as part:
                shutil.copyfileobj(part, handle, 1 << 24)
            os.unlink(path)
        offsets = array("q")
        offsets.frombytes(state["offsets"])
        base = self._offsets[-1]
        self._offsets.extend(base + o for o in offsets[1:])
        self._supervised.frombytes(state["supervised"])
        self.max_id = max(self.max_id, state["max_id"])

    def lengths(self) -> np.ndarray:
        return np.diff(np.frombuffer(self._offsets, dtype=np.int64))

    def supervised(self) -> np.ndarray:
        return np.frombuffer(self._supervised, dtype=np.int64)

    def _read(self, which: int, i: int, count: int | None = None) -> np.ndarray:
        start, end = self._offsets[i], self._offsets[i + 1]
        if count is not None:
            end = min(end, start + count)
        data = os.pread(self._files[which].fileno(), 4 * (end - start), 4 * start)
        return np.frombuffer(data, dtype=np.int32)

    def ids(self, i: int, count: int | None = None) -> np.ndarray:
        return self._read(0, i, count)

    def labels(self, i: int, count: int | None = None) -> np.ndarray:
        return self._read(1, i, count)

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        for path in self._paths:
            path.unlink(missing_ok=True)


class RowStore:
    """Accepted rows' content (fields, messages or text) on disk while a compile runs: an Example
    keeps where its content is (compiler/data.Example.spill) and reads it back on each access."""

    def __init__(self, directory: str | os.PathLike, name: str = "rows"):
        self.path = Path(directory) / f"{name}.jsonl"
        self._file = open(self.path, "w+b")
        self._size = 0
        self._unflushed = False

    def put(self, content) -> int:
        # JSON (never pickle: sftc deserializes nothing that can run code). A value JSON has no type
        # for (a parquet row's datetime, Decimal, bytes) is stored as str(value): the row's fields are
        # only ever written out again as eval_prompts.jsonl, with default=str, so the bytes are the same.
        data = json.dumps(content, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
        if len(data) >> 32:
            raise OverflowError(f"a row of {len(data)} bytes: RowStore holds rows under 4 GiB")
        self._file.write(data)
        at, self._size = self._size, self._size + len(data)
        self._unflushed = True
        # where and how long, in one int: a tuple of two held ~100 bytes more per row (issue 17)
        return at << 32 | len(data)

    def flush(self) -> None:
        """Before workers fork: what they read must be on disk, not in this process's buffer."""
        if self._unflushed:
            self._file.flush()
            self._unflushed = False

    def get(self, where: int):
        self.flush()
        at, size = where >> 32, where & 0xFFFF_FFFF
        return json.loads(os.pread(self._file.fileno(), size, at).decode("utf-8", "surrogatepass"))

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


# safetensors' layout, written by hand because its writers take whole arrays in memory: tensors
# sorted by dtype (wider first), then by name; an 8-byte header length, the JSON header padded with
# spaces to a multiple of 8, then the data. tests/compiler/test_store.py checks the bytes are
# exactly safetensors.numpy.save's.
_DTYPES = {np.dtype(np.int64): ("I64", 0), np.dtype(np.int32): ("I32", 1), np.dtype(np.uint8): ("U8", 2)}

# The tensors that hold the tokens themselves; the rest of a token file is its index (offsets,
# lengths, order, row digests), small beside them. The lock seals the index (Lock.token_index) and
# the index holds a sha256 per row, so a rank verifies the index and then only the rows it reads.
BULK_TENSORS = ("input_ids", "labels")


class Tensor:
    """A tensor to stream: its dtype, shape and a function yielding its data in order."""

    def __init__(self, dtype, shape: tuple[int, ...], chunks: Callable[[], Iterator[np.ndarray]]):
        self.dtype, self.shape, self.chunks = np.dtype(dtype), tuple(int(s) for s in shape), chunks

    @classmethod
    def of(cls, array: np.ndarray) -> "Tensor":
        return cls(array.dtype, array.shape, lambda: iter([array]))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor]) -> tuple[str, str]:
    """Write a safetensors file chunk by chunk; returns (sha256 of the bytes written, sha256 of its
    index: the header and every tensor but BULK_TENSORS, in file order; runtime/bundle.py
    index_sha256 is the reader's side of the same definition)."""
    ordered = sorted(tensors.items(), key=lambda item: (_DTYPES[item[1].dtype][1], item[0]))
    header, at = {}, 0
    for name, tensor in ordered:
        header[name] = {"dtype": _DTYPES[tensor.dtype][0], "shape": list(tensor.shape),
                        "data_offsets": [at, at + tensor.nbytes]}
        at += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest, index = hashlib.sha256(), hashlib.sha256()
    with open(path, "wb") as out:
        def put(data: bytes, indexed: bool) -> None:
            out.write(data)
            digest.update(data)
            if indexed:
                index.update(data)

        put(struct.pack("<Q", len(text)) + text, True)
        for name, tensor in ordered:
            written = 0
            for chunk in tensor.chunks():
                chunk = np.ascontiguousarray(chunk, dtype=tensor.dtype)
                put(chunk.tobytes(), name not in BULK_TENSORS)
                written += chunk.nbytes
            if written != tensor.nbytes:
                raise AssertionError(f"{path}: tensor {name} streamed {written} bytes, its header says {tensor.nbytes}")
    return digest.hexdigest(), index.hexdigest()


def row_sha256(input_ids, labels) -> bytes:
    """The digest of one packed row: sha256 of the sha256 of its input_ids and of its labels
    (int32 little-endian bytes). Two inner hashes, so the writer can hash the input_ids stream and
    the labels stream one after the other, as the file lays them out."""
    return _combine(hashlib.sha256(input_ids).digest(), hashlib.sha256(labels).digest())


def _combine(ids_digest, labels_digest) -> bytes:
    digest = hashlib.sha256(ids_digest)
    digest.update(labels_digest)
    return digest.digest()


class RowDigests:
    """row_sha256 of every row, computed from the input_ids and labels chunks as they are written.

    `tap` passes a stream through and hashes it row by row; `tensor` is the U8 [rows, 32] digest
    tensor. safetensors puts U8 after the int32 tensors, so both streams have passed by the time the
    digests are written; `tensor` refuses to yield them otherwise. Memory: 64 bytes a row, and the
    tensor's 32 while it is written.
    """

    def __init__(self, row_offsets: np.ndarray):
        self.row_offsets = row_offsets
        self.inner: dict[str, bytearray] = {}  # 32 bytes a row each: a list of bytes objects would be ~75

    def tap(self, which: str, chunks: Callable[[], Iterator[np.ndarray]]) -> Callable[[], Iterator[np.ndarray]]:
        ends = self.row_offsets[1:].tolist()

        def run():
            out, r, at, h = bytearray(), 0, 0, hashlib.sha256()
            for chunk in chunks():
                chunk = np.ascontiguousarray(chunk, dtype=np.int32)
                lo, hi = 0, len(chunk)
                while r < len(ends) and ends[r] <= at + hi:  # row r ends inside (or at the end of) this chunk
                    cut = ends[r] - at
                    h.update(chunk[lo:cut])
                    out += h.digest()
                    h, lo, r = hashlib.sha256(), cut, r + 1
                h.update(chunk[lo:hi])
                at += hi
                yield chunk
            while r < len(ends) and ends[r] == at:  # empty rows after the last chunk (or no chunk at all)
                out += h.digest()
                h, r = hashlib.sha256(), r + 1
            if r != len(ends):
                raise AssertionError(f"{which}: streamed {at} tokens, rows end at {ends[-1]}")
            self.inner[which] = out

        return run

    def tensor(self) -> Tensor:
        rows = len(self.row_offsets) - 1

        def chunks():
            if set(self.inner) != set(BULK_TENSORS):
                raise AssertionError("row digests asked for before input_ids and labels were written")
            ids, labels = memoryview(self.inner["input_ids"]), memoryview(self.inner["labels"])
            yield np.frombuffer(b"".join(_combine(ids[at : at + 32], labels[at : at + 32]) for at in range(0, 32 * rows, 32)),
                                dtype=np.uint8).reshape(rows, 32)

        return Tensor(np.uint8, (rows, 32), chunks)


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> str:
    """Write text lines (UTF-8) as they come; returns the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for line in lines:
            data = line.encode("utf-8")
            out.write(data)
            digest.update(data)
    return digest.hexdigest()
