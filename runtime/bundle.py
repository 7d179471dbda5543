"""Load a compiled bundle: the sealed lock and the bundle files, exactly as `sftc compile` wrote them.

The runtime never re-tokenizes. Everything it trains on comes out of `train.safetensors`, in the
order the lock's `order` tensor fixes, so two runs of one bundle see the same tokens. Every bundle
file is read once, checked against the lock, and used from memory from then on.
"""

from __future__ import annotations

import json
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


def parse_token_file(data: bytes, label: str, name: str, need_order: bool) -> TokenFile:
    """A token file from the bytes the bundle verified (`label` names it in errors)."""
    from safetensors.numpy import load

    try:
        arrays = load(data)
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise BundleError(f"{label}: cannot read the {name} token file ({exc})") from None
    missing = [k for k in TOKEN_KEYS if k not in arrays] + (["order"] if need_order and "order" not in arrays else [])
    if missing:
        raise BundleError(f"{label}: {name} token file lacks tensor(s) {missing}")
    tf = TokenFile(path=Path(label), order=arrays.get("order"), **{k: arrays[k] for k in TOKEN_KEYS})
    tf.validate(name)
    return tf


def read_verified(bundle_dir: Path, lock: Lock) -> dict[str, bytes]:
    """Every file the lock lists, read once and checked against its sha256; a file the lock does not
    list is refused. The runtime uses these bytes and never opens a bundle file again, so a file
    overwritten or deleted mid-run changes nothing, and a file dropped into the bundle (a rules.yaml
    in a bundle compiled without rules, an eval.safetensors where there was no eval split) is never
    consumed."""
    problems, contents = [], {}
    for name, expected in sorted(lock.files.items()):
        path = bundle_dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{path}: listed in the lock but missing")
            continue
        except OSError as exc:
            problems.append(f"{path}: listed in the lock but unreadable ({exc.strerror})")
            continue
        if sha256_bytes(data) != expected:
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
    """A verified bundle: its sealed Lock and the bytes of every listed file, read once."""

    dir: Path
    lock: Lock
    contents: dict[str, bytes] = field(repr=False)

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
