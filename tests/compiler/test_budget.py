"""The batch budget is computed from the real packed rows and the locked order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftc.compiler.budget import plan_order

from .conftest import IGNORE_INDEX, base_spec, load_tokens

ROWS = [
    {"thread_id": f"G{i}", "prompt": "Key k%d is stale. " % i + "Owner unknown. " * (i % 5),
     "completion": "Rotate key k%d now. " % i + "Then confirm. " * (i % 3)}
    for i in range(30)
]


def _per_row(data, values: np.ndarray) -> np.ndarray:
    cumulative = np.concatenate([[0], np.cumsum(values.astype(np.int64))])
    return cumulative[data["row_offsets"][1:]] - cumulative[data["row_offsets"][:-1]]


def _stats(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "max": int(values.max())}


@pytest.mark.parametrize("strategy, batch, schedule, distributed", [
    ("none", {"per_device": 2, "grad_accum": 3}, {"epochs": 2.5}, None),
    ("bfd", {"per_device": 2, "grad_accum": 2}, {"epochs": 3}, None),
    ("bfd", {"per_device": 1, "grad_accum": 2, "world_size": 2}, {"epochs": 4}, {"strategy": "ddp", "procs_per_node": 2}),
    ("none", {"per_device": 4, "grad_accum": 1}, {"max_steps": 7}, None),
])
def test_budget_matches_the_token_file(project, strategy, batch, schedule, distributed):
    project.write_jsonl("data/rows.jsonl", ROWS)
    overrides = dict(packing={"strategy": strategy, "seq_length": 128}, batch=batch, schedule=schedule,
                     split={"eval_fraction": 0.2})
    if distributed:
        overrides["distributed"] = distributed
    bundle, lock, _ = project.compile(base_spec(**overrides))
    budget = lock.budget.model_dump(mode="json")
    data = load_tokens(bundle)
    rows = len(data["row_offsets"]) - 1
    per_update = batch["per_device"] * batch["grad_accum"] * batch.get("world_size", 1)
    assert lock.batch.examples_per_update == per_update
    assert budget["train_rows"] == rows == lock.packing.rows
    if strategy == "none":
        assert rows == lock.data_manifest.train_examples
    else:
        assert rows < lock.data_manifest.train_examples  # packing put several examples in a row

    if "max_steps" in schedule:
        steps = schedule["max_steps"]
    else:
        steps = math.ceil(schedule["epochs"] * rows / per_update)
    assert budget["optimizer_steps"] == steps

    order = data["order"]
    assert order.dtype == np.int64
    assert order.size == steps * per_update
    assert order.min() >= 0 and order.max() < rows
    full_epochs = order.size // rows
    for epoch in range(full_epochs):  # each full epoch visits every row exactly once
        assert sorted(order[epoch * rows : (epoch + 1) * rows].tolist()) == list(range(rows))

    supervised = _per_row(data, data["labels"] != IGNORE_INDEX)[order].reshape(steps, per_update).sum(axis=1)
    tokens = np.diff(data["row_offsets"])[order].reshape(steps, per_update).sum(axis=1)
    stats = budget["supervised_tokens_per_update"]
    assert stats["min"] <= stats["mean"] <= stats["max"]
    assert stats == _stats(supervised)
    assert budget["tokens_per_update"] == _stats(tokens)
    assert budget["supervised_tokens"] == int(supervised.sum())
    assert budget["total_tokens"] == int(tokens.sum())
    assert stats["mean"] * steps == pytest.approx(budget["supervised_tokens"], abs=0.005 * steps)
    assert 0 < budget["supervised_tokens"] < budget["total_tokens"]  # prompts are context, not targets
    assert budget["epochs"] == round(steps * per_update / rows, 4)
    assert budget["lr_per_example"] == pytest.approx(1.0e-4 / per_update)
    segs = np.diff(data["seq_offsets"])[order].reshape(steps, per_update).sum(axis=1)
    assert budget["source_examples_per_update"] == _stats(segs)


def test_plan_order_is_deterministic_and_seeded():
    a = plan_order(10, 7, 4, seed=1)
    assert np.array_equal(a, plan_order(10, 7, 4, seed=1))
    assert not np.array_equal(a, plan_order(10, 7, 4, seed=2))
    assert a.size == 28
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:20].tolist()) == list(range(10))


def test_world_size_must_match_distributed(project):
    from sftc.errors import SpecError

    project.write_jsonl("data/rows.jsonl", ROWS)
    with pytest.raises(SpecError, match="batch.world_size"):
        project.compile(base_spec(batch={"world_size": 2}))
