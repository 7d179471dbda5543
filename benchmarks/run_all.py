"""`make bench`: every benchmark, one after the other in one run, then one summary.

Runs each bench_*.py as its own process (so one's imports and memory do not colour the next),
then reads their results/*.json and writes
  benchmarks/results/latest.json   the headline numbers, each target met or missed, the machine,
                                   load averages, code state, and every script's full result
  benchmarks/results/latest.md     the same as a Markdown table

Ratios are measured within one script run (baseline and candidate interleaved); absolute numbers
only mean something with the machine description next to them.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only compile,train,...] [--summarize]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = Path(__file__).resolve().parent
# name -> (script, full args, --quick args). The full set takes ~16 min on 2 idle cores.
SCRIPTS = {
    "compile": ("bench_compile.py", ["--repeats", "2"], ["--repeats", "1", "--rows", "4000"]),
    "packing": ("bench_packing.py", [], []),
    # 5 repeats: under a load average of 2-5 single repeats of the same batches differ by +-15%
    "train": ("bench_train.py", ["--steps", "4", "--warmup", "1", "--repeats", "5"], ["--steps", "2", "--repeats", "1"]),
    # the spec lever on CPU: the same demo examples packed into 256-token rows instead of 512
    "train_pack256": ("bench_train.py", ["--pack-length", "256", "--setups", "sftc_varlen,sftc_varlen_eq,sftc_segments,trl_padded,dense_stream", "--out",
                                         "train_pack256", "--steps", "4", "--warmup", "1", "--repeats", "3"],
                      ["--pack-length", "256", "--setups", "sftc_varlen,sftc_varlen_eq,sftc_segments,trl_padded,dense_stream", "--out", "train_pack256",
                       "--steps", "1", "--repeats", "1"]),
    # OrgAccess lengths (L=1024, 33% padding when unpacked) on the same tiny model; TRL's flattened
    # setup is left out here: one 8192-token row with a materialized mask costs ~30 s a step on CPU
    "train_orgaccess": ("bench_train.py", ["--orgaccess", "--setups", "sftc_varlen,sftc_varlen_eq,sftc_segments,trl_padded,dense_stream", "--steps", "3",
                                           "--warmup", "1", "--repeats", "3"],
                        ["--orgaccess", "--setups", "sftc_varlen,sftc_varlen_eq,sftc_segments,trl_padded,dense_stream", "--steps", "1", "--repeats", "1"]),
    # the same OrgAccess lengths on a ~10M-parameter model, the size of the lab figures
    "train_orgaccess_10m": ("bench_train.py", ["--orgaccess", "--scale-10m", "--setups", "sftc_varlen,sftc_varlen_eq,trl_padded,dense_stream",
                                               "--out", "train_orgaccess_10m", "--steps", "2", "--warmup", "1", "--repeats", "3"],
                            ["--orgaccess", "--scale-10m", "--setups", "sftc_varlen,sftc_varlen_eq,trl_padded,dense_stream",
                             "--out", "train_orgaccess_10m", "--steps", "1", "--repeats", "1"]),
    "checkpoint": ("bench_checkpoint.py", [], []),
    "eval": ("bench_eval.py", ["--prompts", "32", "--repeats", "3"], ["--prompts", "8", "--repeats", "1"]),
    "gpu": ("bench_gpu.py", [], []),
    # not in the default set (about an hour): `--only scaling` or `make bench-scaling`
    "scaling": ("bench_scaling.py", [], ["--sizes", "4000,40000"]),
}
OPTIONAL = {"scaling"}

# (label, result file, key path, target op, target value, unit/format)
HEADLINES = [
    # {rows}: filled in from the result file (rows the compile read), never written down here
    ("Compile: sftc cold / TRL SFTTrainer prep (OrgAccess, {rows} rows)", "compile", ["compile_vs_trl_ratio"], "<=", 1.0),
    ("Compile: same, per example tokenized on each side", "compile", ["compile_vs_trl_ratio_per_example"], None, None),
    ("Compile: same, sftc's split pass (near-duplicate search, TRL has none) left out", "compile", ["compile_vs_trl_ratio_excl_split"], None, None),
    ("Compile: same ratio, whole processes incl. imports", "compile", ["compile_vs_trl_ratio_process"], None, None),
    ("Compile: sftc cold compile s", "compile", ["sftc_compile_s"], None, None),
    ("Compile: TRL SFTTrainer dataset prep s", "compile", ["trl_prepare_s"], None, None),
    ("Compile: warm recompile s", "compile", ["warm_recompile_s"], "<=", 2.0),
    ("Compile: peak RSS MB", "compile", ["compile_peak_rss_mb"], "<=", 2048),
    ("Packing: bfd efficiency @1024 (lock budget.packing_efficiency)", "packing", ["orgaccess", "lock_packing_efficiency"], ">=", 0.97),
    ("Packing: bfd rows / ideal rows (ceil(total/1024))", "packing", ["orgaccess", "rows_over_ideal"], None, None),
    ("Packing: padded batches of 8, no packing (real/processed)", "packing", ["orgaccess", "efficiency", "padded_batches"], None, None),
    ("Packing: TRL SFTTrainer's own bfd efficiency", "compile", ["trl_packing_efficiency"], None, None),
    ("Train: sftc default (varlen) / TRL padded (tokens/s)", "train", ["train_speedup_vs_padded"], ">=", 1.6),
    ("Train: same, sftc at equal examples per step (varlen, fewer packed rows)", "train", ["train_speedup_vs_padded_equal_examples"], ">=", 1.6),
    ("Train: TRL padded positions / real tokens (the speedup removing pad alone can give)", "train", ["padded_baseline_positions_per_real_token"], None, None),
    ("Train: sftc default (varlen) / dense stream rows, no example boundaries (tokens/s; not a ceiling)", "train", ["train_vs_dense_stream"], None, None),
    ("Train: TRL padded positions / real tokens over the whole epoch", "train", ["padded_positions_per_real_token_epoch"], None, None),
    ("Train: sftc default (varlen) / TRL padding-free flattened", "train", ["train_speedup_vs_trl_flat"], None, None),
    ("Train: sftc default (varlen) / one example per padded row (segments)", "train", ["default_vs_segments"], None, None),
    ("Train: sftc default (varlen) / packed rows with plain sdpa", "train", ["default_vs_packed_rows"], None, None),
    ("Train: sftc default (varlen) tokens/s", "train", ["setups", "sftc_varlen", "tokens_per_s"], None, None),
    ("Train: sftc packed rows tokens/s", "train", ["setups", "sftc_packed", "tokens_per_s"], None, None),
    ("Train: TRL padded tokens/s", "train", ["setups", "trl_padded", "tokens_per_s"], None, None),
    ("Train: TRL flattened tokens/s", "train", ["setups", "trl_flat", "tokens_per_s"], None, None),
    ("Train: dense stream rows tokens/s", "train", ["setups", "dense_stream", "tokens_per_s"], None, None),
    ("Train: sftc default (varlen) supervised tokens/s", "train", ["setups", "sftc_varlen", "supervised_tokens_per_s"], None, None),
    ("Train: TRL padded supervised tokens/s", "train", ["setups", "trl_padded", "supervised_tokens_per_s"], None, None),
    ("Train, OrgAccess lengths @1024: sftc default / TRL padded", "train_orgaccess", ["train_speedup_vs_padded"], ">=", 1.6),
    ("Train, OrgAccess lengths @1024: sftc default / dense stream rows", "train_orgaccess", ["train_vs_dense_stream"], None, None),
    ("Train, OrgAccess lengths: same, sftc at equal examples per step", "train_orgaccess", ["train_speedup_vs_padded_equal_examples"], ">=", 1.6),
    ("Train, OrgAccess lengths: TRL padded positions / real tokens (measured batches)", "train_orgaccess", ["padded_baseline_positions_per_real_token"], None, None),
    ("Train, OrgAccess lengths: TRL padded positions / real tokens (whole epoch)", "train_orgaccess", ["padded_positions_per_real_token_epoch"], None, None),
    ("Train, OrgAccess lengths: sftc default supervised tokens/s / TRL padded", "train_orgaccess", ["supervised_speedup_vs_padded"], None, None),
    ("Train, OrgAccess lengths, 10M-param model: sftc default / TRL padded", "train_orgaccess_10m", ["train_speedup_vs_padded"], ">=", 1.6),
    ("Train, OrgAccess lengths, 10M-param model: same, sftc at equal examples per step", "train_orgaccess_10m", ["train_speedup_vs_padded_equal_examples"], ">=", 1.6),
    ("Train, OrgAccess lengths, 10M-param model: sftc default / dense stream rows", "train_orgaccess_10m", ["train_vs_dense_stream"], None, None),
    ("Train, demo packed into 256-token rows: sftc default / TRL padded", "train_pack256", ["train_speedup_vs_padded"], None, None),
    ("Train, demo packed into 256-token rows: sftc default / dense stream rows @256", "train_pack256", ["train_vs_dense_stream"], None, None),
    ("Checkpoint: save / training time per interval (eval excluded)", "checkpoint", ["checkpoint_overhead_fraction"], "<=", 0.03),
    ("Checkpoint: save incl. its held-out eval / training time", "checkpoint", ["checkpoint_with_eval_fraction"], None, None),
    ("Start-up to first step, fresh s", "checkpoint", ["startup_fresh_s"], None, None),
    ("Start-up to first step, resume s", "checkpoint", ["startup_resume_s"], None, None),
    ("Eval: batched (KV cache) / one prompt at a time", "eval", ["eval_batched_speedup"], None, None),
    ("Eval: batched generated tokens/s", "eval", ["batched_tokens_per_s"], None, None),
    ("GPU section ran", "gpu", ["ran"], None, None),
    ("Scaling, realistic mix: largest size measured (rows)", "scaling", ["variants", "realistic", "largest_measured_rows"], None, None),
    # CPU time, not wall: on the shared machine the wall time also measures the other jobs
    ("Scaling, realistic mix: CPU time exponent k (c * rows^k)", "scaling", ["variants", "realistic", "fits", "cpu_s", "params", 1], None, None),
    ("Scaling, realistic mix: peak RSS MB per row (slope)", "scaling", ["variants", "realistic", "fits", "peak_rss_mb", "params", 1], None, None),
    ("Scaling, duplicate-heavy mix: CPU time exponent k", "scaling", ["variants", "duplicate_heavy", "fits", "cpu_s", "params", 1], None, None),
]


def _get(obj, path):
    for key in path:
        if isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        elif isinstance(obj, dict) and key in obj:
            obj = obj[key]
        else:
            return None
    return obj


def freshness(result: dict, code: dict) -> dict:
    """Whether a result file was measured on the code the summary describes: same commit, and a
    clean tree on both sides (a dirty tree's numbers belong to no commit)."""
    measured = result.get("code") or {}
    head = measured.get("head")
    dirty = bool(measured.get("dirty", measured.get("modified_files")))
    if not head:
        state = "unknown: the result file records no commit"
    elif head != code.get("head"):
        state = f"older: measured at {head}"
    elif dirty:
        state = f"measured at {head} with uncommitted changes"
    else:
        state = "current"
    return {"state": state, "current": head is not None and head == code.get("head"), "commit": head, "dirty": dirty, "measured_at": result.get("measured_at")}


def summarize(wall: dict | None = None) -> dict:
    """latest.json/.md from results/*.json: every headline with the commit it was measured at; a
    result of another commit is shown as older and never counted as meeting or missing a target."""
    # only this run's wall times: carrying an earlier run's forward would publish them undated
    code = common.code_state()
    results, fresh = {}, {}
    for name in SCRIPTS:
        path = common.RESULTS / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            fresh[name] = freshness(results[name], code)
    rows = []
    for label, src, path, op, target in HEADLINES:
        value = _get(results.get(src), path)
        met = None
        current = fresh.get(src, {}).get("current", False)
        if op and current and isinstance(value, (int, float)) and not isinstance(value, bool):
            met = value <= target if op == "<=" else value >= target
        rows.append({"metric": label.format(**{k: _get(results.get(src), [k]) for k in ("rows",)}),
                     "key": ".".join([src, *map(str, path)]), "value": value,
                     "target": f"{op} {target}" if op else None, "met": met,
                     "measured": fresh.get(src, {}).get("state", "no result file")})
    latest = {
        "machine": common.machine(),
        "code": code,
        "freshness": fresh,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpu": "none lent to this run: the GPU section did not run" if not _get(results.get("gpu"), ["ran"]) else "ran",
        "script_wall_s": wall or {},
        "loadavg": {k: v.get("loadavg") for k, v in results.items() if "loadavg" in v},
        "headline": rows,
        "results": results,
    }
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    from sftc.io import atomic_write_text

    atomic_write_text(common.RESULTS / "latest.json", json.dumps(latest, indent=2) + "\n")
    atomic_write_text(common.RESULTS / "latest.md", markdown(latest))
    return latest


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return "—" if v is None else str(v)


def markdown(latest: dict) -> str:
    m = latest["machine"]
    lines = [
        "# sftc benchmarks — latest run",
        "",
        # when the summary was written, not when its rows were measured: each row names its own commit
        f"Summary written {latest['measured_at']} on {m.get('cpu_count')} CPU cores ({m.get('cpu_model', m.get('processor'))}), "
        f"{m.get('mem_total_gb', '?')} GB RAM, {m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}; "
        f"GPU: {latest['gpu']}. The machine was shared with other jobs (load averages in latest.json): "
        "ratios are measured inside one run with the setups interleaved; absolute numbers are for this machine only.",
        f"Code: HEAD {latest['code']['head']}, {len(latest['code']['modified_files'])} modified tracked file(s). "
        "Each row says which commit it was measured at; a target is judged only on results of this HEAD.",
        "",
        "| metric | value | target | met | measured |",
        "|---|---:|---|---|---|",
    ]
    for row in latest["headline"]:
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        measured = row.get("measured", "")
        if measured != "current":
            measured = f"**{measured}**"
        lines.append(f"| {row['metric']} | {_fmt(row['value'])} | {row['target'] or ''} | {met} | {measured} |")
    for key in ("train", "train_pack256", "train_orgaccess", "train_orgaccess_10m"):
        train = latest["results"].get(key)
        if not train:
            continue
        data = {"train": "demo data", "train_pack256": "demo data packed into 256-token rows",
                "train_orgaccess": "OrgAccess lengths (ids folded into the model's vocabulary)",
                "train_orgaccess_10m": "OrgAccess lengths, 10M-parameter model of the same family"}[key]
        attn = train["model"]["attn_implementation"]
        state = latest.get("freshness", {}).get(key, {}).get("state", "unknown")
        lines += ["", f"Training setups, {data} [{state}] ({train['model']['parameters']:,}-parameter model {train['model']['path']}, fp32, "
                  f"batch {train['batch_rows']}, seq_length {train['seq_length']}, {train['torch_threads']} torch thread(s), "
                  f"{train['steps']} steps x {train['repeats']} repeats, median):", "",
                  "| setup | attention | batch shape | examples/step | real tokens/step | supervised/step | s/step | tokens/s | supervised tokens/s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in train["setups"].items():
            lines.append(f"| {name} | {attn.get(name, '') if isinstance(attn, dict) else attn} | {s['batch_shape']} | {s['examples_per_step'] if s.get('examples_per_step') else '-'} "
                         f"| {s['real_tokens_per_step']:.0f} | {s['supervised_tokens_per_step']:.0f} "
                         f"| {s['seconds_per_step']:.3f} | {s['tokens_per_s']:.0f} | {s['supervised_tokens_per_s']:.0f} |")
    pack = latest["results"].get("packing")
    if pack:
        lines += ["", "Packing (real tokens / processed positions):", "",
                  "| data | L | bound | bfd rows | bfd batches of 8 | padded batches of 8 | padded to L |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("orgaccess", "demo"):
            e = pack[name]["efficiency"]
            lines.append(f"| {name} | {pack[name]['seq_length']} | {e['bound']} | {e['bfd_rows']} | {e['bfd_batches']} "
                         f"| {e['padded_batches']} | {e['padded_to_max']} |")
    if latest["script_wall_s"]:
        lines += ["", "Wall time per script (s): " + ", ".join(f"{k} {v}" for k, v in latest["script_wall_s"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rows, steps and repeats")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SCRIPTS))
    parser.add_argument("--summarize", action="store_true", help="only rebuild latest.json/.md from results/*.json")
    args = parser.parse_args(argv)
    wall = {}
    if not args.summarize:
        names = args.only.split(",") if args.only else [n for n in SCRIPTS if n not in OPTIONAL]
        unknown = [n for n in names if n not in SCRIPTS]
        if unknown:
            print(f"--only: unknown benchmark(s) {unknown}; known: {', '.join(SCRIPTS)}", file=sys.stderr)
            return 2
        missing = common.missing_prerequisites(names)
        if missing:
            print("The benchmarks need inputs that are not there. Run first:\n  " + "\n  ".join(missing), file=sys.stderr)
            return 2
        failed = []
        for name in names:
            script, full, quick = SCRIPTS[name]
            print(f"== {name} ({script})", flush=True)
            start = time.perf_counter()
            rc = subprocess.run([sys.executable, str(BENCH / script), *(quick if args.quick else full)]).returncode
            wall[name] = round(time.perf_counter() - start, 1)
            if rc:
                failed.append(f"{script} (exit code {rc})")
        if failed:
            # latest.* keeps describing the run it came from: a summary after a failure would put
            # today's date and HEAD over numbers this run did not measure
            print(f"failed: {', '.join(failed)}; latest.json/latest.md not rewritten", file=sys.stderr)
            return 1
    latest = summarize(wall)
    print((common.RESULTS / "latest.md").read_text())
    missed = [r["metric"] for r in latest["headline"] if r["met"] is False]
    if missed:
        print("targets missed: " + "; ".join(missed))
    older = sorted({r["measured"] for r in latest["headline"] if r["measured"] not in ("current", "no result file")})
    if older:
        print("not measured at this HEAD (shown as such in latest.md): " + "; ".join(older))
    return 0


if __name__ == "__main__":
    sys.exit(main())
