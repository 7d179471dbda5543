"""What one rank reads of a bundle's token file at run start (issue 17): the sealed index, then the
rows of its own plan, against the whole-file sha256 every rank computed before format 3.

For each world size W, a fresh process plays rank 0 of W: it drops the token file from the page
cache (posix_fadvise DONTNEED, so the reads are the disk's), loads the bundle (index checked),
plans rank 0's updates as `sftc run` does, and checks those rows. It records the wall time, the
bytes its rows hold, the bytes it read from storage (/proc/self/io read_bytes) and the pages of the
token file mapped in it (/proc/self/smaps Rss). The baseline, in its own cold process, hashes the
whole file as the format-2 runtime did on every rank.

    .venv/bin/python benchmarks/bench_rank_reads.py BUNDLE_DIR [--worlds 1,2,4] [--out NAME]

Any bundle of format 3 works; benchmarks/README.md § Rank reads says which one was measured.
A world size must divide the bundle's examples per update over its per_device (derive_layout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine, shown_path, write_result  # noqa: E402

CHILD = r"""
import hashlib, json, os, sys, time
bundle_dir, world, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
path = os.path.join(bundle_dir, "train.safetensors")

def storage_read():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])

def mapped_kb():
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            current = len(fields) >= 6 and fields[-1] == os.path.abspath(path)
        elif current and fields[0] == "Rss:":
            total += int(fields[1])
    return total

from sftc.runtime.batching import plan_updates
from sftc.runtime.bundle import load_bundle
from sftc.runtime.verify import derive_layout

fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: what follows reads from storage
os.close(fd)
before, start = storage_read(), time.perf_counter()
if mode == "whole":  # the format-2 load: every rank hashed the whole token file
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    out = {"rows": None, "row_bytes": None}
else:
    bundle = load_bundle(bundle_dir)
    loaded = time.perf_counter() - start
    layout = derive_layout(bundle.lock.batch, world)
    plan = plan_updates(bundle.train.epochs, layout["per_device"], layout["grad_accum"],
                        bundle.lock.budget.optimizer_steps, world_size=world, rank=0)
    rows = sorted({r for u in plan for mb in u["microbatches"] for r in mb})
    bundle.train.verify_rows(rows)
    lengths = bundle.train.row_lengths
    out = {"rows": len(rows), "of_rows": bundle.train.n_rows, "row_bytes": int(lengths[rows].sum()) * 8,
           "load_s": round(loaded, 3), "mapped_kb": mapped_kb()}
out.update(wall_s=round(time.perf_counter() - start, 3), storage_read_bytes=storage_read() - before,
           file_bytes=os.path.getsize(path))
print(json.dumps(out))
"""


def measure(bundle: Path, world: int, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(world), mode], capture_output=True, text=True,
                          timeout=3600)
    if done.returncode:
        raise SystemExit(f"rank-read child (world {world}, {mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--out", default="rank_reads")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    lock = json.loads((bundle / "bundle.lock.json").read_text())
    result = {"bundle": shown_path(bundle), "bundle_id": lock["bundle_id"], "format_version": lock["format_version"],
              "machine": machine(), "loadavg_before": loadavg(), "whole_file_hash": measure(bundle, 1, "whole"),
              "rank0": {}}
    for world in [int(w) for w in args.worlds.split(",")]:
        got = measure(bundle, world, "rows")
        got["storage_read_fraction"] = round(got["storage_read_bytes"] / got["file_bytes"], 3)
        got["mapped_fraction"] = round(got["mapped_kb"] * 1024 / got["file_bytes"], 3)
        got["row_fraction"] = round(got["row_bytes"] / got["file_bytes"], 3)
        result["rank0"][str(world)] = got
        print(f"world {world}: rank 0 checks {got['rows']}/{got['of_rows']} rows ({got['row_fraction']:.0%} of the file's "
              f"bytes) in {got['wall_s']} s; read {got['storage_read_fraction']:.0%} from storage, "
              f"mapped {got['mapped_fraction']:.0%}", flush=True)
    whole = result["whole_file_hash"]
    print(f"whole-file hash (format 2, every rank): {whole['wall_s']} s, read "
          f"{whole['storage_read_bytes'] / whole['file_bytes']:.0%} from storage", flush=True)
    result["loadavg_after"] = loadavg()
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
