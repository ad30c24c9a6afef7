# Everyday commands. `just --list` shows them.

# install moestream with the preparation pipeline and the test tools
setup:
    pip install -e '.[test]'

# the README's first command: synth a small MoE, prepare it, generate inside a small budget
demo:
    moestream demo

# the README's second command (what CI runs)
test:
    python -m pytest -q

# the fast suite: everything but the tests that run Prefect, Dask or whole commands in subprocesses
test-fast:
    python -m pytest -q -m "not slow"

# benchmarks: print figures, never assert timings
bench:
    python bench/prepare_vs_convert.py
    python bench/runtime_small.py

lint:
    ruff check .
