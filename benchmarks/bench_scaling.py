"""Compile scaling: wall time, peak RSS, bundle size and the near-duplicate pass from 40k to 3M rows.

Two synthetic mixes, generated deterministically (seeded) so every run measures the same bytes:
  realistic        distinct prompt/completion rows in threads of 1-4 rows, of which 2% are near
                   copies (1-3 words changed) and 1% exact copies of an earlier prompt in another
                   thread: the order of the duplicate rates that dedup reports give for public SFT
                   mixes (an assumption, stated here, not measured on one)
  duplicate_heavy  a pool of distinct prompts repeated with the row number appended, as in issue 17's
                   independent check (OrgAccess's 38,280 rows repeated): the pool is rows/4 prompts up
                   to 38,280, so every row has at least 3 near copies and, past 153k rows, rows/38,280
                   of them (the copies per prompt grow with the size, as in that check); threads of 4
  orgaccess_repeated  issue 17's check itself: OrgAccess easy ($SFTC_EXTERNAL) repeated with the row
                   number appended to the request, grouped by user_role (247 groups): rows sharing a
                   permissions list fill LSH buckets of hundreds of rows, and they grow with the copies
                   (`--variants orgaccess_repeated`; not in the default set)
Words come from a fixed pseudo-vocabulary with Zipf frequencies; lengths are log-normal
(prompts ~70 words, completions ~120). The real Qwen2.5 tokenizer ($SFTC_EXTERNAL) tokenizes them,
max_length 1024, bfd packing at 1024, LoRA.

Each compile runs in its own child process (`compile_spec(force=True)`) and reports wall time, peak
RSS (RUSAGE_SELF), CPU time, the split pass (near-duplicate search + group split, timed around
split_examples) and the search's own counters, and the bundle's size on disk. Sizes run smallest
first; a size is not run when the curve measured so far predicts it past --time-limit (or the
memory past --max-rss-gb): it is recorded as "not run" with the extrapolated value, never a
number that was not measured. A child past --time-limit is stopped and recorded as such.
Extrapolations to 10M and 100M rows: power law fitted over the measured sizes for time (whole
compile and split pass), straight line for RSS and bundle size.

Parallelism: `--workers 2,1` (the default) compiles each size with 2 worker processes (compile_spec's
`workers`, compiler/workers.py) and then with 1; the size's record is the 2-worker run, with the
1-worker run beside it (`single_process`), the speedup (wall 1 / wall N) and whether the two bundles
are identical file by file (`identical_across_workers`: the lock's sha256 of every file and the
bundle id). CPU time adds the workers' (RUSAGE_CHILDREN); `worker_peak_rss_mb` is the largest
worker's peak, and `peak_rss_upper_mb` the parent's peak plus that times the worker count: an upper
bound, since forked workers share the parent's pages until written.

--snapshot [REV] measures a commit (default HEAD; git archive, imported from the benchmark cache)
instead of the working tree: other engineers' uncommitted edits cannot leak into the numbers.

    .venv/bin/python benchmarks/bench_scaling.py [--sizes 40000,400000,1000000,3000000]
        [--variants realistic,duplicate_heavy] [--time-limit 600] [--snapshot]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCALING = common.CACHE / "scaling"
POOL = 38_280
VARIANTS = ("realistic", "duplicate_heavy")


def vocabulary(rng, size: int = 6000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables, size=int(rng.integers(1, 4)))))
    return sorted(words)


class Writer:
    """Sentences of Zipf-distributed words, drawn in blocks (one rng call per block, not per word)."""

    def __init__(self, seed: int):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.words = vocabulary(self.rng)
        ranks = np.arange(1, len(self.words) + 1)
        self.p = (1.0 / ranks) / (1.0 / ranks).sum()
        self.block, self.at, self.lengths = [], 0, {}
        self.words = np.array(self.words)

    def text(self, mean_words: int) -> str:
        lengths = self.lengths.get(mean_words)
        if not lengths:
            drawn = self.rng.lognormal(math.log(mean_words), 0.5, size=4096).clip(3, 1000).astype(int)
            lengths = self.lengths[mean_words] = drawn.tolist()
        n = lengths.pop()
        if self.at + n > len(self.block):
            self.block, self.at = self.rng.choice(self.words, size=1 << 18, p=self.p).tolist(), 0
        self.at += n
        return " ".join(self.block[self.at - n : self.at]) + "."


def near_copy(rng, text: str) -> str:
    words = text.split()
    for _ in range(int(rng.integers(1, 4))):
        words[int(rng.integers(len(words)))] = "changed"
    return " ".join(words)


def write_orgaccess_repeated(path: Path, rows: int) -> dict:
    import pyarrow.parquet as pq

    base = pq.read_table(common.EXTERNAL / "datasets/orgaccess/easy-00000-of-00001.parquet").to_pylist()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        for i in range(rows):
            row = base[i % len(base)]
            # the same prompt and completion bench_compile.py builds, the row number after the request
            handle.write(json.dumps({
                "thread_id": row["user_role"],
                "prompt": f"Role: {row['user_role']}\nPermissions: {row['permissions']}\nRequest: {row['query']} {i}",
                "completion": f"{row['expected_response']}: {row['rationale']}"}) + "\n")
    tmp.rename(path)
    return {"rows": rows, "near_copies_written": max(0, rows - len(base)), "exact_copies_written": 0,
            "bytes": path.stat().st_size, "source": "$SFTC_EXTERNAL/datasets/orgaccess/easy-00000-of-00001.parquet"}


def write_rows(path: Path, variant: str, rows: int, seed: int = 0) -> dict:
    """The mix as JSONL (prompt, completion, thread_id); returns its measured shape."""
    if variant == "orgaccess_repeated":
        return write_orgaccess_repeated(path, rows)
    writer = Writer(seed)
    rng = writer.rng
    near = exact = 0
    recent: list[str] = []  # earlier prompts a duplicate can copy (bounded: it is the generator's memory)
    pool: list[tuple[str, str]] = []
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        for i in range(rows):
            if variant == "duplicate_heavy":
                if len(pool) < min(POOL, max(1, rows // 4)):
                    pool.append((writer.text(70), writer.text(120)))
                prompt, completion = pool[i % len(pool)]  # while the pool fills, i % len(pool) is the newest
                prompt, thread = f"{prompt} {i}", i // 4
            else:
                draw = rng.random()
                completion = writer.text(120)
                if draw < 0.01 and recent:
                    prompt, exact = recent[int(rng.integers(len(recent)))], exact + 1
                elif draw < 0.03 and recent:
                    prompt, near = near_copy(rng, recent[int(rng.integers(len(recent)))]), near + 1
                else:
                    prompt = writer.text(70)
                    if len(recent) < 100_000:
                        recent.append(prompt)
                    else:
                        recent[int(rng.integers(len(recent)))] = prompt
                thread = i // 3 if i % 7 else i  # threads of 1-4 rows
            handle.write(json.dumps({"thread_id": f"t{thread}", "prompt": prompt, "completion": completion}) + "\n")
    tmp.rename(path)
    return {"rows": rows, "near_copies_written": near if variant == "realistic" else rows - len(pool),
            "exact_copies_written": exact, "bytes": path.stat().st_size}


SPEC = """
name: scaling-{variant}-{rows}
objective: sft
parameterization: {{kind: lora, rank: 16, alpha: 32}}
model: {{path: models/qwen}}
data: {{files: [data/rows.jsonl], format: prompt_completion, fields: {{group: thread_id}}, max_reject_fraction: 0.2}}
tokenize: {{max_length: 1024}}
packing: {{strategy: bfd, seq_length: 1024}}
batch: {{per_device: 8, grad_accum: 4}}
optimizer: {{lr: 1.0e-4}}
schedule: {{epochs: 1}}
"""


def make_project(variant: str, rows: int) -> tuple[Path, dict]:
    project = SCALING / f"{variant}-{rows}"
    data = project / "data" / "rows.jsonl"
    shape_file = project / "data" / "shape.json"
    if not (data.exists() and shape_file.exists()):
        shutil.rmtree(project, ignore_errors=True)
        (project / "data").mkdir(parents=True)
        shape_file.write_text(json.dumps(write_rows(data, variant, rows)))
    model = project / "models" / "qwen"
    model.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(common.EXTERNAL / "tokenizers/qwen2.5-instruct" / name, model / name)
    shutil.copy(common.EXTERNAL / "model-configs/qwen2.5_0.5b_instruct/config.json", model / "config.json")
    (project / "pyproject.toml").write_text("")
    (project / "specs").mkdir(exist_ok=True)
    (project / "specs" / "scaling.yaml").write_text(SPEC.format(variant=variant, rows=rows))
    shape = json.loads(shape_file.read_text())
    from sftc.io import sha256_file

    shape["sha256"] = sha256_file(data)
    return project, shape


CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from sftc.compiler import split as split_module
seen = {}
original = split_module.split_examples
def timed(examples, spec, *rest):
    start = time.perf_counter()
    result = original(examples, spec, *rest)
    seen["split_s"] = time.perf_counter() - start
    seen["search"] = getattr(result, "near_duplicate_search", None)
    seen["merged_clusters"] = len(result.record["merged_near_duplicates"])
    return result
split_module.split_examples = timed  # compile_spec imports it at call time
from sftc.compiler import compile_spec
import inspect
workers = int(sys.argv[3]) if len(sys.argv) > 3 else None
if "workers" in inspect.signature(compile_spec).parameters:
    bundle, lock, reused = compile_spec(sys.argv[1], bundles_dir=sys.argv[2], force=True, workers=workers)
else:  # a commit before compile_spec took workers (--snapshot): one process
    assert workers in (None, 1), "this commit compiles in one process only: --workers 1"
    bundle, lock, reused = compile_spec(sys.argv[1], bundles_dir=sys.argv[2], force=True)
def field(record, *path):  # a Lock (format 2) or the lock dict of older commits (--snapshot)
    for key in path:
        record = record[key] if isinstance(record, dict) else getattr(record, key)
    return record.model_dump() if hasattr(record, "model_dump") else record
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime,
                  "peak_rss_mb": usage.ru_maxrss / 1024, "worker_peak_rss_mb": children.ru_maxrss / 1024,
                  "workers": workers, "bundle_id": field(lock, "bundle_id"), "files": field(lock, "files"),
                  "bundle_bytes": size, "packed_rows": field(lock, "packing", "rows"), "rejected": field(lock, "data_manifest", "rejected"),
                  **seen}))
"""


SPLIT_CHILD = r"""
import json, resource, sys, time
from sftc.compiler.data import Example
from sftc.compiler.spec import SplitSpec
from sftc.compiler.split import split_examples
examples = []
with open(sys.argv[1]) as handle:
    for i, line in enumerate(handle):
        row = json.loads(line)
        # the split reads the user turns only: the completion is left out to keep the input small
        examples.append(Example("rows.jsonl", i, row["thread_id"], {},
                                messages=[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": ""}]))
before = resource.getrusage(resource.RUSAGE_SELF)
start, cpu = time.perf_counter(), time.process_time()
result = split_examples(examples, SplitSpec())
wall = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "cpu_s": time.process_time() - cpu, "split_s": wall,
                  "peak_rss_mb": after.ru_maxrss / 1024, "rss_before_split_mb": before.ru_maxrss / 1024,
                  "bundle_bytes": 0, "search": getattr(result, "near_duplicate_search", None),
                  "merged_clusters": len(result.record["merged_near_duplicates"])}))
"""


def snapshot(rev: str, overlays: list[str]) -> tuple[Path, dict]:
    """A commit as committed, importable as `sftc` from the cache (the package-dir mapping as symlinks).

    `overlays` ("path@rev") replace single files with their version at another commit: on a shared
    tree a commit can carry someone's half-finished hunk, and the measured change is then laid over
    the last commit that compiles. Both are recorded in the result."""
    def short(r):
        return subprocess.run(["git", "rev-parse", "--short", r], cwd=common.REPO, capture_output=True, text=True,
                              check=True).stdout.strip()

    commit = short(rev)
    overlays = [f"{path}@{short(at)}" for path, at in (o.rsplit("@", 1) for o in overlays)]
    root = common.CACHE / "snapshots" / "+".join([commit, *(o.replace("/", "_") for o in overlays)])
    if not (root / "pkg" / "sftc").exists():
        src = root / "src"
        shutil.rmtree(root, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=common.REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        pkg = root / "pkg" / "sftc"
        for overlay in overlays:
            path, at = overlay.rsplit("@", 1)
            (src / path).write_bytes(subprocess.run(["git", "show", f"{at}:{path}"], cwd=common.REPO,
                                                    capture_output=True, check=True).stdout)
        shutil.copytree(src / "sftc", pkg)
        for sub in ("compiler", "runtime", "review", "templates"):
            (pkg / sub).symlink_to(src / sub, target_is_directory=True)
    return root / "pkg", {"head": commit, "modified_files": [], "overlays": overlays,
                          "source": f"git archive of {rev} (--snapshot)"}


def compile_child(project: Path, time_limit: float, pythonpath: Path | None, split_only: bool = False,
                  workers: int | None = None) -> dict:
    # the environment `sftc compile` would see: the tokenizers library's own threads left as they are
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out_dir = project / "bundles"
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    try:
        argv = ([SPLIT_CHILD, str(project / "data" / "rows.jsonl")] if split_only
                else [CHILD, str(project / "specs" / "scaling.yaml"), str(out_dir), *([str(workers)] if workers else [])])
        proc = subprocess.run([sys.executable, "-c", *argv],
                              cwd=project, capture_output=True, text=True, env=env, timeout=time_limit)
    except subprocess.TimeoutExpired:
        return {"status": f"stopped after the {time_limit:.0f} s limit", "wall_s_at_least": round(time.perf_counter() - start, 1)}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # GBs at the large sizes; the size was measured
    if proc.returncode:
        return {"status": f"failed (exit {proc.returncode})", "stderr_tail": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "measured", **result}


def power_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(coefficient, exponent) of y = c * n^k, least squares in log-log; None below two points."""
    points = [(n, y) for n, y in points if y and y > 0]
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - k * mx), k


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of y = a + b * n; None below two points."""
    if len(points) < 2:
        return None
    mx, my = sum(n for n, _ in points) / len(points), sum(y for _, y in points) / len(points)
    b = sum((n - mx) * (y - my) for n, y in points) / sum((n - mx) ** 2 for n, _ in points)
    return my - b * mx, b


POWER_LAW = ("wall_s", "cpu_s", "split_s")


def curve(measured: dict[int, dict]) -> dict:
    """The fitted curves of one variant and what they predict, from measured sizes only."""
    ok = {n: r for n, r in measured.items() if r.get("status") == "measured"}
    fits = {"wall_s": power_fit([(n, r["wall_s"]) for n, r in ok.items()]),
            # CPU time: on a shared machine the wall time also measures the other jobs
            "cpu_s": power_fit([(n, r.get("cpu_s")) for n, r in ok.items()]),
            "split_s": power_fit([(n, r.get("split_s")) for n, r in ok.items()]),
            "peak_rss_mb": line_fit([(n, r["peak_rss_mb"]) for n, r in ok.items()]),
            "bundle_bytes": line_fit([(n, r["bundle_bytes"]) for n, r in ok.items()])}

    def predict(n: int) -> dict:
        out = {}
        for key, fit in fits.items():
            if fit is None:
                continue
            out[key] = fit[0] * n ** fit[1] if key in POWER_LAW else fit[0] + fit[1] * n
        return {k: round(v, 1) for k, v in out.items()}

    return {"fits": {k: (None if f is None else {"form": "c*n^k" if k in POWER_LAW else "a+b*n",
                                                  "params": [float(f"{f[0]:.6g}"), round(f[1], 4) if k in POWER_LAW else float(f"{f[1]:.6g}")]})
                     for k, f in fits.items()},
            "measured_sizes": sorted(ok), "predict": predict}


def measure_size(variant: str, rows: int, measured: dict[int, dict], args, pythonpath) -> dict:
    """One compile of one size, or why it was not run (predicted from the sizes measured before it)."""
    stopped = [n for n, r in measured.items() if r["status"].startswith("stopped") and n < rows]
    if stopped:
        return {"status": f"not run: {min(stopped)} rows already ran past the {args.time_limit:.0f} s limit"}
    guess = curve(measured)["predict"](rows)
    if guess.get("wall_s", 0) > args.time_limit or guess.get("peak_rss_mb", 0) > args.max_rss_gb * 1024:
        return {"status": f"not run: extrapolated wall {guess.get('wall_s')} s, peak RSS {guess.get('peak_rss_mb')} MB "
                          "from the sizes measured before it", "extrapolated": guess}
    gen = time.perf_counter()
    project, shape = make_project(variant, rows)
    generated = time.perf_counter() - gen
    runs = []
    for workers in (args.workers if not getattr(args, "split_only", False) else [None]):
        load_before = common.loadavg()
        run = compile_child(project, args.time_limit, pythonpath, getattr(args, "split_only", False), workers)
        run["loadavg"] = [load_before, common.loadavg()]
        if run["status"] == "measured":
            run["per_row_ms"] = round(1000 * run["wall_s"] / rows, 4)
            run["cpu_per_row_ms"] = round(1000 * run["cpu_s"] / rows, 4)
            run["rss_kb_per_row"] = round(1024 * run["peak_rss_mb"] / rows, 2)
            run["cores_used"] = round(run["cpu_s"] / run["wall_s"], 2)
            run["split_share"] = round(run["split_s"] / run["wall_s"], 3)
            if run.get("workers"):
                run["peak_rss_upper_mb"] = round(run["peak_rss_mb"] + run["workers"] * run.get("worker_peak_rss_mb", 0) *
                                                 (run["workers"] > 1), 1)
        runs.append(run)
        if run["status"] != "measured":
            break  # a smaller worker count would only take longer
    result = runs[0]
    if len(runs) > 1:
        single = runs[-1]
        result["single_process"] = {k: v for k, v in single.items() if k not in ("search", "files", "rejected")}
        if single["status"] == "measured" and result["status"] == "measured":
            result["parallel_speedup"] = round(single["wall_s"] / result["wall_s"], 3)
            result["identical_across_workers"] = (single["files"] == result["files"]
                                                  and single["bundle_id"] == result["bundle_id"])
    result.update(input=shape, data_generation_s=round(generated, 1))
    if not args.keep_data:
        shutil.rmtree(project, ignore_errors=True)
    return result


def summarize_variant(measured: dict[int, dict]) -> dict:
    fitted = curve(measured)
    return {"sizes": {str(n): r for n, r in sorted(measured.items())}, "fits": fitted["fits"],
            "largest_measured_rows": max(fitted["measured_sizes"], default=None),
            "extrapolated": {str(n): fitted["predict"](n) for n in (10_000_000, 100_000_000)}}


def table(result: dict) -> str:
    """A result file as Markdown: one row per variant and size, measured or why not."""
    lines = [f"{result.get('measures', 'the whole cold compile')}; code {result['code']['head']}"
             + (f" + {', '.join(result['code'].get('overlays', []))}" if result["code"].get("overlays") else "")
             + f", limit {result['args']['time_limit_s']:.0f} s per size", "",
             "| mix | rows | wall s | CPU s | cores used | peak RSS MB | bundle MB | ms/row (CPU) | split s | merged clusters | checks | capped buckets |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, v in result["variants"].items():
        for rows, r in v["sizes"].items():
            if r["status"] != "measured":
                lines.append(f"| {variant} | {int(rows):,} | {r['status']} |||||||||")
                continue
            search = r.get("search") or {}
            lines.append(f"| {variant} | {int(rows):,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['cores_used']} | {r['peak_rss_mb']:,.0f} "
                         f"| {r['bundle_bytes'] / 1e6:,.1f} | {r['cpu_per_row_ms']:.3f} | {r['split_s']:.1f} | {r['merged_clusters']} "
                         f"| {search.get('comparisons', '-')} | {search.get('capped_buckets', '-')} |")
    lines += ["", "| mix | fit (measured sizes) | wall s = c·n^k | CPU s = c·n^k | split s = c·n^k | RSS MB = a + b·n | at 10M: CPU s, RSS MB | at 100M: CPU s, RSS MB |",
              "|---|---|---|---|---|---|---|---|"]
    for variant, v in result["variants"].items():
        f = v["fits"]

        def show(key):
            fit = f.get(key)
            return "-" if not fit else (f"k = {fit['params'][1]}" if fit["form"] == "c*n^k" else f"b = {fit['params'][1] * 1024:.2f} KB/row")

        ext = v["extrapolated"]
        at = {n: f"{ext[n].get('cpu_s', '-'):,} / {ext[n].get('peak_rss_mb', '-'):,}" if ext[n] else "-" for n in ext}
        sizes = ", ".join(f"{int(r):,}" for r, x in v["sizes"].items() if x["status"] == "measured")
        lines.append(f"| {variant} | {sizes} | {show('wall_s')} | {show('cpu_s')} | {show('split_s')} | {show('peak_rss_mb')} "
                     f"| {at.get('10000000', '-')} | {at.get('100000000', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> dict:
    parser = argparse.ArgumentParser()
    # 10k and 100k: a curve needs points before the sizes it predicts (and decides not to run)
    parser.add_argument("--sizes", default="10000,40000,100000,400000,1000000,3000000")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per compile (measured or predicted)")
    parser.add_argument("--max-rss-gb", type=float, default=None, help="default: 80%% of this machine's memory")
    parser.add_argument("--snapshot", nargs="?", const="HEAD", default=None, metavar="REV",
                        help="measure a commit (default HEAD) from a git archive, not the working tree")
    parser.add_argument("--overlay", action="append", default=[], metavar="PATH@REV",
                        help="with --snapshot: this file as it is at REV")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated projects in the cache")
    parser.add_argument("--workers", default="2,1", help="worker counts compiled at each size, the first one fitted "
                        "and reported, the last one its single-process comparison (default 2,1)")
    parser.add_argument("--split-only", action="store_true",
                        help="only the split pass (near-duplicate search) on the same rows, default threshold 0.85: "
                             "the part that grew faster than linear, at sizes the whole compile cannot reach")
    parser.add_argument("--out", default=None, help="results/<out>.json (default scaling, or scaling_split)")
    parser.add_argument("--table", nargs="+", default=None, metavar="RESULT_JSON", help="print result files as Markdown and exit")
    args = parser.parse_args()
    if args.table:
        for path in args.table:
            print(table(json.loads(Path(path).read_text())))
        return {}
    args.max_rss_gb = args.max_rss_gb or 0.8 * common.machine().get("mem_total_gb", 8)
    args.workers = [int(w) for w in args.workers.split(",") if w]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    out = args.out or ("scaling_split" if args.split_only else "scaling")
    pythonpath, code = snapshot(args.snapshot, args.overlay) if args.snapshot else (None, common.code_state())
    result = {
        "machine": common.machine(),
        "code": code,
        "args": {"sizes": sizes, "variants": args.variants.split(","), "time_limit_s": args.time_limit,
                 "max_rss_gb": round(args.max_rss_gb, 1), "snapshot": args.snapshot, "split_only": args.split_only,
                 "workers": args.workers},
        "measures": ("split_examples alone (near-duplicate search + group split) on the rows' prompts, in a child"
                     if args.split_only else "the whole cold compile (compile_spec, force=True), in a child"),
        "tokenizer": "qwen2.5-instruct ($SFTC_EXTERNAL)", "max_length": 1024, "seq_length": 1024,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset (library default)"),
        "parallel": "each size compiled with each of args.workers (compile_spec workers=N); the record is the first, "
                    "single_process the last, parallel_speedup = wall(last) / wall(first), identical_across_workers "
                    "compares the locks' file hashes and bundle ids",
        "variants": {},
    }
    measured: dict[str, dict[int, dict]] = {v: {} for v in args.variants.split(",")}
    for rows in sizes:  # size by size, so a time-out at a large size still leaves both variants' small ones
        for variant in measured:
            measured[variant][rows] = measure_size(variant, rows, measured[variant], args, pythonpath)
            shown = {k: v for k, v in measured[variant][rows].items() if k not in ("input", "search", "stderr_tail")}
            print(f"{variant} {rows}: {json.dumps(shown)}", flush=True)
            # written after every size: a run stopped half-way keeps what it measured
            result["variants"] = {v: summarize_variant(m) for v, m in measured.items()}
            common.write_result(out, {**result, "complete": False})
    result["complete"] = True
    common.write_result(out, result)
    return result


if __name__ == "__main__":
    main()
