"""A non-editable install works: build the wheel, install it without -e into a fresh environment,
then compile and run a tiny spec from a directory outside the repository.

`pip install -e` hides a missing package-data file or a stray top-level import name (v0.1 read
templates/launch.sh.j2 next to the source tree and crashed on every compile once installed), so
this test installs the wheel itself. The fresh environment reuses the dependencies already
installed in the test's own environment through a .pth line: a .pth line adds a directory but
does not run the .pth files inside it, so the editable install of this checkout stays out.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.runtime.conftest import _rows, base_spec, tiny_model_dir  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy of the tracked files: setuptools writes build/ and *.egg-info into the source
    source = tmp_path_factory.mktemp("source") / "sftc"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (REPO / rel).is_file() and not rel.startswith(("tests/", "benchmarks/", "data/", "reports/")):
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300, cwd=out,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = out.glob("sftc-*.whl")
    return path


def test_wheel_ships_one_import_name_and_its_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sftc"}, f"the wheel installs import names {sorted(top)}"
    assert "sftc/templates/launch.sh.j2" in names
    for package in ("compiler", "runtime", "review"):
        assert any(n.startswith(f"sftc/{package}/") and n.endswith(".py") for n in names), package


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable); returns its python."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
         "--target", purelib, str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    Path(purelib, "sftc_test_deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(deps)), encoding="utf-8")
    return python


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def test_installed_wheel_compiles_and_runs_outside_the_repo(installed, tiny_model_dir, tmp_path):
    project = tmp_path / "elsewhere"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'wheel-test'\n", encoding="utf-8")
    shutil.copytree(tiny_model_dir, project / "model")
    (project / "data").mkdir()
    (project / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    spec = base_spec(schedule={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})
    (project / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    env = _clean_env()

    where = subprocess.run([str(installed), "-c", "import sftc, sys; print(sftc.__file__)\n"
                            "try:\n import compiler\nexcept ImportError: print('no-compiler')\n"
                            "try:\n import runtime\nexcept ImportError: print('no-runtime')"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert str(REPO) not in where.stdout and "no-compiler" in where.stdout and "no-runtime" in where.stdout, where.stdout

    compiled = subprocess.run([str(installed), "-m", "sftc", "compile", "spec.yaml", "--quiet"],
                              cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    bundle = Path(compiled.stdout.strip().splitlines()[-1])
    if not bundle.is_absolute():
        bundle = project / bundle
    assert (bundle / "launch.sh").is_file() and (bundle / "bundle.lock.json").is_file()

    ran = subprocess.run([str(installed), "-m", "sftc", "run", str(bundle)],
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (project / "runs" / bundle.name / "checkpoints" / "checkpoint-2").is_dir()
