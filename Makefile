# The two commands of the README: `make pretrain` and `make test`. Each runs the idempotent
# set-up first, so a fresh clone needs nothing else.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup pretrain test bench clean

setup:
	@bash scripts/setup.sh

pretrain: setup
	$(PY) -m spark_sparse.pretrain $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) -m benchmarks.sparse_vs_dense $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
