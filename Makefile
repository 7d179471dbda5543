# make bench: every benchmark side by side in one run -> benchmarks/results/latest.{json,md} (~16 min on 2 idle cores).
#   It reads DVC outputs (models/access-base, data/access_policy) and $SFTC_EXTERNAL; when one is
#   missing it names the command that makes it (`dvc repro pretrain`, ...) and exits non-zero.
#   A benchmark that fails leaves latest.* as it was and the make target fails.
# make bench-quick: the same scripts with fewer rows/steps/repeats, a smoke test (~4 min)
# make bench-scaling: the compile at 40k..3M synthetic rows (about an hour; sizes predicted past
#   10 minutes are reported as extrapolated, not run)
# make test: what CI runs
PYTHON ?= .venv/bin/python

.PHONY: bench bench-quick bench-scaling test

bench:
	$(PYTHON) benchmarks/run_all.py

bench-quick:
	$(PYTHON) benchmarks/run_all.py --quick

bench-scaling:
	$(PYTHON) benchmarks/run_all.py --only scaling

test:
	bash .ci/run
