"""Errors meant for people: they name the file, key or row, what was found and what is allowed.

The CLI prints an `SftcError` as a message and exits non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class SftcError(Exception):
    """A user-facing failure: bad spec, bad data, drifted bundle, refused run."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    def __reduce__(self):
        # pickled whole (a compile worker's error reaches the parent with its problems)
        return type(self), (super().__str__(), self.problems)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class SpecError(SftcError):
    """The spec file is malformed or inconsistent."""


class DataError(SftcError):
    """Input data cannot be read, or too much of it was rejected."""


class BundleError(SftcError):
    """A bundle is incomplete, edited after compile, or drifted from its lock."""


class RunError(SftcError):
    """The runtime refused to start or had to stop."""
