"""Worker processes for a compile's per-row passes, with results in input order (issue 17).

Rendering a chat template and turning offsets into label masks is Python, held to one core by the
GIL; the Rust tokenizer's own threads cover only its share. So the rows are cut into contiguous
ranges and each range runs the serial code in a forked process; the parent takes the results back
range by range, in order. Every row's result depends on that row alone, so the output is the one
the serial pass gives, whatever the number of workers (tests/compiler/test_workers.py compares the
bundle bytes).

Fork, not spawn: the children inherit the loaded tokenizer, template and rows without pickling
them, and start in milliseconds. The standard library's pool is used (not HF datasets' num_proc,
which would first turn every row into an Arrow table and write its results to a cache).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from sftc.errors import SftcError

# below this many rows a range is not worth a process (fork and result transfer: ~0.1 s each)
MIN_ROWS_PER_WORKER = 2048
# a few ranges per worker, so one slow range does not leave a core idle and the results waiting
# for the caller stay small
RANGES_PER_WORKER = 4

ROWS_PER_RANGE_HERE = 50_000  # ranges run in this process (one worker): what one range's result holds

_TASK: Callable[[int, int, int], Any] | None = None


def default_workers() -> int:
    """The cores this process may use (its CPU affinity, as a container or taskset sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run(k: int, lo: int, hi: int):
    return _TASK(k, lo, hi)


def map_ranges(task: Callable[[int, int, int], Any], rows: int, workers: int) -> Iterator:
    """Yield task(k, lo, hi) for each contiguous range k of range(rows), in order; in worker
    processes when `workers` > 1 and there are enough rows, else one after another in this process.
    Each result is yielded as soon as it and those before it are done, and dropped here: the
    caller folds it in while the workers go on, so the ranges' results are never all held."""
    global _TASK
    workers = min(int(workers), rows // MIN_ROWS_PER_WORKER)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        # in this process too a range at a time, so one process holds no more than the parent of
        # several does (one range for all rows peaked 1.6 GB at 400k rows, against 1.0 GB)
        for k, lo in enumerate(range(0, rows, ROWS_PER_RANGE_HERE)):
            yield task(k, lo, min(lo + ROWS_PER_RANGE_HERE, rows))
        if not rows:
            yield task(0, 0, 0)
        return
    parts = workers * RANGES_PER_WORKER
    bounds = [rows * i // parts for i in range(parts + 1)]
    # A tokenizer that has used its thread pool prints a warning in every forked child and runs
    # single-threaded there; saying so up front keeps the warning out of the compile's output. (Its
    # Rust thread pool does not survive a fork: forced on with TOKENIZERS_PARALLELISM=true, the
    # workers hung. So each worker tokenizes on one thread, where one process uses the pool.)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TASK = task
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = deque(pool.submit(_run, k, lo, hi) for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])))
            try:
                # result() re-raises a worker's exception here, the first in row order, as the serial
                # pass would (an SftcError keeps its message and problems)
                while futures:
                    yield futures.popleft().result()
            except BrokenProcessPool:
                raise SftcError(f"a compile worker process died (killed, or out of memory) while {rows} rows were "
                                f"processed in {workers} processes; compile again, with --workers 1 to use one "
                                "process and less memory") from None
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        _TASK = None
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
