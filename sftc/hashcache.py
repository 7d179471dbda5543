"""sha256 of large files (base-model weights), cached per project by (path, size, mtime_ns).

A 100 GB model is streamed through sha256 once per machine; later compiles and every run's
pre-flight check only stat the files. A file rewritten in place changes its mtime, so it is hashed
again. The cache lives in `<project>/.sftc-cache/hashes.json` (not an artifact: it names paths of
this machine, and nothing reads it but this module); it is written atomically, and a damaged cache
is treated as empty.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sftc.io import atomic_write_json, sha256_file

CACHE_PATH = Path(".sftc-cache") / "hashes.json"


def _read(cache_file: Path) -> dict:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_sha256(paths: list[Path], project_root: Path) -> dict[Path, str]:
    """{path: sha256 hex} for each path; unchanged files come from the cache."""
    cache_file = Path(project_root) / CACHE_PATH
    cache = _read(cache_file)
    out, changed = {}, False
    for path in paths:
        real = os.path.realpath(path)  # hub snapshots are symlinks to blobs: key by the blob
        st = os.stat(real)
        entry = cache.get(real)
        if isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns] and isinstance(entry[2], str):
            out[path] = entry[2]
            continue
        digest = sha256_file(real)
        out[path] = digest
        after = os.stat(real)
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not rewritten while hashed
            cache[real] = [st.st_size, st.st_mtime_ns, digest]
            changed = True
    if changed:
        try:
            atomic_write_json(cache_file, cache)
        except OSError:
            pass  # a read-only project still compiles and runs; it just hashes again next time
    return out
