"""Human-facing renderings of a bundle: launch.sh, REPORT.md, the compile summary and `sftc inspect`."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftc.compiler.tokens import IGNORE_INDEX


def package_template(name: str) -> str:
    """A template that ships inside the package (templates/ installs as sftc.templates)."""
    return files("sftc.templates").joinpath(name).read_text(encoding="utf-8")


def render_launch(lock) -> str:
    """launch.sh from the typed Lock (sftc/lock.py): the bundle's world as nodes x processes, the
    launcher found and the rendezvous set up at launch time (docs/distributed.md)."""
    env = ImmutableSandboxedEnvironment(keep_trailing_newline=True)
    template = env.from_string(package_template("launch.sh.j2"))
    dist, batch = lock.spec.distributed, lock.spec.batch
    return template.render(
        bundle_id=lock.bundle_id, nodes=dist.nodes, procs=dist.procs_per_node,
        world=batch.world_size, per_device=batch.per_device, grad_accum=batch.grad_accum,
        examples_per_update=batch.examples_per_update, strategy=dist.strategy,
    ).rstrip("\n") + "\n"


def token_pieces(tokenizer, ids) -> list[str]:
    """Each token's own text. Decoding tokens one by one drops SentencePiece's leading spaces, so
    the word-boundary marker is restored by hand."""
    pieces = []
    for token in tokenizer.convert_ids_to_tokens([int(t) for t in ids]):
        piece = tokenizer.convert_tokens_to_string([token])
        if token.startswith("\u2581") and not piece.startswith(" "):
            piece = " " + piece
        pieces.append(piece)
    return pieces


def marked_row(tokenizer, ids: np.ndarray, labels: np.ndarray, seq_lengths, color: bool) -> str:
    """The row as text, supervised tokens highlighted (green on a terminal, [[...]] otherwise),
    example boundaries shown as ' ‖ '."""
    boundaries = set(np.cumsum(seq_lengths)[:-1].tolist()) if len(seq_lengths) else set()
    out, open_span = [], False
    for position, (piece, label) in enumerate(zip(token_pieces(tokenizer, ids), labels)):
        if position in boundaries:
            if open_span and not color:
                out.append("]]")
                open_span = False
            out.append(" \u2016 ")
        supervised = int(label) != IGNORE_INDEX
        if color:
            out.append(f"\x1b[1;32m{piece}\x1b[0m" if supervised else f"\x1b[2m{piece}\x1b[0m")
        else:
            if supervised and not open_span:
                out.append("[[")
                open_span = True
            elif not supervised and open_span:
                out.append("]]")
                open_span = False
            out.append(piece)
    if open_span:
        out.append("]]")
    return "".join(out)


def _stats(d) -> str:
    return f"min {d.min} / mean {d.mean} / max {d.max}"


def summary_lines(lock) -> list[str]:
    """The compile summary from the typed Lock (sftc/lock.py)."""
    dm, split, budget, params, packing = lock.data_manifest, lock.split, lock.budget, lock.parameters, lock.packing
    rejected = ", ".join(f"{k} {v}" for k, v in dm.rejected.items()) or "none"
    spec, batch, mem = lock.spec, lock.batch, lock.memory
    parts = ", ".join(f"{name} {mem.parts[name + '_bytes'] / 2**20:.1f} MiB"
                      for name in ("weights", "optimizer", "activations") if isinstance(mem.parts.get(name + "_bytes"), (int, float)))
    return [
        f"bundle      {lock.bundle_id}",
        f"objective   {spec.objective} / {spec.parameterization.kind}",
        f"rows        {dm.rows_read} read: {dm.train_examples} train, {dm.eval_examples} eval, "
        f"{sum(dm.rejected.values())} rejected ({rejected})",
        f"split       by group: {len(split.train_groups)} train / {len(split.eval_groups)} eval groups, "
        f"disjoint={split.disjoint}, {len(split.merged_near_duplicates)} near-duplicate merges",
        f"packing     {packing.strategy} @ {packing.seq_length}: {packing.rows} rows "
        f"from {packing.examples} examples, efficiency {budget.packing_efficiency:.3f}, "
        f"overflow dropped {packing.overflow_tokens_dropped}",
        f"budget      {batch.per_device} x {batch.grad_accum} x {batch.world_size} = "
        f"{batch.examples_per_update} rows/update; supervised tokens/update {_stats(budget.supervised_tokens_per_update)}",
        f"            {budget.optimizer_steps} steps ({budget.epochs} epochs), {budget.total_tokens} tokens, "
        f"{budget.supervised_tokens} supervised",
        f"parameters  {params.trainable:,} trainable of {params.total:,} ({100 * params.trainable_fraction:.3f}%)",
        f"memory      ~{mem.total_gib} GiB per device ({parts})",
        f"versions    template {str(lock.template_version)[:19]}, tokenizer {lock.tokenizer_version[:19]}",
    ]


def render_report(lock, packed, tokenizer) -> str:
    lines = [f"# Bundle {lock.bundle_id}", "", "```", *summary_lines(lock), "```", ""]
    lines += [
        "## One packed row, supervised tokens marked",
        "",
        "`[[...]]` marks tokens with a label (they carry loss); `\u2016` marks an example boundary",
        "(position ids restart there). Everything else is context with label -100.",
        "",
    ]
    ids, labels, seg = packed.row(0)
    text = marked_row(tokenizer, ids, labels, seg, color=False)
    lines += ["```text", text[:4000] + (" ..." if len(text) > 4000 else ""), "```", ""]
    return "\n".join(lines)
