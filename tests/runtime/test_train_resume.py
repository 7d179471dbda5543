"""End to end: a run killed with SIGKILL and resumed equals the run that was never interrupted.

Bit-identical per-step losses and final weights on CPU, which needs every piece of the resume
bundle to be right: weights, optimizer moments, scheduler position, RNG (LoRA dropout draws from
it), and the sampler's position in the locked order.
"""

from __future__ import annotations

import json
import signal
import warnings

import torch

from sftc.runtime.checkpoint import KILL_AFTER_ENV, CheckpointWarning, validate
from sftc.runtime.run import run_bundle

from .conftest import final_tensors, run_in_subprocess, train_losses


def _assert_same_run(reference, resumed, steps):
    ref_losses, got_losses = train_losses(reference), train_losses(resumed)
    assert sorted(got_losses) == list(range(1, steps + 1))
    # exact float equality, not approx: the resumed run must replay the same arithmetic
    assert got_losses == ref_losses
    ref_w, got_w = final_tensors(reference, steps), final_tensors(resumed, steps)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(project):
    # LoRA with dropout: the dropout masks come from the torch RNG, so this fails if the RNG
    # state is not restored exactly at the resume point.
    bundle = project.compile(parameterization={"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.1},
                             schedule={"max_steps": 6})
    reference = project.root / "runs" / "reference"
    run_bundle(bundle, run_dir=reference)

    interrupted = project.root / "runs" / "interrupted"
    killed = run_in_subprocess(bundle, interrupted, env={KILL_AFTER_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # the kill came after checkpoint-3 was in place and before anything else
    assert (interrupted / "checkpoints" / "checkpoint-3" / "checkpoint.json").is_file()
    assert max(train_losses(interrupted)) == 3
    assert not (interrupted / "checkpoints" / "checkpoint-6").exists()
    assert not (interrupted / "best.json").exists()  # written after the rename: the kill came first

    resumed = run_in_subprocess(bundle, interrupted)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((interrupted / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["resumed_step"] == 3
    # the resumed session checked its first micro-batches against the locked order
    assert record["consumption"]["first_microbatches"][0]["update"] == 4
    assert record["consumption"]["supervised_tokens_total"] == record["supervised_tokens_locked"]
    _assert_same_run(reference, interrupted, 6)
    # the cumulative supervised-token count continued across the kill
    lines = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    totals = [r["supervised_tokens_total"] for r in lines if r["kind"] == "train"]
    assert totals == sorted(totals) and len(set(totals)) == 6


def test_corrupted_newest_checkpoint_falls_back_to_previous(project):
    bundle = project.compile(schedule={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 3})
    reference = project.root / "runs" / "reference"
    run_bundle(bundle, run_dir=reference)

    stopped = project.root / "runs" / "stopped"
    run_bundle(bundle, run_dir=stopped, stop_after_steps=4)
    assert json.loads((stopped / "run.json").read_text())["status"] == "stopped"
    newest = stopped / "checkpoints" / "checkpoint-4"
    assert validate(newest)[0] is not None
    optimizer = newest / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_bundle(bundle, run_dir=stopped)
    skipped = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert any("checkpoint-4" in m and "optimizer.pt" in m for m in skipped), skipped
    record = json.loads((stopped / "run.json").read_text())
    assert record["resumed_step"] == 2
    _assert_same_run(reference, stopped, 6)


def test_fresh_starts_over(project):
    bundle = project.compile(schedule={"max_steps": 4}, checkpoint={"every_steps": 2})
    run_dir = project.root / "runs" / "r"
    run_bundle(bundle, run_dir=run_dir, stop_after_steps=2)
    first = train_losses(run_dir)
    run_bundle(bundle, run_dir=run_dir, fresh=True)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_step"] == 0 and record["status"] == "finished"
    assert train_losses(run_dir)[1] == first[1]
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]

    # running a finished run again says so and trains nothing: its records stay as they are
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "run.json", "best.json")}
    run_bundle(bundle, run_dir=run_dir)
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_step"] == 0 and record["status"] == "finished"


def test_behaviour_eval_at_checkpoints_does_not_perturb_training(project):
    # Same train tokens, one bundle with behaviour rules (greedy generation at every checkpoint)
    # and one without: with LoRA dropout drawing from the RNG, any RNG or mode leak from the
    # evaluation would change the next update's loss.
    lora = {"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.1}
    common = dict(parameterization=lora, schedule={"max_steps": 4}, checkpoint={"every_steps": 1, "keep_last": 1})
    plain = project.compile(**common)
    judged = project.compile(**common, eval={"rules": "rules.yaml", "max_new_tokens": 8, "max_prompts": 4, "batch_size": 4})
    assert plain != judged
    run_bundle(plain)
    run_bundle(judged)
    plain_dir, judged_dir = project.run_dir(plain), project.run_dir(judged)
    assert train_losses(judged_dir) == train_losses(plain_dir)

    evals = [json.loads(line) for line in (judged_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [1, 2, 3, 4]
    assert all(e["n_prompts"] == 4 and 0.0 <= e["format_pass_rate"] <= 1.0 and "eval_loss" in e for e in evals)
    best = json.loads((judged_dir / "best.json").read_text())
    kept = sorted(p.name for p in (judged_dir / "checkpoints").iterdir())
    # keep_last 1, plus the selected best if it is an older one
    assert f"checkpoint-{best['best_step']}" in kept and "checkpoint-4" in kept and len(kept) <= 2
    manifest = json.loads((judged_dir / "checkpoints" / "checkpoint-4" / "checkpoint.json").read_text())
    assert manifest["metrics"]["format_pass_rate"] == evals[-1]["format_pass_rate"]
    assert "eval_samples.json" in manifest["files"]
    assert manifest["best_metric"]["step"] == best["best_step"]
