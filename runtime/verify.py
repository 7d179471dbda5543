"""Before any step: is this still the bundle that was compiled, on the machine it was compiled for?

The lock is sealed and every bundle file is checked against it when the bundle is loaded
(runtime/bundle.py). Here, what lives outside the bundle: the base model's config, weight and
code files, the tokenizer, the chat template and the input data on disk, and the library versions
that shape the token stream. Each would make "trains on exactly those tokens" a lie, so each is
refused with the file or library named, before a model is loaded.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from sftc.compiler.spec import BatchSpec
from sftc.errors import BundleError, SftcError
from sftc.hashcache import cached_sha256
from sftc.io import sha256_file
from sftc.lock import Lock, model_file_names
from sftc.runtime.bundle import Bundle, load_bundle


def installed_version(name: str) -> str | None:
    if name == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"  # what the compiler records for a library that is not installed


def _check_model(bundle: Bundle, problems: list[str]) -> int:
    """The base model's files against the sha256s sealed at compile (cached by size and mtime, so a
    large model is streamed once per machine). With trust_remote_code, a code file that was not
    there at compile is refused too: it would be imported."""
    model = bundle.lock.model
    try:
        root = bundle.model_dir
    except SftcError as exc:
        problems.append(str(exc))
        return 0
    present = [name for name in model.files if (root / name).is_file()]
    for name in sorted(set(model.files) - set(present)):
        problems.append(f"{root / name}: base model file is gone (lock model.files); the bundle was compiled with it")
    found = cached_sha256([root / name for name in present], bundle.project_root)
    for name in present:
        if found[root / name] != model.files[name]:
            problems.append(f"{root / name}: base model file changed since compile (sha256 differs from lock "
                            f"model.files[{name!r}]); recompile the bundle, or restore the model")
    if bundle.spec.model.trust_remote_code:
        added = [n for n in model_file_names(root) if n.endswith(".py") and n not in model.files]
        for name in added:
            problems.append(f"{root / name}: model code added after compile; trust_remote_code would import it")
    return len(model.files)


def _check_tokenizer(bundle: Bundle, problems: list[str]) -> None:
    from sftc.compiler.template import tokenizer_version  # the compiler's own version: one definition

    tok = bundle.lock.tokenizer
    try:
        root = bundle.tokenizer_dir
    except SftcError as exc:
        problems.append(str(exc))
        return
    found, names = tokenizer_version(root)
    if found == tok.version:
        return
    gone, added = sorted(set(tok.files) - set(names)), sorted(set(names) - set(tok.files))
    detail = "; ".join(part for part in (f"gone: {gone}" if gone else "", f"added: {added}" if added else "") if part)
    problems.append(
        f"{root}: tokenizer files changed since compile (tokenizer.version {found}, lock says {tok.version}"
        + (f"; {detail}" if detail else "") + "); recompile the bundle"
    )


def _check_template(bundle: Bundle, problems: list[str]) -> None:
    """The project's template file is what the tokens were rendered with; the run uses the bundle's
    sealed copy, and refuses when the source moved on so the two cannot silently disagree."""
    template = bundle.lock.template
    if template is None or template.source != "file" or not template.path:
        return
    path = bundle.resolve(template.path)
    if not path.is_file():
        problems.append(f"{path}: chat template file is gone (lock template.path)")
        return
    found = "sha256:" + sha256_file(path)
    if found != template.version:
        problems.append(
            f"{path}: chat template changed since compile (template.version {found}, lock says {template.version}); "
            "recompile the bundle"
        )


def _check_data(bundle: Bundle, problems: list[str]) -> dict:
    """Raw-data drift, checked once and only where the data is.

    The bundle's token files are what trains (sealed above); the raw files matter only as "would a
    recompile still give these tokens". So only global rank 0 re-hashes them, and a node that holds
    just the bundle (and the base model) is not refused for lacking data it never reads: the report
    says the data were not checked there.
    """
    from sftc.compiler.data import dataset_sha256

    files = bundle.lock.data_manifest.files
    if int(os.environ.get("RANK", "0")) != 0:
        return {"checked": 0, "absent": [], "not_checked": "not rank 0: raw data are checked once, by rank 0"}
    checked, absent = 0, []
    for entry in files:
        path = bundle.resolve(entry.path) if getattr(entry, "repo", None) is None else _hub_data_file(entry)
        if path is None or not path.exists():
            absent.append(entry.path)
            continue
        checked += 1
        if path.is_file() and sha256_file(path) != entry.sha256.removeprefix("sha256:"):
            problems.append(f"{path}: input data changed since compile; recompile the bundle so its tokens match")
        elif path.is_dir() and dataset_sha256(path) != entry.sha256.removeprefix("sha256:"):  # a save_to_disk dataset
            problems.append(f"{path}: input dataset changed since compile; recompile the bundle so its tokens match")
    return {"checked": checked, "absent": absent,
            "not_checked": "the raw data are not on this machine: the sealed token files are what trains" if absent else None}


def _hub_data_file(entry):
    """A hub dataset's file of the lock in this machine's cache snapshot of the locked commit (never a
    download), or None when that snapshot is not cached here."""
    from sftc.compiler.template import local_dir
    from sftc.errors import SftcError

    try:
        snapshot = local_dir(entry.repo, entry.revision, "data_manifest.files", repo_type="dataset")
    except SftcError:
        return None
    return snapshot / entry.path.removeprefix(f"hf://datasets/{entry.repo}/")


def library_drift(lock: Lock) -> tuple[dict, dict]:
    """(token-stream changes, other changes), each {name: {"locked", "now"}}."""
    stream = set(lock.token_stream_libraries)
    token_changes, other_changes = {}, {}
    for name, version in sorted(lock.libraries.items()):
        now = installed_version(name)
        if now != version:
            (token_changes if name in stream else other_changes)[name] = {"locked": version, "now": now}
    return token_changes, other_changes


def derive_layout(batch: BatchSpec, world_size: int) -> dict:
    """Keep examples per update when the world size differs from the compiled one, or refuse."""
    epu = batch.examples_per_update
    layout = {
        "world_size": world_size,
        "world_size_locked": batch.world_size,
        "per_device": batch.per_device,
        "grad_accum": batch.grad_accum,
        "grad_accum_locked": batch.grad_accum,
        "examples_per_update": epu,
        "grad_accum_rederived": False,
    }
    if world_size == batch.world_size:
        return layout
    if epu % (batch.per_device * world_size):
        fitting = [w for w in range(1, epu // batch.per_device + 1) if epu % (batch.per_device * w) == 0]
        raise BundleError(
            f"world size {world_size} cannot keep the bundle's {epu} examples per update ({epu} is not a multiple of "
            f"per_device {batch.per_device} x world size {world_size}). Either launch {', '.join(map(str, fitting))} "
            f"process(es) in all (the bundle's launch.sh starts {batch.world_size}), or recompile for {world_size} with "
            f"both `batch.world_size: {world_size}` and `distributed: {{nodes: 1, procs_per_node: {world_size}}}` "
            f"(on several nodes: nodes x procs_per_node = {world_size})"
        )
    layout["grad_accum"] = epu // (batch.per_device * world_size)
    layout["grad_accum_rederived"] = True
    return layout


def verify_bundle(bundle_dir: str | os.PathLike | Bundle, allow_drift: bool = False, all_rows: bool = False) -> dict[str, Any]:
    """Check the bundle against its lock; return a report, raise BundleError on anything refused.
    Token files: their sealed index here, each rank's rows when it runs; all_rows hashes them whole."""
    # loading checks the seal, every listed file and that no unlisted one is there
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else load_bundle(bundle_dir)
    problems: list[str] = []
    n_model = _check_model(bundle, problems)
    _check_tokenizer(bundle, problems)
    _check_template(bundle, problems)
    n_data = _check_data(bundle, problems)
    if problems:
        raise BundleError(f"{bundle.dir}: the bundle's inputs no longer match its lock ({len(problems)} problem(s))", problems)
    # token files are parsed from the verified bytes, so a damaged file gets the hash message first
    bundle.train
    bundle.eval
    whole = bundle.check_whole_token_files() if all_rows else 0

    token_changes, other_changes = library_drift(bundle.lock)
    if token_changes and not allow_drift:
        raise BundleError(
            f"{bundle.dir}: library versions that shape the token stream changed since compile; "
            "recompile, or pass --allow-drift to train on the locked tokens anyway",
            [f"{name}: compiled with {v['locked']}, installed {v['now']}" for name, v in token_changes.items()],
        )

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = derive_layout(bundle.lock.batch, world_size)
    # refusals that need no process group, before a model is loaded (ZeRO bundles, CUDA-only options)
    from sftc.runtime.distributed import check_strategy

    check_strategy(bundle.spec, world_size)
    return {
        "bundle_id": bundle.bundle_id,
        "bundle_files_checked": len(bundle.lock.files),
        "token_rows_checked": "all (token files hashed whole)" if whole else "index only; each rank checks its rows at run start",
        "model_files_checked": n_model,
        "data_files_checked": n_data["checked"],
        "data_files": n_data,
        "tokenizer_version": bundle.lock.tokenizer_version,
        "template_version": bundle.lock.template_version,
        "library_drift": {"token_stream": token_changes, "other": other_changes, "drift_allowed": bool(allow_drift)},
        "layout": layout,
    }
