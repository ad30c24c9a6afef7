# Everyday commands. `just --list` shows them.

# install moestream with the preparation pipeline and the test tools
setup:
    pip install -e '.[test]'

# the README's first command: prepare the trained fixture, answer a tool call inside a small budget
demo:
    moestream demo

# the README's second command (what CI runs)
test:
    python -m pytest -q

# the fast suite: everything but the tests that run Prefect, Dask or whole commands in subprocesses
test-fast:
    python -m pytest -q -m "not slow"

# benchmarks on this machine: print figures, never assert timings (bench/results/README.md says
# which file each one's output became; the H200 one is bench/stream_e2e.py)
bench:
    python bench/prepare_vs_convert.py
    python bench/runtime_small.py
    python bench/reader_compare.py

# that every bench script still imports and runs on a tiny model
bench-check:
    python -m pytest -q tests/test_bench_scripts.py

# the bundle fuzzer's long run: 1000 seeded mutations, a table of how each ended
fuzz:
    python tests/fuzz_bundles.py --cases 1000 --seed 0

lint:
    ruff check .
