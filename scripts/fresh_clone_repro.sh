#!/usr/bin/env bash
# Cross-machine reproducibility, as a release check (too slow for CI: ~25 min on 2 cores).
# A fresh clone at another path installs everything and runs the README's main command; the
# dvc.lock it leaves must be the committed one, byte for byte: data, models, bundles, runs,
# exports and reports hash the same on any machine and path (clock readings live in files
# .dvcignore keeps out of the hashes).
#   bash scripts/fresh_clone_repro.sh [PARENT_DIR]
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
parent="${1:-$(mktemp -d /tmp/sftc-fresh-XXXXXX)}"
dir="$parent/sftc-clone"
git clone -q "$src" "$dir"
cd "$dir"
bash scripts/setup.sh
start=$(date +%s)
.venv/bin/dvc repro
echo "dvc repro in the fresh clone: $(( $(date +%s) - start )) s"
if git diff --exit-code --stat dvc.lock; then
  echo "dvc.lock reproduced byte for byte in $dir"
else
  git diff dvc.lock | head -60
  echo "dvc.lock differs from the committed one (above)" >&2
  exit 1
fi
