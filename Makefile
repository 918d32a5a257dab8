# scoutq developer entry points. `make demo` and `make test` work on a fresh clone.
#
# TORCH is the torch requirement pip installs first. The default, plain `torch`, keeps
# whatever build (CUDA or CPU) a user already has or pip picks; CI pins the CPU wheel:
#     make test TORCH='torch==2.13.0'

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
BIN := $(VENV)/bin
CACHE ?= .cache/scoutq
STAMP := $(VENV)/.scoutq-installed

.PHONY: install demo test test-slow fixtures bench-fixture bench-quantize clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The main job on the built-in default: the trained tiny Llama 4, quantized to int4, verified.
demo: install
	$(BIN)/scoutq fixture $(CACHE)/tiny-trained --preset tiny-trained --reuse
	$(BIN)/scoutq quantize $(CACHE)/tiny-trained --recipe w4a16-g128 --out $(CACHE)/demo/tiny-trained-w4a16-g128 --overwrite
	$(BIN)/scoutq verify $(CACHE)/demo/tiny-trained-w4a16-g128
	$(BIN)/scoutq inspect $(CACHE)/demo/tiny-trained-w4a16-g128

# The trained fixture the test suite and later demos use (a few minutes, cached).
fixtures: install
	$(BIN)/scoutq fixture $(CACHE)/tiny-trained --preset tiny-trained --reuse

test: install
	$(BIN)/python -m pytest -q

# Tests that build multi-GB real-Scout-shape fixtures (minutes, ~20 GB of disk).
test-slow: install
	$(BIN)/python -m pytest -q --run-slow -m slow

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Memory and time of building a real-Scout-shape layer fixture and of inspecting it
# (headers only: the target is well under 1.5 GB of peak RSS). Needs ~9 GB of disk.
BENCH_DIR ?= .cache/scoutq/bench
bench-fixture: install
	$(BIN)/python -m scoutq.bench.peak_rss -- $(BIN)/scoutq fixture $(BENCH_DIR)/scout-layers-1 --preset scout-layers --layers 1 --reuse
	$(BIN)/python -m scoutq.bench.peak_rss -- $(BIN)/scoutq inspect $(BENCH_DIR)/scout-layers-1

# Quantization throughput (GB/s of bf16 input, and as a ratio to a plain read of the same
# files) and peak RSS, for 1 and 3 real-Scout-shape layers. Needs ~40 GB of disk.
bench-quantize: install
	$(BIN)/python -m scoutq.bench.quantize --layers 1 --layers 3 --dir $(BENCH_DIR)
