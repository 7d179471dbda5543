"""Worker processes for a compile's per-row passes, with results in input order (issue 17).

Two executors run the same ranges: forked processes on this machine (the default: plain `pip
install`, no cluster), or tasks on a Ray cluster (`RayCluster`, `sftc compile --executor ray`) for a
compile that outgrows one machine.

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

import itertools
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

# the most rows in one range, in this process or a worker: what one range's result holds, and so
# a worker's memory, whatever the number of rows (issue 17: ranges of rows / 8 grew a worker to
# 0.8 GB at 1M rows)
ROWS_PER_RANGE_HERE = 50_000

_TASK: Callable[[int, int, int], Any] | None = None


def default_workers() -> int:
    """The cores this process may use (its CPU affinity, as a container or taskset sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run(k: int, lo: int, hi: int):
    return _TASK(k, lo, hi)


def map_ranges(task: Callable[[int, int, int], Any], rows: int, workers: "int | RayCluster",
               remote: "tuple[Callable[[int, int], Any], Callable[[int, Any], Any]] | None" = None) -> Iterator:
    """Yield task(k, lo, hi) for each contiguous range k of range(rows), in order; in worker
    processes when `workers` > 1 and there are enough rows, else one after another in this process.
    Each result is yielded as soon as it and those before it are done, and dropped here: the
    caller folds it in while the workers go on, so the ranges' results are never all held.

    `workers` may be a RayCluster: `remote` = (gather, work) then says the same task in two halves,
    gather(lo, hi) -> the range's inputs, read here, and work(k, inputs) -> task(k, lo, hi)'s
    result, computed on the cluster from those inputs alone (a Ray worker shares no memory and
    no disk with this process)."""
    global _TASK
    if isinstance(workers, RayCluster):
        assert remote is not None, "a pass run on Ray says how to gather its inputs"
        yield from workers.map(*remote, rows)
        return
    workers = min(int(workers), rows // MIN_ROWS_PER_WORKER)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        # in this process too a range at a time, so one process holds no more than the parent of
        # several does (one range for all rows peaked 1.6 GB at 400k rows, against 1.0 GB)
        for k, lo in enumerate(range(0, rows, ROWS_PER_RANGE_HERE)):
            yield task(k, lo, min(lo + ROWS_PER_RANGE_HERE, rows))
        if not rows:
            yield task(0, 0, 0)
        return
    parts = max(workers * RANGES_PER_WORKER, -(-rows // ROWS_PER_RANGE_HERE))
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
            ranges = iter(enumerate(zip(bounds[:-1], bounds[1:])))
            futures: deque = deque()
            try:
                # a window of ranges submitted ahead, so finished results do not pile up here while the
                # caller folds in an earlier one. result() re-raises a worker's exception, the first in
                # row order, as the serial pass would (an SftcError keeps its message and problems)
                while True:
                    for k, (lo, hi) in itertools.islice(ranges, 2 * workers - len(futures)):
                        futures.append(pool.submit(_run, k, lo, hi))
                    if not futures:
                        break
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


# rows in one Ray task: its inputs (the rows' text) and results travel through the object store
ROWS_PER_REMOTE_RANGE = 10_000
# ranges sent and not yet taken back: what this process and the object store hold at once
MAX_RANGES_IN_FLIGHT = 64
# how long a task may wait for a CPU anywhere in the cluster before the compile says why it waits
REMOTE_WAIT_S = 60.0


def _run_remote(work, k: int, inputs):
    # a task holds one CPU of its node: the tokenizer's own thread pool would take them all, and each
    # of the node's tasks with it (the tokens do not depend on the threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return work(k, inputs)


class RayCluster:
    """The per-row passes as tasks on a Ray cluster, for a compile past one machine (issue 17).

    `address`: a running cluster's (`ray start --head` on one node, `ray start --address=HEAD:6379` on
    the others; or RAY_ADDRESS), or None for a Ray instance on this machine alone. Every node needs
    sftc and Ray installed (`pip install 'sftc[ray]'`), as for any Ray job. What runs on the cluster
    is what forked workers run here: shingling/MinHash and tokenization, range by range, from
    inputs this process reads and sends (no shared disk is assumed). Ranges are cut by row count
    and results taken back in row order, so the bundle's bytes are the ones any local compile gives
    (tests/compiler/test_ray_executor.py compares them on a local two-node cluster). Tasks and
    results travel pickled, as between the local pool's processes: run it on a cluster you trust
    as you trust this machine."""

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise SftcError("--executor ray needs Ray, which is not installed here: pip install 'sftc[ray]' "
                            "(or run the compile with the default executor, --executor local)") from None
        import logging

        self._ray = ray
        self._connected_here = not ray.is_initialized()
        if self._connected_here:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
            except ConnectionError as exc:
                if "auth" in f"{exc} {exc.__cause__}".lower():
                    # `ray start --head` (Ray 2.60) turns token authentication on and keeps the token in
                    # ~/.ray/auth_token; a client must be told to send it
                    raise SftcError(f"--executor ray: the Ray cluster at {address!r} refused this process's "
                                    "authentication: set RAY_AUTH_MODE=token, with the cluster's token in "
                                    "~/.ray/auth_token or RAY_AUTH_TOKEN, as for any Ray client") from None
                raise SftcError(f"--executor ray: no Ray cluster at {address!r}: {exc}. Start one with `ray start "
                                "--head` (then `ray start --address=<head>:6379` on each other node), or leave "
                                "--ray-address out to run Ray on this machine alone") from None
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < 1:
            self.close()
            raise SftcError(f"--executor ray: the Ray cluster at {address or 'this machine'} has {cpus:g} CPUs, and each "
                            "compile task needs one: add worker nodes (`ray start --address=<head>:6379`) or "
                            "start the head without --num-cpus=0")
        self.workers = int(cpus)

    def close(self) -> None:
        """Disconnect, and stop the Ray instance if this process started it (not one it found running)."""
        if self._connected_here:
            self._ray.shutdown()
            self._connected_here = False

    def _get(self, ref):
        """ray.get, saying why when no CPU takes the task (a cluster whose nodes left: Ray waits forever)."""
        ray = self._ray
        while not ray.wait([ref], timeout=REMOTE_WAIT_S)[0]:
            if ray.cluster_resources().get("CPU", 0) < 1:
                raise SftcError("--executor ray: the Ray cluster has no CPU left to run the compile's tasks (its "
                                "worker nodes left?); compile again once nodes have joined, or with --executor local")
        return ray.get(ref)

    def map(self, gather, work, rows: int) -> Iterator:
        ray = self._ray
        if not rows:
            yield work(0, gather(0, 0))
            return
        parts = max(self.workers * RANGES_PER_WORKER, -(-rows // ROWS_PER_REMOTE_RANGE))
        parts = min(parts, rows)
        bounds = [rows * i // parts for i in range(parts + 1)]
        run = ray.remote(num_cpus=1, max_retries=0)(_run_remote)
        work_ref = ray.put(work)  # the tokenizer and template, sent once, not with every range
        window = min(2 * self.workers, MAX_RANGES_IN_FLIGHT)
        pending: deque = deque()
        submitted = 0
        try:
            while submitted < parts or pending:
                # a bounded window of ranges in flight: their inputs and results are what this
                # process holds, not every range's
                while submitted < parts and len(pending) < window:
                    lo, hi = bounds[submitted], bounds[submitted + 1]
                    pending.append(run.remote(work_ref, submitted, gather(lo, hi)))
                    submitted += 1
                try:
                    result = self._get(pending[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, SftcError):
                        raise cause from None  # a row's DataError, as the serial pass words it
                    raise  # a bug: its traceback (the task's, in the message) is what to read
                except ray.exceptions.RayError as exc:
                    raise SftcError(f"a compile task was lost on the Ray cluster ({type(exc).__name__}: a worker "
                                    f"died or ran out of memory); compile again, or with --executor local: {exc}") from None
                pending.popleft()
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref)
