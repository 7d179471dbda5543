"""The benchmark harness cannot publish a stale or made-up number: run_all's summary on fabricated
result files, a failing benchmark, missing inputs, and the scaling benchmark's refusal to run (or
report) a size it can only extrapolate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_scaling  # noqa: E402
import common  # noqa: E402
import run_all  # noqa: E402

HEAD = {"head": "bbbbbbb", "dirty": False, "modified_files": []}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "code_state", lambda: dict(HEAD))
    monkeypatch.setattr(common, "machine", lambda: {"cpu_count": 2})
    return tmp_path


def _write(results: Path, name: str, head: str, **values) -> None:
    (results / f"{name}.json").write_text(json.dumps({"code": {"head": head, "dirty": False, "modified_files": []},
                                                      "measured_at": "2026-11-24T10:00:00", **values}))


def _row(latest: dict, key: str) -> dict:
    return next(r for r in latest["headline"] if r["key"] == key)


def test_results_of_another_commit_are_marked_older_and_judge_no_target(results):
    _write(results, "compile", "aaaaaaa", compile_vs_trl_ratio=0.94, rows=1234)
    _write(results, "checkpoint", HEAD["head"], checkpoint_overhead_fraction=0.05)
    latest = run_all.summarize()

    old = _row(latest, "compile.compile_vs_trl_ratio")
    assert old["measured"] == "older: measured at aaaaaaa" and old["met"] is None  # 0.94 <= 1.0 is not claimed as met
    assert "1234 rows" in old["metric"]  # the row count comes from the result, not from the label
    new = _row(latest, "checkpoint.checkpoint_overhead_fraction")
    assert new["measured"] == "current" and new["met"] is False
    md = (results / "latest.md").read_text()
    assert "older: measured at aaaaaaa" in md and "| 0.050 | <= 0.03 | **no** | current |" in md


def test_a_result_from_a_dirty_tree_says_so(results):
    (results / "eval.json").write_text(json.dumps({"code": {"head": HEAD["head"], "modified_files": ["compiler/split.py"]},
                                                   "eval_batched_speedup": 6.0}))
    row = _row(run_all.summarize(), "eval.eval_batched_speedup")
    assert row["measured"] == "measured at bbbbbbb with uncommitted changes"


def test_a_failed_benchmark_does_not_rewrite_latest(results, tmp_path_factory, monkeypatch, capsys):
    scripts = tmp_path_factory.mktemp("bench")
    (scripts / "bench_fails.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(run_all, "BENCH", scripts)
    monkeypatch.setattr(run_all, "SCRIPTS", {"fails": ("bench_fails.py", [], [])})
    monkeypatch.setattr(common, "PREREQUISITES", [])
    (results / "latest.md").write_text("the earlier run's summary\n")
    (results / "latest.json").write_text("{}\n")

    assert run_all.main(["--only", "fails"]) == 1
    assert (results / "latest.md").read_text() == "the earlier run's summary\n"
    assert (results / "latest.json").read_text() == "{}\n"
    assert "bench_fails.py (exit code 3)" in capsys.readouterr().err


def test_missing_inputs_name_the_command_and_exit_nonzero(results, tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(run_all.subprocess, "run", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(common, "PREREQUISITES", [(tmp_path / "models" / "access-base" / "config.json", ("train",),
                                                   "dvc repro pretrain")])
    assert run_all.main(["--only", "train"]) == 2
    assert "dvc repro pretrain" in capsys.readouterr().err and ran == []
    assert not (results / "latest.md").exists()


def test_a_result_file_records_commit_arguments_and_inputs(results, tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3}\n')
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--rows", "3"])
    path = common.write_result("x", {"inputs": common.input_files(data)})
    written = json.loads(path.read_text())
    assert written["code"] == HEAD and written["argv"] == ["--rows", "3"]
    (entry,) = written["inputs"]
    assert entry["rows"] == 3 and len(entry["sha256"]) == 64 and not Path(entry["path"]).is_absolute()


def test_scaling_fits_recover_a_known_curve():
    coefficient, exponent = bench_scaling.power_fit([(n, 3e-4 * n ** 1.5) for n in (1e4, 1e5, 1e6)])
    assert exponent == pytest.approx(1.5) and coefficient == pytest.approx(3e-4)
    assert bench_scaling.line_fit([(n, 100 + 0.01 * n) for n in (1e4, 1e5)]) == pytest.approx((100, 0.01))


def test_scaling_does_not_run_a_size_the_curve_puts_past_the_limit(monkeypatch):
    def must_not_run(*args):
        raise AssertionError("a size predicted past the limit was run")

    monkeypatch.setattr(bench_scaling, "make_project", must_not_run)
    measured = {n: {"status": "measured", "wall_s": n / 1000, "split_s": n / 4000, "peak_rss_mb": 500 + n / 100,
                    "bundle_bytes": 1000 * n} for n in (40_000, 400_000)}
    args = type("Args", (), {"time_limit": 600.0, "max_rss_gb": 100.0, "keep_data": False})
    out = bench_scaling.measure_size("realistic", 1_000_000, measured, args, None)
    assert out["status"].startswith("not run: extrapolated wall 1000.0 s")
    assert out["extrapolated"]["wall_s"] == pytest.approx(1000.0)
    summary = bench_scaling.summarize_variant({**measured, 1_000_000: out})
    assert summary["largest_measured_rows"] == 400_000  # the extrapolated size is not counted as measured
    assert summary["extrapolated"]["10000000"]["wall_s"] == pytest.approx(10_000.0)


def test_training_batches_are_drawn_across_the_whole_epoch():
    import bench_train

    picked = bench_train.spread(399, 5)
    assert picked == [39, 119, 199, 279, 359]  # not the first five, where bfd puts the longest examples
    assert bench_train.spread(30, 30) == list(range(30))
    with pytest.raises(SystemExit, match="fewer than the 31"):
        bench_train.spread(30, 31)


def test_scaling_does_not_run_past_a_size_that_ran_out_of_time(monkeypatch):
    monkeypatch.setattr(bench_scaling, "make_project", lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
    measured = {40_000: {"status": "measured", "wall_s": 40.0, "cpu_s": 30.0, "split_s": 5.0, "peak_rss_mb": 900.0,
                         "bundle_bytes": 10},
                100_000: {"status": "stopped after the 600 s limit", "wall_s_at_least": 600.0}}
    args = type("Args", (), {"time_limit": 600.0, "max_rss_gb": 100.0, "keep_data": False})
    out = bench_scaling.measure_size("duplicate_heavy", 400_000, measured, args, None)
    assert out["status"] == "not run: 100000 rows already ran past the 600 s limit"
