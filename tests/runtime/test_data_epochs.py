"""metrics.jsonl's and checkpoint.json's `epoch` is passes over the train rows (data epochs), from
the locked plan, not HF's run progress (the compiler's order is one flat stream, which HF counts as
a single epoch however many passes over the data it holds)."""

from __future__ import annotations

import json

from sftc.lock import load_lock
from sftc.runtime.batching import data_epochs, plan_updates
from sftc.runtime.bundle import load_bundle
from sftc.runtime.run import run_bundle


def test_data_epochs_count_rows_drawn_per_update():
    plan = [{"microbatches": [[0, 1], [2, 3]]}, {"microbatches": [[4, 5], [6]]}, {"microbatches": [[0, 1]]}]
    assert data_epochs(plan, 7) == [round(4 / 7, 4), 1.0, round(9 / 7, 4)]
    assert data_epochs(plan[:1], 8, world_size=2) == [1.0]  # every rank draws as many rows as this one


def test_two_epoch_run_records_data_epochs_from_zero_to_two(project):
    bundle = project.compile(schedule={"max_steps": None, "epochs": 2.0}, checkpoint={"every_steps": 3, "keep_last": 5})
    lock = load_lock(bundle)
    rows, steps = lock.budget.train_rows, lock.budget.optimizer_steps
    per_update = 2 * 2  # base_spec: per_device 2 x grad_accum 2, one rank
    assert 2.0 <= lock.budget.epochs < 2.0 + per_update / rows

    run_bundle(bundle)
    run_dir = project.run_dir(bundle)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["epoch"] for r in lines if r["kind"] == "train"}
    assert sorted(train) == list(range(1, steps + 1))
    # one pass over the packed train rows is 1.0: update u has drawn u x per_update rows
    assert train == {u: round(u * per_update / rows, 4) for u in range(1, steps + 1)}
    assert train[1] == round(per_update / rows, 4) and train[steps] == lock.budget.epochs >= 2.0
    assert all(train[u] < train[u + 1] for u in range(1, steps))
    # the plan the trainer checks micro-batch by micro-batch says the same
    tf = load_bundle(bundle).train
    plan = plan_updates(tf.epochs, 2, 2, steps)
    assert [train[u] for u in range(1, steps + 1)] == data_epochs(plan, tf.n_rows)

    evals = {r["step"] for r in lines if r["kind"] == "eval"}
    kept = [step for step in evals if (run_dir / "checkpoints" / f"checkpoint-{step}" / "checkpoint.json").is_file()]
    assert kept, "rotation kept no checkpoint to compare"
    for step in kept:  # rotation may have removed older ones
        manifest = run_dir / "checkpoints" / f"checkpoint-{step}" / "checkpoint.json"
        assert json.loads(manifest.read_text())["epoch"] == train[step]
