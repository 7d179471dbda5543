# make bench: every benchmark side by side in one run -> benchmarks/results/latest.{json,md} (~16 min on 2 idle cores)
# make bench-quick: the same scripts with fewer rows/steps/repeats, a smoke test (~4 min)
# make test: what CI runs
PYTHON ?= .venv/bin/python

.PHONY: bench bench-quick test

bench:
	$(PYTHON) benchmarks/run_all.py

bench-quick:
	$(PYTHON) benchmarks/run_all.py --quick

test:
	bash .ci/run
