"""Load a compiled bundle: the lock and the token files, exactly as `sftc compile` wrote them.

The runtime never re-tokenizes. Everything it trains on comes out of `train.safetensors`, in the
order the lock's `order` tensor fixes, so two runs of one bundle see the same tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sftc.errors import BundleError
from sftc.io import read_json

LOCK_NAME = "bundle.lock.json"
SUPPORTED_FORMATS = {1, "1"}
IGNORE = -100
TOKEN_KEYS = ("input_ids", "labels", "row_offsets", "seq_lengths", "seq_offsets")


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
        supervised from another one's context.
        """
        keep = self.labels != IGNORE
        # validate() guarantees each row's seq_lengths tile it, so the segments tile the flat array
        starts = np.concatenate([[0], np.cumsum(self.seq_lengths.astype(np.int64))[:-1]])
        keep[starts[starts < len(keep)]] = False
        cumulative = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        return cumulative[self.row_offsets[1:]] - cumulative[self.row_offsets[:-1]]

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


def load_token_file(path: Path, name: str, need_order: bool) -> TokenFile:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise BundleError(f"{path}: {name} token file is missing; recompile the bundle")
    try:
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise BundleError(f"{path}: cannot read the {name} token file ({exc})") from None
    missing = [k for k in TOKEN_KEYS if k not in arrays] + (["order"] if need_order and "order" not in arrays else [])
    if missing:
        raise BundleError(f"{path}: {name} token file lacks tensor(s) {missing}")
    tf = TokenFile(path=path, order=arrays.get("order"), **{k: arrays[k] for k in TOKEN_KEYS})
    tf.validate(name)
    return tf


@dataclass
class Bundle:
    dir: Path
    lock: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        return self.lock["bundle_id"]

    @cached_property
    def spec(self):
        from sftc.compiler.spec import Spec

        return Spec.model_validate(self.lock["spec"])

    @property
    def project_root(self) -> Path:
        """The lock records it relative to the bundle directory (so a moved project still works)."""
        root = self.lock.get("project_root")
        if not root:
            return self.dir.resolve().parent.parent
        return Path(root) if Path(root).is_absolute() else (self.dir / root).resolve()

    def resolve(self, value: str | os.PathLike) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.project_root / p

    @property
    def model_path(self) -> str:
        """Local directory when it exists (inputs are recorded resolved), else the hub id as written."""
        inputs = self.lock.get("inputs") or {}
        for candidate in (inputs.get("model_path"), self.lock["model"]["path"]):
            if candidate and self.resolve(candidate).exists():
                return str(self.resolve(candidate))
        return self.lock["model"]["path"]

    @property
    def tokenizer_path(self) -> str:
        inputs = self.lock.get("inputs") or {}
        for candidate in (inputs.get("tokenizer_path"), self.lock["tokenizer"].get("path")):
            if candidate and self.resolve(candidate).exists():
                return str(self.resolve(candidate))
        return self.lock["tokenizer"].get("path") or self.model_path

    @cached_property
    def train(self) -> TokenFile:
        return load_token_file(self.dir / "train.safetensors", "train", need_order=True)

    @cached_property
    def eval(self) -> TokenFile | None:
        path = self.dir / "eval.safetensors"
        return load_token_file(path, "eval", need_order=False) if path.exists() else None

    def eval_prompts(self) -> list[dict]:
        path = self.dir / "eval_prompts.jsonl"
        if not path.exists():
            return []
        rows = []
        with open(path, encoding="utf-8") as handle:
            for n, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise BundleError(f"{path}: line {n} is not JSON ({exc.msg})") from None
        return rows

    @property
    def rules_path(self) -> Path | None:
        path = self.dir / "rules.yaml"
        return path if path.exists() else None

    @property
    def chat_template(self) -> str | None:
        path = self.dir / "chat_template.jinja"
        return path.read_text(encoding="utf-8") if path.exists() else None

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
    bundle_dir = Path(bundle_dir)
    lock_path = bundle_dir / LOCK_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    if not lock_path.is_file():
        raise BundleError(f"{lock_path}: missing; the bundle is incomplete (compile it again)")
    try:
        lock = read_json(lock_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{lock_path}: not valid JSON ({exc})") from None
    required = ("bundle_id", "spec", "files", "tokenizer", "model", "budget")
    missing = [k for k in required if k not in lock]
    if missing:
        raise BundleError(f"{lock_path}: lock lacks key(s) {missing}")
    version = lock.get("format_version")
    if version not in SUPPORTED_FORMATS:
        raise BundleError(
            f"{lock_path}: format_version {version!r} is not supported by this runtime (supported: {sorted(SUPPORTED_FORMATS)})"
        )
    return Bundle(dir=bundle_dir, lock=lock)
