"""DVC as the experiment tool over the demo: the project's own dvc.yaml and specs, in a throwaway
git repository, with run records written by the pipeline's writer from synthetic run directories
(nothing is trained). Checks what a DVC user types: `dvc params diff`, `dvc exp run -S` on a
nested spec field, `dvc metrics diff` and `dvc plots show`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DVC = Path(sys.executable).with_name("dvc")
RUNS = ("access-policy-cpt", "access-policy-full", "access-policy-lora", "access-policy-qlora")
RULE = {"require": {"format_pass_rate": ">= 0.95"}, "maximize": "policy_pass_rate",
        "tie_break": [{"minimize": "eval_loss"}], "export_if_none_eligible": False}

pytestmark = pytest.mark.skipif(not DVC.is_file() or shutil.which("git") is None, reason="needs dvc and git")


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _make_run(run_dir: Path, policy_at_end: float) -> None:
    """A run directory as `sftc run` leaves it: metrics.jsonl with train and eval lines (eval lines
    carry timings too, as the runtime logs them) and best.json from the real selection code."""
    from sftc.io import pretty_json
    from sftc.runtime.select import select_best

    run_dir.mkdir(parents=True, exist_ok=True)
    evals = {48: (1.9, 0.90, 0.40), 96: (1.4, 0.97, 0.70), 144: (1.2, 0.99, policy_at_end)}
    lines = []
    for step in range(8, 145, 8):
        lines.append({"kind": "train", "step": step, "loss": 2.5 * math.exp(-step / 90) + 1.0, "lr": 6e-3,
                      "grad_norm": 0.5, "tokens_per_s": 1234.5, "step_seconds": 0.8})
        if step in evals:
            loss, fmt, policy = evals[step]
            lines.append({"kind": "eval", "step": step, "eval_loss": loss, "format_pass_rate": fmt,
                          "policy_pass_rate": policy, "n_prompts": 128, "generation_seconds": 9.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    candidates = [{"step": s, "eval_loss": v[0], "format_pass_rate": v[1], "policy_pass_rate": v[2]}
                  for s, v in evals.items()]
    (run_dir / "best.json").write_text(pretty_json(select_best(candidates, RULE)))


def _write_records(project: Path, policy_at_end: float) -> None:
    from sftc.review.runs import write_dvc_records

    for name in RUNS:
        run_dir = project / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        _make_run(run_dir, policy_at_end)
        write_dvc_records(run_dir, project / "reports" / "runs" / name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A git + DVC repository holding the demo's dvc.yaml and specs, one commit of run records."""
    project = tmp_path_factory.mktemp("dvc") / "demo"
    project.mkdir()
    shutil.copyfile(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "specs", project / "specs")
    (project / ".gitignore").write_text("/runs\n")
    _run(project, "git", "init", "-q")
    _run(project, str(DVC), "init", "-q")
    _write_records(project, policy_at_end=0.80)
    _run(project, "git", "add", "-A")
    _run(project, "git", "commit", "-qm", "baseline")
    return project


def test_records_are_deterministic_and_hold_no_timings(demo, tmp_path):
    from sftc.review.runs import write_dvc_records

    records = demo / "reports/runs/access-policy-lora"
    metrics = json.loads((records / "metrics.json").read_text())
    assert metrics["selected_step"] == 144 and metrics["eligible"] is True
    assert metrics["policy_pass_rate"] == 0.80 and metrics["format_pass_rate"] == 0.99
    assert metrics["final_train_loss"] == pytest.approx(2.5 * math.exp(-144 / 90) + 1.0)
    text = "".join(p.read_text() for p in records.iterdir())
    for timing in ("seconds", "tokens_per_s", "wall", "rss"):
        assert timing not in text
    assert (records / "loss.csv").read_text().splitlines()[0] == "step,loss,lr,grad_norm"
    assert (records / "behaviour.csv").read_text().splitlines()[0] == "step,eval_loss,format_pass_rate,policy_pass_rate"
    again = write_dvc_records(demo / "runs/access-policy-lora", tmp_path / "again")
    assert [p.read_bytes() for p in again] == [(records / p.name).read_bytes() for p in again]


def test_params_diff_lists_a_changed_spec_field(demo):
    spec = demo / "specs/access-policy-lora.yaml"
    before = spec.read_text()
    try:
        spec.write_text(before.replace("lr: 6.0e-3", "lr: 3.0e-3"))
        assert spec.read_text() != before
        diff = json.loads(_run(demo, str(DVC), "params", "diff", "--json"))
        assert list(diff) == ["specs/access-policy-lora.yaml"] and list(diff["specs/access-policy-lora.yaml"]) == ["optimizer.lr"]
        assert diff["specs/access-policy-lora.yaml"]["optimizer.lr"]["old"] == 0.006
        assert diff["specs/access-policy-lora.yaml"]["optimizer.lr"]["new"] == 0.003
    finally:
        spec.write_text(before)


def test_exp_run_sets_a_nested_spec_field(demo):
    """`dvc exp run -S file:a.b=v` on a spec (queued, so nothing trains): DVC rewrites the YAML,
    and sftc reads the same spec back with only that field changed."""
    from sftc.compiler.spec import canonical_spec, load_spec_text

    _run(demo, str(DVC), "exp", "run", "--queue", "-S", "specs/access-policy-lora.yaml:optimizer.lr=3e-3")
    try:
        shown = json.loads(_run(demo, str(DVC), "exp", "show", "--json"))
        queued = [r for entry in shown for exp in entry.get("experiments") or [] for r in exp["revs"]]
        assert len(queued) == 1
        params = queued[0]["data"]["params"]["specs/access-policy-lora.yaml"]["data"]
        assert params["optimizer"]["lr"] == 0.003
        rewritten = _run(demo, "git", "show", f"{queued[0]['rev']}:specs/access-policy-lora.yaml")
        original = canonical_spec(load_spec_text((demo / "specs/access-policy-lora.yaml").read_text(), "HEAD"))
        changed = canonical_spec(load_spec_text(rewritten, "exp"))
        assert changed["optimizer"]["lr"] == 0.003
        changed["optimizer"]["lr"] = original["optimizer"]["lr"]
        assert changed == original
    finally:
        _run(demo, str(DVC), "queue", "remove", "--all")


def test_metrics_and_plots_compare_two_commits(demo):
    _write_records(demo, policy_at_end=0.90)
    try:
        diff = json.loads(_run(demo, str(DVC), "metrics", "diff", "--json"))
        lora = diff["reports/runs/access-policy-lora/metrics.json"]
        assert lora["policy_pass_rate"]["old"] == 0.80 and lora["policy_pass_rate"]["new"] == 0.90
        assert set(lora) == {"policy_pass_rate"}  # nothing else moved: no timing churns a metric

        plots = json.loads(_run(demo, str(DVC), "plots", "diff", "HEAD", "--json"))["data"]

        def points(name):  # the datapoints DVC renders into its vega-lite spec
            (plot,) = plots[name]
            return plot["content"]["data"]["values"]

        loss = points("reports/runs/access-policy-lora/loss.csv")
        revisions = {point["rev"] for point in loss}
        assert revisions == {"HEAD", "workspace"}
        assert sorted({int(p["step"]) for p in loss}) == list(range(8, 145, 8))
        behaviour = points("reports/runs/access-policy-full/behaviour.csv")
        assert {(p["rev"], int(p["step"]), float(p["policy_pass_rate"])) for p in behaviour} >= {
            ("HEAD", 144, 0.80), ("workspace", 144, 0.90)}
        shown = json.loads(_run(demo, str(DVC), "plots", "show", "--json"))
        assert "train-loss-by-parameterization" in json.dumps(shown)
    finally:
        _write_records(demo, policy_at_end=0.80)
