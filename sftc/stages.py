"""Say what a long command is doing, and nothing when it is quick.

`sftc compile` and `sftc diff` of a git revision can take from a second to minutes (reading and
tokenizing data, near-duplicate search). A command done within a second prints nothing extra; past
that, each stage still running is announced on stderr once, from a small background thread, so a
person watching a terminal or a CI log sees which pass is working:

    sftc: compile: tokenizing 2998 examples with the real tokenizer ...
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Stages:
    """Use as a context manager; call `stage(text)` as each step begins."""

    def __init__(self, what: str, after_s: float = 1.0, stream: TextIO | None = None, enabled: bool = True):
        self.what = what
        self.after_s = after_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.current: str | None = None
        self.announced: str | None = None
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Stages":
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="sftc-stages", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def stage(self, text: str) -> None:
        with self._lock:
            self.current = text
        if self.enabled and time.perf_counter() - self.started >= self.after_s:
            self._announce()

    def _announce(self) -> None:
        with self._lock:
            text = self.current
            if text is None or text == self.announced:
                return
            self.announced = text
        print(f"sftc: {self.what}: {text} ...", file=self.stream, flush=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            if time.perf_counter() - self.started >= self.after_s:
                self._announce()
