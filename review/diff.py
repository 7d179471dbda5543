"""`sftc diff A B`: what a spec change does to the compiled run, for code review.

A one-line change of `batch.per_device` or `world_size` can double the examples each update
averages over, and with them the effective step size per example. Reasoning from the one knob
that changed misses that, so the diff never reasons: both sides are compiled (or read from the
bundle cache) and the *derived* numbers of the two locks are compared: examples and supervised
tokens per update, steps, tokens, learning rate per example, trainable parameters, memory, data
hashes and row counts, the split, template and tokenizer versions, the bundle id.

A and B may each be a spec file, a bundle directory (its lock is read as is), or a git revision
of a spec (`HEAD~1:specs/x.yaml`). A revision is written to a hidden file next to the spec's
working-tree path, so its relative paths resolve exactly as the checked-in spec's do, and is
deleted afterwards.

Exit codes (`diff_command`): 0 nothing changed, 1 something changed, 3 a `--fail-on` category
changed. Bad input raises `SftcError` (the CLI prints it and exits 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sftc.errors import SftcError
from sftc.lock import Lock, load_lock
from sftc.yaml import MAX_BYTES, read_text_file

# The kinds of change `--fail-on` can name. "spec" is any effective spec field (defaults filled
# in, so writing out a default is not a change); the others are facts of the compiled run.
CATEGORIES = ("spec", "data", "split", "budget", "parameters", "template", "tokenizer", "model", "libraries", "eval")
FORMATS = ("terminal", "markdown", "json")
EXIT_SAME, EXIT_CHANGED, EXIT_FAIL_ON = 0, 1, 3

ABSENT = "(absent)"


# --- reading the two sides -------------------------------------------------------------------


@dataclass
class Side:
    """One side of the diff: what the user named and the lock it stands for."""

    label: str
    kind: str  # "spec" | "bundle" | "git"
    lock: Lock


def _is_bundle_dir(path: Path) -> bool:
    return path.is_dir() and (path / "bundle.lock.json").is_file()


def _not_found(arg: str) -> SftcError:
    return SftcError(f"{arg}: not found; give a spec file, a bundle directory or a git revision REV:PATH "
                     "(e.g. HEAD~1:specs/x.yaml)")


def _require_side(arg: str) -> None:
    """A side names something on disk or a git revision (REV:PATH); said before any compile."""
    if not Path(arg).exists() and ":" not in arg:
        raise _not_found(arg)


def load_side(arg: str, bundles_dir: str | os.PathLike | None = None) -> Side:
    """Resolve a spec file, a bundle directory or `REV:PATH` to its lock (compiling if needed)."""
    _require_side(arg)
    path = Path(arg)
    if path.is_dir():
        if not _is_bundle_dir(path):
            raise SftcError(f"{arg}: a directory but not a bundle (no bundle.lock.json); give a spec, a bundle or REV:PATH")
        return Side(arg, "bundle", load_lock(path))
    if path.is_file():
        if path.name == "bundle.lock.json":
            return Side(arg, "bundle", load_lock(path.parent))
        from sftc.compiler import compile_spec

        _, lock, _ = compile_spec(path, bundles_dir=bundles_dir, progress=True)
        return Side(arg, "spec", lock)
    if ":" in arg:
        return Side(arg, "git", _load_git_side(arg, bundles_dir))
    raise SftcError(f"{arg}: neither a file nor a directory; give a spec file, a bundle directory or REV:PATH")


def _git(args: list[str], cwd: Path) -> bytes:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise SftcError("git is not installed; a REV:PATH argument needs git") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise SftcError(f"git {' '.join(args)}: {message[-1] if message else 'failed'}")
    return done.stdout


def _revision_path(arg: str, cwd: Path) -> tuple[str, str, Path]:
    """(rev, path as git reads it, where the spec lives in the working tree)."""
    rev, _, rel = arg.partition(":")
    if not rel:
        raise SftcError(f"{arg}: a git revision needs a path after the colon, e.g. {rev or 'HEAD'}:specs/x.yaml")
    top = Path(_git(["rev-parse", "--show-toplevel"], cwd).decode().strip())
    # git reads REV:path from the top of the repository, but ./path and ../path from cwd
    worktree = (cwd / rel) if rel.startswith(("./", "../")) else (top / rel)
    return rev, rel, worktree.resolve()


def _rewrite_error(exc: SftcError, temp: Path, label: str) -> SftcError:
    """Errors name the hidden temp file; name the revision the user typed instead."""
    forms = sorted({str(temp), str(temp.resolve()), temp.name}, key=len, reverse=True)

    def fix(text: str) -> str:
        for form in forms:
            text = text.replace(form, label)
        return text

    new = type(exc)(fix(exc.args[0] if exc.args else str(exc)), [fix(p) for p in exc.problems])
    return new


@contextlib.contextmanager
def _spec_copy_in_project(text: bytes, beside: Path, tag: str) -> Iterator[Path]:
    """A hidden copy of a spec placed next to `beside`, removed afterwards.

    Relative paths in a spec resolve against the project that holds the spec file, so the copy
    must live where the original lives; a copy in /tmp would resolve nothing.
    """
    parent = beside.parent
    if not parent.is_dir():
        raise SftcError(f"{beside}: its directory does not exist in the working tree, so the spec's relative paths cannot be resolved")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", tag)[:40] or "rev"
    fd, name = tempfile.mkstemp(prefix=f".sftc-diff-{safe}-", suffix=f"-{beside.name}", dir=parent)
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text)
        yield temp
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def compile_transient(spec_path: Path, bundles_dir: str | os.PathLike | None = None) -> Lock:
    """Lock of a spec file that is about to be deleted.

    Taken from the bundle cache when an identical bundle exists; otherwise compiled into a
    throwaway directory, so bundles/ never holds a lock whose spec_source is a deleted temp file.
    """
    from sftc.compiler.bundle import compile_spec, default_bundles_dir, find_existing, resolve_inputs

    inputs = resolve_inputs(spec_path)
    found = find_existing(Path(bundles_dir) if bundles_dir else default_bundles_dir(inputs), inputs)
    if found is not None:
        return found[1]
    with tempfile.TemporaryDirectory(prefix="sftc-diff-") as scratch:
        _, lock, _ = compile_spec(spec_path, bundles_dir=scratch, progress=True)
    return lock


def _load_git_side(arg: str, bundles_dir) -> Lock:
    cwd = Path.cwd()
    rev, rel, worktree = _revision_path(arg, cwd)
    text = _git(["show", f"{rev}:{rel}"], cwd)
    with _spec_copy_in_project(text, worktree, rev or "index") as temp:
        try:
            return compile_transient(temp, bundles_dir)
        except SftcError as exc:
            raise _rewrite_error(exc, temp, arg) from None


# --- comparing -------------------------------------------------------------------------------


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """`{"batch": {"per_device": 4}}` -> ("batch.per_device", 4). Lists of plain values stay one
    value (`data.files`); lists of mappings (`select.tie_break`) are indexed."""
    if isinstance(obj, dict):
        if not obj and prefix:
            yield prefix, {}
        for key in sorted(obj):
            yield from flatten(obj[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        for i, item in enumerate(obj):
            yield from flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _spec_order() -> dict[str, int]:
    from sftc.compiler.spec import Spec

    return {name: i for i, name in enumerate(Spec.model_fields)}


def changed_fields(spec_a: dict, spec_b: dict) -> list[dict]:
    """Every effective spec field that differs, in the spec's own section order."""
    flat_a, flat_b = dict(flatten(spec_a)), dict(flatten(spec_b))
    order = _spec_order()
    keys = sorted(set(flat_a) | set(flat_b), key=lambda k: (order.get(re.split(r"[.\[]", k)[0], 99), k))
    out = []
    for key in keys:
        before, after = flat_a.get(key, ABSENT), flat_b.get(key, ABSENT)
        if before != after:
            out.append({"key": key, "before": before, "after": after})
    return out


def ratio(before: Any, after: Any) -> Any:
    """after / before for numbers (min/mean/max dicts: per entry); None where it means nothing."""
    if isinstance(before, dict) and isinstance(after, dict):
        return {k: ratio(before.get(k), after.get(k)) for k in before if k in after}
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (numeric(before) and numeric(after)):
        return None
    if before == 0:
        return 1.0 if after == 0 else None
    return round(after / before, 6)


def _accepted(lock: Lock) -> int:
    return lock.data_manifest.train_examples + lock.data_manifest.eval_examples


def _stats(stats) -> dict:
    return stats.model_dump()


@dataclass(frozen=True)
class Quantity:
    category: str
    key: str
    label: str
    get: Callable[[Lock], Any]
    kind: str = "number"  # number | stats | bytes | hash | text


def _q(category, key, label, get, kind="number") -> Quantity:
    return Quantity(category, key, label, get, kind)


# What the review shows, in order. Each reads one number (or hash) out of a lock.
QUANTITIES: tuple[Quantity, ...] = (
    _q("budget", "examples_per_update", "examples per update", lambda l: l.batch.examples_per_update),
    _q("budget", "source_examples_per_update", "source examples per update", lambda l: _stats(l.budget.source_examples_per_update), "stats"),
    _q("budget", "supervised_tokens_per_update", "supervised tokens per update", lambda l: _stats(l.budget.supervised_tokens_per_update), "stats"),
    _q("budget", "tokens_per_update", "tokens per update", lambda l: _stats(l.budget.tokens_per_update), "stats"),
    _q("budget", "optimizer_steps", "optimizer steps", lambda l: l.budget.optimizer_steps),
    _q("budget", "epochs", "epochs", lambda l: l.budget.epochs),
    _q("budget", "warmup_steps", "warmup steps", lambda l: l.budget.warmup_steps),
    _q("budget", "train_rows", "packed train rows", lambda l: l.packing.rows),
    _q("budget", "packing_efficiency", "packing efficiency", lambda l: l.budget.packing_efficiency),
    _q("budget", "total_tokens", "total tokens", lambda l: l.budget.total_tokens),
    _q("budget", "supervised_tokens", "supervised tokens", lambda l: l.budget.supervised_tokens),
    _q("budget", "lr", "learning rate", lambda l: l.spec.optimizer.lr),
    _q("budget", "lr_per_example", "lr per example", lambda l: l.budget.lr_per_example),
    _q("parameters", "trainable", "trainable parameters", lambda l: l.parameters.trainable),
    _q("parameters", "total", "total parameters", lambda l: l.parameters.total),
    _q("parameters", "memory_total_bytes", "memory estimate per device", lambda l: l.memory.total_bytes, "bytes"),
    _q("parameters", "memory_weights_bytes", "  weights", lambda l: l.memory.parts.get("weights_bytes"), "bytes"),
    _q("parameters", "memory_gradients_bytes", "  gradients", lambda l: l.memory.parts.get("gradients_bytes"), "bytes"),
    _q("parameters", "memory_optimizer_bytes", "  optimizer state", lambda l: l.memory.parts.get("optimizer_bytes"), "bytes"),
    _q("parameters", "memory_activations_bytes", "  activations", lambda l: l.memory.parts.get("activations_bytes"), "bytes"),
    _q("data", "hash", "data hash", lambda l: l.data_manifest.hash, "hash"),
    _q("data", "rows_read", "rows read", lambda l: l.data_manifest.rows_read),
    _q("data", "accepted", "rows accepted", _accepted),
    _q("data", "rejected", "rows rejected", lambda l: sum(l.data_manifest.rejected.values())),
    _q("split", "train_groups", "train groups", lambda l: len(l.split.train_groups)),
    _q("split", "eval_groups", "eval groups", lambda l: len(l.split.eval_groups)),
    _q("split", "train_rows", "train rows", lambda l: l.split.train_rows),
    _q("split", "eval_rows", "eval rows", lambda l: l.split.eval_rows),
    _q("split", "merged_near_duplicates", "near-duplicate merges", lambda l: len(l.split.merged_near_duplicates)),
    _q("template", "template_version", "template version", lambda l: l.template_version, "hash"),
    _q("template", "terminator", "template terminator", lambda l: l.template.terminator if l.template else None, "text"),
    _q("tokenizer", "tokenizer_version", "tokenizer version", lambda l: l.tokenizer_version, "hash"),
    _q("tokenizer", "vocab_size", "tokenizer vocab size", lambda l: l.tokenizer.vocab_size),
    _q("model", "config_sha256", "model config", lambda l: l.model.config_sha256, "hash"),
    _q("model", "architecture", "model architecture", lambda l: l.model.architecture, "text"),
    _q("model", "dtype", "model dtype", lambda l: l.spec.model.dtype, "text"),
    _q("model", "attn_implementation", "attention kernel", lambda l: l.spec.model.attn_implementation, "text"),
    _q("eval", "rules_sha256", "eval rules", lambda l: l.eval_manifest.rules_sha256, "hash"),
    _q("eval", "prompts", "eval prompts", lambda l: l.eval_manifest.prompts),
)


def _dynamic_quantities(a: Lock, b: Lock) -> list[Quantity]:
    """Quantities whose names come from the locks: per-reason rejects, per-file hashes, libraries."""
    out = []
    reasons = sorted(set(a.data_manifest.rejected) | set(b.data_manifest.rejected))
    for reason in reasons:
        out.append(_q("data", f"rejected.{reason}", f"  rejected: {reason}",
                      lambda l, r=reason: l.data_manifest.rejected.get(r, 0)))
    paths = []
    for lock in (a, b):
        for f in lock.data_manifest.files:
            if f.path not in paths:
                paths.append(f.path)

    def file_field(lock: Lock, path: str, name: str) -> Any:
        for f in lock.data_manifest.files:
            if f.path == path:
                return getattr(f, name)
        return None

    for path in paths:
        out.append(_q("data", f"files.{path}.sha256", f"  {path}", lambda l, p=path: file_field(l, p, "sha256"), "hash"))
        out.append(_q("data", f"files.{path}.rows_read", f"  {path} rows", lambda l, p=path: file_field(l, p, "rows_read")))
    libraries = sorted(set(a.libraries) | set(b.libraries))
    for name in libraries:
        out.append(_q("libraries", name, name, lambda l, n=name: l.libraries.get(n), "text"))
    return out


def _insert_after(base: tuple[Quantity, ...], extra: list[Quantity]) -> list[Quantity]:
    """Per-reason and per-file rows go right after their category's totals."""
    out, pending = [], {}
    for q in extra:
        pending.setdefault(q.category, []).append(q)
    last_of = {q.category: i for i, q in enumerate(base)}
    for i, q in enumerate(base):
        out.append(q)
        if last_of[q.category] == i:
            out.extend(pending.pop(q.category, []))
    for rest in pending.values():
        out.extend(rest)
    return out


def split_moves(a: Lock, b: Lock) -> dict:
    """Groups that changed side: a moved group's rows were trained on in one run and evaluated in
    the other, so the two runs' eval numbers are not measured on the same thing."""
    train_a, eval_a = set(a.split.train_groups), set(a.split.eval_groups)
    train_b, eval_b = set(b.split.train_groups), set(b.split.eval_groups)
    return {
        "train_to_eval": sorted(train_a & eval_b),
        "eval_to_train": sorted(eval_a & train_b),
        "added": sorted((train_b | eval_b) - (train_a | eval_a)),
        "removed": sorted((train_a | eval_a) - (train_b | eval_b)),
    }


@dataclass
class Diff:
    a: Side
    b: Side
    fields: list[dict]
    rows: list[dict]  # every quantity: {category, key, label, kind, before, after, ratio, changed}
    moves: dict
    categories: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        # the inputs, not the bundle id: a spec compiled from a temp copy (REV:PATH) records another spec_source
        return bool(self.categories) or self.a.lock.inputs_hash != self.b.lock.inputs_hash

    def row(self, key: str, category: str = "budget") -> dict:
        return next(r for r in self.rows if r["key"] == key and r["category"] == category)


def compare(a: Side, b: Side) -> Diff:
    la, lb = a.lock, b.lock
    fields = changed_fields(la.spec.model_dump(mode="json"), lb.spec.model_dump(mode="json"))
    rows = []
    for q in _insert_after(QUANTITIES, _dynamic_quantities(la, lb)):
        before, after = q.get(la), q.get(lb)
        rows.append({
            "category": q.category, "key": q.key, "label": q.label, "kind": q.kind,
            "before": before, "after": after,
            "ratio": ratio(before, after) if q.kind in ("number", "stats", "bytes") else None,
            "changed": before != after,
        })
    moves = split_moves(la, lb)
    changed = {r["category"] for r in rows if r["changed"]}
    if fields:
        changed.add("spec")
    if any(moves.values()):
        changed.add("split")
    if la.model != lb.model:
        changed.add("model")  # path or revision moved even if the config bytes did not
    if la.template != lb.template:
        changed.add("template")
    if la.eval_manifest.metrics != lb.eval_manifest.metrics:
        changed.add("eval")
    diff = Diff(a, b, fields, rows, moves, [c for c in CATEGORIES if c in changed])
    diff.notes = _notes(diff)
    return diff


def _notes(diff: Diff) -> list[str]:
    """Plain-words consequences a reviewer would otherwise have to work out by hand."""
    notes = []
    epu, lr, lrpe = diff.row("examples_per_update"), diff.row("lr"), diff.row("lr_per_example")
    if epu["changed"] and isinstance(epu["ratio"], float):
        lr_part = "at the same learning rate" if not lr["changed"] else f"with learning rate ×{_fmt_ratio(lr['ratio'])}"
        notes.append(
            f"Each optimizer update now averages over ×{_fmt_ratio(epu['ratio'])} the rows "
            f"({_fmt_num(epu['before'])} -> {_fmt_num(epu['after'])}) {lr_part}: "
            f"lr per example ×{_fmt_ratio(lrpe['ratio'])}."
        )
    elif lrpe["changed"] and isinstance(lrpe["ratio"], float):
        notes.append(f"Learning rate per example ×{_fmt_ratio(lrpe['ratio'])}.")
    sup = diff.row("supervised_tokens_per_update")
    if sup["changed"] and isinstance(sup["ratio"], dict) and sup["ratio"].get("mean") and isinstance(epu["ratio"], float):
        if abs(sup["ratio"]["mean"] - epu["ratio"]) > 0.05 * epu["ratio"]:
            notes.append(
                f"Supervised tokens per update (mean) ×{_fmt_ratio(sup['ratio']['mean'])}, not ×{_fmt_ratio(epu['ratio'])}: "
                "rows carry different numbers of answer tokens."
            )
    steps = diff.row("optimizer_steps")
    if steps["changed"] and steps["ratio"]:
        notes.append(f"Optimizer steps ×{_fmt_ratio(steps['ratio'])} ({steps['before']} -> {steps['after']}): "
                     "warmup, checkpoints and the schedule shift with it.")
    every = diff.b.lock.spec.checkpoint.every_steps
    if steps["changed"] and isinstance(every, int) and isinstance(steps["after"], int):
        saves_before = (steps["before"] or 0) // (diff.a.lock.spec.checkpoint.every_steps or every)
        if steps["after"] // every != saves_before:
            notes.append(f"checkpoint.every_steps {every} gives {steps['after'] // every} intermediate checkpoint(s) "
                         f"(was {saves_before}); each is also an evaluation and a selection candidate.")
    moved = len(diff.moves["train_to_eval"]) + len(diff.moves["eval_to_train"])
    if moved:
        notes.append(f"{moved} group(s) changed side between train and eval: the two runs' eval metrics are not comparable.")
    if "tokenizer" in diff.categories or "template" in diff.categories:
        notes.append("The token stream changed (template or tokenizer): losses of the two runs are not comparable.")
    mem = next(r for r in diff.rows if r["key"] == "memory_total_bytes")
    if mem["changed"] and isinstance(mem["ratio"], float) and mem["ratio"] > 1.1:
        notes.append(f"Memory estimate per device ×{_fmt_ratio(mem['ratio'])} ({_fmt_bytes(mem['before'])} -> {_fmt_bytes(mem['after'])}).")
    return notes


def diff_paths(a: str, b: str, bundles_dir: str | os.PathLike | None = None) -> Diff:
    """Compile or read both sides and compare them."""
    for arg in (a, b):  # a missing second side is said before the first one is compiled
        _require_side(arg)
    return compare(load_side(a, bundles_dir), load_side(b, bundles_dir))


# --- formatting ------------------------------------------------------------------------------


def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e15:
            return f"{value:.4g}"
        if value.is_integer():
            return f"{int(value):,}"  # a mean of 512.0 reads like the 512 beside it
        if abs(value) >= 1e3:
            return f"{value:,.2f}".rstrip("0").rstrip(".")
        return f"{value:.6g}"
    return str(value)


def _fmt_ratio(r: Any) -> str:
    if r is None:
        return "-"
    text = f"{r:.3g}"
    # "2.0", not "2": reads as a ratio next to the counts it sits beside
    return text if ("." in text or "e" in text) else text + ".0"


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return _fmt_num(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_hash(h: Any) -> str:
    if not isinstance(h, str):
        return _fmt_num(h)
    algo, sep, hexdigest = h.partition(":")
    return f"{algo}:{hexdigest[:12]}" if sep else h[:12]


def _fmt_value(value: Any) -> str:
    """A spec value as it would be written in YAML."""
    if value == ABSENT:
        return ABSENT
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return _fmt_num(value)
    return json.dumps(value, ensure_ascii=False)


def _fmt_row_value(row: dict, value: Any) -> str:
    kind = row["kind"]
    if value is None:
        return ABSENT
    if kind == "stats" and isinstance(value, dict):
        return " / ".join(_fmt_num(value.get(k)) for k in ("min", "mean", "max"))
    if kind == "bytes":
        return _fmt_bytes(value)
    if kind == "hash":
        return _fmt_hash(value)
    return _fmt_num(value) if not isinstance(value, str) else value


def _fmt_row_ratio(row: dict) -> str:
    r = row["ratio"]
    if r is None:
        return ""
    if isinstance(r, dict):
        parts = [_fmt_ratio(r.get(k)) for k in ("min", "mean", "max")]
        return "×" + (parts[0] if len(set(parts)) == 1 else " / ".join(parts))
    return f"×{_fmt_ratio(r)}"


def _label(row: dict) -> str:
    return row["label"] + (" (min / mean / max)" if row["kind"] == "stats" else "")


def _formula(lock: Lock) -> str:
    b = lock.batch
    return f"{b.per_device}×{b.grad_accum}×{b.world_size}"


def _bundle_line(diff: Diff) -> tuple[str, str]:
    return diff.a.lock.bundle_id, diff.b.lock.bundle_id


def format_terminal(diff: Diff, color: bool = False) -> str:
    import click

    def s(text: str, **style) -> str:
        return click.style(text, **style) if color else text

    before_style, after_style = {"fg": "red"}, {"fg": "green"}
    lines = [s(f"sftc diff {diff.a.label} -> {diff.b.label}", bold=True)]
    id_a, id_b = _bundle_line(diff)
    if not diff.changed:
        lines.append(f"no change: both compile to {id_a}")
        return "\n".join(lines) + "\n"

    lines += ["", s(f"spec fields changed ({len(diff.fields)})", bold=True)]
    if not diff.fields:
        lines.append("  (none: the change is in the inputs the spec points at)")
    width = max([len(f["key"]) for f in diff.fields] + [10])
    for f in diff.fields:
        lines.append(f"  {f['key']:<{width}}  {s(_fmt_value(f['before']), **before_style)} -> {s(_fmt_value(f['after']), **after_style)}")

    lines += ["", s("what it changes in the compiled run", bold=True)]
    changed_rows = [r for r in diff.rows if r["changed"]]
    width = max([len(_label(r)) for r in changed_rows] + [10])
    category = None
    for row in changed_rows:
        if row["category"] != category:
            category = row["category"]
            lines.append(f"  {s(category, underline=True)}")
        ratio_text = _fmt_row_ratio(row)
        if ratio_text:
            ratio_text = "  " + s(ratio_text, fg="yellow", bold=True)
        extra = ""
        if row["key"] == "examples_per_update" and row["category"] == "budget":
            extra = f"  ({_formula(diff.a.lock)} -> {_formula(diff.b.lock)})"
        lines.append(
            f"    {_label(row):<{width}}  {s(_fmt_row_value(row, row['before']), **before_style)} -> "
            f"{s(_fmt_row_value(row, row['after']), **after_style)}{ratio_text}{extra}"
        )
    moves = diff.moves
    if any(moves.values()):
        lines.append(f"  {s('split', underline=True)} groups moved")
        for key, title in (("train_to_eval", "train -> eval"), ("eval_to_train", "eval -> train"), ("added", "new"), ("removed", "gone")):
            if moves[key]:
                lines.append(f"    {title:<14} {len(moves[key])}: {_preview(moves[key])}")
    if diff.notes:
        lines += ["", s("notes", bold=True)] + [f"  - {n}" for n in diff.notes]
    lines += ["", f"bundle      {s(id_a, **before_style)} -> {s(id_b, **after_style)}",
              f"categories  {', '.join(diff.categories) or '(none)'}"]
    return "\n".join(lines) + "\n"


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(diff: Diff) -> str:
    """A pull-request comment: what changed in the spec, then in the compiled run, as tables."""
    id_a, id_b = _bundle_line(diff)
    lines = [f"### `sftc diff` {_md(diff.a.label)} → {_md(diff.b.label)}", ""]
    if not diff.changed:
        return "\n".join(lines + [f"No change: both compile to `{id_a}`.", ""])
    lines += [f"**Changed:** {', '.join(diff.categories)}  ", f"**Bundle:** `{id_a}` → `{id_b}`", ""]
    if diff.notes:
        lines += [f"> {n}  " for n in diff.notes] + [""]
    lines += ["#### Spec fields", ""]
    if diff.fields:
        lines += ["| field | before | after |", "|---|---|---|"]
        lines += [f"| `{_md(f['key'])}` | `{_md(_fmt_value(f['before']))}` | `{_md(_fmt_value(f['after']))}` |" for f in diff.fields]
    else:
        lines.append("_No spec field changed; the difference is in the inputs it points at._")
    lines += ["", "#### Compiled run", "", "| | quantity | before | after | ratio |", "|---|---|---|---|---|"]
    for row in (r for r in diff.rows if r["changed"]):
        label = _label(row).strip()
        if row["key"] == "examples_per_update" and row["category"] == "budget":
            label += f" ({_formula(diff.a.lock)} → {_formula(diff.b.lock)})"
        lines.append(
            f"| {row['category']} | {_md(label)} | {_md(_fmt_row_value(row, row['before']))} | "
            f"{_md(_fmt_row_value(row, row['after']))} | {_md(_fmt_row_ratio(row))} |"
        )
    moves = diff.moves
    if any(moves.values()):
        lines += ["", "<details><summary>Split: groups moved</summary>", ""]
        for key, title in (("train_to_eval", "train → eval"), ("eval_to_train", "eval → train"), ("added", "new"), ("removed", "gone")):
            if moves[key]:
                lines.append(f"- {title} ({len(moves[key])}): {_md(_preview(moves[key], 30))}")
        lines += ["", "</details>"]
    lines.append("")
    return "\n".join(lines)


def to_json(diff: Diff) -> dict:
    """Machine-readable: each derived quantity as {before, after, ratio}, grouped by category."""
    derived: dict[str, dict] = {}
    for row in diff.rows:
        derived.setdefault(row["category"], {})[row["key"]] = {
            "before": row["before"], "after": row["after"], "ratio": row["ratio"],
        }
    id_a, id_b = _bundle_line(diff)
    return {
        "a": {"input": diff.a.label, "kind": diff.a.kind, "bundle_id": id_a},
        "b": {"input": diff.b.label, "kind": diff.b.kind, "bundle_id": id_b},
        "changed": diff.changed,
        "categories_changed": diff.categories,
        "changed_fields": diff.fields,
        "bundle_id": {"before": id_a, "after": id_b, "ratio": None},
        "derived": derived,
        "split_moves": diff.moves,
        "notes": diff.notes,
    }


def format_json(diff: Diff) -> str:
    return json.dumps(to_json(diff), indent=2, ensure_ascii=False, default=str) + "\n"


def parse_fail_on(fail_on: tuple[str, ...] | list[str] | str | None) -> list[str]:
    """`("data,budget", "split")` -> ["data", "budget", "split"]; "any" means every category."""
    if fail_on is None:
        return []
    items = [fail_on] if isinstance(fail_on, str) else list(fail_on)
    names = [n.strip().lower() for item in items for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in CATEGORIES and n != "any"]
    if unknown:
        raise SftcError(f"--fail-on: unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                        f"allowed: {', '.join(CATEGORIES)}, any")
    return list(CATEGORIES) if "any" in names else names


def exit_code(diff: Diff, fail_on: list[str]) -> int:
    if any(c in diff.categories for c in fail_on):
        return EXIT_FAIL_ON
    return EXIT_CHANGED if diff.changed else EXIT_SAME


def render(diff: Diff, fmt: str, color: bool = False) -> str:
    if fmt in ("terminal", "text"):
        return format_terminal(diff, color=color)
    if fmt == "markdown":
        return format_markdown(diff)
    if fmt == "json":
        return format_json(diff)
    raise SftcError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")


def diff_command(a: str, b: str, fmt: str, fail_on: tuple[str, ...], color: bool | None) -> int:
    """`sftc diff A B`: print the diff, return the exit code (0 same, 1 changed, 3 fail-on hit)."""
    import click

    fmt = (fmt or "terminal").lower()
    if fmt not in FORMATS and fmt != "text":
        raise SftcError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    wanted = parse_fail_on(fail_on)  # before compiling: a typo should not cost a compile
    diff = diff_paths(a, b)
    use_color = (fmt == "terminal" and sys.stdout.isatty()) if color is None else (color and fmt == "terminal")
    # click.echo strips ANSI codes when stdout is not a terminal unless told otherwise
    click.echo(render(diff, fmt, color=use_color), nl=False, color=use_color)
    return exit_code(diff, wanted)


# --- git textconv ----------------------------------------------------------------------------


def _has_project_marker(path: Path) -> bool:
    from sftc.compiler.spec import ROOT_MARKERS

    start = path.resolve().parent
    return any((d / m).exists() for d in (start, *start.parents) for m in ROOT_MARKERS)


def _textconv_lock(path: Path) -> Lock:
    """Lock for a spec file git handed us. For the old side of a diff git writes the blob to a
    temp file outside the project, where relative paths resolve nothing; git runs textconv from
    the top of the work tree, so the copy goes there (paths in a spec resolve against the project
    root, not the spec's own directory)."""
    if _has_project_marker(path):
        from sftc.compiler import compile_spec

        _, lock, _ = compile_spec(path, progress=True)
        return lock
    _, data = read_text_file(path)  # a regular file of spec size: git hands us blobs, a device never ends
    with _spec_copy_in_project(data, Path.cwd().resolve() / path.name, "textconv") as temp:
        try:
            return compile_transient(temp)
        except SftcError as exc:
            raise _rewrite_error(exc, temp, str(path)) from None


def summary_facts(lock: Lock) -> list[str]:
    """The key compiled facts, one per line, stable order: what a line diff should compare."""
    b, dm, split, batch = lock.budget, lock.data_manifest, lock.split, lock.batch
    stats = lambda d: " / ".join(_fmt_num(v) for v in (d.min, d.mean, d.max))  # noqa: E731
    lines = [
        f"bundle: {lock.bundle_id}",
        f"examples_per_update: {batch.examples_per_update} ({batch.per_device} per_device x "
        f"{batch.grad_accum} grad_accum x {batch.world_size} world_size)",
        f"supervised_tokens_per_update (min/mean/max): {stats(b.supervised_tokens_per_update)}",
        f"source_examples_per_update (min/mean/max): {stats(b.source_examples_per_update)}",
        f"optimizer_steps: {b.optimizer_steps} ({b.epochs} epochs, {b.warmup_steps} warmup)",
        f"total_tokens: {_fmt_num(b.total_tokens)} ({_fmt_num(b.supervised_tokens)} supervised)",
        f"lr: {_fmt_num(lock.spec.optimizer.lr)} (per example {_fmt_num(b.lr_per_example)})",
        f"trainable_parameters: {_fmt_num(lock.parameters.trainable)} of {_fmt_num(lock.parameters.total)}",
        f"memory_estimate: {_fmt_bytes(lock.memory.total_bytes)} per device",
        f"data: {dm.hash}",
    ]
    for f in dm.files:
        lines.append(f"data_file: {f.path} sha256:{f.sha256} ({f.rows_read} rows)")
    lines.append(f"rows: {dm.rows_read} read, {_accepted(lock)} accepted, {sum(dm.rejected.values())} rejected")
    for reason, n in sorted(dm.rejected.items()):
        lines.append(f"rejected.{reason}: {n}")
    lines += [
        f"split: {len(split.train_groups)} train groups ({split.train_rows} rows), "
        f"{len(split.eval_groups)} eval groups ({split.eval_rows} rows)",
        f"template: {lock.template_version}",
        f"tokenizer: {lock.tokenizer_version}",
        f"model_config: {lock.model.config_sha256}",
    ]
    return lines


def textconv(path: str | os.PathLike) -> str:
    """Compact compiled summary of a spec file, for `git diff` (diff.sftc.textconv).

    Key facts first, then every effective spec field (defaults filled in), one per line. It never
    fails: git aborts the whole diff when a textconv command fails, so a spec that does not
    compile is shown with its error instead.
    """
    path = Path(path)
    try:
        lock = _textconv_lock(path)
    except SftcError as exc:
        raw = ""
        if path.is_file():  # shown as it is, up to the size a spec can have
            with open(path, "rb") as handle:
                raw = handle.read(MAX_BYTES).decode("utf-8", errors="replace")
        return "\n".join([f"# sftc: does not compile: {exc}".replace("\n", "\n# "), raw]).rstrip("\n") + "\n"
    lines = ["# compiled (sftc textconv)", *summary_facts(lock), "# spec (defaults filled in)"]
    order = _spec_order()
    flat = sorted(flatten(lock.spec.model_dump(mode="json")), key=lambda kv: (order.get(re.split(r"[.\[]", kv[0])[0], 99), kv[0]))
    lines += [f"{key}: {_fmt_value(value)}" for key, value in flat]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # `python -m sftc.review.diff textconv PATH` until the CLI has the command
    if len(sys.argv) == 3 and sys.argv[1] == "textconv":
        sys.stdout.write(textconv(sys.argv[2]))
    else:
        sys.stderr.write("usage: python -m sftc.review.diff textconv PATH\n")
        sys.exit(2)
