#!/usr/bin/env python
"""Build reports/reliability.json from the reliability tests (and, optionally, a bigger fault campaign).

    python scripts/reliability_report.py                                   # what docs/reliability.md quotes
    python scripts/reliability_report.py --faults 40 --size large --seed 1 # plus a benchmark-size campaign

Runs `pytest tests/reliability` with SFTC_RELIABILITY_FIGURES set, so every test adds what it
measured (tests/reliability/conftest.py): the CI-size fault campaign, storage faults, drift cases,
fuzzed inputs, tracebacks seen. With --faults, a standalone campaign (scripts/fault_campaign.py)
runs afterwards and its figures are added to the fault totals. The pass/fail count of the tests is
part of the report: a figure from a failing suite is not a promise kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("faults_injected", "faults_survived", "corrupt_checkpoints_loaded", "records_lost", "leaks", "inputs_tried",
        "tracebacks", "hangs", "drift_cases", "drift_caught")
FAMILY_PREFIX = "inputs_tried_"  # tests count each input under inputs_tried and inputs_tried_<family>


def run_tests(figures_path: Path, junit: Path, fuzz_scale: int = 1) -> dict:
    env = {**os.environ, "SFTC_RELIABILITY_FIGURES": str(figures_path), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "SFTC_FUZZ_EXAMPLES": str(fuzz_scale)}
    command = [sys.executable, "-m", "pytest", "tests/reliability", "-p", "no:cacheprovider", "-q", "-W", "ignore",
               f"--junitxml={junit}"]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, env=env)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"command": "python -m pytest tests/reliability", "exit_code": proc.returncode,
            "wall_s": round(time.monotonic() - started, 1), **counts,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "reliability.json")
    parser.add_argument("--faults", type=int, default=0, help="also run a standalone campaign with this many faults")
    parser.add_argument("--size", default="large", choices=["small", "large"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fuzz-scale", type=int, default=1,
                        help="multiply the hypothesis examples of the fuzz tests (SFTC_FUZZ_EXAMPLES)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from benchmarks.common import code_state

    measured = code_state()  # before the tests: the tree may be edited while they run

    with tempfile.TemporaryDirectory(prefix="sftc-reliability-") as tmp:
        figures_path = Path(tmp) / "figures.json"
        tests = run_tests(figures_path, Path(tmp) / "junit.xml", args.fuzz_scale)
        figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}

    report = {key: int(figures.get(key, 0)) for key in KEYS}
    report["inputs_tried_by_family"] = {k[len(FAMILY_PREFIX):]: int(v) for k, v in sorted(figures.items())
                                        if k.startswith(FAMILY_PREFIX)}
    report["details"] = {k: v for k, v in sorted(figures.items()) if k not in KEYS and not k.startswith(FAMILY_PREFIX)}
    report["tests"] = tests
    commands = ["python scripts/reliability_report.py" + (f" --faults {args.faults} --size {args.size} --seed {args.seed}"
                                                          if args.faults else "")
                + (f" --fuzz-scale {args.fuzz_scale}" if args.fuzz_scale != 1 else "")]
    if args.faults:
        sys.path.insert(0, str(REPO / "scripts"))
        import fault_campaign

        campaign = fault_campaign.main(["--faults", str(args.faults), "--seed", str(args.seed), "--size", args.size])
        report["fault_campaign"] = {k: v for k, v in campaign.items() if k != "faults"}
        report["fault_campaign"]["faults"] = campaign["faults"]
        for key in ("faults_injected", "faults_survived", "corrupt_checkpoints_loaded", "records_lost", "leaks",
                    "tracebacks"):
            report[key] += int(campaign[key])
    report["generated"] = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code": measured,  # the commit measured, and whether the tree had uncommitted edits then
        "commands": commands,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu(s), CPU only" ,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in KEYS} | {"tests": tests}, indent=2))
    ok = tests["exit_code"] == 0 and report["faults_survived"] == report["faults_injected"] \
        and not report["corrupt_checkpoints_loaded"] and not report["tracebacks"] and not report["hangs"] \
        and not report["records_lost"] and not report["leaks"] and report["drift_caught"] == report["drift_cases"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
