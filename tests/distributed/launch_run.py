"""`run_bundle` as a torchrun worker (what launch.sh runs via `sftc run`), for the tests.

usage: torchrun --nproc-per-node N -m tests.distributed.launch_run BUNDLE RUN_DIR [STOP_AFTER_STEPS]
"""

from __future__ import annotations

import sys

from sftc.runtime.run import run_bundle

if __name__ == "__main__":
    stop = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    run_bundle(sys.argv[1], run_dir=sys.argv[2], stop_after_steps=stop)
