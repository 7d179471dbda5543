"""What a person sees while `sftc run` works: a live bar on a terminal, plain lines when piped.

On a terminal, one tqdm bar (step, loss, tokens/s, ETA) with a line above it per evaluation. When
stderr is not a terminal (DVC, CI, nohup, SLURM logs) there is no bar: a plain, greppable line
every `every` steps and the same evaluation lines. Either way the run says where it resumed from,
where it exported, and ends with a summary. HF Trainer's own bar and its PrinterCallback (a raw
dict per log) are turned off by the trainer so this is the only display.

    sftc: step 12/191 (6%) loss 1.2345 lr 2.00e-03 grad_norm 0.812 tokens/s 2,583 eta 3m12s
    sftc: eval step 48: format_pass_rate 0.984 policy_pass_rate 0.859 eval_loss 1.144 -> eligible
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, TextIO

from sftc.runtime.rundir import DIAGNOSTICS

# Keys of an evaluation record that describe the evaluation itself, not the model.
_NOT_METRICS = DIAGNOSTICS | {"why"}


def number(value: Any) -> str:
    """The one number format of progress lines: 4 significant digits, thousands separated."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def default_every(total_steps: int) -> int:
    """About twenty plain lines per run, never fewer than one per step."""
    return max(1, total_steps // 20)


class Progress:
    """One display for one process (rank 0 only; other ranks get `Progress.silent()`)."""

    def __init__(self, total_steps: int, start_step: int = 0, every: int | None = None,
                 stream: TextIO | None = None, live: bool | None = None, enabled: bool = True):
        self.total = int(total_steps)
        self.start_step = int(start_step)
        self.every = int(every) if every else default_every(self.total)
        self.stream = stream if stream is not None else sys.stderr
        self.live = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) if live is None else live
        self.enabled = enabled
        self.bar = None
        self.started = None

    @classmethod
    def silent(cls) -> "Progress":
        return cls(0, enabled=False)

    # --- lines -----------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"sftc: {text}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def start(self, resumed_from: str | None = None) -> None:
        self.started = time.perf_counter()
        if not self.enabled:
            return
        if resumed_from:
            self.say(f"resumed from {resumed_from} at step {self.start_step}/{self.total}")
        else:
            self.say(f"training {self.total} optimizer steps")
        if self.live:
            from tqdm.auto import tqdm

            # transformers draws its own bar at every save ("Writing model shards"); a second bar
            # on the terminal breaks this one's in-place redraw, so it is off from here to the end
            # of the run (run_bundle puts it back as it was, however the run ends)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            self.bar = tqdm(total=self.total, initial=self.start_step, file=self.stream, unit="step",
                            dynamic_ncols=True, leave=True, desc="sftc")

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if self.started is None or done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def train(self, record: dict) -> None:
        """A train line of metrics.jsonl, once per optimizer step."""
        if not self.enabled:
            return
        step = int(record.get("step", 0))
        fields = {"loss": record.get("loss"), "lr": record.get("lr"), "grad_norm": record.get("grad_norm"),
                  "tokens/s": record.get("tokens_per_s")}
        if self.bar is not None:
            self.bar.set_postfix({k: number(v) for k, v in fields.items() if v is not None}, refresh=False)
            self.bar.update(max(0, step - self.bar.n))
            return
        if step % self.every == 0 or step == self.total or step == self.start_step + 1:
            percent = 100 * step / self.total if self.total else 100
            parts = " ".join(f"{k} {number(v)}" for k, v in fields.items() if v is not None)
            self.say(f"step {step}/{self.total} ({percent:.0f}%) {parts} eta {duration(self.eta(step))}")

    def evaluation(self, record: dict, eligible: bool | None = None, why: str | None = None) -> None:
        """An eval line of metrics.jsonl: the metrics, and whether the checkpoint may be selected."""
        metrics = " ".join(f"{k} {number(v)}" for k, v in record.items()
                           if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool))
        verdict = {True: " -> eligible", False: " -> not eligible"}.get(eligible, "")
        reason = f" ({why})" if why and eligible is False else ""
        self.say(f"eval step {record.get('step')}: {metrics or 'no metrics'}{verdict}{reason}")

    def close_bar(self) -> None:
        """End the live bar (at its last step), so later lines print below it, not into it."""
        if self.bar is None:
            return
        self.bar.close()
        self.bar = None

    def finish(self, summary: str) -> None:
        self.close_bar()
        elapsed = time.perf_counter() - self.started if self.started is not None else None
        self.say(f"{summary} (this session {duration(elapsed)})")


@contextlib.contextmanager
def third_party_bars_kept():
    """transformers' progress bars as they were before the run, however it ends (Progress.start
    turns them off under its live bar)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
