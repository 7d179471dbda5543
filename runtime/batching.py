"""Batching: which rows make each micro-batch of each update, in what order, and in what layout.

The bundle fixes the rows and their order; this module turns them into what the trainer draws:
the plan of every update (mirroring HF Trainer's epoch/accumulation arithmetic, so the plan can be
checked micro-batch by micro-batch), the sampler that replays the locked order, and the collator
that lays a micro-batch out for the attention kernel in use.
"""

from __future__ import annotations

import math

import numpy as np

from sftc.errors import BundleError, RunError
from sftc.runtime.bundle import IGNORE


def collate_rows(rows: list[dict], pad_token_id: int):
    """Stack rows of packed examples into one micro-batch (every layout ends here).

    Rows are right-padded to the longest one; position ids restart at 0 at every example and at
    the pad tail (its own segment). No attention_mask: on transformers 5.23 sdpa and eager honour
    the position-id boundaries only when no mask is passed (a mask, even all ones, makes packed
    examples read each other), and under causal attention a right pad is never read by a real
    token. The label at each example's first position is masked so no example is scored from the
    previous one's context.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        lab = np.asarray(row["labels"], dtype=np.int64).copy()
        lengths = np.asarray(row["seq_lengths"], dtype=np.int64)
        if lengths.sum() != len(ids):
            raise BundleError(f"a row's seq_lengths add up to {int(lengths.sum())}, its length is {len(ids)}")
        pos = np.concatenate([np.arange(k) for k in lengths]) if len(lengths) else np.zeros(0, dtype=np.int64)
        lab[pos == 0] = IGNORE
        m = len(ids)
        input_ids[i, :m] = torch.from_numpy(ids)
        labels[i, :m] = torch.from_numpy(lab)
        position_ids[i, :m] = torch.from_numpy(pos)
        position_ids[i, m:] = torch.arange(width - m)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# Which layout executes a micro-batch of packed rows. Every layout feeds the model exactly the
# bundle's (token, label) pairs of the micro-batch, so the loss and gradient are the same; they
# differ in cost, and each fits one attention implementation:
#   packed_rows  flash-attention reads example boundaries from the reset position ids (varlen) at
#                no extra cost, so packed rows keep their full length.
#   varlen       sdpa: the micro-batch's rows flattened into one row with no pad; runtime.attention
#                splits attention at the position-id resets (projections and MLPs see real tokens
#                only). Plain sdpa would instead give a packed row a dense block-diagonal mask, a
#                full L x L attention per row off the fused causal kernel.
#   segments     eager (and any other): each example its own right-padded row.
LAYOUTS = ("packed_rows", "varlen", "segments")


def choose_layout(attn_implementation: str | None) -> str:
    name = str(attn_implementation or "")
    if name.startswith("flash_attention"):
        return "packed_rows"
    return "varlen" if name == "sdpa" else "segments"


def split_segments(rows: list[dict]) -> list[dict]:
    """Each packed row's examples as rows of their own, in order."""
    segments = []
    for row in rows:
        ids = np.asarray(row["input_ids"])
        labels = np.asarray(row["labels"])
        start = 0
        for n in np.asarray(row["seq_lengths"], dtype=np.int64).tolist():
            segments.append({"input_ids": ids[start:start + n], "labels": labels[start:start + n],
                             "seq_lengths": np.array([n])})
            start += n
    return segments


def flatten_rows(rows: list[dict]) -> list[dict]:
    """The packed rows end to end as one row; their examples keep their boundaries."""
    return [{key: np.concatenate([np.asarray(r[key]) for r in rows]) for key in ("input_ids", "labels", "seq_lengths")}]


def collate(rows: list[dict], pad_token_id: int, layout: str) -> tuple[dict, list[int]]:
    """The micro-batch in `layout`, and the real length of each batch row."""
    if layout == "segments":
        rows = split_segments(rows)
    elif layout == "varlen":
        rows = flatten_rows(rows)
    elif layout != "packed_rows":
        raise BundleError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return collate_rows(rows, pad_token_id), [len(r["input_ids"]) for r in rows]


def plan_updates(epochs: list[np.ndarray], per_device: int, grad_accum: int, max_steps: int,
                 world_size: int = 1, rank: int = 0) -> list[dict]:
    """The rows of every micro-batch of every optimizer update of this rank, as HF Trainer will draw them.

    Mirrors transformers 5.23 `set_initial_training_values` / `_run_epoch`: a sampler epoch of n
    indices is ceil(n / per_device) micro-batches (the last one may be short), grouped into updates
    of grad_accum (the last update of an epoch may have fewer). With several ranks the micro-batches
    are dealt round-robin (accelerate's BatchSamplerShard): micro-step a of rank r in update u takes
    the per_device rows starting at u*E + (a*world_size + r)*per_device, E = examples per update, as
    docs/bundle-format.md fixes. With the compiler's flat stream (one epoch of steps x E rows) every
    update is full.
    """
    plan = []
    if world_size > 1:
        uneven = [len(e) for e in epochs if len(e) % (per_device * world_size)]
        if uneven:
            raise RunError(
                f"the bundle's order has an epoch of {uneven[0]} rows, not a multiple of per_device {per_device} x "
                f"world_size {world_size}: ranks would get different numbers of micro-batches; recompile the bundle"
            )
    for e, rows in enumerate(epochs):
        rows = rows.tolist()
        micro = [rows[i:i + per_device] for i in range(0, len(rows), per_device)]
        mine = micro[rank::world_size]
        per_epoch = max(math.ceil(len(mine) / grad_accum), 1)
        for u in range(per_epoch):
            plan.append({"epoch": e, "update_in_epoch": u, "microbatches": mine[u * grad_accum:(u + 1) * grad_accum]})
        if len(plan) >= max_steps:
            return plan[:max_steps]
    raise RunError(
        f"budget.optimizer_steps is {max_steps}, but the bundle's order holds only {len(plan)} update(s) of "
        f"{per_device} x {grad_accum} rows; recompile the bundle"
    )


def data_epochs(plan: list[dict], rows_per_epoch: int, world_size: int = 1) -> list[float]:
    """Passes over the train rows completed after each update of `plan` (this rank's plan; every
    rank draws the same number of rows per update): entry u-1 is the data epoch reached by update u.

    Not HF's `state.epoch`, which is run progress over its sampler epochs: the compiler's order is
    one flat stream, so HF counts the whole run as one epoch. Here 1.0 is one pass over the packed
    train rows, and the last update reaches the lock's `budget.epochs` (same rounding: 4 places).
    """
    done, out = 0, []
    for update in plan:
        done += world_size * sum(len(mb) for mb in update["microbatches"])
        out.append(round(done / max(rows_per_epoch, 1), 4))
    return out


class LockedOrderSampler:
    """Yields the bundle's locked row order for the epoch HF asks for, so a resumed run sees the
    same data. HF Trainer (and accelerate's DataLoaderShard / SkipBatchSampler on resume) call
    set_epoch(e) before iterating epoch e.
    """

    def __init__(self, epochs: list[np.ndarray]):
        self.epochs = epochs
        self.epoch = 0
        if len({len(e) for e in epochs}) > 1:
            raise RunError("the bundle's per-epoch orders differ in length")

    def set_epoch(self, epoch: int) -> None:
        if epoch >= len(self.epochs):
            raise RunError(f"the trainer asked for epoch {epoch}, the bundle's order has {len(self.epochs)}")
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(self.epochs[self.epoch].tolist())

    def __len__(self) -> int:
        return len(self.epochs[0])


class RowCollator:
    """Micro-batch of packed rows in the run's layout; keeps the row indices so the trainer can
    check the order, and the real length of each batch row for the token hash."""

    def __init__(self, pad_token_id: int, layout: str):
        self.pad_token_id = pad_token_id
        self.layout = layout

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        batch, lengths = collate(rows, self.pad_token_id, self.layout)
        batch["sftc_rows"] = torch.tensor([int(r["row"]) for r in rows], dtype=torch.long)
        batch["sftc_lengths"] = torch.tensor(lengths, dtype=torch.long)
        return batch
