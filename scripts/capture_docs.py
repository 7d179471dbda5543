"""Refresh the captures in docs/tracking.md: the terminal display of `sftc run` and TensorBoard's scalars.

    .venv/bin/python scripts/capture_docs.py [--out DIR] [--steps 90] [--every 30] [--lr 0.01] [--png docs/images/tensorboard-scalars.png]

What it does, all in a temporary project (the repo's runs/ and bundles/ are not touched):

1. builds the test suite's tiny model (demo.tiny_model, hidden 64, 2 layers) and its 48 access-policy-like
   rows and rules (tests/runtime/conftest.py), and compiles a full fine-tune spec with the real compiler;
2. runs `sftc run bundles/<id> --report-to tensorboard` on a real terminal: a detached tmux session of
   120x30, and `tmux capture-pane -p` every couple of seconds (OUT/tty-NNN.txt) and at the end with the
   whole scrollback (OUT/tty-final.txt);
3. starts `tensorboard --logdir runs` in that project and screenshots its Scalars page (filtered to the
   six charts the doc shows, smoothing off) with headless Chromium (`chromium-headless-shell` or
   `chromium`, Debian packages), then shrinks the PNG with pngquant if it is installed.

Needs tmux; the screenshot needs a Chromium (skipped with a message if none is found).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VENV_BIN = Path(sys.executable).parent


def build_project(root: Path, steps: int, every: int, lr: float) -> Path:
    """A tiny project and its compiled bundle (the runtime tests' fixture, with evaluation and selection)."""
    import yaml

    from sftc.compiler import compile_spec
    from tests.conftest import build_tiny_model
    from tests.runtime.conftest import CORPUS, RULES, _rows, base_spec

    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'docs-capture'\n", encoding="utf-8")
    build_tiny_model(root / "model", CORPUS, vocab_size=512, hidden_size=64, num_layers=2)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    (root / "rules.yaml").write_text(RULES, encoding="utf-8")
    spec = base_spec(
        name="tiny-demo",
        schedule={"max_steps": steps},
        checkpoint={"every_steps": every, "keep_last": 2},
        optimizer={"lr": lr, "max_grad_norm": 1.0, "weight_decay": 0.01},
        eval={"rules": "rules.yaml", "max_new_tokens": 48, "batch_size": 8},
        select={"require": {"format_pass_rate": ">= 0.9"}, "maximize": "policy_pass_rate"},
    )
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    bundle, _, _ = compile_spec(path)
    return Path(bundle)


def tmux(*args: str, check: bool = True) -> str:
    return subprocess.run(["tmux", *args], check=check, capture_output=True, text=True).stdout


def capture_terminal(root: Path, bundle: Path, out: Path, width: int, height: int, interval: float) -> None:
    session = f"sftc-docs-{os.getpid()}"
    rel = bundle.relative_to(root)
    shell_env = f"PS1='$ ' PATH={VENV_BIN}:{os.environ.get('PATH', '')} TOKENIZERS_PARALLELISM=false"
    tmux("new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), "-c", str(root),
         f"env {shell_env} bash --norc --noprofile -i")
    try:
        time.sleep(1)
        tmux("send-keys", "-t", session, f"sftc run {rel} --report-to tensorboard; echo EXIT=$?", "Enter")
        n = 0
        while True:
            time.sleep(interval)
            n += 1
            pane = tmux("capture-pane", "-p", "-t", session)
            (out / f"tty-{n:03d}.txt").write_text(pane, encoding="utf-8")
            if "EXIT=" in pane.replace("echo EXIT=", ""):
                break
            if n * interval > 1800:
                raise SystemExit("sftc run did not finish within 30 minutes")
        full = tmux("capture-pane", "-p", "-S", "-", "-E", "-", "-t", session)
        (out / "tty-final.txt").write_text(full, encoding="utf-8")
    finally:
        tmux("kill-session", "-t", session, check=False)


def find_chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


TAGS = r"train/(loss|learning_rate|grad_norm)$|eval/(eval_loss|format_pass_rate|policy_pass_rate)$"


def screenshot_tensorboard(root: Path, png: Path, port: int, window: str, budget_ms: int) -> None:
    """TensorBoard's Scalars dashboard, filtered to train loss / lr / grad norm and sftc's eval metrics,
    smoothing off (the Time Series tab draws its charts lazily and headless shots caught them blank)."""
    import urllib.parse

    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found (apt-get install chromium-headless-shell): screenshot skipped", file=sys.stderr)
        return
    tb = subprocess.Popen([str(VENV_BIN / "tensorboard"), "--logdir", "runs", "--port", str(port),  # relative:
                           "--host", "127.0.0.1"], cwd=root,  # the page shows the logdir as given
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "data/runs", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        time.sleep(3)  # let it load the event files
        png.parent.mkdir(parents=True, exist_ok=True)
        page = url + "#scalars&tagFilter=" + urllib.parse.quote(TAGS, safe="") + "&_smoothingWeight=0"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={png.resolve()}", f"--window-size={window}",
                        f"--virtual-time-budget={budget_ms}", page], check=True, capture_output=True, timeout=180)
    finally:
        tb.terminate()
        tb.wait(timeout=30)
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--quality=60-90", "--output", str(png), str(png)],
                       check=False)
    print(f"{png}: {png.stat().st_size:,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Where the text captures go (default: a temp dir).")
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--every", type=int, default=30, help="Checkpoint (and evaluate) every N steps.")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "images" / "tensorboard-scalars.png")
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--window", default="1120,1030")
    parser.add_argument("--interval", type=float, default=2.0, help="Seconds between terminal captures.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sftc-docs-"))
    out = args.out or work / "captures"
    out.mkdir(parents=True, exist_ok=True)
    root = work / "proj"
    bundle = build_project(root, args.steps, args.every, args.lr)
    capture_terminal(root, bundle, out, 120, 30, args.interval)
    screenshot_tensorboard(root, args.png, args.port, args.window, 10_000)
    print(f"terminal captures: {out}\nproject (delete when done): {root}")


if __name__ == "__main__":
    main()
