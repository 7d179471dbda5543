"""Human-facing renderings of a bundle: launch.sh, REPORT.md, the compile summary and `sftc inspect`."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftc.compiler.tokens import IGNORE_INDEX


def package_template(name: str) -> str:
    """A template that ships inside the package (templates/ installs as sftc.templates)."""
    return files("sftc.templates").joinpath(name).read_text(encoding="utf-8")


def render_launch(lock: dict) -> str:
    env = ImmutableSandboxedEnvironment(keep_trailing_newline=True)
    template = env.from_string(package_template("launch.sh.j2"))
    dist = lock["spec"]["distributed"]
    budget = lock["budget"]
    return template.render(
        bundle_id=lock["bundle_id"], nodes=dist["nodes"], procs=dist["procs_per_node"],
        world=budget["world_size"], per_device=budget["per_device"], grad_accum=budget["grad_accum"],
        examples_per_update=budget["examples_per_update"], strategy=dist.get("strategy", "none"),
    ).rstrip("\n") + "\n"


DEEPSPEED_STAGES = {"zero2": 2, "zero3": 3}


def render_deepspeed(lock: dict) -> str | None:
    """deepspeed.json for strategy zero2 / zero3 (None otherwise): the engine's config with the
    bundle's batch layout, for `TrainingArguments(deepspeed=...)` or
    `accelerate launch --use_deepspeed --deepspeed_config_file`. The optimizer and schedule stay the
    trainer's (AdamW and the spec's schedule), so the update rule is the same under every strategy.
    The runtime rewrites the two batch fields when it re-derives grad_accum for another world size."""
    import json

    spec = lock["spec"]
    dist = spec["distributed"]
    stage = DEEPSPEED_STAGES.get(dist.get("strategy"))
    if stage is None:
        return None
    budget = lock["budget"]
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True}
    if dist.get("cpu_offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # checkpoints hold full weights (docs/distributed.md), so gather them on save
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    precision = dist.get("mixed_precision", "no")
    dtype = spec["model"]["dtype"]
    config = {
        "train_micro_batch_size_per_gpu": budget["per_device"],
        "gradient_accumulation_steps": budget["grad_accum"],
        "train_batch_size": budget["examples_per_update"],
        "gradient_clipping": spec["optimizer"]["max_grad_norm"] or 0.0,
        "bf16": {"enabled": precision == "bf16" or dtype == "bfloat16"},
        "fp16": {"enabled": precision == "fp16" or dtype == "float16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


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


def _stats(d: dict) -> str:
    return f"min {d['min']} / mean {d['mean']} / max {d['max']}"


def summary_lines(lock: dict) -> list[str]:
    dm, split, budget, params = lock["data_manifest"], lock["split"], lock["budget"], lock["parameters"]
    rejected = ", ".join(f"{k} {v}" for k, v in dm["rejected"].items()) or "none"
    spec = lock["spec"]
    mem = lock["memory_estimate"]
    return [
        f"bundle      {lock['bundle_id']}",
        f"objective   {spec['objective']} / {spec['parameterization']['kind']}",
        f"rows        {dm['rows_read']} read: {dm['train_examples']} train, {dm['eval_examples']} eval, "
        f"{sum(dm['rejected'].values())} rejected ({rejected})",
        f"split       by group: {len(split['train_groups'])} train / {len(split['eval_groups'])} eval groups, "
        f"disjoint={split['disjoint']}, {len(split['merged_near_duplicates'])} near-duplicate merges",
        f"packing     {lock['packing']['strategy']} @ {lock['packing']['seq_length']}: {lock['packing']['rows']} rows "
        f"from {lock['packing']['examples']} examples, efficiency {budget['packing_efficiency']:.3f}, "
        f"overflow dropped {lock['packing']['overflow_tokens_dropped']}",
        f"budget      {budget['per_device']} x {budget['grad_accum']} x {budget['world_size']} = "
        f"{budget['examples_per_update']} rows/update; supervised tokens/update {_stats(budget['supervised_tokens_per_update'])}",
        f"            {budget['optimizer_steps']} steps ({budget['epochs']} epochs), {budget['total_tokens']} tokens, "
        f"{budget['supervised_tokens']} supervised",
        f"parameters  {params['trainable']:,} trainable of {params['total']:,} ({100 * params['trainable_fraction']:.3f}%)",
        f"memory      ~{mem['total_gib']} GiB per device (weights {mem['weights_bytes'] / 2**20:.1f} MiB, "
        f"optimizer {mem['optimizer_bytes'] / 2**20:.1f} MiB, activations {mem['activations_bytes'] / 2**20:.1f} MiB)",
        f"versions    template {str(lock['template_version'])[:19]}, tokenizer {lock['tokenizer_version'][:19]}",
    ]


def render_report(lock: dict, packed, tokenizer) -> str:
    lines = [f"# Bundle {lock['bundle_id']}", "", "```", *summary_lines(lock), "```", ""]
    lines += [
        "## One packed row, supervised tokens marked",
        "",
        "`[[...]]` marks tokens with a label (they carry loss); `\u2016` marks an example boundary",
        "(position ids restart there). Everything else is context with label -100.",
        "",
    ]
    lo, hi = packed.row_offsets[0], packed.row_offsets[1]
    seg = packed.seq_lengths[packed.seq_offsets[0] : packed.seq_offsets[1]]
    text = marked_row(tokenizer, packed.input_ids[lo:hi], packed.labels[lo:hi], seg, color=False)
    lines += ["```text", text[:4000] + (" ..." if len(text) > 4000 else ""), "```", ""]
    return "\n".join(lines)
