"""Packing efficiency: real tokens / processed positions, bfd vs padded batches vs the bound.

Read off compiled bundles (no training): OrgAccess easy at max_length 1024 (the bundle
bench_compile.py leaves in $SFTC_BENCH_CACHE/orgaccess; compiled here when it is missing) and
the demo bundle (specs/access-policy-full.yaml, seq_length 512).

  bound            ceil(total tokens / L) full rows: the best any packing can do
  bfd_rows         the bundle's packed rows, each counted at L positions (the lock's
                   budget.packing_efficiency; packing.rows vs packing.ideal_rows)
  bfd_batches      what sftc's collator actually processes: 8 rows per micro-batch in the locked
                   order, each batch right-padded to its longest row (collate_rows)
  padded_batches   no packing: the same examples, 8 per batch in a seeded random order (HF's
                   RandomSampler), each batch padded to its longest example (TRL's padded collator)
  padded_to_max    no packing, every example padded to L (a static-shape pipeline)

    .venv/bin/python benchmarks/bench_packing.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 8


def orgaccess_bundle() -> Path:
    import bench_compile
    from sftc.compiler import compile_spec

    spec = bench_compile.PROJECT / "specs/orgaccess.yaml"
    if not spec.exists():
        bench_compile.PROJECT.mkdir(parents=True, exist_ok=True)
        bench_compile.make_project(bench_compile.PROJECT, None)
    bundle, _, _ = compile_spec(str(spec))  # warm when bench_compile.py ran first
    return bundle


def efficiency(bundle_dir: Path, seed: int = 0) -> dict:
    import numpy as np

    from sftc.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    tf = bundle.train
    L = int(bundle.lock.packing.seq_length)
    examples = tf.seq_lengths.astype(np.int64)
    total = int(examples.sum())
    rows = tf.row_lengths.astype(np.int64)
    ideal = -(-total // L)

    order = tf.epochs[0][: (len(tf.epochs[0]) // BATCH) * BATCH].reshape(-1, BATCH)
    bfd_batch_positions = int(sum(BATCH * rows[b].max() for b in order))
    bfd_batch_real = int(sum(rows[b].sum() for b in order))

    perm = np.random.default_rng(seed).permutation(len(examples))
    perm = perm[: (len(perm) // BATCH) * BATCH].reshape(-1, BATCH)
    pad_positions = int(sum(BATCH * examples[b].max() for b in perm))
    pad_real = int(sum(examples[b].sum() for b in perm))

    lock_budget = bundle.lock.budget
    return {
        "bundle": bundle.bundle_id,
        "seq_length": L,
        "examples": int(len(examples)),
        "tokens": total,
        "packed_rows": int(len(rows)),
        "ideal_rows": int(ideal),
        "rows_over_ideal": round(len(rows) / ideal, 4),
        "efficiency": {
            "bound": round(total / (ideal * L), 4),
            "bfd_rows": round(total / (len(rows) * L), 4),
            "bfd_batches": round(bfd_batch_real / bfd_batch_positions, 4),
            "padded_batches": round(pad_real / pad_positions, 4),
            "padded_to_max": round(total / (len(examples) * L), 4),
        },
        "lock_packing_efficiency": lock_budget.packing_efficiency,
        "lock_padding_fraction": lock_budget.padding_fraction,
        "bfd_vs_padded_positions": round((pad_positions / pad_real) / (bfd_batch_positions / bfd_batch_real), 3),
    }


def main() -> dict:
    result = {
        "machine": common.machine(),
        "orgaccess": efficiency(orgaccess_bundle()),
        "demo": efficiency(common.demo_bundle()),
        "targets": {"packing_efficiency": ">= 0.97 (OrgAccess, max_length 1024)"},
    }
    result["packing_efficiency"] = result["orgaccess"]["lock_packing_efficiency"]
    common.write_result("packing", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return result


if __name__ == "__main__":
    main()
