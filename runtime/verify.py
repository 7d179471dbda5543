"""Before any step: is this still the bundle that was compiled, on the machine it was compiled for?

A bundle edited after compile, a tokenizer or template swapped on disk, input data changed, or a
library upgrade that alters the token stream: each would make "trains on exactly those tokens" a
lie, so each is refused here with the file or library named.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from sftc.runtime.bundle import Bundle, load_bundle
from sftc.errors import BundleError
from sftc.io import sha256_file, sha256_tree


def tokenizer_version(path: Path, files: list[str]) -> str:
    return "sha256:" + sha256_tree(path, files)


def template_version(path: Path) -> str:
    return "sha256:" + sha256_file(path)


def installed_version(name: str) -> str | None:
    if name == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"  # what the compiler records for a library that is not installed


def _check_bundle_files(bundle: Bundle, problems: list[str]) -> int:
    for rel, expected in sorted(bundle.lock["files"].items()):
        path = bundle.dir / rel
        if not path.is_file():
            problems.append(f"{path}: listed in the lock but missing")
        elif sha256_file(path) != expected.removeprefix("sha256:"):
            problems.append(f"{path}: edited after compile (sha256 differs from bundle.lock.json files[{rel!r}])")
    return len(bundle.lock["files"])


def _check_tokenizer(bundle: Bundle, problems: list[str]) -> None:
    tok = bundle.lock["tokenizer"]
    expected = bundle.lock.get("tokenizer_version")
    files = tok.get("files") or []
    if not expected or not files:
        return
    root = Path(bundle.tokenizer_path)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        problems.append(f"{root}: tokenizer file(s) {missing} are gone; the bundle was compiled with them")
        return
    found = tokenizer_version(root, files)
    if found != expected:
        problems.append(
            f"{root}: tokenizer files changed since compile (tokenizer_version {found}, lock says {expected}); "
            "recompile the bundle"
        )


def _check_template(bundle: Bundle, problems: list[str]) -> None:
    template = bundle.lock.get("template") or {}
    expected = bundle.lock.get("template_version")
    if template.get("source") != "file" or not template.get("path") or not expected:
        return
    path = bundle.resolve(template["path"])
    if not path.is_file():
        problems.append(f"{path}: chat template file is gone (lock template.path)")
    elif template_version(path) != expected:
        problems.append(
            f"{path}: chat template changed since compile (template_version {template_version(path)}, "
            f"lock says {expected}); recompile the bundle"
        )


def _check_data(bundle: Bundle, problems: list[str]) -> int:
    files = (bundle.lock.get("data_manifest") or {}).get("files") or []
    for entry in files:
        path = bundle.resolve(entry["path"])
        if not path.is_file():
            problems.append(f"{path}: input data file is gone (lock data_manifest.files)")
        elif sha256_file(path) != str(entry["sha256"]).removeprefix("sha256:"):
            problems.append(f"{path}: input data changed since compile; recompile the bundle so its tokens match")
    return len(files)


def library_drift(lock: dict) -> tuple[dict, dict]:
    """(token-stream changes, other changes), each {name: {"locked", "now"}}."""
    locked = lock.get("libraries") or {}
    stream = lock.get("token_stream_libraries") or {}
    stream_names = set(stream) if isinstance(stream, (dict, list)) else set()
    token_changes, other_changes = {}, {}
    for name, version in sorted(locked.items()):
        now = installed_version(name)
        if now != version:
            (token_changes if name in stream_names else other_changes)[name] = {"locked": version, "now": now}
    if isinstance(stream, dict):  # a stream library recorded only in the hashed subset
        for name, version in stream.items():
            if name not in locked and installed_version(name) != version:
                token_changes[name] = {"locked": version, "now": installed_version(name)}
    return token_changes, other_changes


def derive_layout(budget: dict, world_size: int) -> dict:
    """Keep examples per update when the world size differs from the compiled one, or refuse."""
    per_device, grad_accum = int(budget["per_device"]), int(budget["grad_accum"])
    locked_world = int(budget.get("world_size", 1))
    epu = int(budget.get("examples_per_update") or per_device * grad_accum * locked_world)
    layout = {
        "world_size": world_size,
        "world_size_locked": locked_world,
        "per_device": per_device,
        "grad_accum": grad_accum,
        "grad_accum_locked": grad_accum,
        "examples_per_update": epu,
        "grad_accum_rederived": False,
    }
    if world_size == locked_world:
        return layout
    if epu % (per_device * world_size):
        raise BundleError(
            f"world size {world_size} cannot keep the bundle's examples_per_update {epu}: "
            f"{epu} is not a multiple of per_device {per_device} x world_size {world_size}; "
            f"run with world size {locked_world} or recompile with batch.world_size: {world_size}"
        )
    layout["grad_accum"] = epu // (per_device * world_size)
    layout["grad_accum_rederived"] = True
    return layout


def verify_bundle(bundle_dir: str | os.PathLike | Bundle, allow_drift: bool = False) -> dict[str, Any]:
    """Check the bundle against its lock; return a report, raise BundleError on anything refused."""
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else load_bundle(bundle_dir)
    problems: list[str] = []
    n_files = _check_bundle_files(bundle, problems)
    _check_tokenizer(bundle, problems)
    _check_template(bundle, problems)
    n_data = _check_data(bundle, problems)
    if problems:
        raise BundleError(f"{bundle.dir}: the bundle no longer matches its lock ({len(problems)} problem(s))", problems)
    # Token files are read only after their hashes passed, so a damaged file gets the hash message.
    bundle.train
    bundle.eval

    token_changes, other_changes = library_drift(bundle.lock)
    if token_changes and not allow_drift:
        raise BundleError(
            f"{bundle.dir}: library versions that shape the token stream changed since compile; "
            "recompile, or pass --allow-drift to train on the locked tokens anyway",
            [f"{name}: compiled with {v['locked']}, installed {v['now']}" for name, v in token_changes.items()],
        )

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = derive_layout(bundle.lock["budget"], world_size)
    # the engine must exist before a model is loaded (deepspeed for zero2/zero3, CUDA for offload)
    from sftc.runtime.distributed import check_strategy

    check_strategy(bundle.spec, world_size)
    return {
        "bundle_id": bundle.bundle_id,
        "bundle_files_checked": n_files,
        "data_files_checked": n_data,
        "tokenizer_version": bundle.lock.get("tokenizer_version"),
        "template_version": bundle.lock.get("template_version"),
        "library_drift": {"token_stream": token_changes, "other": other_changes, "drift_allowed": bool(allow_drift)},
        "layout": layout,
    }
