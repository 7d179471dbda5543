"""Pass 7: the batch budget, computed from the real packed rows and the locked data order.

examples_per_update = per_device x grad_accum x world_size (spec.batch) counts *rows* per optimizer
update; the budget record does not repeat the batch layout, the lock's spec holds it.
Packed rows hold different numbers of examples and answer tokens, so the supervised tokens per
update vary; the budget reports their min / mean / max over the exact planned run, because the
runtime consumes exactly the stream locked here (`order`).

The stream is the concatenation of per-epoch permutations of the rows, cut at
optimizer_steps x examples_per_update: every update gets a full batch, no partial last update.
Within update u the rows are order[u*E:(u+1)*E]; micro-step a of rank r takes the slice
starting at (a * world_size + r) * per_device.
"""

from __future__ import annotations

import math

import numpy as np

from sftc.compiler.pack import Packed
from sftc.compiler.spec import Spec, examples_per_update, planned_rows_problem
from sftc.errors import SpecError
from sftc.lock import Budget


def plan_order(rows: int, steps: int, per_update: int, seed: int) -> np.ndarray:
    needed = steps * per_update
    epochs = max(1, math.ceil(needed / rows))
    # seeded per epoch so a resumed run (or a reviewer) regenerates exactly the same stream
    stream = np.concatenate([np.random.default_rng([seed, epoch]).permutation(rows) for epoch in range(epochs)])
    return stream[:needed].astype(np.int64)


def _stats(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "max": int(values.max())}


def compute_budget(spec: Spec, packed: Packed) -> tuple[Budget, np.ndarray]:
    batch = spec.batch
    per_update = examples_per_update(batch.per_device, batch.grad_accum, batch.world_size)
    rows = packed.rows
    if rows == 0:
        raise ValueError("no train rows to budget")
    if spec.schedule.max_steps is not None:
        steps = spec.schedule.max_steps
    else:
        steps = max(1, math.ceil(spec.schedule.epochs * rows / per_update))
    too_big = planned_rows_problem(steps, per_update, rows)
    if too_big:
        raise SpecError(too_big)
    order = plan_order(rows, steps, per_update, spec.seed)

    lengths = packed.row_lengths()[order]
    supervised = packed.row_supervised()[order]
    segments = packed.row_segments()[order]
    by_update = lambda a: a.reshape(steps, per_update).sum(axis=1)  # noqa: E731
    # positions a micro-batch occupies: its rows right-padded to the longest one
    micro = lengths.reshape(-1, batch.per_device)
    positions = int((micro.max(axis=1) * batch.per_device).sum())
    total_tokens = int(lengths.sum())
    budget = Budget(
        source_examples_per_update=_stats(by_update(segments)),
        supervised_tokens_per_update=_stats(by_update(supervised)),
        tokens_per_update=_stats(by_update(lengths)),
        optimizer_steps=steps,
        epochs=round(steps * per_update / rows, 4),
        train_rows=rows,
        total_tokens=total_tokens,
        supervised_tokens=int(supervised.sum()),
        packing_efficiency=round(total_tokens / positions, 4),
        padding_fraction=round(1 - total_tokens / positions, 4),
        lr_per_example=spec.optimizer.lr / per_update,
        # computed here once; the runtime reads it from the lock and never re-derives it
        warmup_steps=math.ceil(spec.schedule.warmup_ratio * steps),
    )
    return budget, order
