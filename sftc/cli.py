"""`sftc`: compile a spec into a locked bundle, run it, inspect, diff and report.

A user's mistake (an SftcError) prints a message and exits 2; it never shows a traceback.
Heavy libraries are imported inside commands, so `sftc --help` and a warm recompile stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from sftc.errors import SftcError


class _Group(click.Group):
    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        # before the command imports anything: bitsandbytes stays out of commands that never quantize
        from sftc.quiet import quiet_for_command

        quiet_for_command(name, rest)
        return name, command, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SftcError as exc:
            from sftc.runtime.distributed import tell_launcher  # under torchrun: once, and in its summary

            if tell_launcher(f"error: {exc}"):
                click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except Exception as exc:
            message = _input_problem(exc)
            if message is None:
                raise  # a bug: keep the traceback
            click.secho(f"error: {message}", fg="red", err=True)
            sys.exit(2)


def _shown(path: Path) -> str:
    """A path for the terminal: relative to the current directory when it lies under it."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _input_problem(exc: Exception) -> str | None:
    """A message for exceptions that are a hostile or broken input, not an sftc bug.

    A chat template is code: one that only fails on some rows (e.g. a payload or a
    raise_exception behind the system-message branch, which the compile-time probe does not
    render) surfaces from deep inside tokenization as a jinja2 TemplateError, SecurityError
    included (found by tests/reliability/test_security.py).
    """
    try:
        from jinja2.exceptions import SecurityError, TemplateError
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        return None
    if isinstance(exc, SecurityError):
        return f"template.chat: the chat template tried something the Jinja sandbox forbids: {exc}"
    if isinstance(exc, TemplateError):
        return f"template.chat: the chat template failed while rendering a row: {exc.__class__.__name__}: {exc}"
    return _storage_problem(exc)


def _storage_problem(exc: Exception) -> str | None:
    """A full disk, a quota, a file-size limit or a read-only mount is the operator's to fix, in
    any command that writes (run, export, compile, report): say where and what, not a traceback."""
    import errno

    storage = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}
    if isinstance(exc, OSError) and exc.errno in storage:
        where = f"{exc.filename}: " if exc.filename else ""
        return (f"{where}{exc.strerror}: the disk is full, over a quota or size limit, or read-only; nothing "
                "half-written was kept. Free space or make it writable, then run the command again")
    return None


@click.group(cls=_Group)
@click.version_option(package_name="sftc")
def main() -> None:
    """Supervised fine-tuning as a compiled, locked, reproducible run bundle."""


@main.command("compile")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--bundles-dir", type=click.Path(file_okay=False), default=None, help="Default: <project>/bundles.")
@click.option("--force", is_flag=True, help="Rebuild even when an identical bundle exists.")
@click.option("--quiet", is_flag=True, help="Print only the bundle path.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes for the per-row passes (near-duplicate hashing, tokenization); default: the usable "
                   "cores. The bundle is byte for byte the same for any number.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the per-row passes run: processes on this machine, or tasks on a Ray cluster "
                   "(pip install 'sftc[ray]'). The bundle is byte for byte the same on either.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --executor ray: the cluster's address (HEAD:6379, or auto; default $RAY_ADDRESS), "
                   "else Ray on this machine alone.")
def compile_cmd(spec: str, bundles_dir: str | None, force: bool, quiet: bool, workers: int | None, executor: str,
                ray_address: str | None) -> None:
    """Compile SPEC into bundles/<name>-<hash12>/."""
    from sftc.compiler import compile_spec
    from sftc.compiler.report import summary_lines

    cluster = None
    if executor == "ray":
        if workers is not None:
            raise click.UsageError("--workers counts local processes; on Ray the cluster's CPUs run the tasks")
        from sftc.compiler.workers import RayCluster

        cluster = RayCluster(ray_address or os.environ.get("RAY_ADDRESS"))
    elif ray_address is not None:
        raise click.UsageError("--ray-address is for --executor ray")
    try:
        bundle, lock, reused = compile_spec(spec, bundles_dir=bundles_dir, force=force, progress=not quiet,
                                            workers=cluster or workers)
    finally:
        if cluster is not None:
            cluster.close()
    if quiet:
        click.echo(str(bundle))
        return
    click.echo(f"{'up to date' if reused else 'compiled'}: {bundle}")
    for line in summary_lines(lock):
        click.echo("  " + line)


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
@click.option("--row", type=int, default=0, show_default=True, help="Row of the token file.")
@click.option("--split", "which", type=click.Choice(["train", "eval"]), default="train", show_default=True)
@click.option("--color/--no-color", default=None, help="Default: colour on a terminal.")
def inspect(bundle: str, row: int, which: str, color: bool | None) -> None:
    """Show one row token by token, supervised tokens highlighted."""
    from sftc.compiler.pack import position_ids
    from sftc.compiler.report import marked_row
    from sftc.compiler.template import load_tokenizer
    from sftc.runtime.bundle import load_bundle

    loaded = load_bundle(bundle)  # the sealed lock and the verified token files
    data = loaded.train if which == "train" else loaded.eval
    if data is None:
        raise SftcError(f"{bundle}: no {which} token file in this bundle")
    rows = data.n_rows
    if not 0 <= row < rows:
        raise SftcError(f"--row {row}: the {which} split has rows 0..{rows - 1}")
    tokenizer = load_tokenizer(loaded.tokenizer_path, None, loaded.spec.model.trust_remote_code, "tokenizer")
    ids, labels, seg = data.row(row)
    lo, hi = 0, len(ids)
    use_color = sys.stdout.isatty() if color is None else color
    supervised = int((labels != -100).sum())
    click.echo(f"{loaded.bundle_id} {which} row {row}/{rows}: {hi - lo} tokens, {len(seg)} example(s) "
               f"{seg.tolist()}, {supervised} supervised")
    click.echo(f"position ids restart at 0 at each example: {position_ids(seg)[:48].tolist()}{' ...' if hi - lo > 48 else ''}")
    # color= passed on: click strips ANSI codes from piped output unless told, so --color marked nothing when piped
    click.echo(marked_row(tokenizer, ids, labels, seg, color=use_color), color=use_color)


@main.command()
@click.option("--lock", "of_lock", is_flag=True, help="The bundle lock's schema (sftc.lock.Lock) instead of the spec's.")
def schema(of_lock: bool) -> None:
    """Print the spec's (or with --lock, bundle.lock.json's) JSON schema, with field descriptions."""
    if of_lock:
        from sftc.lock import lock_schema

        click.echo(json.dumps(lock_schema(), indent=2))
        return
    from sftc.compiler.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--allow-drift", is_flag=True, help="Record, instead of refusing, drift since compile.")
@click.option("--all-rows", is_flag=True,
              help="Hash the token files whole. Default: their sealed index (a run checks each rank's rows as it starts).")
def verify(bundle: str, allow_drift: bool, all_rows: bool) -> None:
    """Check a bundle against its sealed lock: the seal, bundle files, base model, data, tokenizer, template, libraries."""
    from sftc.runtime.verify import verify_bundle

    report = verify_bundle(bundle, allow_drift=allow_drift, all_rows=all_rows)
    click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="Default: runs/<bundle_id>/.")
@click.option("--fresh", is_flag=True, help="Ignore existing checkpoints and start over.")
@click.option("--allow-drift", is_flag=True, help="Train despite library drift since compile, and record it.")
@click.option("--allow-incomplete-history", is_flag=True,
              help="Select a checkpoint even though metrics.jsonl lines holding evaluations are damaged (quarantined).")
@click.option("--report-to", default=None, metavar="LIST",
              help="Trackers, comma-separated (tensorboard, trackio, wandb, mlflow; 'none' for none). "
                   "Default: the spec file's tracking.report_to. Trackers are not part of the bundle.")
@click.option("--project", "tracker_project", default=None, help="Tracker project (default: tracking.project).")
@click.option("--run-name", default=None, help="Tracker run name (default: tracking.run_name, else the run directory).")
def run(bundle: str, run_dir: str | None, fresh: bool, allow_drift: bool, allow_incomplete_history: bool,
        report_to: str | None, tracker_project: str | None, run_name: str | None) -> None:
    """Verify BUNDLE, then train it, resuming from the newest valid checkpoint."""
    import pickle

    from sftc.runtime.run import run_bundle
    from sftc.errors import RunError

    try:
        trackers = None
        if report_to is not None:
            trackers = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
            unknown = sorted(set(trackers) - {"tensorboard", "trackio", "wandb", "mlflow"})
            if unknown:
                raise RunError(f"--report-to: unknown tracker(s) {unknown}; allowed: tensorboard, trackio, wandb, mlflow, none")
        out = run_bundle(bundle, run_dir=run_dir, fresh=fresh, allow_drift=allow_drift,
                         allow_incomplete_history=allow_incomplete_history, report_to=trackers,
                         project=tracker_project, run_name=run_name)
    except pickle.UnpicklingError as exc:
        # HF Trainer reads optimizer/scheduler/RNG state with torch.load(weights_only=True); a file
        # that holds anything but tensors and plain containers (a planted payload, say) ends here.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise RunError(
            f"refused to load a checkpoint state file: torch's weights_only loader rejected it ({first[:300]}); "
            "sftc never unpickles arbitrary objects. Delete the checkpoint it came from, or run with --fresh"
        ) from None
    # stdout carries only the run directory, for scripts (`RUN=$(sftc run ...)`); the summary went to stderr
    click.echo(_shown(Path(out)))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--allow-ineligible", is_flag=True, help="Export the best checkpoint even if it fails the constraints.")
@click.option("--allow-incomplete-history", is_flag=True,
              help="Export even though metrics.jsonl lines holding evaluations are damaged (quarantined).")
def export(run_dir: str, allow_ineligible: bool, allow_incomplete_history: bool) -> None:
    """Export the selected checkpoint of RUN_DIR to RUN_DIR/export/."""
    from sftc.runtime.export import export_run
    from sftc.runtime.rundir import rederive_best, require_run_dir

    require_run_dir(run_dir)
    # best.json is an output: select again from the records, so a stale or damaged one is never shipped
    rederive_best(run_dir, allow_incomplete_history)
    click.echo(f"exported: {export_run(run_dir, allow_ineligible=allow_ineligible)}")


_export_arg = click.argument("export_dir", type=click.Path(file_okay=False, exists=True))
_system_opt = click.option("--system", default=None, help="A system message instead of the one the model was trained with.")
_tokens_opt = click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)


@main.command()
@_export_arg
@click.option("--prompt", required=True, help="The user message.")
@_system_opt
@_tokens_opt
def generate(export_dir: str, prompt: str, system: str | None, max_new_tokens: int) -> None:
    """One greedy reply from an export (full, adapter or merged/), prompted through its chat template."""
    from sftc.runtime.chat import generate_once

    click.echo(generate_once(export_dir, prompt, system=system, max_new_tokens=max_new_tokens))


@main.command()
@_export_arg
@_system_opt
@_tokens_opt
def chat(export_dir: str, system: str | None, max_new_tokens: int) -> None:
    """Chat with an export: one line of stdin per turn; /clear starts over, /exit ends."""
    from sftc.runtime.chat import chat as chat_loop

    marker = (lambda: click.echo("> ", nl=False)) if sys.stdin.isatty() else None
    chat_loop(export_dir, sys.stdin, click.echo, system=system, max_new_tokens=max_new_tokens, prompt_marker=marker)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def status(run_dir: str) -> None:
    """List a run's checkpoints, metrics and the selected best."""
    from sftc.review.status import status as run_status
    from sftc.runtime.rundir import require_run_dir

    require_run_dir(run_dir)
    click.echo(run_status(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: RUN_DIR/report/.")
def report(run_dir: str, out: str | None) -> None:
    """Render loss curves, behaviour metrics and token budget as PNGs and HTML."""
    from sftc.review.report import render_report
    from sftc.runtime.rundir import require_run_dir

    require_run_dir(run_dir)
    click.echo(f"report: {render_report(run_dir, out)}")


@main.command()
@click.option("--root", type=click.Path(file_okay=False, exists=True), default=".", show_default=True,
              help="The project whose runs/ to list.")
def runs(root: str) -> None:
    """Every run in the project side by side."""
    from sftc.review.runs import format_runs, list_runs

    click.echo(format_runs(list_runs(root)))


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--format", "fmt", type=click.Choice(["terminal", "markdown", "json"]), default="terminal", show_default=True)
@click.option("--fail-on", multiple=True, help="Exit 3 when one of these kinds changes: spec, data, split, budget, "
              "parameters, template, tokenizer, model, libraries, eval, any (comma-separated or repeated).")
@click.option("--color/--no-color", default=None, help="Default: colour on a terminal.")
def diff(a: str, b: str, fmt: str, fail_on: tuple[str, ...], color: bool | None) -> None:
    """What changing A into B does to the run. A and B: spec files, bundles, or REV:path/to/spec.yaml.

    Exit 0: no change; 1: changed; 3: a --fail-on kind changed; 2: error."""
    from sftc.review.diff import diff_command

    sys.exit(diff_command(a, b, fmt, fail_on, color))


@main.command()
@click.argument("path")
def textconv(path: str) -> None:
    """Compiled summary of a spec, for `git diff` (see docs/diff.md)."""
    from sftc.review.diff import textconv as summary

    click.echo(summary(path), nl=False)


if __name__ == "__main__":
    main()
