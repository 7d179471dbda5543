"""The run directory (`runs/<bundle_id>/`): its records, how each is written, read and validated.

    run.json        what this run is and how its last session ended (running, finished, failed,
                    stopped, interrupted); rewritten atomically at every change of status
    metrics.jsonl   one JSON line per train update, per checkpoint evaluation, per rotation;
                    append-only while training
    best.json       the selection: derived from the checkpoints' evaluation records at every start
                    and after every checkpoint, never read back as state
    run.lock        flock held by the one `sftc run` writing the directory

status, report, select and export read the same files through here, so every reader refuses a
damaged record the same way: naming the file and saying what to do. Nothing unparseable is ever
deleted: damaged metrics lines are moved beside the file (metrics.jsonl.quarantine-<n>), and the
selection refuses to run on an eval history with holes unless the user allows it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sftc.errors import RunError
from sftc.lock import Lock, load_lock
from sftc.io import atomic_write_json, atomic_write_text, read_json
from sftc.runtime import checkpoint as ckpt

RUN_JSON = "run.json"
BEST_JSON = "best.json"
METRICS = "metrics.jsonl"
RUN_STATUSES = ("running", "finished", "failed", "stopped", "interrupted")
_QUARANTINE = re.compile(r"^metrics\.jsonl\.(quarantine|torn)-(\d+)$")


class MetricsWarning(UserWarning):
    pass


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- reading a JSON record -------------------------------------------------------------------


def _read_record(path: Path, what: str, remedy: str) -> dict:
    """A JSON object from `path`, or a RunError naming the file, what is wrong and what to do."""
    try:
        value = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: the {what} is damaged (not valid JSON: {exc}); {remedy}") from None
    except OSError as exc:
        raise RunError(f"{path}: cannot read the {what} ({exc.strerror or exc}); {remedy}") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: the {what} is damaged (a JSON {type(value).__name__}, expected an object); {remedy}")
    return value


def _require(path: Path, record: dict, what: str, remedy: str, checks: dict[str, tuple]) -> None:
    wrong = [f"{key}: found {record.get(key)!r}" for key, types in checks.items()
             if key in record and not isinstance(record[key], types)]
    if wrong:
        raise RunError(f"{path}: the {what} is damaged; {remedy}", wrong)


# --- run.json --------------------------------------------------------------------------------


def read_run_json(run_dir) -> dict:
    """run.json, validated; {} when the run never started."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        return {}
    remedy = ("it is rewritten by the next `sftc run` of this directory (the checkpoints are the state), "
              "or delete it")
    record = _read_record(path, "run record", remedy)
    _require(path, record, "run record", remedy,
             {"bundle_id": (str,), "bundle_dir": (str,), "status": (str,), "sessions": (list,)})
    if "status" in record and record["status"] not in RUN_STATUSES:
        raise RunError(f"{path}: the run record is damaged (status {record['status']!r}; allowed: "
                       f"{', '.join(RUN_STATUSES)}); {remedy}")
    return record


# What a clock measures (when a session ran, how fast) differs on every run of the same bundle, so it
# never goes into run.json, metrics.jsonl or checkpoint.json: the records a DVC output hashes stay
# the same bytes on any machine that trains the same bundle. It goes to TIMINGS (wall clock of each
# session) and TIMINGS_LOG (per-step throughput), which .dvcignore leaves out of DVC's hashes.
TIMINGS = "timings.json"
TIMINGS_LOG = "timings.jsonl"
CLOCK_RECORD_KEYS = ("started_at", "finished_at")
CLOCK_METRIC_KEYS = ("tokens_per_s", "generation_seconds")


def split_clock(record: dict) -> tuple[dict, dict]:
    """(run.json's content, timings.json's content) of one run record."""
    stable = {k: v for k, v in record.items() if k not in CLOCK_RECORD_KEYS}
    clock = {k: record[k] for k in CLOCK_RECORD_KEYS if k in record}
    sessions = record.get("sessions") or []
    stable["sessions"] = [{k: v for k, v in s.items() if k not in CLOCK_RECORD_KEYS} for s in sessions]
    clock["sessions"] = [{k: v for k, v in s.items() if k in CLOCK_RECORD_KEYS or k == "resumed_step"} for s in sessions]
    return stable, clock


def read_timings(run_dir) -> dict:
    """timings.json, or {} when it is missing or damaged (it only ever informs, never decides)."""
    path = Path(run_dir) / TIMINGS
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def earlier_sessions(run_dir) -> list[dict]:
    """The sessions an earlier run.json lists, each with its wall clock from timings.json. Either
    file damaged, or the two out of step, leaves what it cannot vouch for out: run.json's sessions
    are kept only as a list of records, and a clock is added only from a matching list of records,
    its clock keys alone (timings.json informs, it never changes what run.json says)."""
    try:
        sessions = read_run_json(run_dir).get("sessions")
    except RunError:  # a damaged run.json is rewritten; its sessions are not state
        return []
    if not isinstance(sessions, list) or not all(isinstance(s, dict) for s in sessions):
        return []
    clocks = read_timings(run_dir).get("sessions")
    if not isinstance(clocks, list) or len(clocks) != len(sessions) or not all(isinstance(c, dict) for c in clocks):
        return sessions
    return [{**s, **{k: c[k] for k in CLOCK_RECORD_KEYS if k in c}} for s, c in zip(sessions, clocks)]


def write_run_json(run_dir, record: dict, tolerate_storage_errors: bool = False) -> bool:
    """Write run.json (and its clock readings to timings.json) atomically. With
    `tolerate_storage_errors` (the failure paths, where the disk may be the very thing that failed)
    a storage error is reported on stderr once and False comes back, so the original error is the
    one the user sees, not a chain of tracebacks."""
    stable, clock = split_clock(record)
    target = Path(run_dir) / RUN_JSON
    try:
        atomic_write_json(target, stable)
        target = Path(run_dir) / TIMINGS  # the status is recorded; only its clock readings are at stake now
        atomic_write_json(target, clock)
        return True
    except OSError as exc:
        if not tolerate_storage_errors:
            raise
        what = f"status {record.get('status')!r}" if target.name == RUN_JSON else "the clock readings"
        print(f"sftc: could not record {what} in {target}: {exc.strerror or exc}", file=sys.stderr)
        return False


# --- metrics.jsonl ---------------------------------------------------------------------------


@dataclass
class DamagedLine:
    """A metrics line that does not parse: where it was, its bytes, and what it may have held."""

    source: str  # the file it sits in now
    line: int
    text: str
    torn: bool  # the unterminated last line of a killed write, not damage

    @property
    def kind(self) -> str | None:
        match = re.search(r'"kind":\s*"(train|eval|rotate)"', self.text)
        return match.group(1) if match else None

    @property
    def step(self) -> int | None:
        match = re.search(r'"step":\s*(\d+)', self.text)
        return int(match.group(1)) if match else None


@dataclass
class MetricsLog:
    path: Path
    lines: list[dict] = field(default_factory=list)
    damaged: list[DamagedLine] = field(default_factory=list)

    @property
    def train(self) -> list[dict]:
        return [line for line in self.lines if line.get("kind") == "train"]

    @property
    def evals(self) -> list[dict]:
        return [line for line in self.lines if line.get("kind") == "eval"]

    def missing_evals(self, recovered_steps: set[int]) -> list[str]:
        """Damaged lines that were, or may have been, an evaluation no other record holds.

        A torn last line is not a hole: every record is fsynced before the next one starts and an
        eval line before its checkpoint's rename, so a torn line belongs to work after the last
        complete checkpoint, which a resume runs again. A damaged line that still reads as a train
        or rotation line, or as the eval of a step whose checkpoint.json holds the metrics, is not
        one either.
        """
        holes = []
        evaluated = {int(line["step"]) for line in self.evals if isinstance(line.get("step"), int)}
        for bad in self.damaged:
            if bad.torn or bad.kind in ("train", "rotate"):
                continue
            if bad.step is not None and bad.kind == "eval" and (bad.step in recovered_steps or bad.step in evaluated):
                continue
            what = f"the eval of step {bad.step}" if bad.kind == "eval" and bad.step is not None else "a record"
            holes.append(f"{bad.source} line {bad.line} held {what} that cannot be read")
        return holes


def _parse_lines(path: Path, text: str, log: MetricsLog, torn_tail: bool) -> None:
    raw_lines = text.split("\n")
    ends_clean = text.endswith("\n") or text == ""
    if ends_clean:
        raw_lines = raw_lines[:-1]
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("kind"), str) and isinstance(row.get("step"), int):
            log.lines.append(row)
        else:
            torn = torn_tail or (n == len(raw_lines) and not ends_clean)
            log.damaged.append(DamagedLine(source=path.name, line=n, text=raw, torn=torn))


def read_metrics_log(run_dir) -> MetricsLog:
    """The one reader of metrics.jsonl: parsed lines in file order, plus every line that does not
    parse, from the file itself and from its quarantine files."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    log = MetricsLog(path=path)
    for side in sorted(run_dir.glob(METRICS + ".*")):
        match = _QUARANTINE.match(side.name)
        if match:
            scratch = MetricsLog(path=side)
            _parse_lines(side, side.read_text(encoding="utf-8", errors="replace"), scratch, match.group(1) == "torn")
            # a quarantined line stays out of the history until the user puts it back (and deletes
            # the quarantine file), even one that parses now: it still counts as damage
            log.damaged += scratch.damaged + [
                DamagedLine(source=side.name, line=0, text=json.dumps(row), torn=match.group(1) == "torn")
                for row in scratch.lines
            ]
    if path.is_file():
        _parse_lines(path, path.read_bytes().decode("utf-8", errors="replace"), log, False)
    return log


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of metrics.jsonl, in file order; damaged lines are skipped with a
    warning that names them (the runtime quarantines them at its next start)."""
    log = read_metrics_log(run_dir)
    in_file = [d for d in log.damaged if d.source == METRICS and not d.torn]
    if in_file:
        warnings.warn(f"{log.path}: {len(in_file)} line(s) do not parse (line {', '.join(str(d.line) for d in in_file)}); "
                      "skipped here, and moved to a quarantine file by the next `sftc run`", MetricsWarning, stacklevel=2)
    return log.train, log.evals


def _next_quarantine(run_dir: Path, kind: str) -> Path:
    taken = [int(m.group(2)) for p in run_dir.glob(METRICS + ".*") if (m := _QUARANTINE.match(p.name)) and m.group(1) == kind]
    return run_dir / f"{METRICS}.{kind}-{max(taken, default=0) + 1}"


def repair_metrics(run_dir, through_step: int) -> MetricsLog:
    """At the start of a session: keep the parsed lines up to the step the run resumes from (later
    ones are about to be logged again), and move every line that does not parse, byte for byte,
    into a quarantine file beside metrics.jsonl, with a warning. Returns the log as it now stands."""
    run_dir = Path(run_dir)
    log = read_metrics_log(run_dir)
    if not log.path.exists():
        return log
    fresh = [d for d in log.damaged if d.source == METRICS]
    for kind, lines in (("quarantine", [d for d in fresh if not d.torn]), ("torn", [d for d in fresh if d.torn])):
        if not lines:
            continue
        target = _next_quarantine(run_dir, kind)
        atomic_write_text(target, "".join(d.text + "\n" for d in lines))
        for d in lines:
            d.source = target.name
        if kind == "quarantine":
            warnings.warn(f"{log.path}: line(s) {', '.join(str(d.line) for d in lines)} do not parse; moved to "
                          f"{target.name} (nothing is deleted)", MetricsWarning, stacklevel=2)
    log.lines = [line for line in log.lines if line["step"] <= through_step]
    atomic_write_text(log.path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in log.lines))
    return log


def append_metrics(run_dir, record: dict) -> None:
    """One line of metrics.jsonl; its clock readings (throughput, generation time) go to
    timings.jsonl under the same kind and step."""
    clock = {k: record[k] for k in CLOCK_METRIC_KEYS if k in record}
    stable = {k: v for k, v in record.items() if k not in CLOCK_METRIC_KEYS}
    targets = [(METRICS, stable)]
    if clock:
        targets.append((TIMINGS_LOG, {"kind": record.get("kind"), "step": record.get("step"), **clock}))
    for name, line in targets:
        with open(Path(run_dir) / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def latest_by_step(rows: list[dict]) -> list[dict]:
    """One row per step, the last one written: a resumed run re-logs the steps after its checkpoint,
    and only the re-run is the history of the weights that exist."""
    by_step: dict[int, dict] = {}
    for row in rows:
        if "step" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


# --- checkpoints as the run directory sees them ----------------------------------------------


def checkpoint_dirs(run_dir) -> list[tuple[int, Path]]:
    return ckpt.checkpoint_dirs(Path(run_dir) / "checkpoints")


def checkpoint_problems(ckpt_dir, bundle_id: str | None = None, verify_hashes: bool = True) -> list[str]:
    """Why a checkpoint directory is not a complete checkpoint of this bundle ([] when it is):
    runtime/checkpoint.py's validate, the one validator, plus the bundle it belongs to."""
    ckpt_dir = Path(ckpt_dir)
    manifest, why = ckpt.validate(ckpt_dir, verify_hashes=verify_hashes)
    if manifest is None:
        return [why.replace(str(ckpt_dir.parent) + os.sep, "")]  # named from the checkpoints/ folder
    if bundle_id is not None and manifest.get("bundle_id") != bundle_id:
        return [f"{ckpt_dir}: written by bundle {manifest.get('bundle_id')!r}, not {bundle_id!r}"]
    return []


def candidates(run_dir, log: MetricsLog | None = None) -> list[dict]:
    """Every evaluated step, as select_best wants it: eval lines of metrics.jsonl, completed by the
    metrics sealed in checkpoint.json for steps the log lacks. `on_disk` says whether the
    checkpoint still exists (rotation removes old ones)."""
    log = log if log is not None else read_metrics_log(run_dir)
    rows = {int(r["step"]): {k: v for k, v in r.items() if k != "kind"} for r in latest_by_step(log.evals)}
    on_disk = set()
    for step, path in checkpoint_dirs(run_dir):
        if not (path / ckpt.MANIFEST).is_file():
            continue
        on_disk.add(step)  # export validates the one it ships; a listing need not re-hash every weight file
        if step not in rows:
            manifest, _ = ckpt.validate(path, verify_hashes=False)
            if manifest is not None and manifest.get("metrics"):
                rows[step] = {"step": step, **manifest["metrics"]}
    out = []
    for step in sorted(rows):
        row = {k: v for k, v in rows[step].items() if _scalar(v)}
        row["step"] = step
        row["on_disk"] = step in on_disk
        out.append(row)
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int, float))


# --- best.json -------------------------------------------------------------------------------


def history_holes(run_dir, log: MetricsLog | None = None) -> list[str]:
    log = log if log is not None else read_metrics_log(run_dir)
    recovered = set()
    for step, path in checkpoint_dirs(run_dir):
        manifest, _ = ckpt.validate(path, verify_hashes=False)
        if manifest is not None and manifest.get("metrics"):
            recovered.add(step)
    return log.missing_evals(recovered)


def check_history(run_dir, allow_incomplete_history: bool = False, log: MetricsLog | None = None) -> list[str]:
    """The holes in the run's evaluation history; a RunError when there are some and the user did
    not allow selecting without them."""
    holes = history_holes(run_dir, log)
    if holes and not allow_incomplete_history:
        raise RunError(
            f"{run_dir}: the evaluation history is incomplete, so a selection from it could be wrong",
            holes + ["the damaged lines are kept in the quarantine file(s) beside metrics.jsonl: repair them, append "
                     "them to metrics.jsonl and delete the quarantine file, or pass --allow-incomplete-history to "
                     "select from what can be read"],
        )
    return holes


def derive_best(run_dir, select_spec: dict, bundle_id: str | None = None, allow_incomplete_history: bool = False,
                log: MetricsLog | None = None, write: bool = True) -> dict:
    """Select from every evaluation record the run has, and (re)write best.json from it.

    Called at every start and after every checkpoint: best.json is an output, so a kill between a
    checkpoint's rename and the best.json that follows it loses nothing. An eval history with
    holes (a damaged line that held an evaluation) could select a different checkpoint than the
    complete one would, so it is refused unless the user allows it; the result records it.
    """
    from sftc.runtime.select import select_best

    run_dir = Path(run_dir)
    log = log if log is not None else read_metrics_log(run_dir)
    holes = check_history(run_dir, allow_incomplete_history, log)
    result = select_best(candidates(run_dir, log), select_spec)
    for row in result["candidates"]:
        row["checkpoint"] = f"checkpoints/checkpoint-{row['step']}"
    best = result.get("best_step")
    result["checkpoint"] = f"checkpoints/checkpoint-{best}" if best is not None else None
    if bundle_id is not None:
        result["bundle_id"] = bundle_id
    if holes:
        result["incomplete_history"] = holes
    if write:
        atomic_write_json(run_dir / BEST_JSON, result)
    return result


def rederive_best(run_dir, allow_incomplete_history: bool = False) -> dict:
    """best.json derived again from the run's records by its bundle's selection rule: what
    `sftc export` exports from, so a best.json left stale or damaged by a kill is never shipped."""
    lock = read_lock(run_dir)
    return derive_best(run_dir, lock.spec.select.model_dump(mode="json"), lock.bundle_id,
                       allow_incomplete_history=allow_incomplete_history)


def read_best(run_dir) -> dict | None:
    """best.json, validated; None when no checkpoint was selected yet."""
    path = Path(run_dir) / BEST_JSON
    if not path.is_file():
        return None
    remedy = ("it is derived from the checkpoints' evaluation records: run `sftc run` on this run's bundle "
              "again (it re-derives best.json and trains nothing new if the run finished), or delete it")
    record = _read_record(path, "selection record", remedy)
    _require(path, record, "selection record", remedy,
             {"best_step": (int, type(None)), "fallback_step": (int, type(None)), "candidates": (list,),
              "rule": (dict,), "why": (str, type(None))})
    if "candidates" in record and not all(isinstance(c, dict) for c in record["candidates"]):
        raise RunError(f"{path}: the selection record is damaged (a candidate is not an object); {remedy}")
    return record


# --- the run lock, starting over ------------------------------------------------------------


@contextlib.contextmanager
def run_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    handle = open(path, "a+", encoding="utf-8", errors="replace")  # a damaged holder line is still shown
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunError(
                f"{run_dir}: another `sftc run` is training in this run directory ({holder}); "
                "wait for it to finish, or give this run another run directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {now()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def start_over(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only in a directory is_run_dir accepted
    if (run_dir / "export" / "provenance.json").is_file():  # an export sftc wrote, not a folder of the user's
        shutil.rmtree(run_dir / "export", ignore_errors=True)
    for path in [run_dir / METRICS, run_dir / BEST_JSON, run_dir / RUN_JSON, run_dir / TIMINGS, run_dir / TIMINGS_LOG,
                 *run_dir.glob(METRICS + ".*")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- where the run's bundle and inputs are ---------------------------------------------------


RUN_MARKS = (RUN_JSON, "run.lock", METRICS, "checkpoints")  # a session writes run.lock before anything else


def is_run_dir(path) -> bool:
    """Whether sftc wrote this directory: a file of the right name is not enough (another tool's
    checkpoints/ or metrics.jsonl), its content must be sftc's. One piece of evidence suffices, so
    a run with one damaged record is still recognised."""
    path = Path(path)
    if not path.is_dir():
        return False
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((path / RUN_JSON).read_bytes())
        if isinstance(record, dict) and "bundle_id" in record:
            return True
    with contextlib.suppress(OSError):
        holder = (path / "run.lock").read_bytes()
        if holder == b"" or holder.startswith(b"pid "):
            return True
    if any((path / "checkpoints").glob("checkpoint-*/" + ckpt.MANIFEST)):
        return True
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open(path / METRICS, "rb") as handle:
            first = json.loads(next(handle))
        return isinstance(first, dict) and first.get("kind") in ("train", "eval")
    return False


def require_run_dir(path) -> Path:
    """`path` as a run directory, or a clear error: the commands that read a run (status, report,
    export) would otherwise report an empty run, or write a report, for any directory at all."""
    path = Path(path)
    if not is_run_dir(path):
        raise RunError(f"{path}: not a run directory (none of {', '.join(RUN_MARKS)} is there); give the directory "
                       "`sftc run` wrote, e.g. runs/<bundle id> or the --run-dir it was given (`sftc runs` lists them)")
    return path


def check_run_target(run_dir: Path, bundle_dir: Path) -> None:
    """Where `sftc run` may write: a new or empty directory, or a run directory; never inside the
    bundle (it would add files the seal refuses) and never a directory of other things (`--fresh`
    removes checkpoints/ and export/ from it)."""
    run_dir, bundle_dir = Path(run_dir).resolve(), Path(bundle_dir).resolve()
    if run_dir == bundle_dir or bundle_dir in run_dir.parents:
        raise RunError(f"--run-dir {run_dir} is inside the bundle {bundle_dir}; a bundle holds only what its lock "
                       "lists. Give a directory outside it (the default is runs/<bundle id>)")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise RunError(f"--run-dir {run_dir}: exists, is not empty and is not a run directory (none of "
                       f"{', '.join(RUN_MARKS)}); give a new directory or an earlier run's")


def bundle_dir_of(run_dir) -> Path:
    """The bundle a run executed. run.json names it; a relative name is tried against the project
    (the parent of runs/) first, then the working directory."""
    run_dir = Path(run_dir)
    run = read_run_json(run_dir)
    project = run_dir.resolve().parent.parent
    tried = []
    named = run.get("bundle_dir")
    if named:
        for base in ([Path(named)] if Path(named).is_absolute() else [project / named, Path.cwd() / named]):
            tried.append(str(base))
            if (base / "bundle.lock.json").is_file():
                return base
    bundle_id = run.get("bundle_id") or run_dir.name
    fallback = project / "bundles" / bundle_id
    tried.append(str(fallback))
    if (fallback / "bundle.lock.json").is_file():
        return fallback
    named_by = (f"; {run_dir / RUN_JSON} names bundle_dir {named!r} and bundle_id {run.get('bundle_id')!r}: if it "
                "is damaged, delete it (the next `sftc run` of the bundle writes it again)") if run else ""
    raise RunError(f"{run_dir}: cannot find the run's bundle (looked for bundle.lock.json in: {', '.join(tried)})"
                   f"{named_by}")


def read_lock(run_dir) -> Lock:
    """The run's bundle lock, through the one loader (sealed, typed)."""
    return load_lock(bundle_dir_of(run_dir))


# Numbers logged next to the metrics that describe the evaluation itself, not the model.
DIAGNOSTICS = frozenset({"step", "eligible", "failed", "rank", "on_disk", "checkpoint", "kind", "n_prompts",
                         "eval_tokens", "generated_tokens", "generation_seconds", "replies_truncated", "epoch"})


def metric_names(lock: Lock) -> list[str]:
    """eval_loss, the rules' declared metrics and whatever the selection rule names, in that order."""
    names = ["eval_loss"] + list(lock.eval_manifest.metrics)
    select = lock.spec.select
    names += list(select.require) + ([select.maximize] if select.maximize else [])
    for entry in select.tie_break:
        names += [v for v in (entry.minimize, entry.maximize) if v]
    out: list[str] = []
    for name in names:
        name = "eval_loss" if name == "val_loss" else name
        if name not in out:
            out.append(name)
    return out if len(out) > 1 else []
