"""Load a compiled bundle: the sealed lock and the bundle files, exactly as `sftc compile` wrote them.

The runtime never re-tokenizes. Everything it trains on comes out of `train.safetensors`, in the
order the lock's `order` tensor fixes, so two runs of one bundle see the same tokens. Every bundle
file is checked against the lock when the bundle is loaded. The small files are read once and used
from memory from then on; the token files are memory-mapped once verified, so a rank touches only
the pages of the rows it trains on, however large the bundle (issue 17).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from sftc.compiler.spec import Spec
from sftc.errors import BundleError
from sftc.io import sha256_bytes
from sftc.lock import LOCK_NAME, Lock, load_lock

IGNORE = -100
TOKEN_KEYS = ("input_ids", "labels", "row_offsets", "seq_lengths", "seq_offsets")
TOKEN_FILES = ("train.safetensors", "eval.safetensors")  # mapped, not read (the rest: read once)
_ROWS_PER_SCAN = 65536  # rows per block when a pass reads every row (row_supervised)


@dataclass
class TokenFile:
    """Flat arrays of one token file; row r is a slice (docs/bundle-format.md)."""

    path: Path
    input_ids: np.ndarray
    labels: np.ndarray
    row_offsets: np.ndarray
    seq_lengths: np.ndarray
    seq_offsets: np.ndarray
    order: np.ndarray | None = None

    @property
    def epochs(self) -> list[np.ndarray]:
        """The locked row order as the sampler's epochs.

        The compiler writes one flat stream [steps x examples_per_update] (per-epoch permutations
        concatenated and cut so every update is full); the documented form is [E, R], one
        permutation per epoch. The stream is one sampler epoch; [E, R] is E of them.
        """
        if self.order is None:
            raise BundleError(f"{self.path}: no 'order' tensor")
        return [self.order] if self.order.ndim == 1 else list(self.order)

    @property
    def n_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.row_offsets[r]), int(self.row_offsets[r + 1])
        s, t = int(self.seq_offsets[r]), int(self.seq_offsets[r + 1])
        return self.input_ids[a:b], self.labels[a:b], self.seq_lengths[s:t]

    def examples(self, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (input_ids, labels) of each example packed into row r."""
        ids, labels, lengths = self.row(r)
        out, start = [], 0
        for n in lengths.tolist():
            out.append((ids[start:start + n], labels[start:start + n]))
            start += n
        return out

    @cached_property
    def row_supervised(self) -> np.ndarray:
        """Supervised tokens the loss actually scores, per row.

        A label at the first position of an example is never scored: the token before it belongs to
        the previous example (or there is none), and the collator masks it so no example is
        supervised from another one's context. Counted a block of rows at a time, so the pass
        holds a block's labels, never a copy of the whole (mapped) labels tensor.
        """
        out = np.zeros(self.n_rows, dtype=np.int64)
        for lo in range(0, self.n_rows, _ROWS_PER_SCAN):
            hi = min(lo + _ROWS_PER_SCAN, self.n_rows)
            a, b = int(self.row_offsets[lo]), int(self.row_offsets[hi])
            keep = self.labels[a:b] != IGNORE
            # validate() guarantees each row's seq_lengths tile it, so the segments tile the block
            lengths = self.seq_lengths[int(self.seq_offsets[lo]) : int(self.seq_offsets[hi])].astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
            keep[starts[starts < len(keep)]] = False
            cumulative = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
            out[lo:hi] = cumulative[self.row_offsets[lo + 1 : hi + 1] - a] - cumulative[self.row_offsets[lo:hi] - a]
        return out

    @property
    def row_lengths(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    def validate(self, name: str) -> None:
        """Structural checks, so a broken file is refused with its name instead of an IndexError later."""
        problems = []
        t = len(self.input_ids)
        if len(self.labels) != t:
            problems.append(f"labels has {len(self.labels)} entries, input_ids {t}")
        if len(self.row_offsets) < 1 or self.row_offsets[0] != 0 or self.row_offsets[-1] != t:
            problems.append(f"row_offsets must run from 0 to {t}")
        elif np.any(np.diff(self.row_offsets) < 0):
            problems.append("row_offsets are not increasing")
        if len(self.seq_offsets) != len(self.row_offsets):
            problems.append(f"seq_offsets has {len(self.seq_offsets)} entries, row_offsets {len(self.row_offsets)}")
        elif self.seq_offsets[-1] != len(self.seq_lengths):
            problems.append(f"seq_offsets ends at {self.seq_offsets[-1]}, seq_lengths has {len(self.seq_lengths)}")
        else:
            sums = np.add.reduceat(self.seq_lengths.astype(np.int64), self.seq_offsets[:-1]) if len(self.seq_lengths) else []
            empty = np.diff(self.seq_offsets) == 0
            if len(self.seq_lengths) and np.any((np.asarray(sums) != self.row_lengths) & ~empty):
                problems.append("the seq_lengths of a row do not add up to the row's length")
            if np.any(empty & (self.row_lengths > 0)):
                problems.append("a non-empty row has no seq_lengths")
        if self.order is not None:
            if self.order.ndim == 2:
                if self.order.shape[1] != self.n_rows:
                    problems.append(f"order has shape {list(self.order.shape)}, expected [epochs, {self.n_rows}]")
                elif any(sorted(e.tolist()) != list(range(self.n_rows)) for e in self.order):
                    problems.append("an epoch of order is not a permutation of the rows")
            elif self.order.ndim == 1:
                if len(self.order) and (self.order.min() < 0 or self.order.max() >= self.n_rows):
                    problems.append(f"order names rows outside 0..{self.n_rows - 1}")
            else:
                problems.append(f"order has {self.order.ndim} dimensions, expected a stream [N] or epochs [E, R]")
        if problems:
            raise BundleError(f"{self.path}: malformed {name} token file", problems)


_DTYPES = {"I32": np.dtype("<i4"), "I64": np.dtype("<i8")}


def safetensors_views(data, label: str, name: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only views of `data` (bytes or a memory map).

    Read by hand because safetensors' numpy loader copies every tensor into memory, and a token
    file of a few million rows is many GB: views of the map let each rank page in its own rows.
    The checks are safetensors' own (header length and JSON, dtype, shape against byte range, ranges
    inside the data, no overlap), with the file named when one fails.
    """
    def bad(why: str):
        return BundleError(f"{label}: cannot read the {name} token file ({why}); recompile the bundle")

    size = len(data)
    if size < 8:
        raise bad(f"{size} bytes, shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8 or n > 100_000_000:
        raise bad(f"header length {n} past the file's {size} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    body, views, ranges = 8 + n, {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {key!r}: entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise bad(f"tensor {key!r}: dtype {dtype!r}; token files hold {sorted(_DTYPES)}")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
            raise bad(f"tensor {key!r}: shape {shape!r} or data_offsets {offsets!r} malformed")
        begin, end = offsets
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end <= size - body or end - begin != count * _DTYPES[dtype].itemsize:
            raise bad(f"tensor {key!r}: bytes {begin}..{end} do not hold shape {shape} of {dtype} inside the data")
        ranges.append((begin, end, key))
        views[key] = np.frombuffer(data, dtype=_DTYPES[dtype], count=count, offset=body + begin).reshape(shape)
    ranges.sort()
    if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])):
        raise bad("two tensors share bytes")
    return views


def parse_token_file(data, label: str, name: str, need_order: bool) -> TokenFile:
    """A token file from the bytes or the map the bundle verified (`label` names it in errors)."""
    arrays = safetensors_views(data, label, name)
    missing = [k for k in TOKEN_KEYS if k not in arrays] + (["order"] if need_order and "order" not in arrays else [])
    if missing:
        raise BundleError(f"{label}: {name} token file lacks tensor(s) {missing}")
    tf = TokenFile(path=Path(label), order=arrays.get("order"), **{k: arrays[k] for k in TOKEN_KEYS})
    tf.validate(name)
    return tf


def _map_verified(path: Path) -> tuple[mmap.mmap | bytes, str | None]:
    """(a read-only map of the file, its sha256 or None). The file is hashed through the descriptor
    it is mapped from; None if its inode, size or mtime moved meanwhile. A replacement by rename
    later (as sftc and DVC write) leaves the mapped inode as it was verified."""
    with open(path, "rb") as handle:
        before = os.fstat(handle.fileno())
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if before.st_size else b""
        after = os.fstat(handle.fileno())
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        return b"", None
    return mapped, digest.hexdigest()


def read_verified(bundle_dir: Path, lock: Lock) -> dict[str, bytes | mmap.mmap]:
    """Every file the lock lists, checked against its sha256; a file the lock does not list is
    refused. Small files are read once and never opened again, so a file overwritten or deleted
    mid-run changes nothing, and a file dropped into the bundle (a rules.yaml in a bundle compiled
    without rules, an eval.safetensors where there was no eval split) is never consumed. Token files
    are mapped from the inode that was hashed: deleted or replaced by a rename mid-run, the run
    keeps the verified bytes (only an in-place rewrite of the file could reach the mapped pages)."""
    problems, contents = [], {}
    for name, expected in sorted(lock.files.items()):
        path = bundle_dir / name
        try:
            if name in TOKEN_FILES:
                data, digest = _map_verified(path)
            else:
                data = path.read_bytes()
                digest = sha256_bytes(data)
        except FileNotFoundError:
            problems.append(f"{path}: listed in the lock but missing")
            continue
        except OSError as exc:
            problems.append(f"{path}: listed in the lock but unreadable ({exc.strerror})")
            continue
        if digest is None:
            problems.append(f"{path}: changed while sftc verified it; run again once nothing writes to the bundle")
            continue
        if digest != expected:
            problems.append(f"{path}: edited after compile (sha256 differs from bundle.lock.json files[{name!r}])")
            continue
        contents[name] = data
    listed = set(lock.files) | {LOCK_NAME}
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if rel not in listed and not path.is_dir():
            problems.append(f"{path}: not listed in the lock (added after compile); sftc never reads an unlisted "
                            "file and refuses the bundle so it holds only what its lock says: remove the file or recompile")
    if problems:
        raise BundleError(f"{bundle_dir}: the bundle no longer matches its lock ({len(problems)} problem(s))", problems)
    return contents


@dataclass
class Bundle:
    """A verified bundle: its sealed Lock, the bytes of every listed file read once, and its token
    files mapped."""

    dir: Path
    lock: Lock
    contents: dict[str, bytes | mmap.mmap] = field(repr=False)

    @property
    def bundle_id(self) -> str:
        return self.lock.bundle_id

    @property
    def spec(self) -> Spec:
        return self.lock.spec

    @property
    def project_root(self) -> Path:
        """The lock records it relative to the bundle directory (so a moved project still works)."""
        return (self.dir / self.lock.project_root).resolve()

    def resolve(self, value: str | os.PathLike) -> Path:
        """A project-relative path of the lock, on this machine."""
        return self.project_root / value

    def _location(self, source: str, path: str, revision: str | None, key: str) -> Path:
        if source == "local":
            return self.resolve(path)
        from sftc.compiler.template import local_dir

        # the snapshot of the locked commit in the local hub cache; never a download
        return local_dir(path, revision, f"{self.dir / LOCK_NAME}: {key}")

    @cached_property
    def model_dir(self) -> Path:
        model = self.lock.model
        return self._location(model.source, model.path, model.revision, "model.path")

    @cached_property
    def tokenizer_dir(self) -> Path:
        tok = self.lock.tokenizer
        return self._location(tok.source, tok.path, tok.revision, "tokenizer.path")

    @property
    def model_path(self) -> str:
        return str(self.model_dir)

    @property
    def tokenizer_path(self) -> str:
        return str(self.tokenizer_dir)

    def _text(self, name: str) -> str | None:
        return self.contents[name].decode("utf-8") if name in self.contents else None

    @cached_property
    def train(self) -> TokenFile:
        if "train.safetensors" not in self.contents:
            raise BundleError(f"{self.dir / LOCK_NAME}: lists no train.safetensors; recompile the bundle")
        return parse_token_file(self.contents["train.safetensors"], str(self.dir / "train.safetensors"), "train", need_order=True)

    @cached_property
    def eval(self) -> TokenFile | None:
        if "eval.safetensors" not in self.contents:
            return None
        return parse_token_file(self.contents["eval.safetensors"], str(self.dir / "eval.safetensors"), "eval", need_order=False)

    @cached_property
    def _eval_prompts(self) -> tuple[dict, ...]:
        text = self._text("eval_prompts.jsonl") or ""
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BundleError(f"{self.dir / 'eval_prompts.jsonl'}: line {n} is not JSON ({exc.msg})") from None
        return tuple(rows)

    def eval_prompts(self) -> list[dict]:
        return [dict(row) for row in self._eval_prompts]

    @property
    def rules_text(self) -> str | None:
        return self._text("rules.yaml")

    @cached_property
    def rules(self):
        """The bundle's rules file, parsed from the verified bytes (None when compiled without rules)."""
        if self.rules_text is None:
            return None
        from sftc.runtime.evaluate.rules import load_rules_text

        return load_rules_text(self.rules_text, str(self.dir / "rules.yaml"))

    @property
    def chat_template(self) -> str | None:
        return self._text("chat_template.jinja")

    def train_dataset(self):
        """The packed train rows as a `datasets.Dataset` (input_ids, labels, seq_lengths, row), row r at index r.

        Built from Arrow list arrays over the flat buffers, so a large bundle is not turned into
        Python lists up front.
        """
        import datasets
        import pyarrow as pa

        tf = self.train
        table = pa.table({
            "input_ids": pa.LargeListArray.from_arrays(pa.array(tf.row_offsets), pa.array(tf.input_ids)),
            "labels": pa.LargeListArray.from_arrays(pa.array(tf.row_offsets), pa.array(tf.labels)),
            "seq_lengths": pa.LargeListArray.from_arrays(pa.array(tf.seq_offsets), pa.array(tf.seq_lengths)),
            "row": pa.array(np.arange(tf.n_rows, dtype=np.int64)),
        })
        return datasets.Dataset(table).with_format("numpy")


def load_bundle(bundle_dir: str | os.PathLike) -> Bundle:
    """The sealed lock (sftc.lock.load_lock) and the verified bytes of every bundle file."""
    bundle_dir = Path(bundle_dir)
    lock = load_lock(bundle_dir)
    return Bundle(dir=bundle_dir, lock=lock, contents=read_verified(bundle_dir, lock))
