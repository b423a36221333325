# Two entry points for a fresh machine (Python 3.11 with venv, make):
#   make demo   installs everything, prepares SmolLM2, serves it with --enable-hierarchical-kv
#   make test   installs everything, prepares SmolLM2, runs the test suite (all tiers but the
#               `extended` variants: what CI runs)
#   make test-all  the same with every test
#   make bench  installs everything, prepares SmolLM2, runs the RAG comparison (table + plot)
#   make soak   installs everything, prepares SmolLM2, runs the 30-minute memory soak
#   make gpu-wheels  downloads the wheels bench/gpu/check.sh installs on a GPU machine that has
#               no package index (CPython 3.12, x86_64: the project's H200 image)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install model demo test test-all bench soak gpu-wheels

# uv installs the ~10 GB of wheels in parallel, where pip took ~4-5 min on a 2-core CI
# machine. --compile-bytecode, as pip does by default: SGLang spawns its scheduler with
# `python -B` (no .pyc written), so without it every server start compiled sglang's modules
# again (~2x slower starts, 2026-12-05). pip stays the fallback, e.g. where only pip's
# configured indexes answer (uv reads no pip.conf). Temporary files and the cache stay beside
# the venv (a small tmpfs /tmp must not fail the install) and the cache goes after it (uv
# hard-links it into the venv: removing it frees nothing the venv needs).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(VENV)/pip-tmp
	TMPDIR=$(abspath $(VENV))/pip-tmp $(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip uv
	TMPDIR=$(abspath $(VENV))/pip-tmp UV_CACHE_DIR=$(abspath $(VENV))/uv-cache \
		$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[test]' \
	|| TMPDIR=$(abspath $(VENV))/pip-tmp $(BIN)/python -m pip install --quiet --no-cache-dir -e '.[test]'
	rm -rf $(VENV)/pip-tmp $(VENV)/uv-cache
	touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/sgl-kvext model prepare

demo: model
	$(BIN)/sgl-kvext demo

bench: model
	$(BIN)/sgl-kvext-bench rag --json results/rag.json

# float32: on CPUs without bf16 matmul units (AVX2 only) bf16 prefill is ~7x slower, and
# the soak should spend its 30 minutes serving, not waiting on one prefill.
soak: model
	$(BIN)/sgl-kvext-bench soak --json results/soak.json --server-args "--dtype float32"

# The unit and kernel tiers run beside the server tiers (tests/run_tiers.py says why).
test: model
	$(BIN)/python tests/run_tiers.py

test-all: model
	$(BIN)/python -m pytest -q

GPU_PY ?= 312
gpu-wheels:
	mkdir -p .gpu-wheels
	$(PYTHON) -m pip download --quiet --no-deps -d .gpu-wheels pytest pluggy iniconfig packaging \
		pytest-xdist execnet pycparser
	$(PYTHON) -m pip download --quiet --no-deps -d .gpu-wheels --only-binary=:all: \
		--python-version $(GPU_PY) --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 zstandard xxhash cryptography cffi
