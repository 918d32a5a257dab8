# scoutq developer entry points. `make demo` and `make test` work on a fresh clone.
#
# TORCH is the torch requirement pip installs first. The default, plain `torch`, keeps
# whatever build (CUDA or CPU) a user already has or pip picks; CI pins the CPU wheel:
#     make test TORCH='torch==2.13.0'

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
# TORCH_INDEX, when set, is the index torch comes from (https://download.pytorch.org/whl/cpu
# gives the CPU wheel on a machine that would otherwise download a CUDA build).
TORCH_INDEX ?=
BIN := $(VENV)/bin
CACHE ?= .cache/scoutq
STAMP := $(VENV)/.scoutq-installed

.PHONY: install demo release test test-slow test-llama-cpp install-llama-cpp fixtures bench-fixture bench-quantize bench-calibrate bench-eval bench-quality bench-gguf bench-gguf-export bench-tasks bench-peers install-llmc test-llmc bench-gpu bench-distributed clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The main job on the built-in default: the trained tiny Llama 4 (built once, cached), quantized
# to int4 by round-to-nearest and by GPTQ, each evaluated against the bf16 model.
DEMO := $(CACHE)/demo
demo: install
	$(BIN)/scoutq fixture $(CACHE)/tiny-trained --preset tiny-trained --reuse
	$(BIN)/scoutq quantize $(CACHE)/tiny-trained --recipe w4a16-g128 --out $(DEMO)/tiny-trained-w4a16-g128 --overwrite
	$(BIN)/scoutq quantize $(CACHE)/tiny-trained --recipe w4a16-g128-gptq --out $(DEMO)/tiny-trained-w4a16-g128-gptq --overwrite
	$(BIN)/scoutq eval $(DEMO)/tiny-trained-w4a16-g128 --reference $(CACHE)/tiny-trained --latency \
		--json $(DEMO)/w4a16-g128.eval.json --markdown $(DEMO)/w4a16-g128.eval.md --plots $(DEMO)/plots-w4a16-g128
	$(BIN)/scoutq eval $(DEMO)/tiny-trained-w4a16-g128-gptq --reference $(CACHE)/tiny-trained --latency \
		--json $(DEMO)/w4a16-g128-gptq.eval.json --markdown $(DEMO)/w4a16-g128-gptq.eval.md --plots $(DEMO)/plots-w4a16-g128-gptq

# Release artifacts: each recipe's checkpoint, manifest, eval report (JSON + Markdown) and one
# SHA256SUMS, in $(DIST). SRC defaults to the tiny-trained fixture.
SRC ?= $(CACHE)/tiny-trained
RECIPES ?= w4a16-g128 w4a16-g128-gptq
DIST ?= dist
release: install
	$(if $(filter $(CACHE)/tiny-trained,$(SRC)),$(BIN)/scoutq fixture $(SRC) --preset tiny-trained --reuse)
	$(BIN)/python -m scoutq.release --src "$(SRC)" --recipes "$(RECIPES)" --dist "$(DIST)"

# The trained fixture the test suite and later demos use (a few minutes, cached).
fixtures: install
	$(BIN)/scoutq fixture $(CACHE)/tiny-trained --preset tiny-trained --reuse

test: install
	$(BIN)/python -m pytest -q

# llama.cpp itself, the consumer of the GGUF files: llama-cpp-python builds it from source (about
# 8 minutes on 2 cores, once per venv). Pinned so the stated tolerances meet the llama.cpp they
# were measured against.
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed
install-llama-cpp: $(LLAMA_CPP_STAMP)

# Built without AMX: on CPUs that have it, llama.cpp's AMX weight repacking segfaults in decode on
# these Q8_0 / Q4_0 files (seen here; ggml-org/llama.cpp#20824 reports the same crash). GCC keeps
# explicit -mno-* ISA flags over -march=native, so every other native path stays as it is.
# --no-cache-dir: a wheel pip cached from a build with AMX would otherwise be reused.
LLAMA_CPP_CMAKE ?= -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
$(LLAMA_CPP_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/python -m pip install --quiet --no-cache-dir "$(LLAMA_CPP)"
	touch $@

# The GGUF files checked by llama.cpp: loading, logits against scoutq's runtime, greedy text, the
# tokenizer. Figures land in $(CACHE)/llama-cpp-results.json.
test-llama-cpp: install-llama-cpp
	SCOUTQ_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -q -m llama_cpp tests/gguf_llama_cpp
	cat $(CACHE)/llama-cpp-results.json

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

# The calibrated layer walk (GPTQ, 32 sequences of 512 tokens) on 2 real-Scout-shape layers:
# wall time and peak RSS against its budget (hidden states + one layer + one expert and its
# statistics; target at most 8 GB). Needs ~20 GB of disk. CALIBRATE_RECIPE=w4a16-g128-gptaq
# measures GPTQ with full-precision targets (a second stream of hidden states) instead.
CALIBRATE_RECIPE ?= w4a16-g128-gptq
bench-calibrate: install
	$(BIN)/python -m scoutq.bench.calibrate --layers 2 --samples 32 --seq-len 512 --recipe $(CALIBRATE_RECIPE) \
		--dir $(BENCH_DIR)

# The layer-walked eval (a w4a16-g128 quantization against its bf16 source, both walked one
# layer at a time) on 3 real-Scout-shape layers: time and peak RSS (target at most 6 GB).
bench-eval: install
	$(BIN)/python -m scoutq.bench.evaluate --layers 3 --samples 8 --seq-len 512 --dir $(BENCH_DIR)

# The quality table: bf16 vs RTN, clipping and GPTQ at int8 and int4 on tiny-trained (held-out
# text, every window), through `scoutq eval`. About 5 minutes on 2 cores.
bench-quality: install
	$(BIN)/python -m scoutq.bench.quality

# GGUF quality on tiny-trained held-out text: scoutq's gguf-q4_0, gguf-q4_0-gptaq and gguf-q4_k beside
# llama.cpp's own Q4_0 and Q4_K_M made by its quantizer from scoutq's BF16 GGUF, all scored by
# `scoutq eval` against the bf16 checkpoint. Needs llama-cpp-python (built on first use).
bench-gguf: install-llama-cpp
	$(BIN)/python -m scoutq.bench.gguf --dir $(CACHE)/bench-gguf

# The streamed GGUF export (gguf-q4_0, gguf-q4_k) of 2 real-Scout-shape layers: time and peak RSS
# (target at most 1.5 GB). Needs ~20 GB of disk.
bench-gguf-export: install
	$(BIN)/python -m scoutq.bench.gguf_export --layers 2 --dir $(BENCH_DIR)

# Task accuracy through lm-evaluation-harness on tiny-trained: bf16 against w4a16-g128 and
# w4a16-g128-gptaq on the offline tasks (score, stderr, recovery); reports in $(CACHE)/tasks/.
TASKS ?= scoutq_offline
TASK_RECIPES ?= w4a16-g128 w4a16-g128-gptaq
bench-tasks: install
	$(BIN)/scoutq fixture $(CACHE)/tiny-trained --preset tiny-trained --reuse
	for recipe in $(TASK_RECIPES); do \
		$(BIN)/scoutq quantize $(CACHE)/tiny-trained --recipe $$recipe --out $(CACHE)/tasks/tiny-$$recipe --overwrite \
		&& $(BIN)/scoutq eval $(CACHE)/tasks/tiny-$$recipe --reference $(CACHE)/tiny-trained --tasks $(TASKS) \
			--json $(CACHE)/tasks/$$recipe.json --markdown $(CACHE)/tasks/$$recipe.md || exit 1; \
	done

# The neutral judge: tiny-trained quantized by scoutq (RTN, GPTQ, GPTAQ), by llm-compressor (RTN,
# GPTQ; from its own venv, skipped with one line without it) and by transformers' bitsandbytes nf4,
# all judged in one `scoutq eval` run. Table in $(CACHE)/bench-peers/judged.md.
LLMC_VENV ?= .cache/llmc-venv
LLMC ?= llmcompressor==0.14.*
LLMC_STAMP := $(LLMC_VENV)/.llmc-installed
install-llmc: $(LLMC_STAMP)

$(LLMC_STAMP):
	$(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/python -m pip install --quiet "$(TORCH)" "$(LLMC)" && touch $@ \
		|| echo "llm-compressor did not install; bench-peers runs without it"

# Checkpoints made by llm-compressor itself (its venv), decoded by scoutq as compressed-tensors does.
test-llmc: install install-llmc
	SCOUTQ_REQUIRE_LLMC=1 $(BIN)/python -m pytest -q -m llmc tests/foreign_llmc

bench-peers: install install-llmc
	$(BIN)/python -m scoutq.bench.peers --dir $(CACHE)/bench-peers --llmc-python $(LLMC_VENV)/bin/python

# What a lent GPU machine runs in one go: scout-layers (2 real-shape layers), RTN, the GPTQ layer
# walk on CUDA with 1 rank and one rank per GPU (sha256 of each output), the kernel and MoE
# benchmarks and the GPU tests, as one table. Needs ~20 GB of disk.
bench-gpu: install
	$(BIN)/python -m scoutq.bench.gpu --layers 2 --samples 32 --seq-len 512 --dir $(BENCH_DIR)

# The calibrated layer walk of 2 real-shape layers with 1 and 2 CPU ranks (gloo): wall time,
# speed-up, peak RSS of the largest rank, sha256 (equal for any number of ranks), and the
# projected time of the 48-layer Scout. Needs ~20 GB of disk; about an hour on 2 cores.
bench-distributed: install
	$(BIN)/python -m scoutq.bench.distributed --layers 2 --samples 32 --seq-len 512 --dir $(BENCH_DIR)
