"""The trainer: TRL's SFTTrainer fed the bundle's rows in the locked order, every update checked.

RunState tracks what the run proves beside HF's TrainerState (each micro-batch's rows against the
plan, the first micro-batches' tokens against the bundle, each update's supervised tokens against
the bundle's prediction). BundleTrainer swaps in the locked sampler, stops on a non-finite loss
before the optimizer sees it, and saves checkpoints through runtime/checkpoint.py. training_args
sets every SFTConfig knob from the lock: TRL's defaults (bf16 on, gradient checkpointing on,
logging every 10 steps, NaN losses hidden from the log) are not what a locked run means.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sftc.errors import RunError
from sftc.runtime import rundir
from sftc.runtime.batching import LockedOrderSampler, data_epochs
from sftc.runtime.bundle import IGNORE, Bundle, TokenFile
from sftc.runtime.checkpoint import save_checkpoint

HASHED_MICROBATCHES = 4


def row_hash(tf: TokenFile, rows: list[int]) -> str:
    """sha256 of the rows' tokens, concatenated in order: the same for every layout."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(np.ascontiguousarray(tf.row(r)[0], dtype=np.int64).tobytes())
    return digest.hexdigest()


def batch_hash(input_ids, n_real: list[int]) -> str:
    """sha256 of the real (unpadded) tokens of the batch rows, concatenated in order."""
    digest = hashlib.sha256()
    for i, n in enumerate(n_real):
        digest.update(input_ids[i, :n].cpu().numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


class RunState:
    """What the run tracks beside HF's TrainerState: consumption checks, metrics, checkpoints."""

    def __init__(self, bundle: Bundle, run_dir: Path, plan: list[dict] | None, pad_id: int, tokenizer,
                 supervised_total: int, stop_after_steps: int | None, dist=None, start_step: int = 0,
                 allow_incomplete_history: bool = False):
        from sftc.runtime.distributed import Dist

        from sftc.runtime.progress import Progress

        self.dist = dist if dist is not None else Dist()
        self.trainer = None
        self.progress = Progress.silent()  # run.py gives rank 0 a real one
        self.bundle = bundle
        self.run_dir = run_dir
        self.plan = plan
        # data epoch reached after each update (runtime/batching.py data_epochs): what metrics record as "epoch"
        self.data_epochs = None if plan is None else data_epochs(plan, bundle.train.n_rows, self.dist.world_size)
        self.pad_id = pad_id
        self.tokenizer = tokenizer
        self.supervised_total = supervised_total
        self.stop_after_steps = stop_after_steps
        self.mb_in_update = 0
        self.update_supervised = 0
        self.update_tokens = 0
        self.update_started = None
        self.last_update: dict | None = None
        self.hashed: list[dict] = []
        self.start_step = start_step
        self.select_spec = bundle.spec.select.model_dump(mode="json")
        self.allow_incomplete_history = allow_incomplete_history
        self.selection: dict = {}
        self.last_checkpoint: Path | None = None

    # called for every training micro-batch, before the forward
    def observe(self, step: int, inputs: dict) -> None:
        rows = inputs.pop("sftc_rows").tolist()
        lengths = inputs.pop("sftc_lengths").tolist()
        labels = inputs["labels"]
        supervised = int((labels[:, 1:] != IGNORE).sum())
        if self.plan is not None:
            if step >= len(self.plan):
                raise RunError(f"the trainer ran past the bundle's {len(self.plan)} updates (at update {step + 1})")
            expected = self.plan[step]["microbatches"]
            if self.mb_in_update >= len(expected) or expected[self.mb_in_update] != rows:
                want = expected[self.mb_in_update] if self.mb_in_update < len(expected) else "no micro-batch"
                raise RunError(
                    f"data order diverged from the bundle's locked order at update {step + 1}, "
                    f"micro-batch {self.mb_in_update + 1}: got rows {rows}, the bundle says {want}"
                )
            if len(self.hashed) < HASHED_MICROBATCHES:
                got = batch_hash(inputs["input_ids"], lengths)
                want_hash = row_hash(self.bundle.train, rows)
                if got != want_hash:
                    raise RunError(f"update {step + 1}: the input_ids fed to the model are not the bundle's rows {rows}")
                self.hashed.append({"update": step + 1, "microbatch": self.mb_in_update + 1, "rows": rows, "sha256": got})
        self.mb_in_update += 1
        self.update_supervised += supervised
        self.update_tokens += int(sum(lengths))

    def begin_update(self) -> None:
        self.update_started = time.perf_counter()

    def end_update(self, step: int) -> None:
        """Called after optimizer step `step` (1-based)."""
        if self.plan is not None:
            want_mb = len(self.plan[step - 1]["microbatches"])
            if self.mb_in_update != want_mb:
                raise RunError(f"update {step} used {self.mb_in_update} micro-batches, the bundle plans {want_mb}")
            want_sup = self.bundle.train.supervised([r for mb in self.plan[step - 1]["microbatches"] for r in mb])
            if want_sup != self.update_supervised:
                where = f" on rank {self.dist.rank} of {self.dist.world_size}" if self.dist.active else ""
                raise RunError(
                    f"update {step} scored {self.update_supervised} supervised tokens{where}, the bundle predicts {want_sup}"
                )
        if self.dist.active:
            # each rank checked its own slice above; the update's totals are the sum over ranks
            from sftc.runtime.distributed import all_sum

            self.update_supervised, self.update_tokens = all_sum(self.dist, [self.update_supervised, self.update_tokens])
        elapsed = time.perf_counter() - (self.update_started or time.perf_counter())
        self.supervised_total += self.update_supervised
        self.last_update = {
            "supervised_tokens": self.update_supervised,
            "supervised_tokens_total": self.supervised_total,
            "tokens": self.update_tokens,
            "tokens_per_s": self.update_tokens / elapsed if elapsed > 0 else None,
        }
        self.mb_in_update = self.update_supervised = self.update_tokens = 0

    def data_epoch(self, step: int) -> float | None:
        """Passes over the train rows done after update `step` (0 before the first); None without a plan."""
        if self.data_epochs is None:
            return None
        if step <= 0:
            return 0.0
        return self.data_epochs[min(step, len(self.data_epochs)) - 1]

    def append_metrics(self, record: dict) -> None:
        if self.dist.is_main:  # one writer: rank 0
            rundir.append_metrics(self.run_dir, record)
            if record.get("kind") == "train":
                self.progress.train(record)


def make_trainer_class():
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class BundleTrainer(SFTTrainer):
        def __init__(self, *args, run: RunState, sampler: LockedOrderSampler, **kwargs):
            self.run = run
            self.locked_sampler = sampler
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            return self.locked_sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "sftc_rows" in inputs:
                self.run.observe(self.state.global_step, inputs)
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            value = loss[0] if isinstance(loss, tuple) else loss
            if model.training and not torch.isfinite(value.detach()).all():
                last = self.run.last_checkpoint
                raise RunError(
                    f"non-finite loss ({float(value.detach())}) at update {self.state.global_step + 1}; "
                    "stopped before the optimizer step, so no weight saw it. "
                    + (f"Last good checkpoint: {last}" if last else "No checkpoint was written yet.")
                    + " Lower optimizer.lr, keep optimizer.max_grad_norm set, or check the data of this update."
                )
            return loss

        def _save_checkpoint(self, model, trial):
            save_checkpoint(self, model)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if self.run.dist.fsdp:
                return  # loaded into the unsharded model before fully_shard (runtime/distributed.py)
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or not self.run.dist.fsdp:
                return super()._load_optimizer_and_scheduler(checkpoint)
            from sftc.runtime.distributed import load_full_optimizer_state

            state = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True)
            load_full_optimizer_state(self.model, getattr(self.optimizer, "optimizer", self.optimizer), state)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    class RunCallback(TrainerCallback):
        def __init__(self, run: RunState):
            self.run = run

        def on_train_begin(self, args, state, control, **kwargs):
            # prove the engine on the model the trainer actually steps (after accelerate's prepare)
            d = self.run.dist
            if self.run.bundle.spec.distributed.activation_checkpointing:
                inner = self.run.trainer.model
                on = bool(getattr(inner, "is_activation_checkpointing", False))
                if not on:
                    raise RunError("distributed.activation_checkpointing is set but the model does not recompute "
                                   "its layers (is_activation_checkpointing is False)")
                d.checks["activation_checkpointing"] = on
            if not d.active:
                return
            from sftc.runtime.distributed import verify_replicated, verify_sharding

            stepped = self.run.trainer.model_wrapped
            if d.fsdp:
                verify_sharding(stepped, d, "model the trainer steps")
            else:
                verify_replicated(stepped, d)

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.run.dist.fsdp and "state_shares" not in self.run.dist.checks:  # once per run: an all_gather
                from sftc.runtime.distributed import verify_state_shares

                verify_state_shares(self.run.trainer.model_wrapped, self.run.trainer.optimizer, self.run.dist)

        def on_step_begin(self, args, state, control, **kwargs):
            self.run.begin_update()

        def on_step_end(self, args, state, control, **kwargs):
            self.run.end_update(state.global_step)
            if self.run.stop_after_steps is not None and state.global_step >= self.run.stop_after_steps:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs or "train_loss" in logs or self.run.last_update is None:
                return
            record = {
                "kind": "train",
                "step": state.global_step,
                "epoch": self.run.data_epoch(state.global_step),
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                **self.run.last_update,
            }
            self.run.append_metrics(record)
            self.run.last_update = None

    return BundleTrainer, RunCallback


def training_args(bundle: Bundle, run_dir: Path, layout: dict, model, dist=None, tracking=None):
    import torch
    from trl import SFTConfig

    spec = bundle.spec
    opt, sched = spec.optimizer, spec.schedule
    cuda = torch.cuda.is_available()
    max_steps = bundle.lock.budget.optimizer_steps
    model_dtype = spec.model.dtype
    autocast = spec.distributed.mixed_precision if not (dist is not None and dist.fsdp) else "no"
    if autocast == "fp16" and not cuda:
        raise RunError("distributed.mixed_precision 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
    if model_dtype == "float16" and not cuda:
        raise RunError("model.dtype float16 needs a CUDA device (fp16 mixed precision); use float32 or bfloat16 on CPU")
    extra: dict[str, Any] = {}
    if dist is not None and dist.active:
        extra = {
            "ddp_backend": "nccl" if dist.device.startswith("cuda") else "gloo",
            # accelerate deals each rank every world_size-th micro-batch of the locked sampler
            # (BatchSamplerShard), the slicing docs/bundle-format.md fixes; the consumption check
            # compares every micro-batch with it. No dispatching, no splitting of batches.
            "accelerator_config": {"split_batches": False, "dispatch_batches": False, "even_batches": True},
        }
    from sftc.runtime import tracking as tracking_

    names = tracking_.check_available(list(tracking.report_to)) if tracking is not None else []
    tracker_kwargs = tracking_.training_kwargs(names, run_dir, getattr(tracking, "project", None),
                                               getattr(tracking, "run_name", None))
    return SFTConfig(
        **extra,
        # the loss of an update is the sum over every rank's supervised tokens / their global count
        average_tokens_across_devices=True,
        output_dir=str(run_dir / "checkpoints"),
        seed=spec.seed,
        data_seed=spec.seed,
        max_steps=max_steps,
        per_device_train_batch_size=layout["per_device"],
        gradient_accumulation_steps=layout["grad_accum"],
        optim=spec.optimizer.name,  # estimated per optimizer at compile (compiler/model.py)
        learning_rate=opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        max_grad_norm=opt.max_grad_norm if opt.max_grad_norm is not None else 0.0,
        lr_scheduler_type=sched.kind,
        # the lock's integer step count (a float < 1 would be read as a ratio)
        warmup_steps=bundle.lock.budget.warmup_steps,
        # distributed.mixed_precision: FSDP2's MixedPrecisionPolicy when sharded, else autocast
        bf16=model_dtype == "bfloat16" or (autocast == "bf16"),
        fp16=model_dtype == "float16" or (autocast == "fp16"),
        activation_checkpointing=False,
        use_cpu=not cuda,
        logging_strategy="steps",
        logging_steps=1,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # HF would log a NaN loss as the running mean; we stop instead
        save_strategy="steps",
        save_steps=spec.checkpoint.every_steps,
        save_total_limit=None,  # rotation is ours: it must never delete the selected best
        eval_strategy="no",
        **tracker_kwargs,
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,
        padding_free=False,
        disable_tqdm=True,  # runtime/progress.py is the one display (a bar on a terminal, lines when piped)
        ddp_find_unused_parameters=False,
    )


def keep_fsdp_unwrapped(trainer, model) -> None:
    """accelerate's prepare would wrap the FSDP2 model in DDP on CPU (and refuses DTensor
    parameters there); prepare it the way transformers prepares a model it sharded itself: autocast
    only, no wrapper, no device move. verify_sharding proves the result at train begin."""
    original = trainer.accelerator.prepare_model

    def prepare_model(m, device_placement=None, evaluation_mode=False):
        if m is model:
            return original(m, device_placement=False, evaluation_mode=True)
        return original(m, device_placement=device_placement, evaluation_mode=evaluation_mode)

    trainer.accelerator.prepare_model = prepare_model
