#!/usr/bin/env python
"""Fault campaign: kill `sftc run` at random moments, inside checkpoint writes and mid-export, kill
`sftc compile` mid-staging, rot checkpoints on disk, resume each time, and require the finished run
to equal an uninterrupted one bit for bit, with no record lost and no staging dir leaked.

    python scripts/fault_campaign.py --faults 3 --seed 0 --size small            # what CI runs (tests/reliability)
    python scripts/fault_campaign.py --faults 40 --seed 1 --size large --out reports/reliability.json
    python scripts/fault_campaign.py --faults 2 --kinds kill_during_export,kill_during_compile  # only these

What it does:
  1. builds a throwaway project (tiny Llama-style model from demo/tiny_model.py, a few dozen
     prompt/completion rows, a LoRA spec with dropout so the RNG state must survive a resume, and
     a small checkpoint.every_steps), compiles it;
  2. runs `sftc run BUNDLE --run-dir reference` once, uninterrupted;
  3. injects N faults into trials (one run directory each), cycling through these kinds (or the
     ones --kinds names):
       kill_during_checkpoint  SIGKILL while checkpoint-<k> is half-written (runtime hook
                               SFTC_FAULT_KILL_DURING_CHECKPOINT=<k>:files|manifest)
       corrupt_checkpoint      between sessions, flip one byte of / truncate one file of the newest
                               valid checkpoint (storage rot); the next session must skip it
       kill_random             SIGKILL after a random delay counted from the moment the session
                               started training (run.json rewritten)
       kill_after_checkpoint   SIGKILL right after checkpoint-<k> is renamed into place
                               (SFTC_FAULT_KILL_AFTER_CHECKPOINT=<k>)
       kill_after_final_checkpoint  the same right after the last checkpoint, before best.json,
                               rotation and export: the next session trains nothing and must still
                               select, rotate and export exactly what the reference did
       kill_during_export      SIGKILL with the export staged and fsynced, before its rename
                               (SFTC_FAULT_KILL_IN_STAGING=export): RUN/.export.pidN.*.tmp is left;
                               the next session must remove it and export what the reference did
       kill_during_compile     between sessions, `sftc compile SPEC --force` SIGKILLed the same way
                               with its bundle staged (SFTC_FAULT_KILL_IN_STAGING=<bundle id>):
                               bundles/.<id>.pidN.*.tmp must be left (the kill landed mid-staging),
                               and the same command run again must remove it and write a bundle
                               whose every file has the sha256 of the original
     after each fault the same command is started again (it resumes), until the run finishes;
  4. checks, for every session, that it resumed from the newest checkpoint that was valid when it
     started (never from a half-written or corrupted one: `runtime.checkpoint.validate` is run on
     the directory before the session), that no half-written checkpoint ever sits under its final
     name, that no staging dir survives a finished run, that no session printed a traceback, and
     at the end that the final checkpoint's tensors, every logged loss, the selected best, the
     checkpoints rotation kept and the exported weights equal the reference exactly (CPU, one
     thread), and that no staging dir of a checkpoint, an export or a compile is left.
  5. counts, per trial and in total, `records_lost` (train and eval lines of the reference's
     metrics.jsonl, by kind and step, missing or different in the finished trial, plus every line
     the runtime quarantined as damaged; a torn last line of a killed write is counted apart, as
     `torn_lines`, since the resume logs its record again and a record it failed to would show as
     missing) and `leaks` (staging/trash dirs of checkpoints, exports and compiles left after the
     trial finished, or after a killed compile was run again).

A fault counts as injected when it happened (a kill that came after the process had already
finished does not count), and as survived when its trial finished bit-identical to the reference
with every resume correct, no record lost and no leak. `sigkills` counts the injected faults that
were a SIGKILL (every kind but corrupt_checkpoint). The JSON report goes to stdout, and with --out
is merged into that file (key "fault_campaign" plus the top-level fault figures).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sftc.io import KILL_IN_STAGING_ENV  # noqa: E402
from sftc.runtime import checkpoint as ckpt  # noqa: E402  (light: numpy and sftc.io only)

KINDS = ("kill_during_checkpoint", "corrupt_checkpoint", "kill_random", "kill_after_checkpoint",
         "kill_after_final_checkpoint", "kill_during_export", "kill_during_compile")
# Files of an export that name the run (its directory) rather than carry what it selected.
NAMING_THE_RUN = ("provenance.json", "README.md")
SIZES = {
    # ~5 sessions of ~10-15 s each on a shared 2-core CPU box: the CI test's budget
    "small": {"rows": 32, "max_steps": 8, "every_steps": 2, "keep_last": 2},
    # for benchmarks: more steps, more checkpoints, more room for a random kill to land mid-update
    "large": {"rows": 96, "max_steps": 36, "every_steps": 3, "keep_last": 3},
}
DECISIONS = ["approve", "deny", "escalate", "request_evidence", "revoke"]
SUBJECTS = ["stale key", "expired badge", "admin role", "vpn token", "service account", "shared login"]
FAULT_ENV = (ckpt.KILL_AFTER_ENV, ckpt.KILL_DURING_ENV, ckpt.ENOSPC_ENV, KILL_IN_STAGING_ENV)


# --- the throwaway project -------------------------------------------------------------------


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        decision, subject, policy = DECISIONS[i % 5], SUBJECTS[i % 6], f"AC-{101 + i % 7}"
        out.append({
            "thread_id": f"t{i // 2}",
            "prompt": f"Ticket {i}: the {subject} of user u{i % 11} needs a decision under {policy}.",
            "completion": json.dumps({"decision": decision, "policy": policy, "reply": f"{decision} per {policy}."}),
        })
    return out


def spec_for(size: dict) -> dict:
    return {
        "name": "faults",
        "seed": 1234,
        "objective": "sft",
        # LoRA dropout draws from the torch RNG: a resume that restores the RNG wrongly shows up
        "parameterization": {"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.1},
        "model": {"path": "model", "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"files": ["data/rows.jsonl"], "format": "prompt_completion", "fields": {"group": "thread_id"},
                 "max_reject_fraction": 0.2},
        "split": {"eval_fraction": 0.2, "seed": 13},
        "tokenize": {"max_length": 96},
        "packing": {"strategy": "bfd", "seq_length": 160},
        "batch": {"per_device": 2, "grad_accum": 2},
        "optimizer": {"lr": 2.0e-3, "max_grad_norm": 1.0, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_ratio": 0.1, "max_steps": size["max_steps"]},
        "checkpoint": {"every_steps": size["every_steps"], "keep_last": size["keep_last"]},
        "eval": {"batch_size": 8},
        "verify": {"probe_examples": 4, "probe_tolerance": 1.0e-4},
    }


def build_project(root: Path, size: dict) -> Path:
    """The project on disk, compiled; returns the bundle directory."""
    import yaml

    from sftc.compiler import compile_spec
    from demo.tiny_model import build_tiny

    data = rows(size["rows"])
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'fault-campaign'\n", encoding="utf-8")
    corpus = [r["prompt"] + " " + r["completion"] for r in data] * 3
    build_tiny(root / "model", corpus, seed=7, vocab_size=512, hidden_size=64, num_layers=2)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_for(size), sort_keys=False), encoding="utf-8")
    bundle, _, _ = compile_spec(spec)
    return bundle


# --- one `sftc run` session ------------------------------------------------------------------


def session_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FAULT_ENV}
    # one thread: the box is shared, and bit-identity is checked on the same kernel choice anyway
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"})
    env.update(extra or {})
    return env


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def run_session(bundle: Path, run_dir: Path, log: Path, env: dict | None = None, kill_after_s: float | None = None,
                timeout: float = 600.0) -> dict:
    """Start `sftc run`; with kill_after_s, SIGKILL it that long after it started training.

    "Started training" = run.json rewritten by this session (it is written once the checkpoint to
    resume from is chosen, the model loaded and the probe passed, right before trainer.train).
    """
    before = _read(run_dir / "run.json")
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sftc.cli", "run", str(bundle), "--run-dir", str(run_dir)],
            cwd=REPO, env=session_env(env), stdout=err, stderr=subprocess.STDOUT,
        )
        training_at = None
        killed = False
        while proc.poll() is None:
            now = time.monotonic()
            if now - started > timeout:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"sftc run did not finish in {timeout:.0f} s; see {log}")
            if training_at is None and _read(run_dir / "run.json") != before:
                training_at = now
            if kill_after_s is not None and training_at is not None and now - training_at >= kill_after_s:
                proc.send_signal(signal.SIGKILL)
                killed = True
                proc.wait()
                break
            time.sleep(0.02)
    rc = proc.returncode
    if training_at is None and _read(run_dir / "run.json") != before:
        training_at = time.monotonic()
    output = log.read_text(encoding="utf-8", errors="replace")
    return {
        "rc": rc,
        "killed": rc == -signal.SIGKILL,
        "killed_by_us": killed,
        "started_training": _read(run_dir / "run.json") != before,
        "training_s": (time.monotonic() - training_at) if training_at else None,
        "wall_s": time.monotonic() - started,
        "traceback": "Traceback (most recent call last)" in output,
        "output_tail": output[-2000:],
    }


# --- checks ----------------------------------------------------------------------------------


def newest_valid(ck_root: Path) -> tuple[int | None, dict[str, str]]:
    """(step of the newest valid checkpoint or None, {dir name: why invalid} for the others)."""
    best, invalid = None, {}
    for step, path in ckpt.checkpoint_dirs(ck_root):
        manifest, why = ckpt.validate(path)
        if manifest is None:
            invalid[path.name] = why
        else:
            best = step
    return best, invalid


def export_files(run_dir: Path) -> dict[str, str]:
    from sftc.io import sha256_file

    export = run_dir / "export"
    return {str(p.relative_to(export)): sha256_file(p) for p in sorted(export.rglob("*"))
            if p.is_file() and p.name not in NAMING_THE_RUN}


def kept_checkpoints(run_dir: Path) -> list[int]:
    return [step for step, _ in ckpt.checkpoint_dirs(run_dir / "checkpoints")]


def staging_leaks(run_dir: Path) -> list[str]:
    """Staging of an export in the run directory, or of a compile in bundles/, left by a kill."""
    bundles = run_dir.parent.parent / "bundles"
    return sorted(p.name for d in (run_dir, bundles) if d.is_dir() for p in d.iterdir()
                  if p.is_dir() and p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


def leftovers(ck_root: Path) -> list[str]:
    if not ck_root.is_dir():
        return []
    return sorted(p.name for p in ck_root.iterdir() if p.name.startswith(".checkpoint-") or p.name.startswith(".trash-"))


def records_lost(reference: Path, run_dir: Path) -> tuple[list[str], int]:
    """(the reference's train/eval records missing or different in run_dir's metrics log, and
    every damaged line there, quarantined or not; the number of torn tails the resume logged again)."""
    from sftc.runtime.rundir import METRICS, read_metrics_log

    def by_key(log) -> dict:
        return {(line["kind"], line["step"]): line for line in log.lines if line["kind"] in ("train", "eval")}

    ref_log, got_log = read_metrics_log(reference), read_metrics_log(run_dir)
    want, have = by_key(ref_log), by_key(got_log)
    lost = [f"{kind} step {step}: {'missing' if (kind, step) not in have else 'differs'}"
            for kind, step in sorted(want) if have.get((kind, step)) != want[(kind, step)]]
    # a torn tail in a torn-N file is the unterminated last line of a killed write: not damage,
    # its record is logged again (or it shows above as missing); any other damaged line is lost
    torn = [d for d in got_log.damaged if d.torn and d.source != METRICS]
    lost += [f"{d.source} line {d.line}: damaged ({d.kind or '?'} step {d.step})"
             for d in got_log.damaged if d not in torn]
    return lost, len(torn)


def bundle_files(bundle: Path) -> dict[str, str]:
    from sftc.io import sha256_file

    return {str(p.relative_to(bundle)): sha256_file(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


def compile_staging(bundle: Path) -> list[str]:
    return sorted(p.name for p in bundle.parent.iterdir()
                  if p.name.startswith(f".{bundle.name}.") and p.name.endswith((".tmp", ".old")))


def compile_fault(spec: Path, bundle: Path, log: Path) -> dict:
    """kill_during_compile: `sftc compile SPEC --force` SIGKILLed with the bundle staged, before
    its rename; then the same command again must clean the staging and rewrite the same bytes."""
    command = [sys.executable, "-m", "sftc.cli", "compile", str(spec), "--force", "--quiet"]
    before = bundle_files(bundle)
    with open(log, "w", encoding="utf-8") as out:
        killed = subprocess.run(command, cwd=REPO, env=session_env({KILL_IN_STAGING_ENV: bundle.name}),
                                stdout=out, stderr=subprocess.STDOUT, timeout=600)
    if killed.returncode != -signal.SIGKILL:  # it staged some other bundle (the code changed?), or failed
        text = log.read_text(encoding="utf-8", errors="replace")
        return {"injected": False, "why": f"rc {killed.returncode}, {text[-300:].strip()!r}", "leaks": [],
                "traceback": "Traceback (most recent call last)" in text}
    staging_left = compile_staging(bundle)
    again_log = log.with_name(log.stem + "-again.log")
    with open(again_log, "w", encoding="utf-8") as out:
        again = subprocess.run(command, cwd=REPO, env=session_env(), stdout=out, stderr=subprocess.STDOUT, timeout=600)
    output = again_log.read_text(encoding="utf-8", errors="replace")
    left_after = compile_staging(bundle)
    problems = []
    if killed.returncode == -signal.SIGKILL and not staging_left:
        problems.append("killed, but no bundle staging dir was left (the kill did not land mid-staging)")
    if again.returncode != 0:
        problems.append(f"the compile run again failed (rc {again.returncode}): {output[-1000:]}")
    if left_after:
        problems.append(f"the compile run again left staging behind: {left_after}")
    after = bundle_files(bundle) if bundle.is_dir() else {}
    if after != before:
        differ = sorted({name for name, _ in set(after.items()) ^ set(before.items())})
        problems.append(f"the bundle rewritten differs from the original in {differ[:4]}")
    return {"injected": killed.returncode == -signal.SIGKILL, "bundle": bundle.name, "staging_left": staging_left,
            "leaks": left_after, "traceback": "Traceback (most recent call last)" in output, "problems": problems}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted({line["step"] for line in _metrics(run_dir) if line["kind"] == "eval"})


def _metrics(run_dir: Path) -> list[dict]:
    from sftc.runtime.rundir import read_metrics_log

    return read_metrics_log(run_dir).lines


def train_losses(run_dir: Path) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in _metrics(run_dir) if line["kind"] == "train"}


def final_tensors(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted((run_dir / "checkpoints" / f"checkpoint-{step}").glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return tensors


def compare(reference: Path, run_dir: Path, steps: int) -> list[str]:
    """Differences from the reference run; empty when bit-identical."""
    import torch

    problems = []
    record = json.loads((run_dir / "run.json").read_text())
    if record.get("status") != "finished":
        problems.append(f"status {record.get('status')!r}")
    ref_losses, got = train_losses(reference), train_losses(run_dir)
    if got != ref_losses:
        diff = sorted(s for s in set(ref_losses) | set(got) if ref_losses.get(s) != got.get(s))
        problems.append(f"train losses differ at steps {diff}")
    ref_w, got_w = final_tensors(reference, steps), final_tensors(run_dir, steps)
    if not ref_w or ref_w.keys() != got_w.keys():
        problems.append(f"final checkpoint tensors differ in names ({len(ref_w)} vs {len(got_w)})")
    else:
        unequal = [k for k in ref_w if not torch.equal(ref_w[k], got_w[k])]
        if unequal:
            problems.append(f"final weights differ in {len(unequal)} tensor(s), e.g. {unequal[0]}")
    ref_best = json.loads((reference / "best.json").read_text()).get("best_step")
    got_best = json.loads((run_dir / "best.json").read_text()).get("best_step")
    if ref_best != got_best:
        problems.append(f"selected best differs: {got_best} vs reference {ref_best}")
    if kept_checkpoints(run_dir) != kept_checkpoints(reference):
        problems.append(f"rotation kept {kept_checkpoints(run_dir)}, the reference {kept_checkpoints(reference)}")
    if export_files(run_dir) != export_files(reference):
        differ = sorted(set(export_files(run_dir).items()) ^ set(export_files(reference).items()))
        problems.append(f"exported files differ from the reference's: {[name for name, _ in differ][:4]}")
    if leftovers(run_dir / "checkpoints"):
        problems.append(f"staging/trash dirs left behind: {leftovers(run_dir / 'checkpoints')}")
    if staging_leaks(run_dir):
        problems.append(f"export/compile staging left behind: {staging_leaks(run_dir)}")
    return problems


def corrupt_newest(ck_root: Path, rng: random.Random) -> dict | None:
    step, _ = newest_valid(ck_root)
    if step is None:
        return None
    path = ck_root / f"checkpoint-{step}"
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST and p.stat().st_size > 0)
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    how = rng.choice(["bitflip", "truncate"])
    if how == "bitflip":
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    else:
        data = data[: rng.randrange(len(data))]
    target.write_bytes(bytes(data))
    return {"checkpoint": path.name, "file": str(target.relative_to(path)), "how": how}


# --- the campaign ----------------------------------------------------------------------------


def campaign(faults: int, seed: int, size_name: str, work: Path, log=print, kinds: tuple[str, ...] = KINDS) -> dict:
    size = SIZES[size_name]
    rng = random.Random(seed)
    t0 = time.monotonic()
    bundle = build_project(work / "proj", size)
    runs = work / "proj" / "runs"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = size["max_steps"]

    reference = runs / "reference"
    ref = run_session(bundle, reference, logs / "reference.log")
    if ref["rc"] != 0:
        raise RuntimeError(f"the reference run failed (rc {ref['rc']}):\n{ref['output_tail']}")
    ck_steps = checkpoint_steps(reference)
    train_s = ref["training_s"] or 10.0
    log(f"reference: {steps} steps, checkpoints at {ck_steps}, {ref['wall_s']:.1f} s ({train_s:.1f} s training)")

    report = {
        "size": size_name, "seed": seed, "faults_requested": faults, "optimizer_steps": steps,
        "checkpoint_steps": ck_steps, "faults": [], "trials": [], "sessions": 1,
        "corrupt_checkpoints_loaded": 0, "wrong_resumes": 0, "half_checkpoints_visible": 0, "tracebacks": 0,
        "kinds": list(kinds), "records_lost": 0, "leaks": 0, "torn_lines": 0,
    }
    injected: list[dict] = []
    kind_at = 0
    trial = 0
    attempts = 0
    while len(injected) < faults and attempts < faults * 4:
        trial += 1
        run_dir = runs / f"trial-{trial}"
        ck_root = run_dir / "checkpoints"
        trial_faults: list[dict] = []
        compile_leaks: list[str] = []
        trial_ok = True
        finished = False
        sessions = 0
        while not finished:
            attempts += 1
            want_fault = len(injected) + len(trial_faults) < faults and sessions < faults + 4
            resume_step, invalid = newest_valid(ck_root)
            fault = None
            env, kill_after = {}, None
            if want_fault:
                kind = kinds[kind_at % len(kinds)]
                ahead = [s for s in ck_steps if s > (resume_step or 0)]
                if kind == "kill_after_final_checkpoint" and ck_steps[-1] not in ahead:
                    kind = "corrupt_checkpoint"
                if kind == "corrupt_checkpoint" and resume_step is None:
                    kind = "kill_after_checkpoint"  # nothing on disk to rot yet: make something first
                if kind in ("kill_during_checkpoint", "kill_after_checkpoint") and not ahead:
                    kind = "corrupt_checkpoint"
                if kind == "corrupt_checkpoint":
                    what = corrupt_newest(ck_root, rng)
                    fault = {"kind": kind, **what, "injected": True}
                    trial_faults.append(fault)
                    kind_at += 1
                    log(f"trial {trial}: fault {len(injected) + len(trial_faults)}: {kind} {what}")
                    continue  # the next loop's session must skip it; it may carry the next fault
                if kind == "kill_during_compile":
                    kind_at += 1
                    what = compile_fault(work / "proj" / "spec.yaml", bundle,
                                         logs / f"trial-{trial}-compile-{kind_at}.log")
                    fault = {"kind": kind, **what}
                    if what["traceback"]:
                        report["tracebacks"] += 1
                    compile_leaks += what["leaks"]
                    if not what["injected"]:
                        # it will not land on a later try either (the compile stages another bundle id):
                        # drop the kind rather than loop on it
                        log(f"trial {trial}: {kind} did not land (the compile ended first: {what['why']}); "
                            "not tried again")
                        kinds = [k for k in kinds if k != kind]
                        if not kinds:
                            raise RuntimeError(f"no fault kind left to inject: {kind} did not land ({what['why']})")
                        continue
                    trial_faults.append(fault)
                    if what["problems"] or what["traceback"]:
                        trial_ok = False
                    log(f"trial {trial}: fault {len(injected) + len(trial_faults)}: {kind} "
                        f"staging left {what['staging_left']}, {what['problems'] or 'rewritten identically'}")
                    continue  # the next loop's session runs on the bundle compiled again
                if kind == "kill_during_checkpoint":
                    target, phase = rng.choice(ahead), rng.choice(ckpt.KILL_PHASES)
                    env = {ckpt.KILL_DURING_ENV: f"{target}:{phase}"}
                    fault = {"kind": kind, "step": target, "phase": phase}
                elif kind in ("kill_after_checkpoint", "kill_after_final_checkpoint"):
                    target = ck_steps[-1] if kind == "kill_after_final_checkpoint" else rng.choice(ahead)
                    env = {ckpt.KILL_AFTER_ENV: str(target)}
                    fault = {"kind": kind, "step": target}
                elif kind == "kill_during_export":
                    env = {KILL_IN_STAGING_ENV: "export"}
                    fault = {"kind": kind}
                else:
                    remaining = (steps - (resume_step or 0)) / steps
                    kill_after = round(rng.uniform(0.0, 0.95 * train_s * remaining), 3)
                    fault = {"kind": kind, "after_training_start_s": kill_after}
                kind_at += 1

            resume_step, invalid = newest_valid(ck_root)  # again: a corrupt fault may have run
            result = run_session(bundle, run_dir, logs / f"trial-{trial}-session-{sessions + 1}.log", env, kill_after)
            sessions += 1
            report["sessions"] += 1
            if result["traceback"]:
                report["tracebacks"] += 1
                trial_ok = False
                log(f"trial {trial}: traceback:\n{result['output_tail']}")
            if result["started_training"]:
                record = json.loads((run_dir / "run.json").read_text())
                got = record.get("resumed_from")
                want = str(ck_root / f"checkpoint-{resume_step}") if resume_step is not None else None
                if got is not None and Path(got).name in invalid:
                    report["corrupt_checkpoints_loaded"] += 1
                    trial_ok = False
                if (Path(got).name if got else None) != (Path(want).name if want else None):
                    report["wrong_resumes"] += 1
                    trial_ok = False
                    log(f"trial {trial}: resumed from {got}, the newest valid checkpoint was {want}")
                # no unlisted skip: every skipped checkpoint is one we knew was invalid
                for why in record.get("skipped_checkpoints", []):
                    if not any(name in why for name in invalid):
                        report["wrong_resumes"] += 1
                        trial_ok = False
            half = {n: w for n, w in newest_valid(ck_root)[1].items()
                    if not any(f.get("checkpoint") == n for f in trial_faults)}
            if half:
                report["half_checkpoints_visible"] += len(half)
                trial_ok = False
                log(f"trial {trial}: half-written checkpoint(s) under their final names: {half}")

            if fault is not None:
                fault["injected"] = result["killed"]
                fault["resume_step_before"] = resume_step
                if result["killed"]:
                    # the half-written save or export the next session must clean
                    fault["staging_left"] = (staging_leaks(run_dir) if fault["kind"] == "kill_during_export"
                                             else leftovers(ck_root))
                    trial_faults.append(fault)
                    log(f"trial {trial}: fault {len(injected) + len(trial_faults)}: {fault}, "
                        f"newest valid now {newest_valid(ck_root)[0]}")
                    # a half-written save under its final name; an older checkpoint of the same step that
                    # this campaign corrupted earlier may still sit there (it is replaced on rename)
                    name = f"checkpoint-{fault.get('step')}"
                    corrupted_before = any(f.get("checkpoint") == name for f in trial_faults[:-1])
                    if fault["kind"] == "kill_during_checkpoint" and (ck_root / name).exists() and not corrupted_before:
                        report["half_checkpoints_visible"] += 1
                        trial_ok = False
                    continue
                log(f"trial {trial}: {fault['kind']} did not land (the session ended first, rc {result['rc']})")
            if result["killed"]:
                continue
            if result["rc"] != 0:
                trial_ok = False
                log(f"trial {trial}: session failed rc {result['rc']}:\n{result['output_tail']}")
                break
            record = json.loads((run_dir / "run.json").read_text())
            finished = record.get("status") == "finished"
            if not finished:
                trial_ok = False
                break

        problems = compare(reference, run_dir, steps) if finished else ["did not finish"]
        lost, torn = records_lost(reference, run_dir)
        leaked = leftovers(ck_root) + staging_leaks(run_dir) + compile_leaks
        if lost:
            log(f"trial {trial}: {len(lost)} record(s) lost: {lost[:6]}")
        survived = trial_ok and not problems and not lost and not leaked
        for f in trial_faults:
            f["survived"] = survived
        injected.extend(trial_faults)
        report["records_lost"] += len(lost)
        report["leaks"] += len(leaked)
        report["torn_lines"] += torn
        report["trials"].append({"trial": trial, "faults": len(trial_faults), "sessions": sessions,
                                 "bit_identical": not problems, "problems": problems,
                                 "records_lost": len(lost), "lost": lost[:10], "leaks": len(leaked),
                                 "leaked": leaked, "torn_lines": torn})
        log(f"trial {trial}: {len(trial_faults)} fault(s), {sessions} session(s), "
            f"{'bit-identical to the reference' if not problems else problems}")

    report["faults"] = injected
    report["faults_injected"] = len(injected)
    report["faults_survived"] = sum(1 for f in injected if f.get("survived"))
    report["by_kind"] = {k: sum(1 for f in injected if f["kind"] == k) for k in KINDS}
    report["sigkills"] = sum(1 for f in injected if f["kind"] != "corrupt_checkpoint")
    report["wall_s"] = round(time.monotonic() - t0, 1)
    return report


def merge_into(out: Path, report: dict) -> None:
    data = json.loads(out.read_text()) if out.is_file() else {}
    data["fault_campaign"] = report
    for key in ("faults_injected", "faults_survived", "corrupt_checkpoints_loaded", "records_lost", "leaks"):
        data[key] = report[key]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated fault kinds to cycle through (default: all, {','.join(KINDS)})")
    parser.add_argument("--out", type=Path, default=None, help="merge the figures into this JSON file")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the project and logs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        parser.error(f"--kinds: unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sftc-faults-"))
    try:
        report = campaign(args.faults, args.seed, args.size, work, log=lambda m: print(m, file=sys.stderr, flush=True),
                          kinds=kinds)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        merge_into(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=2, sort_keys=True))
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["faults_survived"] == result["faults_injected"] == result["faults_requested"]
             and not result["corrupt_checkpoints_loaded"] and not result["tracebacks"]
             and not result["records_lost"] and not result["leaks"] else 1)
