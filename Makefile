# mmcli: `make demo` and `make test` are the two commands for a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -q
# a PyTorch wheel index to take torch and torchvision from first (install-cpu sets PyTorch's CPU index)
TORCH_INDEX_URL ?=
CPU_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-cpu demo test test-fast lint lint-imports bench docker clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(if $(TORCH_INDEX_URL),$(BIN)/pip install --index-url $(TORCH_INDEX_URL) torch torchvision)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# CPU only: torch and torchvision from PyTorch's CPU wheels (no CUDA libraries), then mmcli as `make install`
install-cpu:
	$(MAKE) install TORCH_INDEX_URL=$(CPU_INDEX_URL)

demo: $(STAMP)
	$(BIN)/mmcli demo --out demo_out

test: $(STAMP) lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the inner loop: everything but the tests marked slow (CI runs `make test`, all of them)
test-fast: $(STAMP) lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not slow"

# the layer contracts of pyproject.toml [tool.importlinter]: a wrong-way import fails here
lint-imports: $(STAMP)
	$(BIN)/lint-imports

lint: $(STAMP) lint-imports
	$(BIN)/ruff check mmcli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_wsi.py
	$(BIN)/python benchmarks/bench_mri_text.py
	$(BIN)/python benchmarks/bench_fit.py

# CPU image that runs `mmcli serve` (see Dockerfile); TORCH_INDEX_URL=<a PyTorch CPU wheel index> makes it smaller
IMAGE ?= mmcli:latest
docker:
	@command -v docker >/dev/null 2>&1 || { echo "make docker: no docker command on this machine"; exit 1; }
	docker build -t $(IMAGE) $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) .

clean:
	rm -rf $(VENV) demo_out .pytest_cache
