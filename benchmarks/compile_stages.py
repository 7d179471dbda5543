"""One cold compile of a bench_scaling.py project, with the RSS of each compile pass (issue 17).

The passes are the compile's own progress lines (reading, splitting, tokenizing, packing, counting,
writing); a thread samples RSS every 50 ms, so each pass reports the highest RSS seen while it ran
and the RSS when it ended. The whole compile's peak is RUSAGE_SELF's maxrss (what bench_scaling.py
reports). Prints one JSON object.

    cd $SFTC_BENCH_CACHE/scaling/realistic-40000     # made by bench_scaling.make_project
    [PYTHONPATH=<snapshot>/pkg] .venv/bin/python benchmarks/compile_stages.py . OUT_DIR [WORKERS]

benchmarks/results/scaling_memory_step.json holds what it measured, with the commits (as git
archive snapshots, bench_scaling.snapshot) and the data's sha256.
"""

import json
import resource
import sys
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    project, out = Path(sys.argv[1]), Path(sys.argv[2])
    stages = []
    current = {"name": "start", "peak": 0.0, "t": time.perf_counter()}

    def sample():
        while True:
            current["peak"] = max(current["peak"], rss_mb())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()

    def say(text: str) -> None:
        now, rss = time.perf_counter(), rss_mb()
        stages.append({"stage": current["name"], "s": round(now - current["t"], 1),
                       "peak_mb": round(max(current["peak"], rss)), "end_mb": round(rss)})
        current.update(name=text.split(" ")[0], peak=rss, t=now)

    start = time.perf_counter()
    from sftc.compiler import bundle

    inputs = bundle.resolve_inputs(project / "specs" / "scaling.yaml")
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else None  # default: the usable cores
    final, lock = bundle._build(inputs, out, say, workers)
    say("end")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                      "peak_rss_mb": round(usage.ru_maxrss / 1024), "bundle": final.name, "stages": stages}, indent=1))


if __name__ == "__main__":
    main()
