.PHONY: check test bench
check:
	scripts/check
test:
	.venv/bin/pytest -q
bench:
	.venv/bin/python bench/compile.py && .venv/bin/python bench/pairwise.py \
		&& .venv/bin/python -m bench.throughput && .venv/bin/python -m bench.ratelimit \
		&& .venv/bin/python -m bench.scaling && .venv/bin/python -m bench.dag && .venv/bin/python bench/ui.py
