"""Hashing and atomic file writes shared by the compiler and the runtime.

Everything that ends up in a bundle or a checkpoint goes through here, so "nothing is
half-written" is enforced in one place: write to a temporary sibling, fsync, rename.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: str | os.PathLike, names: list[str] | None = None) -> str:
    """One hash over a directory's files (names and contents), in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    files = sorted(names) if names is not None else sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
    )
    for name in files:
        digest.update(name.encode() + b"\0" + sha256_file(root / name).encode() + b"\n")
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def pretty_json(obj: Any) -> str:
    """Key-sorted, indented JSON with a trailing newline: the form that is written and diffed."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list: makes a rename durable)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, pretty_json(obj))


# A test hook for the fault campaign (scripts/fault_campaign.py) and tests/reliability:
# SFTC_FAULT_KILL_IN_STAGING=<final dir name or fnmatch glob> SIGKILLs this process in staging_dir
# once a matching directory is staged and fsynced, before its rename: a kill mid-compile
# (bundles/<id>) or mid-export (RUN/export). The staging dir must be removed by the next writer.
# `<name>.aside` kills between moving an existing `name` aside and renaming the new one in: the
# next writer must put the old one back.
KILL_IN_STAGING_ENV = "SFTC_FAULT_KILL_IN_STAGING"

_OWNER = re.compile(r"\.pid(\d+)(?:[.-]|$)")
# staging_dir's names: `.<final>.pid<N>.<mkdtemp's 8 characters>.tmp|.old`, or without the pid
# (older sftc); nothing else in the directory is touched
_STAGING = re.compile(r"^\..+?\.(?:pid\d+\.)?[A-Za-z0-9_]{8}\.(?:tmp|old)$")


def owner_alive(name: str) -> bool:
    """Whether the process named in a staging name (`.<final>.pid<N>.<random>.tmp`) still runs.
    A name with no owner predates owner records; nothing can own it any more."""
    match = _OWNER.search(name)
    if not match:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_staging(parent: str | os.PathLike) -> list[str]:
    """Remove the staging and set-aside dirs of staging_dir() in `parent` whose writer is dead (a
    SIGKILL mid-compile or mid-export leaves them forever otherwise). Returns their names."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for child in parent.iterdir():
        if _STAGING.match(child.name) and child.is_dir() and not owner_alive(child.name):
            _restore_set_aside(child)
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return sorted(removed)


def _restore_set_aside(aside: Path) -> None:
    """A `.old` dir holds the previous `final` moved aside by staging_dir(replace=True). A writer
    killed between that move and the new one's rename left no `final`: the old one goes back, so
    a kill never loses the export or bundle that was there before."""
    if not aside.name.endswith(".old"):
        return
    for kept in list(aside.iterdir()):
        target = aside.parent / kept.name
        if kept.is_dir() and not target.exists():
            os.rename(kept, target)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success rename it into place, on failure remove it.

    If `final` already exists when the work is done (a concurrent writer won), the staged copy is
    discarded: both writers produced the same content-addressed result. With `replace`, the old
    directory is moved aside first and removed only after the new one is in place. The temporary
    names carry this process's pid, and stale ones of dead writers in the same directory are
    removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final.parent)
    owner = f".{final.name}.pid{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=owner, suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        kill = os.environ.get(KILL_IN_STAGING_ENV)
        if kill and fnmatch.fnmatchcase(final.name, kill):
            os.kill(os.getpid(), signal.SIGKILL)
        if replace and final.exists():
            aside = Path(tempfile.mkdtemp(prefix=owner, suffix=".old", dir=final.parent))
            os.rename(final, aside / final.name)
            try:
                if kill and fnmatch.fnmatchcase(final.name + ".aside", kill):
                    os.kill(os.getpid(), signal.SIGKILL)  # the fault campaign: between the two renames
                os.rename(tmp, final)
            except BaseException:
                _restore_set_aside(aside)
                shutil.rmtree(aside, ignore_errors=True)
                raise
            shutil.rmtree(aside, ignore_errors=True)
            fsync_path(final.parent)
            return
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
